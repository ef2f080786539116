"""Evaluation of a UniAD run for one of its products: the runtime's computation in PyTorch (raw map and score of
``UniADGraph``, the product's affine and threshold), for ``build_engines.evaluate.evaluate_run``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..feature_distance import feature_distance_predictor
from .export import UniADGraph
from .train import load_uniad_run

__all__ = ["uniad_predictor"]


def uniad_predictor(run_dir: str | Path, product: str | None, data: str | Path = "") -> tuple[str, Callable[[list[np.ndarray]], tuple[list[np.ndarray], np.ndarray]], float, str, list[float]]:
    """(product, predict(frames) -> (normalised maps, scores), threshold, method, validation scores); see ``feature_distance_predictor``."""
    run = load_uniad_run(run_dir)
    cfg = run.config
    return feature_distance_predictor(UniADGraph(run.extractor, run.model, cfg.image_size, cfg.pool), cfg.image_size, run.calibration, product, data)
