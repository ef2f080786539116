"""When the kernel tests may skip: never under CI or EDGEAD_REQUIRE_KERNELS (a skip there hides a broken build)."""

from __future__ import annotations

import os
from typing import Any

import pytest


def required() -> bool:
    return any(os.environ.get(k, "").lower() not in ("", "0", "false") for k in ("CI", "EDGEAD_REQUIRE_KERNELS"))


def require_module(name: str) -> Any:
    """Import ``name`` for a GPU test: skip without it, except under the require flag, where a skip
    would let `make test-gpu` report success having run nothing."""
    try:
        return __import__(name)
    except ImportError as exc:
        if required():
            pytest.fail(f"{name} is required for the GPU kernel tests under EDGEAD_REQUIRE_KERNELS/CI: {exc}")
        pytest.skip(f"{name} not installed")
