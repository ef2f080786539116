"""scripts/time_to_accuracy.py: each snapshot is calibrated and evaluated as if training had stopped there."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from build_engines.efficientad.train import TrainConfig, train
from build_engines.evaluate import evaluate_run
from build_engines.synthetic import generate
from edgead.errors import ConfigError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "time_to_accuracy.py"


def _load_script() -> object:
    spec = importlib.util.spec_from_file_location("time_to_accuracy", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_last_snapshot_reproduces_the_finished_run(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = generate(tmp_path / "data", n_train=5, n_test_good=2, n_test_defect=1, size=128, seed=3)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), preset="demo", teacher="random", steps=3, val_fraction=0.4, snapshot_every=1, device="cpu")
    run = train(cfg)
    mod = _load_script()
    out = tmp_path / "curve.json"
    assert mod.main([str(run), "--json", str(out), "--no-pixel-metrics"]) == 0  # type: ignore[attr-defined]
    rows = json.loads(out.read_text())["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0.0 < r["train_s"] for r in rows) and rows[0]["train_s"] <= rows[-1]["train_s"]
    final = evaluate_run(run, data, device="cpu", pixel_metrics=False)
    assert rows[-1]["image_auroc"] == pytest.approx(final["image_auroc"], abs=1e-9)
    assert rows[-1]["operating_point"]["threshold"] == pytest.approx(final["threshold"], rel=1e-5)
    assert mod.main([str(run), "--json", str(out), "--no-pixel-metrics", "--snapshots", "1,3"]) == 0  # type: ignore[attr-defined]
    assert [r["step"] for r in json.loads(out.read_text())["rows"]] == [1, 3]
    with pytest.raises(ConfigError, match="snapshot"):
        mod.curve(data)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="--snapshots"):
        mod.main([str(run), "--json", str(out), "--snapshots", "last"])  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"\[1, 2, 3\]"):  # a step without a snapshot names the ones there are
        mod.main([str(run), "--json", str(out), "--snapshots", "2,5"])  # type: ignore[attr-defined]
