"""Locate (or build) the kernel libraries for tests/kernels.

The host library must be tested wherever the tests run: if build/lib has no up-to-date
libedgead_pp_host.so, it is built from kernels/postprocess into a temporary folder with cmake
(host only, seconds). If that is impossible the tests FAIL under CI (env CI or
EDGEAD_REQUIRE_KERNELS set) and skip with a reason elsewhere, so CI never silently skips them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from kernel_requirements import required as _required

from edgead import kernels

REPO = Path(__file__).resolve().parents[2]
SOURCES = REPO / "kernels" / "postprocess"


def _stale(lib: Path) -> bool:
    newest = max(p.stat().st_mtime for p in list(SOURCES.iterdir()) + [REPO / "CMakeLists.txt"] if p.suffix in (".cu", ".cuh", ".h", ".cpp", ".txt"))
    return lib.stat().st_mtime < newest


def _unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"kernel library unavailable under CI: {reason}; run `make kernels` before the tests")
    pytest.skip(f"{reason}; run `make kernels`")


@pytest.fixture(scope="session")
def host_library(tmp_path_factory: pytest.TempPathFactory) -> kernels.PostprocessLibrary:
    found = kernels.find_library("host")
    if found is not None and not _stale(found):
        return kernels.load_library("host")
    cmake = shutil.which("cmake")
    if cmake is None:
        _unavailable("libedgead_pp_host.so is missing or older than its sources and cmake is not installed")
    out = tmp_path_factory.mktemp("pp_build")
    try:
        subprocess.run([cmake, "-S", str(REPO), "-B", str(out), "-DEDGEAD_WITH_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True, timeout=300)
        subprocess.run([cmake, "--build", str(out), "-j", "2"], check=True, capture_output=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"building the host library failed: {exc}")
    os.environ["EDGEAD_KERNELS_DIR"] = str(out / "lib")
    return kernels.load_library("host")


@pytest.fixture(scope="session")
def cuda_library() -> kernels.PostprocessLibrary:
    found = kernels.find_library("cuda")
    if found is None:
        pytest.fail("libedgead_pp_cuda.so not found on a GPU machine: run `make kernels` with the CUDA toolkit installed")
    if _stale(found):
        pytest.fail(f"{found} is older than kernels/postprocess sources: run `make kernels`")
    return kernels.load_library("cuda")
