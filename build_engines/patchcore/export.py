"""Export a PatchCore run to a bundle: one ONNX graph (backbone grid + standardisation + distance GEMM against the
constant bank + min + max), dynamic batch, the feature-distance families' outputs and per-product calibration.

    edgead export runs/ballscrew_pc --out bundles/ballscrew_pc
"""

from __future__ import annotations

from pathlib import Path

from edgead.bundle import check_bundle_target
from edgead.errors import ConfigError, message

from ..feature_distance import export_feature_distance_bundle
from .train import load_patchcore_run

__all__ = ["export_patchcore_bundle"]


def export_patchcore_bundle(run_dir: str | Path, out_dir: str | Path, *, opset: int = 17, overwrite: bool = False,
                            int8_calibration: str | Path | None = None, int8_images: int = 64, int8_target: str = "onnxruntime") -> Path:
    """Export a PatchCore run. No INT8 variant: the map is the distance between two close float vectors (a feature and
    its nearest normal feature), which 8-bit features cannot resolve (UniAD's study: INT8 features cost 6 AUROC points)."""
    del int8_images, int8_target
    if int8_calibration is not None:
        raise ConfigError(message("--int8", "a PatchCore run", "an EfficientAD or UniAD run (PatchCore has no INT8 variant: its distances need float features)",
                                  "drop --int8; on CPUs try OpenVINO BF16 and check it with `edgead fidelity`"))
    out = check_bundle_target(out_dir, overwrite)
    run = load_patchcore_run(run_dir)
    cfg = run.config
    return export_feature_distance_bundle(run.graph, out, family="patchcore", size="base", image_size=cfg.image_size,
                                          calibration=run.calibration, opset=opset, overwrite=overwrite, tiling=cfg.tiling)
