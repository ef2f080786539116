"""One root for every user-facing error, and a separate type for internal bugs.

Every message follows the house format ``what | got X; expected Y; how to fix``
so that an operator reading a log line knows what to change.
"""

from __future__ import annotations

__all__ = [
    "EdgeADError",
    "ConfigError",
    "InputError",
    "DataError",
    "BundleError",
    "BackendError",
    "MissingDependencyError",
    "InternalError",
    "message",
]


def message(what: str, got: object, expected: object, fix: str) -> str:
    """Format an error message in the house style.

    >>> message("image_size", 100, "a multiple of 64", "pass --image-size 256")
    'image_size | got 100; expected a multiple of 64; how to fix: pass --image-size 256'
    """
    return f"{what} | got {got}; expected {expected}; how to fix: {fix}"


class EdgeADError(Exception):
    """Root of every error EdgeAD raises because of what the user passed or has."""


class ConfigError(EdgeADError, ValueError):
    """An argument or option is invalid (unknown choice, out of range, inconsistent)."""


class InputError(EdgeADError, ValueError):
    """A frame or array handed to the runtime is unusable (dtype, shape, layout)."""


class DataError(EdgeADError):
    """A dataset on disk is unusable (empty folder, unreadable image, bad mask)."""


class BundleError(EdgeADError):
    """A bundle is missing, altered, of an unknown schema or built for another machine."""


class BackendError(EdgeADError):
    """An inference backend cannot run here or failed while running."""


class MissingDependencyError(EdgeADError, ImportError):
    """An optional dependency is not installed; the message names the extra."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            message(
                purpose,
                f"'{package}' is not installed",
                f"the '{extra}' extra",
                f"pip install 'edgead[{extra}]'",
            )
        )
        self.package = package
        self.extra = extra


class InternalError(Exception):
    """An invariant of EdgeAD itself was broken: a bug, to be reported, never user error."""
