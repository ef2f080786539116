"""EdgeAD: visual anomaly detection at the edge.

The runtime package. It never imports PyTorch; heavy backends load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BackendError,
    BundleError,
    ConfigError,
    DataError,
    EdgeADError,
    InputError,
    InternalError,
    MissingDependencyError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "EdgeADError",
    "ConfigError",
    "InputError",
    "DataError",
    "BundleError",
    "BackendError",
    "MissingDependencyError",
    "InternalError",
    "Detector",
    "Result",
    "load_bundle",
]

if TYPE_CHECKING:
    from .bundle import load_bundle
    from .detector import Detector
    from .result import Result

# The runtime API loads on first use so that `import edgead` (and `edgead --help`) stay light.
_LAZY = {"Detector": ".detector", "Result": ".result", "load_bundle": ".bundle"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgead' has no attribute {name!r}")
