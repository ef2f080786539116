"""The one table of what EdgeAD supports; every argument check goes through it.

Model families, sizes, backends and precisions are validated here so that a typo
gets the same helpful message everywhere (with a close-match suggestion).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigError, message

__all__ = [
    "FamilySpec",
    "FAMILIES",
    "BACKENDS",
    "PRECISIONS",
    "RUNTIME_PRECISIONS",
    "COLORS",
    "check_choice",
    "family_spec",
]


@dataclass(frozen=True)
class FamilySpec:
    """What the runtime needs to know about one model family."""

    name: str
    sizes: tuple[str, ...]
    available: bool  # False: planned (bundle format reserves the name), no toolchain yet


FAMILIES: dict[str, FamilySpec] = {
    "efficientad": FamilySpec("efficientad", ("s", "m"), True),
    "uniad": FamilySpec("uniad", ("base",), True),
    "patchcore": FamilySpec("patchcore", ("base",), True),
    "grad": FamilySpec("grad", ("base",), False),
}

BACKENDS: tuple[str, ...] = ("auto", "tensorrt", "onnxruntime", "openvino")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")  # TensorRT engine precisions
RUNTIME_PRECISIONS: tuple[str, ...] = (*PRECISIONS, "bf16")  # what a Detector can be asked for (bf16: OpenVINO on CPUs)
COLORS: tuple[str, ...] = ("bgr", "rgb", "gray", "bgra", "rgba")


def check_choice(what: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` lower-cased if it is one of ``choices``, else raise ConfigError.

    >>> check_choice("backend", "ONNXRuntime", BACKENDS)
    'onnxruntime'
    """
    options = tuple(choices)
    if not isinstance(value, str):
        raise ConfigError(message(what, repr(value), f"one of {', '.join(options)}", "pass a string"))
    normalised = value.strip().lower()
    if normalised in options:
        return normalised
    close = difflib.get_close_matches(normalised, options, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(options)}"
    raise ConfigError(message(what, repr(value), f"one of {', '.join(options)}", hint))


def family_spec(name: str, *, require_available: bool = True) -> FamilySpec:
    """Look up a model family; planned families are refused with a clear message."""
    spec = FAMILIES[check_choice("model family", name, FAMILIES)]
    if require_available and not spec.available:
        raise ConfigError(
            message(
                "model family",
                f"'{spec.name}' (planned, not yet supported by this release)",
                "one of " + ", ".join(f.name for f in FAMILIES.values() if f.available),
                "upgrade EdgeAD or use an efficientad bundle",
            )
        )
    return spec
