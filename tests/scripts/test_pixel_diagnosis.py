"""scripts/pixel_diagnosis.py: its edge-padded merged map is the one edgead eval scores, and a zero border shows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from build_engines.efficientad.train import TrainConfig, train
from build_engines.evaluate import evaluate_run
from build_engines.synthetic import generate

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pixel_diagnosis.py"


def test_edge_merged_variant_is_what_eval_reports(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = generate(tmp_path / "data", n_train=5, n_test_good=2, n_test_defect=1, size=128, seed=3)
    run = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), preset="demo", teacher="random", steps=3, val_fraction=0.4, device="cpu"))
    spec = importlib.util.spec_from_file_location("pixel_diagnosis", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.diagnose(run, data)
    assert report["pixel_auroc"]["merged_edge"] == pytest.approx(evaluate_run(run, data, device="cpu")["pixel_auroc"], abs=1e-4)
    assert set(report["pixel_auroc"]) == {f"{b}_{p}" for b in ("local", "global", "merged") for p in ("edge", "zero")}
    assert 0.0 <= report["normal_pixels_below_zero"] <= 1.0
