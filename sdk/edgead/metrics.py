"""Anomaly-detection metrics: image / pixel AUROC, AU-PRO and F1-max. Exact, numpy-only.

* AUROCs are exact, with ties counted as one half (the same value as sklearn's
  ``roc_auc_score``). Pixel AUROC sorts only the normal pixels (in place, in the maps'
  float dtype) and places the defective pixels with a binary search, so memory stays
  about one copy of the maps.
* AU-PRO follows the MVTec AD reference: regions are the 8-connected components of the
  ground-truth masks; the PRO of a threshold is the mean over all regions of the
  fraction of the region predicted anomalous; the FPR is over all normal pixels; the
  curve starts at (0, 0), is integrated by trapezoids up to ``fpr_limit`` (interpolated at
  the limit) and divided by ``fpr_limit``.
* F1-max scans every distinct score as a threshold (anomalous when ``score >= threshold``).

Connected components use OpenCV (already a runtime dependency); nothing else beyond numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from .errors import InputError, message

__all__ = ["image_auroc", "pixel_auroc", "aupro", "f1_max"]

ArrayList = Sequence[np.ndarray] | np.ndarray


def _labels_scores(labels: object, scores: object, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.ndim != 1 or s.ndim != 1:
        raise InputError(message("labels / scores", f"shapes {y.shape} and {s.shape}", "two 1-D sequences", "pass one label and one score per image"))
    if y.shape != s.shape:
        raise InputError(message("labels / scores", f"{y.size} labels and {s.size} {what}", "the same length", "pass one score per labelled image"))
    if y.dtype != bool:
        if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
            raise InputError(message("labels", f"values {np.unique(y)[:5].tolist()}", "0 (good) or 1 (defective)", "encode labels as 0/1 or bool"))
        y = y.astype(bool)
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise InputError(message(what, f"dtype {s.dtype}", "real numbers", "pass float scores"))
    _check_finite(s, what)
    _check_classes(int(y.sum()), int(y.size - y.sum()), "labels")
    return y, s


def _check_finite(values: np.ndarray, what: str) -> None:
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise InputError(
            message(what, f"{bad} NaN or infinite value(s)", "finite numbers", "fix the model output (NaN usually means a diverged model or a bad input)")
        )


def _check_classes(n_pos: int, n_neg: int, what: str) -> None:
    if n_pos == 0 or n_neg == 0:
        raise InputError(message(what, f"{n_pos} defective and {n_neg} good", "both classes present", "evaluate on a test set with good and defective images"))


def _auc_from_sorted_neg(neg_sorted: np.ndarray, pos: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(pos == neg), exactly, with integer counting."""
    pos = np.sort(pos)
    below = np.searchsorted(neg_sorted, pos, side="left").astype(np.int64)
    upto = np.searchsorted(neg_sorted, pos, side="right").astype(np.int64)
    twice = 2 * int(below.sum()) + int((upto - below).sum())
    return twice / (2.0 * float(pos.size) * float(neg_sorted.size))


def image_auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of image scores (1 = defective ranks above every good image).

    >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    y, s = _labels_scores(labels, scores)
    return _auc_from_sorted_neg(np.sort(s[~y]), s[y])


def _masks_maps(masks: ArrayList, maps: ArrayList) -> tuple[list[np.ndarray], list[np.ndarray], np.dtype]:
    masks_l = list(masks) if not isinstance(masks, np.ndarray) or masks.ndim == 3 else [masks]
    maps_l = list(maps) if not isinstance(maps, np.ndarray) or maps.ndim == 3 else [maps]
    if len(masks_l) != len(maps_l):
        raise InputError(
            message("masks / maps", f"{len(masks_l)} masks and {len(maps_l)} maps", "one map per mask", "pass the anomaly map of every test image")
        )
    if not masks_l:
        raise InputError(message("masks / maps", "empty sequences", "at least one image", "pass the test set's masks and maps"))
    out_masks, out_maps = [], []
    dtype = np.dtype(np.float32)
    for i, (m, a) in enumerate(zip(masks_l, maps_l, strict=True)):
        m, a = np.asarray(m), np.asarray(a)
        if m.ndim != 2 or m.shape != a.shape:
            raise InputError(
                message(f"mask / map {i}", f"shapes {m.shape} and {a.shape}", "two HxW arrays of the same shape", "resize the anomaly map to the mask's size")
            )
        if m.dtype != bool:
            if not np.issubdtype(m.dtype, np.integer) or not np.isin(m, (0, 1)).all():
                raise InputError(message(f"mask {i}", f"dtype {m.dtype}", "bool (or 0/1 integers)", "pass mask > 0"))
            m = m.astype(bool)
        if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
            raise InputError(message(f"map {i}", f"dtype {a.dtype}", "real numbers", "pass float anomaly maps"))
        _check_finite(a, f"map {i}")
        dtype = np.promote_types(dtype, a.dtype) if np.issubdtype(a.dtype, np.floating) else np.promote_types(dtype, np.float64)
        out_masks.append(m)
        out_maps.append(a)
    return out_masks, out_maps, dtype


