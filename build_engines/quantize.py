"""INT8 static quantisation of the merged graph (ONNX Runtime, QDQ format).

Weights: per-channel symmetric INT8. Activations: per-tensor INT8, min/max-calibrated on good images
(the run's training folder by default) read and preprocessed exactly as at run time
(``edgead.datasets.read_image`` + ``edgead.preprocess.prepare``). Only convolutions are
quantised, and not all of them (``float_convs``); measured on the real sets (docs/benchmarks.md):

- the post-processing tail (squared differences, channel means, affine, pad, max) stays FP32:
  the score is a small difference of two feature maps;
- the first convolution of every network (the ones reading the image) stays FP32: quantising the
  normalised image to 8 bits per tensor dropped the local map's correlation with FP32 to 0.65-0.85
  on the real sets (0.9999 without it), and a 3-channel input convolution gains nothing from INT8;
- the autoencoder stays FP32: with it in INT8 bsdata lost 1.4 AUROC points through the global map;
  in FP32 it costs about 4 % of the INT8 throughput.

INT8 thus covers the teacher's and student's bodies, 92 % of the FLOPs (``scripts/int8_sensitivity.py``
reproduces the study). Min/max calibration is the
default because it reproduced the FP32 scores at least as closely as the 99.999th percentile on all three
real sets (mean score error 0.6-1.2 % of the score spread against 0.6-2.7 %).

Two activation schemes (``target``):

- ``"onnxruntime"`` (default): unsigned 8-bit asymmetric activations (U8S8). ONNX Runtime on x86
  fuses every quantised convolution into QLinearConv with this scheme; with signed symmetric
  activations it left some in FP32 (the student's last, ~26 % of the FLOPs, among them).
- ``"tensorrt"``: signed symmetric activations (zero point 0), the only form TensorRT accepts
  (``edgead build --precision int8`` checks this).

Biases stay float in both (TensorRT's DequantizeLinear takes INT8 only).

>>> quantize_merged("b/model_merged.onnx", "b/model_merged_int8.onnx", "data/train/good", 256)  # doctest: +SKIP
PosixPath('b/model_merged_int8.onnx')
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgead.datasets import IMAGE_EXTENSIONS
from edgead.errors import ConfigError, DataError, MissingDependencyError, message
from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare
from edgead.tiling import Tiling

__all__ = [
    "FLOAT_MODULES",
    "calibration_images",
    "float_convs",
    "FolderCalibrationReader",
    "quantize_merged",
    "rank_correlation",
    "main",
]

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
INT8_TARGETS = ("onnxruntime", "tensorrt")
FLOAT_MODULES = ("autoencoder",)  # sub-networks of the exported graph (``export.RawGraph``) kept in floating point


def float_convs(model: Any, modules: Sequence[str] = FLOAT_MODULES) -> list[str]:
    """Names of the Conv nodes that stay floating point: those reading a graph input (padded or not), and those of ``modules``.

    Module membership comes from the exporter's node names (``/raw/<module>/...``); a module that
    matches no convolution is refused rather than silently quantised.
    """
    inputs = {i.name for i in model.graph.input}
    for n in model.graph.node:  # the image padded ("same" padding of the Lite backbones) is still the image
        if n.op_type == "Pad" and n.input[0] in inputs:
            inputs.add(n.output[0])
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    keep = [n.name for n in convs if n.input[0] in inputs]
    for module in modules:
        found = [n.name for n in convs if f"/{module}/" in n.name and n.name not in keep]
        if not found and not any(f"/{module}/" in name for name in keep):
            raise ConfigError(
                message(
                    "float module",
                    repr(module),
                    "a sub-network of the exported graph (node names /raw/<module>/...)",
                    "re-export the bundle with this edgead version",
                )
            )
        keep += found
    return keep


def calibration_images(folder: str | Path, max_images: int = 64, seed: int = 0) -> list[Path]:
    """Up to ``max_images`` image files of ``folder`` (a reproducible random subset when there are more)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(message("INT8 calibration folder", str(folder), "an existing folder of good images", "pass --int8-images DIR"))
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataError(
            message(
                "INT8 calibration folder", f"{folder} (no {'/'.join(IMAGE_EXTENSIONS)} files)", "at least one good image", "point --int8-images at train/good"
            )
        )
    if max_images < 1:
        raise ConfigError(message("max_images", max_images, "an integer >= 1", "pass --int8-max-images 64"))
    if len(files) > max_images:
        idx = np.random.default_rng(seed).choice(len(files), max_images, replace=False)
        files = [files[i] for i in sorted(idx)]
    return files


