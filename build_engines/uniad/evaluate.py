"""Evaluation of a UniAD run for one of its products: the runtime's computation in PyTorch (raw map and score of
``UniADGraph``, the product's affine and threshold), for ``build_engines.evaluate.evaluate_run``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgead.datasets import image_color
from edgead.errors import ConfigError, message
from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare
from edgead.registry import check_choice

from .export import UniADGraph
from .train import load_uniad_run

__all__ = ["uniad_predictor"]


def uniad_predictor(run_dir: str | Path, product: str) -> tuple[str, Callable[[list[np.ndarray]], tuple[list[np.ndarray], np.ndarray]], float, str, list[float]]:
    """(product, predict(frames) -> (normalised maps at grid resolution, scores), threshold, method, validation scores)."""
    run = load_uniad_run(run_dir)
    if product not in run.calibration:
        raise ConfigError(message("product", repr(product), f"one of the run's products {sorted(run.calibration)}", "pass --product NAME (the data folder names the product by default)"))
    product = check_choice("product", product, tuple(run.calibration))
    cal = run.calibration[product]
    scale = 0.1 / (cal["qb"] - cal["qa"])
    graph = UniADGraph(run.extractor, run.model, run.config.image_size, run.config.pool)
    size = run.config.image_size

    @torch.no_grad()
    def predict(frames: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        x = torch.from_numpy(np.stack([prepare(f, size, IMAGENET_MEAN, IMAGENET_STD, image_color(f)) for f in frames]))
        amap, score = graph(x)
        maps = ((amap[:, 0].double() - cal["qa"]) * scale).float().numpy()
        return list(maps), ((score.double() - cal["qa"]) * scale).float().numpy()

    return product, predict, float(cal["threshold"]), str(cal["method"]), list(cal.get("validation_scores", []))
