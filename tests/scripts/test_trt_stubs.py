"""The TensorRT type check is real: with the prepared stubs, mypy rejects a misuse of the TensorRT 10 API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("typestubs")
    subprocess.run([sys.executable, str(REPO / "scripts" / "trt_stubs.py"), str(out)], check=True, capture_output=True)
    return out


def _mypy(stubs: Path, code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    src = tmp_path / "snippet.py"
    src.write_text(code)
    env = dict(os.environ, MYPYPATH=str(stubs))
    cmd = [sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(REPO / "pyproject.toml"), str(src)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)


def test_correct_tensorrt_code_passes(stubs: Path, tmp_path: Path) -> None:
    code = "import tensorrt as trt\nruntime: trt.Runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))\n"
    result = _mypy(stubs, code, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_misuse_of_tensorrt_api_is_caught(stubs: Path, tmp_path: Path) -> None:
    # TensorRT 10 removed IExecutionContext.execute_async_v2; a wrong argument type must be flagged too
    code = (
        "import tensorrt as trt\n"
        "def f(ctx: trt.IExecutionContext) -> None:\n"
        "    ctx.execute_async_v2([], 0)\n"
        "    ctx.set_input_shape('image', 'not a shape', 3)\n"
    )
    result = _mypy(stubs, code, tmp_path)
    assert result.returncode == 1
    assert "execute_async_v2" in result.stdout
    assert "set_input_shape" in result.stdout
