"""The build side of ``edgead.registry.FAMILIES``: where each family's toolchain lives, imported when used.

EfficientAD is the toolchain's default (``build_engines.efficientad`` and the generic ``export`` / ``evaluate``
modules); every other family is one row here: its ``edgead train --family`` entry point, its bundle export and its
evaluation predictor (``(product, predict, threshold, method, validation scores)``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Toolchain", "TOOLCHAINS", "toolchain", "run_family"]


@dataclass(frozen=True)
class Toolchain:
    """``module:function`` of each entry point."""

    train_main: str
    export_bundle: str
    predictor: str

    def load(self, which: str) -> Callable[..., Any]:
        module, _, name = getattr(self, which).partition(":")
        return getattr(importlib.import_module(module), name)


TOOLCHAINS: dict[str, Toolchain] = {
    "uniad": Toolchain("build_engines.uniad.train:main", "build_engines.uniad.export:export_uniad_bundle", "build_engines.uniad.evaluate:uniad_predictor"),
    "patchcore": Toolchain("build_engines.patchcore.train:main", "build_engines.patchcore.export:export_patchcore_bundle",
                           "build_engines.patchcore.evaluate:patchcore_predictor"),
}


def toolchain(family: str) -> Toolchain | None:
    """The toolchain of a family other than EfficientAD; None for EfficientAD (the default paths)."""
    return TOOLCHAINS.get(family)


def run_family(run_dir: str | Path) -> str:
    """The family a run folder was trained as (its config.json's ``family``; EfficientAD runs predate the key)."""
    try:
        return str(json.loads((Path(run_dir) / "config.json").read_text()).get("family", "efficientad"))
    except (OSError, ValueError):
        return "efficientad"  # the loader reports what is missing
