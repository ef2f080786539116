"""Calibration of a trained EfficientAD on held-out good images (never on test images).

Two things are fitted, both from normal images only:

* the quantile constants of post-processing: ``qa`` / ``qb`` (0.9 / 0.995 by default) of the raw
  local (teacher vs student) and global (autoencoder vs student) maps, taken over all pixels of all
  validation images at feature resolution (before padding and resizing), as the reference implementation;
* the image threshold: a documented statistic of the validation image scores computed with
  ``edgead.postprocess.merge_maps`` (the runtime's definition; with a tiling, an image's score is the
  max over its tiles). Methods: ``"max"`` (no validation image is flagged), ``"quantile:Q"`` (e.g.
  ``"quantile:0.99"``: about 1 - Q of good parts rejected) or ``"sigma:K"`` (mean + K standard
  deviations). The default, ``DEFAULT_THRESHOLD = "sigma:4"``, was chosen on the real sets for the most
  predictable false-reject rate (docs/results.md, section 7). The validation scores are kept in the run, so ``edgead eval`` can show every rule's
  operating point without recomputing anything.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from edgead.errors import ConfigError, DataError, message
from edgead.postprocess import EfficientADPost, QuantileAffine, efficientad_maps, merge_maps

from .efficientad.models import EfficientAD
from .efficientad.run import Calibration

__all__ = ["QA", "QB", "THRESHOLD_METHODS", "DEFAULT_THRESHOLD", "model_maps", "fit_quantiles", "fit_threshold", "frame_scores", "calibrate"]

log = logging.getLogger(__name__)

QA = 0.9
QB = 0.995
THRESHOLD_METHODS = ("max", "quantile:Q", "sigma:K")
DEFAULT_THRESHOLD = "sigma:4"  # mean + 4 std: the most predictable false-reject rate on the measured sets (docs/results.md, section 7)


@torch.no_grad()
def model_maps(model: EfficientAD, images: np.ndarray | torch.Tensor, *, batch_size: int = 8, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Run the model in eval mode on prepared NCHW images; return the raw (N, h, w) local and global maps.

    Batch by batch: only the one-channel maps are kept, never the 1536 feature channels of every image (a tiled
    set's hundreds of tiles would need tens of GB).

    >>> m = EfficientAD("s", 128).eval()
    >>> [o.shape for o in model_maps(m, np.zeros((2, 3, 128, 128), np.float32))]
    [(2, 24, 24), (2, 24, 24)]
    """
    if len(images) == 0:
        raise DataError(message("images", "an empty batch", "at least one prepared image", "pass validation images"))
    if batch_size < 1:
        raise ConfigError(message("batch_size", batch_size, "an integer >= 1", "pass --batch-size 8"))
    was_training = model.training
    model.eval()
    local: list[np.ndarray] = []
    glob: list[np.ndarray] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            x = torch.as_tensor(np.asarray(chunk) if not isinstance(chunk, torch.Tensor) else chunk, dtype=torch.float32).to(device)
            t, s, a = (o.float().cpu().numpy() for o in model(x))
            lo, gl = efficientad_maps(t, s, a)
            local.append(lo)
            glob.append(gl)
    finally:
        model.train(was_training)
    return np.concatenate(local), np.concatenate(glob)


def _check_q(qa: float, qb: float) -> None:
    if not (0.0 < qa < qb < 1.0):
        raise ConfigError(message("calibration quantiles", f"qa={qa}, qb={qb}", "0 < qa < qb < 1", "use the paper's qa=0.9, qb=0.995"))


def fit_quantiles(local: np.ndarray, glob: np.ndarray, qa: float = QA, qb: float = QB) -> tuple[QuantileAffine, QuantileAffine]:
    """Quantile constants of the raw (N,h,w) local and global maps over all pixels.

    >>> st, ae = fit_quantiles(np.arange(100.0).reshape(1, 10, 10), np.arange(100.0).reshape(1, 10, 10) * 2)
    >>> round(st.qa, 2), round(ae.qb, 2)
    (89.1, 197.01)
    """
    _check_q(qa, qb)
    out = []
    for name, maps in (("local", local), ("global", glob)):
        values = np.asarray(maps, dtype=np.float64).ravel()
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise DataError(message(f"{name} validation maps", f"{values.size} values (finite: {bool(np.all(np.isfinite(values)))})", "finite values", "check the training run (loss diverged?)"))
        lo, hi = np.quantile(values, [qa, qb])
        if not hi > lo:
            raise DataError(
                message(f"{name} map quantiles", f"q{qa}={lo}, q{qb}={hi}", "q_b > q_a", "use more (and varied) validation images: raise --val-fraction")
            )
        out.append(QuantileAffine(float(lo), float(hi)))
    return out[0], out[1]


