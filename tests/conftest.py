"""Shared test configuration: the `gpu` marker skips cleanly without a CUDA device."""

from __future__ import annotations

import ctypes.util

import pytest


def _cuda_device_present() -> bool:
    if ctypes.util.find_library("cuda") is None:
        return False
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        return False
    err, count = cudart.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


HAS_GPU = _cuda_device_present()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
