"""EdgeAD: visual anomaly detection at the edge.

The runtime package. It never imports PyTorch; heavy backends load lazily.
"""

from __future__ import annotations

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
]