def _reader_base() -> type:
    try:
        from onnxruntime.quantization import CalibrationDataReader
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "cpu", "INT8 quantisation") from exc
    return CalibrationDataReader


class FolderCalibrationReader(_reader_base()):  # type: ignore[misc]
    """Feeds preprocessed good images, one per batch, to ONNX Runtime's calibrator."""

    def __init__(
        self,
        files: Sequence[Path],
        image_size: int,
        input_name: str = "image",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        tiling: Tiling | None = None,
    ) -> None:
        from edgead.datasets import image_color, read_image

        self._batches: list[dict[str, np.ndarray]] = []
        for path in files:
            frame = read_image(path)
            for piece in tiling.cut(frame) if tiling is not None else [frame]:  # what the model sees at run time
                self._batches.append({input_name: prepare(piece, image_size, mean, std, image_color(piece))[None]})
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def quantize_merged(
    onnx_path: str | Path,
    out_path: str | Path,
    images: str | Path | Sequence[Path],
    image_size: int,
    *,
    max_images: int = 64,
    method: str = "minmax",
    target: str = "onnxruntime",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    keep_float: Sequence[str] | None = None,
    tiling: Tiling | None = None,
    op_types: Sequence[str] = ("Conv",),
) -> Path:
    """Write the INT8 (QDQ) version of a merged ONNX graph, calibrated on good images; return its path.

    ``images``: a folder (``max_images`` are sampled) or an explicit list of image files.
    ``keep_float``: names of Conv nodes left in floating point (default: ``float_convs``).
    ``op_types``: the operators quantised (EfficientAD: its convolutions; UniAD adds its transformer's MatMuls).
    """
    from edgead.registry import check_choice

    try:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "cpu", "INT8 quantisation") from exc
    method = check_choice("calibration method", method, CALIBRATION_METHODS)
    target = check_choice("INT8 target", target, INT8_TARGETS)
    symmetric = target == "tensorrt"
    files = calibration_images(images, max_images) if isinstance(images, (str, Path)) else list(images)
    if not files:
        raise DataError(message("INT8 calibration images", "an empty list", "at least one good image", "pass a folder of good images"))
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    t0 = time.perf_counter()
    import onnx

    keep_float = list(float_convs(onnx.load(str(onnx_path), load_external_data=False)) if keep_float is None else keep_float)
    reader = FolderCalibrationReader(files, image_size, mean=mean, std=std, tiling=tiling)
    # float biases: TensorRT 10's DequantizeLinear takes INT8 only; symmetric activations for TensorRT (zero points 0)
    extra: dict[str, Any] = {"ActivationSymmetric": symmetric, "WeightSymmetric": True, "QuantizeBias": False}
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    quantize_static(
        str(onnx_path),
        str(out_path),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(op_types),
        per_channel=True,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[method],
        nodes_to_exclude=keep_float,
        extra_options=extra,
    )
    log.info(
        "quantised %s -> %s (INT8 QDQ for %s, %d calibration images, %s, %d convolutions kept float, %.1f MB) in %.1f s",
        onnx_path.name,
        out_path,
        target,
        len(reader),
        method,
        len(keep_float),
        out_path.stat().st_size / 1e6,
        time.perf_counter() - t0,
    )
    return out_path


def rank_correlation(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation, tied values sharing their average rank (image scores tie, e.g. at 0).

    >>> round(rank_correlation([0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 2.0, 5.0]), 6)
    1.0
    """

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        _, inverse = np.unique(x, return_inverse=True)
        return np.asarray((np.bincount(inverse, r) / np.bincount(inverse))[inverse])

    ra, rb = ranks(np.asarray(a, dtype=float)), ranks(np.asarray(b, dtype=float))
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")  # undefined for constant scores
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None) -> int:
    """``python -m build_engines.quantize BUNDLE DATASET``: FP32 vs INT8 (ONNX Runtime) on a test set (``edgead fidelity``)."""
    from .fidelity import main as fidelity

    args = list(argv or [])
    return fidelity([*args[:2], "--candidate", "onnxruntime/int8", *args[2:]])


if __name__ == "__main__":
    raise SystemExit(main())
