"""Evaluation of a PatchCore run: the runtime's computation in PyTorch, for ``build_engines.evaluate.evaluate_run``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..feature_distance import feature_distance_predictor
from .train import load_patchcore_run

__all__ = ["patchcore_predictor"]


def patchcore_predictor(run_dir: str | Path, product: str | None, data: str | Path = "") -> tuple[str, Callable[[list[np.ndarray]], tuple[list[np.ndarray], np.ndarray]], float, str, list[float]]:
    """(product, predict(frames) -> (normalised maps, scores), threshold, method, validation scores); see ``feature_distance_predictor``."""
    run = load_patchcore_run(run_dir)
    return feature_distance_predictor(run.graph, run.config.image_size, run.calibration, product, data, run.config.tiling)