def parse_threshold_method(method: str) -> tuple[str, float | None]:
    """'max' -> ('max', None); 'quantile:0.99' -> ('quantile', 0.99); 'sigma:3' -> ('sigma', 3.0); else ConfigError."""
    text = str(method).strip().lower()
    if text == "max":
        return "max", None
    kind, _, arg = text.partition(":")
    try:
        value = float(arg)
    except ValueError:
        value = float("nan")
    if (kind == "quantile" and 0.0 < value < 1.0) or (kind == "sigma" and 0.0 <= value <= 20.0):
        return kind, value
    raise ConfigError(
        message("threshold method", repr(method), "'max', 'quantile:Q' with 0 < Q < 1, or 'sigma:K' with 0 <= K <= 20", "pass --threshold quantile:0.99 or --threshold sigma:3")
    )


def fit_threshold(scores: Sequence[float] | np.ndarray, method: str = "max") -> tuple[float, str]:
    """Image threshold from the scores of good validation images; returns (threshold, description).

    >>> fit_threshold([0.1, 0.3, 0.2])
    (0.3, 'max of 3 validation-good image scores')
    """
    kind, q = parse_threshold_method(method)
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise DataError(message("validation image scores", f"{values.size} values", "at least one finite score", "hold out more good images (--val-fraction)"))
    if kind == "max":
        return float(values.max()), f"max of {values.size} validation-good image scores"
    assert q is not None
    if kind == "sigma":
        return float(values.mean() + q * values.std()), f"mean + {q:g} std of {values.size} validation-good image scores"
    return float(np.quantile(values, q)), f"quantile {q} (linear) of {values.size} validation-good image scores"


def frame_scores(scores: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """Per-image scores from per-row (tile) scores: the max over the rows of each image.

    >>> frame_scores(np.array([0.1, 0.5, 0.2]), np.array([0, 0, 1])).tolist()
    [0.5, 0.2]
    """
    if groups is None:
        return np.asarray(scores, np.float64)
    groups = np.asarray(groups)
    if groups.shape != np.shape(scores):
        raise ConfigError(message("groups", groups.shape, f"one image index per row {np.shape(scores)}", "pass the owner array of prepare_images"))
    out = np.full(int(groups.max()) + 1, -np.inf)
    np.maximum.at(out, groups, np.asarray(scores, np.float64))
    return out


def calibrate(
    model: EfficientAD,
    val_images: np.ndarray | torch.Tensor,
    *,
    qa: float = QA,
    qb: float = QB,
    threshold_method: str = DEFAULT_THRESHOLD,
    batch_size: int = 8,
    device: str = "cpu",
    groups: np.ndarray | None = None,
) -> Calibration:
    """Fit quantiles and the image threshold on prepared good validation images (``groups``: the image
    each row belongs to when rows are tiles; the threshold is then fitted on per-image scores).

    >>> cal = calibrate(EfficientAD("s", 128), np.random.rand(2, 3, 128, 128).astype(np.float32))  # doctest: +SKIP
    """
    parse_threshold_method(threshold_method)
    local, glob = model_maps(model, val_images, batch_size=batch_size, device=device)
    st, ae = fit_quantiles(local, glob, qa, qb)
    post = EfficientADPost(st, ae, model.map_pad)
    _, tile_scores = merge_maps(local, glob, post)
    scores = frame_scores(tile_scores, groups)
    threshold, description = fit_threshold(scores, threshold_method)
    log.info("calibration on %d good images: st %.4g/%.4g ae %.4g/%.4g, threshold %.4f (%s)", len(scores), st.qa, st.qb, ae.qa, ae.qb, threshold, description)
    return Calibration(st.qa, st.qb, ae.qa, ae.qb, threshold, description, int(len(scores)), [float(v) for v in scores])
