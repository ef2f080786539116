"""Export a UniAD run to a bundle: one ONNX graph (backbone + transformer + map + score), dynamic batch.

Outputs of the ``merged`` variant (the names the runtime knows): ``anomaly_map`` (N, 1, h, w), the raw per-token
L2 distance on the feature grid, and ``score`` (N,), the reference protocol's image score (max of the 16 x 16
average-pooled map upsampled to the input). Both are raw: each product's calibration (affine qa -> 0, qb -> 0.1
and threshold) is in the manifest's ``classes`` and applied by ``Detector(..., product=...)``, so one graph
serves every product. The neighbour mask is a constant initializer: no data-dependent control flow.

    edgead export runs/unified --out bundles/unified
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgead.errors import ConfigError, DataError, message

from .model import UniAD, anomaly_map, image_score
from .train import FeatureExtractor, load_uniad_run

__all__ = ["UniADGraph", "export_uniad_bundle", "product_calibration_images", "INT8_OPS"]

log = logging.getLogger(__name__)


class UniADGraph(nn.Module):
    """image (N,3,S,S) -> (anomaly_map (N,1,h,w), score (N,)): what the bundle's ONNX computes."""

    def __init__(self, extractor: FeatureExtractor, model: UniAD, image_size: int, pool: int) -> None:
        super().__init__()
        self.extractor, self.model, self.image_size, self.pool = extractor, model, int(image_size), int(pool)
        self.eval()

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.extractor.grid(image)
        amap = anomaly_map(feats, self.model(feats))
        return amap, image_score(amap, self.image_size, self.pool)


def export_uniad_bundle(run_dir: str | Path, out_dir: str | Path, *, opset: int = 17, overwrite: bool = False,
                        int8_calibration: str | Path | None = None, int8_images: int = 64, int8_target: str = "onnxruntime") -> Path:
    """Export a finished UniAD run; the graph is checked against PyTorch (<= 1e-4) and TensorRT's operator table.

    ``int8_calibration``: ``"train"`` (each product's train/good, the same number of images from each) or a folder
    of good images, to calibrate an extra ``merged_int8`` variant; None skips INT8. INT8 covers the transformer;
    the backbone stays FP32 (``INT8_OPS``).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    import onnxsim

    from edgead import __version__
    from edgead.bundle import ClassSpec, InputSpec, Manifest, PostprocessSpec, Producer, ThresholdSpec, VariantSpec, check_bundle_target, write_bundle
    from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD

    from ..export import export_onnx, simplify_onnx
    from ..onnx_ops import check_tensorrt_compatible

    out = check_bundle_target(out_dir, overwrite)
    run = load_uniad_run(run_dir)
    cfg = run.config
    graph = UniADGraph(run.extractor, run.model, cfg.image_size, cfg.pool)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgead-uniad-export-") as tmp:
        raw = export_onnx(graph, Path(tmp) / "raw.onnx", cfg.image_size, ("anomaly_map", "score"), opset=opset)
        path = simplify_onnx(raw, Path(tmp) / "model_merged.onnx")
        model_proto = onnx.load(str(path))
        check_tensorrt_compatible(model_proto, "UniAD graph")
        x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref_map, ref_score = (t.numpy() for t in graph(x))
        got_map, got_score = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["anomaly_map", "score"], {"image": x.numpy()})
        err = max(float(np.max(np.abs(got_map - ref_map)) / max(float(np.max(np.abs(ref_map))), 1e-12)),
                  float(np.max(np.abs(got_score - ref_score)) / max(float(np.max(np.abs(ref_score))), 1e-12)))
        if err > 1e-4:
            raise DataError(message("UniAD ONNX export", f"relative error {err:.2e} against PyTorch", "<= 1e-4", "report this as a bug (export mismatch)"))
        files = {"merged": path}
        if int8_calibration is not None:
            files["merged_int8"] = _quantize(path, Path(tmp) / "model_merged_int8.onnx", cfg, int8_calibration, int8_images, int8_target)
        classes = {name: ClassSpec(c["qa"], c["qb"], c["threshold"], c["method"]) for name, c in run.calibration.items()}
        manifest = Manifest(
            family="uniad",
            size="base",
            input=InputSpec(cfg.image_size, tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)),
            variants={v: VariantSpec(f.name) for v, f in files.items()},
            postprocess=PostprocessSpec.feature_distance(),
            threshold=ThresholdSpec(max(c.threshold for c in classes.values()), "per product: see classes (this value is not used)"),
            producer=Producer(__version__, torch.__version__, onnx.__version__, str(onnxsim.__version__), opset),
            classes=classes,
        )
        bundle = write_bundle(out, manifest, {f.name: f for f in files.values()}, overwrite=overwrite)
    log.info("UniAD bundle %s: products %s, variants %s, parity %.1e, %.1f s", bundle, ", ".join(classes), ", ".join(files), err, time.perf_counter() - t0)
    return Path(bundle)


# INT8 covers the transformer only (its weight products, Gemm, and its attention products, MatMul). Measured on ball
# screw (120 test images, docs/benchmarks.md): the transformer in INT8 keeps the scores (rank correlation 0.9994 with
# FP32, -0.04 AUROC points) at 1.4x the FP32 speed; any backbone convolution in INT8 does not (0.887, -6 points): the map
# is the distance between the backbone's features and their reconstruction, and quantising the features moves both.
INT8_OPS = ("Gemm", "MatMul")


def _quantize(merged: Path, out: Path, cfg: Any, calibration: str | Path, max_images: int, target: str) -> Path:
    """The ``merged_int8`` graph, calibrated on good images of every product (``"train"``) or of one folder."""
    from ..quantize import calibration_images, quantize_merged

    images = product_calibration_images(cfg.data, max_images) if str(calibration) == "train" else calibration_images(calibration, max_images)
    return quantize_merged(merged, out, images, cfg.image_size, target=target, keep_float=[], op_types=INT8_OPS)


def product_calibration_images(data: Sequence[str | Path], max_images: int) -> list[Path]:
    """Up to ``max_images`` train/good images, the same number from each product's set (at least one each)."""
    from ..quantize import calibration_images

    if max_images < len(data):
        raise ConfigError(message("--int8-max-images", max_images, f">= the number of products ({len(data)}): one image of each at least", "use 64"))
    return [f for root in data for f in calibration_images(Path(root) / "train" / "good", max_images // len(data))]
