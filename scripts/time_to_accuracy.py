"""Time-to-accuracy curve of one training run: every snapshot calibrated on the run's held-out good images
and evaluated on the test set, as `edgead train` + `edgead eval` would have done had training stopped there.

The run must have been trained with ``--snapshot-every N``. For each ``snapshots/step_N.pt`` a complete run
directory is assembled in a scratch folder (weights, the run's config, a fresh calibration on the same
validation split), then ``build_engines.evaluate.evaluate_run`` scores it. Wall seconds are the training
time at the snapshot (from the snapshot itself); the learning-rate drop happens at 95 % of the planned
steps, so earlier points are not identical to a shorter run with its own drop.

    python scripts/time_to_accuracy.py runs/ballscrew --json curve.json [--no-pixel-metrics]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from build_engines.calibrate import calibrate
from build_engines.efficientad.models import EfficientAD
from build_engines.efficientad.run import CONFIG_FILE, load_run, save_calibration, save_model
from build_engines.efficientad.train import SNAPSHOTS, TrainConfig, prepare_images, tiling_of
from build_engines.evaluate import evaluate_run
from edgead.datasets import open_dataset, split_train_val
from edgead.errors import ConfigError, message


def curve(run_dir: Path, *, pixel_metrics: bool = True, every: int = 1, steps: set[int] | None = None) -> list[dict[str, Any]]:
    """One row per snapshot (every ``every``-th, or those at ``steps``): step, training seconds, image/pixel AUROC,
    AU-PRO, operating point."""
    run_dir = Path(run_dir)
    by_step = {int(p.stem.split("_")[1]): p for p in (run_dir / SNAPSHOTS).glob("step_*.pt")}
    if steps is not None and (missing := sorted(steps - set(by_step))):
        raise ConfigError(message("--snapshots", missing, f"steps with a snapshot in {run_dir / SNAPSHOTS}: {sorted(by_step)}", "pick from those steps"))
    snaps = [by_step[s] for s in sorted(by_step) if steps is None or s in steps][::every]
    if not snaps:
        raise ConfigError(message("snapshots", f"none in {run_dir / SNAPSHOTS}", "a run trained with --snapshot-every N", "re-train with --snapshot-every 500"))
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    cfg = TrainConfig(**{k: (tuple(v) if k in ("mean", "std") else v) for k, v in config.items() if k in TrainConfig.__dataclass_fields__})
    dataset = open_dataset(cfg.data)
    _, val_paths = split_train_val(dataset.train_good, cfg.val_fraction, cfg.seed)
    assert cfg.image_size is not None
    val_images, owner = prepare_images(val_paths, cfg.image_size, cfg.mean, cfg.std, tiling_of(cfg))
    final = load_run(run_dir) if (run_dir / "model.pt").is_file() else None
    rows = []
    for snap in snaps:
        blob = torch.load(snap, map_location="cpu", weights_only=True)
        model = EfficientAD(cfg.model, cfg.image_size)
        model.load_state_dict(blob["state_dict"])
        model.eval()
        cal = calibrate(model, val_images, qa=cfg.qa, qb=cfg.qb, threshold_method=cfg.threshold_method, groups=owner)
        with tempfile.TemporaryDirectory() as tmp:
            scratch = Path(tmp)
            save_model(model, scratch)
            save_calibration(cal, scratch)
            (scratch / CONFIG_FILE).write_text(json.dumps(config))
            result = evaluate_run(scratch, dataset, device="cpu", pixel_metrics=pixel_metrics)
        rows.append(
            {
                "step": int(blob["step"]),
                "train_s": float(blob["elapsed_s"]),
                "image_auroc": result["image_auroc"],
                "pixel_auroc": result["pixel_auroc"],
                "aupro": result["aupro"],
                "operating_point": result["operating_point"],
                "threshold_rules": result.get("threshold_rules"),
            }
        )
        print(json.dumps({k: rows[-1][k] for k in ("step", "train_s", "image_auroc", "pixel_auroc", "aupro")}), flush=True)
    if final is not None and rows[-1]["step"] == max(by_step):
        rows[-1]["final_threshold"] = final.calibration.threshold
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--every", type=int, default=1, help="use every k-th snapshot")
    p.add_argument("--snapshots", default=None, help="only these steps, e.g. 1200,2000")
    p.add_argument("--no-pixel-metrics", action="store_true")
    args = p.parse_args(argv)
    if args.json.is_dir() or not args.json.parent.is_dir():
        raise ConfigError(message("--json", str(args.json), "a file in an existing folder", "pass e.g. --json curve.json"))
    try:
        steps = {int(x) for x in args.snapshots.split(",")} if args.snapshots else None
    except ValueError:
        raise ConfigError(message("--snapshots", args.snapshots, "comma-separated step numbers", "e.g. --snapshots 1200,2000")) from None
    rows = curve(args.run_dir, pixel_metrics=not args.no_pixel_metrics, every=args.every, steps=steps)
    args.json.write_text(json.dumps({"run_dir": str(args.run_dir), "command": " ".join(["python", "scripts/time_to_accuracy.py", *sys.argv[1:]]), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
