"""The run directory: what `edgead train` writes and `edgead eval` / `edgead export` read.

    RUN_DIR/
      config.json        the TrainConfig used (all hyper-parameters, seed, data path)
      log.jsonl          one JSON object per logged step
      checkpoints/       resumable training state (last.pt)
      model.pt           final weights: {"state_dict", "size", "image_size", "padding", "out_channels"}
      calibration.json   quantiles (fitted on held-out good images) and the image threshold
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from edgead.errors import DataError, message
from edgead.postprocess import EfficientADPost, QuantileAffine
from edgead.tiling import Tiling

from .models import EfficientAD

__all__ = ["Calibration", "TrainedRun", "save_model", "save_calibration", "load_run"]

MODEL_FILE = "model.pt"
CALIBRATION_FILE = "calibration.json"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class Calibration:
    """Post-processing constants and the decision threshold, all from good images only."""

    qa_st: float
    qb_st: float
    qa_ae: float
    qb_ae: float
    threshold: float
    threshold_method: str  # e.g. "quantile 0.995 of validation-good image scores (n=...)"
    validation_images: int
    validation_scores: list[float] = field(default_factory=list)  # per image; lets eval compare threshold rules

    def post(self, pad: int) -> EfficientADPost:
        return EfficientADPost(QuantileAffine(self.qa_st, self.qb_st), QuantileAffine(self.qa_ae, self.qb_ae), pad)


@dataclass
class TrainedRun:
    run_dir: Path
    model: EfficientAD
    calibration: Calibration
    config: dict

    @property
    def post(self) -> EfficientADPost:
        return self.calibration.post(self.model.map_pad)

    @property
    def tiling(self) -> Tiling | None:
        """The tile layout the run was trained with (``--tile``), or None for whole images."""
        tile = self.config.get("tile")
        return Tiling(int(tile), int(self.config.get("tile_overlap", 0))) if tile else None


def save_model(model: EfficientAD, run_dir: Path) -> Path:
    path = Path(run_dir) / MODEL_FILE
    torch.save(
        {
            "state_dict": model.state_dict(),
            "size": model.size,
            "image_size": model.image_size,
            "padding": model.padding,
            "out_channels": model.out_channels,
        },
        path,
    )
    return path


def save_calibration(calibration: Calibration, run_dir: Path) -> Path:
    path = Path(run_dir) / CALIBRATION_FILE
    path.write_text(json.dumps(asdict(calibration), indent=2))
    return path


def load_run(run_dir: str | Path, map_location: str = "cpu") -> TrainedRun:
    """Load a finished run; raise DataError naming the missing piece."""
    run_dir = Path(run_dir)
    for name in (MODEL_FILE, CALIBRATION_FILE, CONFIG_FILE):
        if not (run_dir / name).is_file():
            raise DataError(message("run directory", f"{run_dir} without {name}", "a finished `edgead train` run", f"train first: edgead train --data DIR --out {run_dir}"))
    blob = torch.load(run_dir / MODEL_FILE, map_location=map_location, weights_only=True)
    model = EfficientAD(blob["size"], blob["image_size"], blob["padding"], blob["out_channels"])
    model.load_state_dict(blob["state_dict"])
    model.eval()
    calibration = Calibration(**json.loads((run_dir / CALIBRATION_FILE).read_text()))
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    return TrainedRun(run_dir, model, calibration, config)