def _split_pixels(masks: list[np.ndarray], maps: list[np.ndarray], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(sorted normal-pixel scores, defective-pixel scores) without a full concatenation of both."""
    n_pos = sum(int(m.sum()) for m in masks)
    n_all = sum(m.size for m in masks)
    neg = np.empty(n_all - n_pos, dtype)
    pos = np.empty(n_pos, dtype)
    i = j = 0
    for m, a in zip(masks, maps, strict=True):
        vals_n = a[~m]
        vals_p = a[m]
        neg[i : i + vals_n.size] = vals_n
        pos[j : j + vals_p.size] = vals_p
        i += vals_n.size
        j += vals_p.size
    neg.sort(kind="quicksort")
    return neg, pos


def pixel_auroc(masks: ArrayList, maps: ArrayList) -> float:
    """Pixel-level AUROC over all images: ``masks`` bool HxW, ``maps`` float of the same shapes.

    >>> m = np.array([[0, 1], [0, 0]], bool); a = np.array([[0.1, 0.9], [0.2, 0.3]])
    >>> pixel_auroc([m], [a])
    1.0
    """
    masks_l, maps_l, dtype = _masks_maps(masks, maps)
    neg, pos = _split_pixels(masks_l, maps_l, dtype)
    _check_classes(pos.size, neg.size, "mask pixels")
    return _auc_from_sorted_neg(neg, pos)


def _region_weights(masks: list[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """Per image: weight of each defective pixel = 1 / |its region| (in mask order), and the region count."""
    weights, n_regions = [], 0
    for m in masks:
        if not m.any():
            weights.append(np.empty(0, np.float64))
            continue
        count, labels = cv2.connectedComponents(m.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
        lab = labels[m]
        sizes = np.bincount(lab, minlength=count).astype(np.float64)
        weights.append(1.0 / sizes[lab])
        n_regions += count - 1
    return weights, n_regions


def aupro(masks: ArrayList, maps: ArrayList, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD definition).

    >>> m = np.zeros((8, 8), bool); m[2:4, 2:4] = True
    >>> round(aupro([m], [m.astype(float)]), 6)
    1.0
    """
    if not 0.0 < float(fpr_limit) <= 1.0:
        raise InputError(message("fpr_limit", fpr_limit, "a number in (0, 1]", "use the customary 0.3"))
    limit = float(fpr_limit)
    masks_l, maps_l, dtype = _masks_maps(masks, maps)
    weights, n_regions = _region_weights(masks_l)
    neg, pos = _split_pixels(masks_l, maps_l, dtype)
    _check_classes(pos.size, neg.size, "mask pixels")
    w = np.concatenate(weights) / n_regions  # same order as pos (boolean indexing, image by image)
    order = np.argsort(pos, kind="stable")
    pos_sorted = pos[order]
    # pro_ge[k] = sum of weights of pos_sorted[k:] (PRO when the threshold is pos_sorted[k])
    tail = np.concatenate([np.cumsum(w[order][::-1])[::-1], [0.0]])

    n_neg = neg.size
    # Only thresholds with FPR <= limit, plus the first beyond it, shape the integral.
    need = min(n_neg, int(np.ceil(limit * n_neg)) + 1)
    start = int(np.searchsorted(neg, neg[n_neg - need], side="left"))
    top = neg[start:]
    change = np.flatnonzero(top[1:] != top[:-1]) + 1
    first = np.concatenate([[0], change])  # first index of each distinct value in top
    values = top[first][::-1]  # distinct normal scores, descending
    fpr = ((n_neg - start - first) / n_neg)[::-1]  # FPR at threshold = value (score >= value)
    pro_ge = tail[np.searchsorted(pos_sorted, values, side="left")]
    pro_gt = tail[np.searchsorted(pos_sorted, values, side="right")]
    fpr_prev = np.concatenate([[0.0], fpr[:-1]])

    # Segment k goes from (fpr_prev[k], pro_gt[k]) to (fpr[k], pro_ge[k]); vertical parts have no area.
    x0, y0, x1, y1 = fpr_prev, pro_gt, fpr, pro_ge
    full = x1 <= limit
    area = float(np.sum(0.5 * (y0[full] + y1[full]) * (x1[full] - x0[full])))
    cut = np.flatnonzero((x0 < limit) & (x1 > limit))
    if cut.size:
        k = int(cut[0])
        y_lim = y0[k] + (y1[k] - y0[k]) * (limit - x0[k]) / (x1[k] - x0[k])
        area += 0.5 * (y0[k] + y_lim) * (limit - x0[k])
    return float(area / limit)


def f1_max(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and that threshold (an image is defective when ``score >= threshold``).

    Among equally good thresholds the highest is returned.

    >>> f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    (0.8, 0.35)
    """
    y, s = _labels_scores(labels, scores)
    order = np.argsort(-s.astype(np.float64), kind="stable")
    s_desc = s[order]
    y_desc = y[order]
    tp = np.cumsum(y_desc)
    fp = np.cumsum(~y_desc)
    last = np.concatenate([np.flatnonzero(np.diff(s_desc) != 0), [s_desc.size - 1]])  # last index of each tie group
    tp, fp = tp[last].astype(np.float64), fp[last].astype(np.float64)
    n_pos = float(y.sum())
    f1 = 2.0 * tp / (tp + fp + n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(s_desc[last[best]])
