"""Export a UniAD run to a bundle: one ONNX graph (backbone + transformer + map + score), dynamic batch.

Outputs of the ``merged`` variant (the names the runtime knows): ``anomaly_map`` (N, 1, h, w), the raw per-token
L2 distance on the feature grid, and ``score`` (N,), the reference protocol's image score (max of the 16 x 16
average-pooled map upsampled to the input). Both are raw: each product's calibration (affine qa -> 0, qb -> 0.1
and threshold) is in the manifest's ``classes`` and applied by ``Detector(..., product=...)``, so one graph
serves every product. The neighbour mask is a constant initializer: no data-dependent control flow.

    edgead export runs/unified --out bundles/unified
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgead.errors import ConfigError, message

from .model import UniAD, anomaly_map, image_score
from .train import FeatureExtractor, load_uniad_run

__all__ = ["UniADGraph", "export_uniad_bundle", "product_calibration_images", "INT8_OPS"]


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
    from edgead.bundle import check_bundle_target

    from ..feature_distance import export_feature_distance_bundle

    out = check_bundle_target(out_dir, overwrite)
    run = load_uniad_run(run_dir)
    cfg = run.config

    def int8(merged: Path, work: Path) -> dict[str, Path]:
        if int8_calibration is None:
            return {}
        return {"merged_int8": _quantize(merged, work / "model_merged_int8.onnx", cfg, int8_calibration, int8_images, int8_target)}

    return export_feature_distance_bundle(UniADGraph(run.extractor, run.model, cfg.image_size, cfg.pool), out, family="uniad", size="base",
                                          image_size=cfg.image_size, calibration=run.calibration, opset=opset, overwrite=overwrite, extra_variants=int8)


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
