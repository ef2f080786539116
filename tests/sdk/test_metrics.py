"""Metrics against independent references: sklearn for AUROC, brute force for PRO and F1."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from edgead.errors import InputError
from edgead.metrics import aupro, f1_max, image_auroc, pixel_auroc

# ---- independent references (no scipy, no code shared with edgead.metrics)


def _flood_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected component labels by breadth-first flood fill."""
    labels = np.zeros(mask.shape, int)
    count = 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        count += 1
        labels[y0, x0] = count
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = count
                        queue.append((yy, xx))
    return labels, count


def _brute_pro_curve(masks: list[np.ndarray], maps: list[np.ndarray], thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) for each threshold (anomalous when map >= t), computed region by region."""
    regions = []
    for m, a in zip(masks, maps, strict=True):
        labels, n = _flood_labels(m)
        regions += [a[labels == k] for k in range(1, n + 1)]
    normal = np.concatenate([a[~m] for m, a in zip(masks, maps, strict=True)])
    fpr = np.array([(normal >= t).mean() for t in thresholds])
    pro = np.array([np.mean([(r >= t).mean() for r in regions]) for t in thresholds])
    return fpr, pro


def _brute_aupro(masks: list[np.ndarray], maps: list[np.ndarray], thresholds: np.ndarray, limit: float) -> float:
    fpr, pro = _brute_pro_curve(masks, maps, np.sort(thresholds)[::-1])
    x = np.concatenate([[0.0], fpr])
    y = np.concatenate([[0.0], pro])
    area = 0.0
    for i in range(1, x.size):
        if x[i] <= limit:
            area += 0.5 * (y[i] + y[i - 1]) * (x[i] - x[i - 1])
        elif x[i - 1] < limit:
            y_lim = y[i - 1] + (y[i] - y[i - 1]) * (limit - x[i - 1]) / (x[i] - x[i - 1])
            area += 0.5 * (y[i - 1] + y_lim) * (limit - x[i - 1])
    return area / limit


def _random_set(seed: int, n: int = 4, h: int = 20, w: int = 24, levels: int | None = 40) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(n):
        m = np.zeros((h, w), bool)
        if i % 3 != 0:  # some images are good (all-normal masks)
            for _ in range(int(rng.integers(1, 4))):
                y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
                m[y : y + rng.integers(1, 5), x : x + rng.integers(1, 5)] = True
        a = rng.random((h, w)) + 0.6 * m * rng.random()
        if levels:
            a = np.round(a * levels) / levels  # many ties
        masks.append(m)
        maps.append(a.astype(np.float32))
    return masks, maps


# ---- AUROC


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + 0.5 * labels, 1)  # ties across classes
    assert abs(image_auroc(labels, scores) - roc_auc_score(labels, scores)) < 1e-6
    assert abs(image_auroc(labels.astype(bool), scores.astype(np.float32)) - roc_auc_score(labels, scores.astype(np.float32))) < 1e-6


def test_image_auroc_extremes() -> None:
    assert image_auroc([0, 0, 1, 1], [1, 2, 3, 4]) == 1.0
    assert image_auroc([0, 0, 1, 1], [3, 4, 1, 2]) == 0.0
    assert image_auroc([0, 1, 0, 1], [5, 5, 5, 5]) == 0.5


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 20])
def test_pixel_auroc_matches_sklearn(seed: int, levels: int | None) -> None:
    masks, maps = _random_set(seed, n=6, levels=levels)
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    assert abs(pixel_auroc(masks, maps) - roc_auc_score(y, s)) < 1e-6
    maps64 = [a.astype(np.float64) + 1e-9 * i for i, a in enumerate(maps)]  # float64 kept, not rounded to float32
    s64 = np.concatenate([a.ravel() for a in maps64])
    assert abs(pixel_auroc(np.stack(masks), np.stack(maps64)) - roc_auc_score(y, s64)) < 1e-6


def test_pixel_auroc_single_image_array() -> None:
    m = np.zeros((4, 4), bool)
    m[0, 0] = True
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert pixel_auroc(m, a) == 0.0
    assert pixel_auroc(m, -a) == 1.0


# ---- AU-PRO


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_exact_against_all_thresholds(seed: int, limit: float) -> None:
    masks, maps = _random_set(seed, levels=25)
    thresholds = np.unique(np.concatenate([a.ravel() for a in maps]))  # every distinct score: exact curve
    assert abs(aupro(masks, maps, fpr_limit=limit) - _brute_aupro(masks, maps, thresholds, limit)) < 1e-9


@pytest.mark.parametrize("seed", range(3))
def test_aupro_continuous_scores_within_grid_error(seed: int) -> None:
    masks, maps = _random_set(seed + 10, levels=None)
    grid = np.linspace(0.0, 1.7, 800)
    assert abs(aupro(masks, maps) - _brute_aupro(masks, maps, grid, 0.3)) < 5e-3


def test_aupro_hand_values() -> None:
    m = np.zeros((10, 10), bool)
    m[2:5, 2:5] = True
    assert aupro([m], [m.astype(np.float32)]) == pytest.approx(1.0)
    # a constant map: the curve jumps from (0,0) to (1,1) -> area 0.3^2/2, normalised by 0.3
    assert aupro([m], [np.ones((10, 10), np.float32)]) == pytest.approx(0.15)
    assert aupro([m], [np.ones((10, 10), np.float32)], fpr_limit=1.0) == pytest.approx(0.5)


def test_aupro_uses_8_connectivity() -> None:
    # two pixels touching only at a corner are ONE region (MVTec reference); a 4-connected
    # labelling would count two regions and give a different value.
    m = np.zeros((6, 6), bool)
    m[1, 1] = m[2, 2] = True
    m[4, 4] = m[4, 5] = True  # second region, 2 pixels
    a = np.zeros((6, 6), np.float32)
    a[1, 1] = 1.0  # half of region 1 detected at the top threshold
    a[4, 4] = a[4, 5] = 0.5
    # thresholds: 1.0 -> pro = (1/2 + 0)/2 = 0.25, fpr 0; 0.5 -> pro 0.75, fpr 0; 0 -> (1, 1)
    # curve: (0,0) (0,.25) (0,.75) (1,1): area to 0.3 = 0.3 * (0.75 + 0.825) / 2
    assert aupro([m], [a]) == pytest.approx((0.75 + 0.825) / 2)
    assert aupro([m], [a]) == pytest.approx(_brute_aupro([m], [a], np.array([1.0, 0.5, 0.0]), 0.3))


# ---- F1-max


def _brute_f1(labels: np.ndarray, scores: np.ndarray, t: float) -> float:
    pred = scores >= t
    tp = np.sum(pred & labels)
    fp = np.sum(pred & ~labels)
    fn = np.sum(~pred & labels)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 120).astype(bool)
    scores = np.round(rng.normal(size=120) + labels, 1)
    f1, thr = f1_max(labels, scores)
    all_f1 = {float(t): _brute_f1(labels, scores, t) for t in np.unique(scores)}
    best = max(all_f1.values())
    assert f1 == pytest.approx(best, abs=1e-12)
    assert _brute_f1(labels, scores, thr) == pytest.approx(f1, abs=1e-12)
    assert thr == max(t for t, v in all_f1.items() if abs(v - best) < 1e-12)  # highest of the best


def test_f1_max_tie_between_thresholds_takes_the_highest() -> None:
    # thresholds 0.8 and 0.4 both give F1 = 0.5 (1 of 2 found with nothing else flagged / both found with 4 false alarms)
    assert f1_max([0, 1, 0, 0, 0, 1], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]) == (0.5, 0.8)


def test_f1_max_perfect() -> None:
    assert f1_max([0, 0, 1], [0.1, 0.2, 0.9]) == (1.0, 0.9)


# ---- input validation


@pytest.mark.parametrize(
    "labels, scores, match",
    [
        ([0, 1, 1], [0.1, 0.2], "same length"),
        ([1, 1], [0.1, 0.2], "both classes"),
        ([0, 0], [0.1, 0.2], "both classes"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 1], [0.1, float("inf")], "NaN or infinite"),
        ([0, 2], [0.1, 0.2], "0 \\(good\\) or 1"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([0, 1], ["a", "b"], "real numbers"),
    ],
)
def test_label_score_validation(labels: list, scores: list, match: str) -> None:
    for fn in (image_auroc, f1_max):
        with pytest.raises(InputError, match=match):
            fn(labels, scores)


def test_map_validation() -> None:
    m = np.zeros((4, 4), bool)
    m[0, 0] = True
    a = np.random.default_rng(0).random((4, 4))
    for fn in (pixel_auroc, aupro):
        with pytest.raises(InputError, match="one map per mask"):
            fn([m, m], [a])
        with pytest.raises(InputError, match="same shape"):
            fn([m], [a[:3]])
        with pytest.raises(InputError, match="at least one image"):
            fn([], [])
        with pytest.raises(InputError, match="both classes"):
            fn([np.zeros((4, 4), bool)], [a])
        bad = a.copy()
        bad[1, 1] = np.nan
        with pytest.raises(InputError, match="NaN"):
            fn([m], [bad])
        with pytest.raises(InputError, match="bool"):
            fn([m.astype(np.uint8) * 255], [a])
    assert pixel_auroc([m.astype(np.uint8)], [a]) == pixel_auroc([m], [a])  # 0/1 integers accepted
    for limit in (0.0, -1.0, 1.5):
        with pytest.raises(InputError, match="fpr_limit"):
            aupro([m], [a], fpr_limit=limit)
