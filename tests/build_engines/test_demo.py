"""The end-to-end demo: tiny fast pipeline (unmarked), reuse of earlier stages, export + Detector (slow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from build_engines import demo
from build_engines.demo import pick_teacher, run_demo
from edgead.errors import ConfigError

torch.set_num_threads(1)

TINY = {"n_train": 5, "n_test_good": 2, "n_test_defect": 1, "size": 96}


def test_demo_end_to_end_tiny_then_reuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    summary = run_demo(out, steps=2, teacher="random", device="cpu", data=TINY, export=False)
    for name in ("data/train/good", "run/model.pt", "run/calibration.json", "eval.json", "overlays"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "eval.json").read_text())
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["aupro"] <= 1.0
    assert summary["metrics"]["image_auroc"] == metrics["image_auroc"]
    assert summary["train_config"]["preset"] == "demo" and summary["train_config"]["steps"] == 2
    assert summary["train_config"]["image_size"] == 128
    printed = capsys.readouterr().out
    assert "img AUROC" in printed and "overlays" in printed
    # stage 5: PatchCore on the same data, printed next to EfficientAD with its operating point
    assert (out / "run_patchcore" / "model.pt").is_file() and 0.0 <= summary["patchcore"]["image_auroc"] <= 1.0
    assert "5/5 PatchCore" in printed and any(re.fullmatch(r"PatchCore\s+\d\.\d{3}\s+.*\d+/\d+, \d+/\d+", line) for line in printed.splitlines())

    model_time = (out / "run" / "model.pt").stat().st_mtime_ns
    run_demo(out, steps=2, teacher="random", device="cpu", data=TINY, export=False)
    assert (out / "run" / "model.pt").stat().st_mtime_ns == model_time  # the finished run was reused
    assert "reusing the finished run" in capsys.readouterr().out


def test_pick_teacher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from build_engines.efficientad import teacher

    assert pick_teacher("random") == "random"
    monkeypatch.setattr(teacher, "default_teacher_path", lambda size: None)
    assert pick_teacher("auto") == "random"
    assert "RANDOM teacher" in caplog.text
    weights = tmp_path / "teacher_s.pth"
    weights.write_bytes(b"x")
    monkeypatch.setattr(teacher, "default_teacher_path", lambda size: weights)
    assert pick_teacher("auto") == "default"


def test_demo_cli_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--steps"):
        demo.main(["--out", str(tmp_path / "d"), "--steps", "0"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="a folder"):
        demo.main(["--out", str(tmp_path / "file")])


@pytest.mark.slow
def test_demo_exports_and_detector_agrees_with_torch(tmp_path: Path) -> None:
    summary = run_demo(tmp_path / "demo", steps=2, teacher="random", device="cpu", data=TINY, export=True, frames=2)
    manifest = json.loads((tmp_path / "demo" / "bundle" / "manifest.json").read_text())
    assert set(manifest["variants"]) == {"merged", "raw", "merged_int8"}  # INT8 calibrated on the demo's train/good, for make bench
    assert len(summary["detector"]) == 2
    for row in summary["detector"]:
        assert row["score"] == pytest.approx(row["torch_score"], rel=1e-4, abs=1e-5)
        assert row["decision"] in ("OK", "NG")


def test_demo_steps_are_the_demo_presets() -> None:
    from build_engines.demo import DEMO_STEPS
    from build_engines.efficientad.train import PRESETS

    assert DEMO_STEPS == PRESETS["demo"]["steps"]
