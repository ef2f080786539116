"""Packaging: the extras a user installs pin cuda-python to the CUDA major of the TensorRT they go with."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

SETUP = Path(__file__).resolve().parents[2] / "setup.py"


def _extras() -> dict[str, list[str]]:
    tree = ast.parse(SETUP.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "EXTRAS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("EXTRAS not found in setup.py")


@pytest.mark.parametrize(("extra", "major"), [("tensorrt-cu12", 12), ("jetson", 12), ("tensorrt-cu13", 13), ("tensorrt", 13), ("dev", 13)])
def test_cuda_python_is_pinned_to_one_cuda_major(extra: str, major: int) -> None:
    reqs = [Requirement(r) for r in _extras()[extra] if r.startswith("cuda-python")]
    assert len(reqs) == 1, extra
    spec = reqs[0].specifier
    assert spec.contains(Version(f"{major}.9.0")) and not spec.contains(Version(f"{major + 1}.0.0")) and not spec.contains(Version(f"{major - 1}.9.0"))


def test_tensorrt_extras_match_their_cuda_major_and_jetson_pulls_no_tensorrt_wheel() -> None:
    extras = _extras()
    assert any(r.startswith("tensorrt-cu12") for r in extras["tensorrt-cu12"])
    assert any(r.startswith("tensorrt-cu13") for r in extras["tensorrt-cu13"])
    assert not any(r.split(">")[0].split("<")[0].split("=")[0].startswith("tensorrt") for r in extras["jetson"])  # JetPack's own TensorRT
