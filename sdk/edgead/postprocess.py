"""The one definition of post-processing (NumPy reference).

EfficientAD: from the normalised teacher output T (N,C,h,w), the student output
S (N,2C,h,w) and the autoencoder output A (N,C,h,w):

    local  = mean_c (T - S[:, :C])^2          global = mean_c (A - S[:, C:])^2
    local' = 0.1 * (local - qa_st) / (qb_st - qa_st)    (qa -> 0, qb -> 0.1)
    global'= 0.1 * (global - qa_ae) / (qb_ae - qa_ae)
    map    = pad(0.5 * local' + 0.5 * global', pad, mode=edge)
    score  = max(map)                          (per image, at model resolution)

The padding band (the border an unpadded PDN does not see) repeats the nearest seen value. The
reference implementation pads with 0, but 0 is not "normal" here: it is the 0.9 quantile of the good
images' map, so a zero band sits above about 90 % of the normal pixels, outranks them in pixel
metrics (pixel AUROC below 0.5 on real sets where defects are interior) and floors every score at 0.

The map is then resized bilinearly (half-pixel centres, as cv2.INTER_LINEAR and
torch's align_corners=False) to the frame size. The ONNX in-graph variant and the
CUDA kernels in kernels/postprocess implement exactly this and are tested against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, InputError, message

__all__ = [
    "QuantileAffine",
    "EfficientADPost",
    "efficientad_maps",
    "merge_maps",
    "efficientad_postprocess",
    "resize_bilinear",
    "image_scores",
]


MAX_PAD = 64  # map padding cells; EfficientAD uses 4 (a bigger value only allocates memory)


@dataclass(frozen=True)
class QuantileAffine:
    """Affine map sending the quantile value ``qa`` to 0 and ``qb`` to 0.1."""

    qa: float
    qb: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.qa) and np.isfinite(self.qb)) or self.qb <= self.qa:
            raise ConfigError(
                message("quantiles", f"qa={self.qa}, qb={self.qb}", "finite values with qb > qa", "re-run calibration on more (and varied) good images")
            )

    @property
    def scale(self) -> float:
        return 0.1 / (self.qb - self.qa)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (x - self.qa) * self.scale


@dataclass(frozen=True)
class EfficientADPost:
    """Constants of EfficientAD post-processing, as stored in the bundle manifest."""

    st: QuantileAffine
    ae: QuantileAffine
    pad: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or not 0 <= self.pad <= MAX_PAD:
            raise ConfigError(message("pad", self.pad, f"an integer in 0..{MAX_PAD}", "use 4 for unpadded PDNs and 0 for padded ones"))


def _check_outputs(teacher: np.ndarray, student: np.ndarray, ae: np.ndarray) -> int:
    if teacher.ndim != 4 or student.ndim != 4 or ae.ndim != 4:
        raise InputError(message("network outputs", (teacher.shape, student.shape, ae.shape), "three NCHW arrays", "pass teacher, student and autoencoder outputs"))
    n, c, h, w = teacher.shape
    if student.shape != (n, 2 * c, h, w) or ae.shape != (n, c, h, w):
        raise InputError(
            message("network output shapes", f"teacher {teacher.shape}, student {student.shape}, ae {ae.shape}", f"student (N,2C,h,w)={n, 2 * c, h, w}, ae {teacher.shape}", "check the model export")
        )
    return c


def efficientad_maps(teacher: np.ndarray, student: np.ndarray, ae: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw local (teacher vs student) and global (autoencoder vs student) maps, (N,h,w) float32."""
    c = _check_outputs(teacher, student, ae)
    t = teacher.astype(np.float64)
    s = student.astype(np.float64)
    a = ae.astype(np.float64)
    local = np.mean((t - s[:, :c]) ** 2, axis=1)
    glob = np.mean((a - s[:, c:]) ** 2, axis=1)
    return local.astype(np.float32), glob.astype(np.float32)


def efficientad_postprocess(teacher: np.ndarray, student: np.ndarray, ae: np.ndarray, post: EfficientADPost) -> tuple[np.ndarray, np.ndarray]:
    """Normalised merged maps (N, h+2p, w+2p) float32 and image scores (N,) float32."""
    return merge_maps(*efficientad_maps(teacher, student, ae), post)


def merge_maps(local: np.ndarray, glob: np.ndarray, post: EfficientADPost) -> tuple[np.ndarray, np.ndarray]:
    """Raw local / global maps (``efficientad_maps``) -> normalised merged maps and image scores."""
    merged = 0.5 * post.st.apply(local.astype(np.float64)) + 0.5 * post.ae.apply(glob.astype(np.float64))
    p = post.pad
    if p:
        merged = np.pad(merged, ((0, 0), (p, p), (p, p)), mode="edge")
    maps = merged.astype(np.float32)
    return maps, image_scores(maps)


def image_scores(maps: np.ndarray) -> np.ndarray:
    """Per-image score: the maximum of each map."""
    return maps.reshape(maps.shape[0], -1).max(axis=1).astype(np.float32)


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, None)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    return i0, i1, frac


def resize_bilinear(maps: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize of (N,h,w) maps with half-pixel centres (cv2.INTER_LINEAR semantics)."""
    if maps.ndim != 3:
        raise InputError(message("maps", maps.shape, "an (N,h,w) array", "pass a batch of 2-D maps"))
    if out_h <= 0 or out_w <= 0:
        raise InputError(message("output size", (out_h, out_w), "positive height and width", "pass the frame's size"))
    y0, y1, fy = _axis_weights(maps.shape[1], out_h)
    x0, x1, fx = _axis_weights(maps.shape[2], out_w)
    m = maps.astype(np.float64)
    top = m[:, y0][:, :, x0] * (1 - fx) + m[:, y0][:, :, x1] * fx
    bottom = m[:, y1][:, :, x0] * (1 - fx) + m[:, y1][:, :, x1] * fx
    out = top * (1 - fy)[None, :, None] + bottom * fy[None, :, None]
    return out.astype(np.float32)
