"""`edgead doctor` on this machine as it is (no TensorRT, no NVIDIA driver in CI): exit 0, every missing piece named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_bundle as tb

from edgead.cli import main as cli
from edgead.doctor import diagnose, format_report


def test_doctor_names_what_is_missing_here(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = diagnose()
    if report["cuda"].get("devices"):
        pytest.skip("a GPU is present: see the simulated-device doctor tests for the matching path")
    assert report["onnxruntime"]["installed"] and "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    assert report["tensorrt"]["version"] is None and "edgead[tensorrt]" in report["tensorrt"]["why"]
    assert report["cuda"]["why"] and "cudaError" in report["cuda"]["why"]  # the CUDA error, not just "no GPU"
    assert report["tensorrt_backend"]["usable"] is False
    bundle = tb.make_bundle(tmp_path / "b")
    assert cli(["doctor", str(bundle), "--json"]) == 0
    b = json.loads(capsys.readouterr().out)["bundle"]
    assert b["engines"] == [] and b["auto"]["backend"] == "openvino" and b["variants"] == ["merged", "raw"]
    text = format_report(diagnose(str(bundle)))
    assert "no TensorRT engine in the bundle" in text and "Detector(bundle) runs: openvino merged" in text


def test_doctor_on_a_bundle_that_is_not_one_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["doctor", str(tmp_path / "missing")]) == 2
    assert "edgead: error: bundle" in capsys.readouterr().err
