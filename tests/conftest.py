"""Shared test configuration: the `gpu` marker skips cleanly without a CUDA device; the ``make_run`` factory."""

from __future__ import annotations

import ctypes.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    if os.environ.get("EDGEAD_REQUIRE_GPU", "").lower() not in ("", "0", "false"):
        # `make test-gpu` sets it: GPU tests that cannot run are a failure, never a silent success
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.usefixtures("_gpu_required"))
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def _gpu_required() -> None:
    pytest.fail("EDGEAD_REQUIRE_GPU=1 (make test-gpu) but no usable CUDA device: check nvidia-smi, cuda-python and the driver")


@pytest.fixture(scope="session")
def make_run() -> Callable[..., Path]:
    """Factory for a training run directory as ``edgead export`` reads it, without training: EfficientAD-S
    weights (random, seeded, unless ``model`` is given), hand-set quantiles and threshold, and a config.json
    holding ``image_size`` plus any ``config`` keys.

    >>> run = make_run(tmp_path / "run", 128, quantiles=(0.5, 2.0, 0.3, 1.5), data=str(dataset))  # doctest: +SKIP
    """

    def make(
        run_dir: Path,
        image_size: int = 128,
        *,
        model: Any = None,
        seed: int = 0,
        quantiles: tuple[float, float, float, float] = (0.8, 2.5, 0.3, 1.1),
        threshold: float = 0.5,
        **config: Any,
    ) -> Path:
        import torch

        from build_engines.efficientad.models import EfficientAD
        from build_engines.efficientad.run import Calibration, save_calibration, save_model

        run_dir.mkdir(parents=True, exist_ok=True)
        if model is None:
            torch.manual_seed(seed)
            model = EfficientAD("s", image_size).eval()
        save_model(model, run_dir)
        save_calibration(Calibration(*quantiles, threshold, "hand-set for tests", 0), run_dir)
        (run_dir / "config.json").write_text(json.dumps({"image_size": image_size, **config}))
        return run_dir

    return make
