"""Evaluate a trained run on a test set: image / pixel AUROC, AU-PRO, F1-max, accuracy, overlays.

The torch model produces (teacher, student, autoencoder) outputs; everything after that is the
runtime's own post-processing (``edgead.postprocess``): merged map at model resolution, image score
= max of the padded map, map resized bilinearly to each image's size for the pixel metrics.
An image counts as anomalous when ``score > threshold`` (as ``edgead.Result``).

Example::

    edgead eval runs/line3 --data /data/line3 --json runs/line3/eval.json --overlays runs/line3/overlays
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgead.datasets import Dataset, Sample, image_color, open_dataset, read_image, read_mask
from edgead.errors import ConfigError, DataError, message
from edgead.metrics import aupro, f1_max, image_auroc, pixel_auroc
from edgead.postprocess import EfficientADPost, merge_maps, resize_bilinear
from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare
from edgead.tiling import Tiling

from .calibrate import fit_threshold, model_maps
from .devices import resolve_device
from .efficientad.models import EfficientAD
from .efficientad.run import load_run

__all__ = ["predict", "evaluate_run", "format_table", "save_overlay", "main"]

log = logging.getLogger(__name__)


def predict(
    model: EfficientAD,
    post: EfficientADPost,
    frames: list[np.ndarray],
    *,
    mean: tuple[float, ...] = tuple(IMAGENET_MEAN),
    std: tuple[float, ...] = tuple(IMAGENET_STD),
    device: str = "cpu",
    tiling: Tiling | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Frames (uint8/uint16, gray or BGR) -> (one map per frame, scores (N,)), as the runtime ``Detector``.

    Without a tiling the maps are at model resolution (S', S'); with one, each frame's tiles are stitched
    into a map at frame resolution and the score is the max over its tiles.

    >>> from edgead.postprocess import QuantileAffine
    >>> post = EfficientADPost(QuantileAffine(0, 1), QuantileAffine(0, 1), 4)
    >>> predict(EfficientAD("s", 128).eval(), post, [np.zeros((40, 50), np.uint8)])[0][0].shape
    (32, 32)
    """
    pieces = [t for f in frames for t in tiling.cut(f)] if tiling is not None else frames
    x = np.stack([prepare(f, model.image_size, mean, std, image_color(f)) for f in pieces])
    maps, scores = merge_maps(*model_maps(model, x, batch_size=min(len(pieces), 16), device=device), post)
    return stitch_frames(frames, maps, scores, tiling, post.pad)


def stitch_frames(frames: list[np.ndarray], maps: np.ndarray, scores: np.ndarray, tiling: Tiling | None, pad: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-piece maps and scores of ``frames`` (their tiles in ``tiling.cut`` order, or the frames themselves) ->
    one map and score per frame, as the ``Detector``: tile maps stitched at frame resolution, the max over tiles."""
    if tiling is None:
        return list(maps), np.asarray(scores, np.float32)
    out_maps, out_scores, start = [], [], 0
    for f in frames:
        n = len(tiling.layout(f.shape[0], f.shape[1]))
        out_maps.append(tiling.stitch(maps[start : start + n], f.shape[0], f.shape[1], pad))
        out_scores.append(scores[start : start + n].max())
        start += n
    return out_maps, np.asarray(out_scores, np.float32)


def _rate(flags: np.ndarray) -> float | None:
    return float(flags.mean()) if flags.size else None


def save_overlay(path: Path, image: np.ndarray, anomaly_map: np.ndarray, *, vmax: float, caption: str, mask: np.ndarray | None = None) -> Path:
    """Write a JET heat-map overlay (map scaled to [0, vmax]) with a caption and the mask outline."""
    gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if gray.dtype == np.uint16:
        gray = (gray // 256).astype(np.uint8)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    scaled = np.clip(anomaly_map / max(vmax, 1e-12), 0.0, 1.0)
    heat = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(base, 0.5, heat, 0.5, 0.0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 255, 255), 1)
    cv2.putText(out, caption, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), out):
        raise DataError(message("overlay", f"could not write {path}", "a writable folder", "check --overlays"))
    return path


def _group_metrics(labels: np.ndarray, scores: np.ndarray, masks: list[np.ndarray] | None, maps: list[np.ndarray] | None, threshold: float) -> dict[str, Any]:
    out: dict[str, Any] = {"n": int(labels.size), "n_good": int((labels == 0).sum()), "n_defect": int((labels == 1).sum())}
    both = 0 < out["n_good"] and 0 < out["n_defect"]
    out["image_auroc"] = image_auroc(labels, scores) if both else None
    pixel_ok = both and masks is not None and maps is not None
    out["pixel_auroc"] = pixel_auroc(masks, maps) if pixel_ok else None
    out["aupro"] = float(aupro(masks, maps)) if pixel_ok else None
    pred = scores > threshold
    out["detection_rate"] = _rate(pred[labels == 1])
    out["false_positive_rate"] = _rate(pred[labels == 0])
    out["accuracy"] = float((pred == (labels == 1)).mean())
    return out


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | Dataset,
    *,
    device: str = "auto",
    batch_size: int = 8,
    overlays: str | Path | None = None,
    n_overlays: int = 4,
    pixel_metrics: bool = True,
    product: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``run_dir`` on the test split of ``data``; return the metrics dict (see module doc).

    A UniAD run (several products) is evaluated as the product ``product`` (default: the data folder's name).

    >>> r = evaluate_run("runs/line3", "data/line3")  # doctest: +SKIP
    >>> sorted(r)[:3]  # doctest: +SKIP
    ['accuracy', 'aupro', 'counts']
    """
    if batch_size < 1:
        raise ConfigError(message("batch_size", batch_size, "an integer >= 1", "pass --batch-size 8"))
    dev = str(resolve_device(device))
    t0 = time.perf_counter()
    dataset = data if isinstance(data, Dataset) else open_dataset(data)
    run = _predictor(Path(run_dir), dataset, dev, product)
    samples: list[Sample] = list(dataset.test)
    if not samples:
        raise DataError(message("test set", f"no test images in {dataset.root}", "test/good and test/<defect> images", "point --data to a dataset with a test split"))
    use_pixels = pixel_metrics and dataset.has_masks
    scores = np.zeros(len(samples), np.float32)
    small_maps: list[np.ndarray] = []
    maps: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    from tqdm import tqdm

    bar = tqdm(total=len(samples), desc="eval", unit="img", dynamic_ncols=True)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        frames = [read_image(s.path) for s in chunk]
        m, sc = run.predict(frames)
        scores[start : start + len(chunk)] = sc
        for i, (sample, frame) in enumerate(zip(chunk, frames, strict=True)):
            small_maps.append(m[i])
            if use_pixels:
                maps.append(resize_bilinear(m[i][None], frame.shape[0], frame.shape[1])[0])
                masks.append(read_mask(sample, frame.shape))
        bar.update(len(chunk))
    bar.close()
    labels = np.array([s.label for s in samples], np.int64)
    threshold = float(run.threshold)
    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": str(dataset.root),
        "family": run.family,
        "product": run.product,
        "counts": {"total": len(samples), "good": int((labels == 0).sum()), "defect": int((labels == 1).sum())},
        "threshold": threshold,
        "threshold_method": run.threshold_method,
        "pixel_metrics": bool(use_pixels),
    }
    overall = _group_metrics(labels, scores, masks if use_pixels else None, maps if use_pixels else None, threshold)
    for key in ("image_auroc", "pixel_auroc", "aupro", "accuracy", "detection_rate", "false_positive_rate"):
        result[key] = overall[key]
    if (labels == 0).any() and (labels == 1).any():
        f1, f1_thr = f1_max(labels, scores)
        result["f1_max"], result["f1_max_threshold"] = f1, f1_thr
    else:
        result["f1_max"], result["f1_max_threshold"] = None, None
    result["operating_point"] = operating_point(labels, scores, threshold)
    if run.validation_scores:
        result["threshold_rules"] = compare_threshold_rules(run.validation_scores, labels, scores)
    per_defect: dict[str, Any] = {}
    good_idx = np.flatnonzero(labels == 0)
    defect_pixels = float(sum(int(m.sum()) for m in masks)) if use_pixels else 0.0
    for defect in sorted({s.defect for s in samples if s.label == 1}):
        idx = np.concatenate([good_idx, np.array([i for i, s in enumerate(samples) if s.defect == defect], np.int64)])
        sub_masks = [masks[i] for i in idx] if use_pixels else None
        sub_maps = [maps[i] for i in idx] if use_pixels else None
        g = _group_metrics(labels[idx], scores[idx], sub_masks, sub_maps, threshold)
        g["n"] = g["n_defect"]
        g["mean_score"] = float(scores[idx][labels[idx] == 1].mean())
        # this type's share of all defective pixels: the overall pixel AUROC is pooled over pixels, so a type with
        # large masks weighs more there than its image count says
        g["pixel_share"] = sum(int(masks[i].sum()) for i in idx if labels[i] == 1) / defect_pixels if defect_pixels else None
        per_defect[defect] = {k: g[k] for k in ("n", "image_auroc", "pixel_auroc", "aupro", "pixel_share", "detection_rate", "mean_score")}
    if good_idx.size:
        per_defect["good"] = {"n": int(good_idx.size), "false_positive_rate": overall["false_positive_rate"], "mean_score": float(scores[good_idx].mean())}
    result["per_defect"] = per_defect
    result["scores"] = [{"path": str(s.path), "defect": s.defect, "label": int(s.label), "score": float(sc)} for s, sc in zip(samples, scores, strict=True)]
    if overlays is not None:
        result["overlays"] = _write_overlays(Path(overlays), samples, labels, scores, small_maps, threshold, n_overlays, dataset.has_masks)
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    return result


@dataclass
class _Predictor:
    """What the evaluation needs of a run, whatever its family: frames -> (maps, scores) as the runtime computes them."""

    family: str
    product: str | None
    predict: Callable[[list[np.ndarray]], tuple[list[np.ndarray], np.ndarray]]
    threshold: float
    threshold_method: str
    validation_scores: list[float]


def _predictor(run_dir: Path, dataset: Dataset, device: str, product: str | None) -> _Predictor:
    from .families import run_family, toolchain

    family = run_family(run_dir)
    chain = toolchain(family)
    if chain is not None:
        return _Predictor(family, *chain.load("predictor")(run_dir, product, dataset.root))
    run = load_run(run_dir)
    model = run.model.to(device).eval()
    mean, std = tuple(run.config.get("mean", IMAGENET_MEAN)), tuple(run.config.get("std", IMAGENET_STD))

    def predict_frames(frames: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        return predict(model, run.post, frames, mean=mean, std=std, device=device, tiling=run.tiling)

    cal = run.calibration
    return _Predictor("efficientad", None, predict_frames, float(cal.threshold), cal.threshold_method, list(cal.validation_scores))


RULES = ("max", "quantile:0.999", "quantile:0.99", "quantile:0.95", "sigma:3", "sigma:4", "sigma:5")


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """False rejects (good flagged NG) and escapes (defects passed OK) at ``threshold`` (NG when score > threshold).

    >>> operating_point(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.2]), 0.5)["escapes"]
    1
    """
    ng = ~(scores <= threshold)  # NaN is NG, as the runtime decides
    good, bad = labels == 0, labels == 1
    return {
        "threshold": float(threshold),
        "good": int(good.sum()),
        "false_rejects": int((ng & good).sum()),
        "false_reject_rate": _rate(ng[good]),
        "defects": int(bad.sum()),
        "escapes": int((~ng & bad).sum()),
        "escape_rate": _rate(~ng[bad]),
    }


def compare_threshold_rules(validation_scores: list[float], labels: np.ndarray, scores: np.ndarray, rules: tuple[str, ...] = RULES) -> dict[str, Any]:
    """Each threshold rule fitted on the validation-good scores, and its operating point on the test set."""
    return {rule: operating_point(labels, scores, fit_threshold(validation_scores, rule)[0]) for rule in rules}


def _write_overlays(
    folder: Path, samples: list[Sample], labels: np.ndarray, scores: np.ndarray, small_maps: list[np.ndarray], threshold: float, n: int, has_masks: bool
) -> list[str]:
    """Best and worst cases: n highest- and n lowest-scored defects, the highest-scored good images."""
    bad = [int(i) for i in np.argsort(-scores) if labels[i] == 1]
    good = [int(i) for i in np.argsort(-scores) if labels[i] == 0]
    picks = [("defect_top", i) for i in bad[:n]] + [("defect_low", i) for i in bad[::-1][:n]] + [("good_top", i) for i in good[: max(1, n // 2)]]
    vmax = 2.0 * threshold if threshold > 0 else float(scores.max() or 1.0)
    written = []
    for rank, (kind, i) in enumerate(picks):
        sample = samples[i]
        frame = read_image(sample.path)
        amap = resize_bilinear(small_maps[i][None], frame.shape[0], frame.shape[1])[0]
        mask = read_mask(sample, frame.shape) if has_masks and sample.label == 1 else None
        verdict = "NG" if scores[i] > threshold else "OK"
        caption = f"{sample.defect} score {scores[i]:.3f} {verdict} (thr {threshold:.3f})"
        path = folder / f"{kind}_{rank:02d}_{sample.defect}_{sample.path.stem}.png"
        written.append(str(save_overlay(path, frame, amap, vmax=vmax, caption=caption, mask=mask)))
    return written


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def format_table(result: dict[str, Any]) -> str:
    """Plain-text per-defect table of an :func:`evaluate_run` result."""
    head = f"{'defect':<16}{'n':>5}{'img AUROC':>11}{'pix AUROC':>11}{'AU-PRO':>9}{'pix share':>11}{'flagged':>9}{'mean score':>12}"
    lines = [head, "-" * len(head)]
    for name, g in result["per_defect"].items():
        flagged = g.get("detection_rate", g.get("false_positive_rate"))
        lines.append(
            f"{name:<16}{g['n']:>5}{_fmt(g.get('image_auroc')):>11}{_fmt(g.get('pixel_auroc')):>11}{_fmt(g.get('aupro')):>9}{_fmt(g.get('pixel_share')):>11}"
            f"{_fmt(flagged):>9}{_fmt(g['mean_score']):>12}"
        )
    lines.append("-" * len(head))
    c = result["counts"]
    lines.append(
        f"{'all':<16}{c['total']:>5}{_fmt(result['image_auroc']):>11}{_fmt(result['pixel_auroc']):>11}{_fmt(result['aupro']):>9}"
        f"   F1-max {_fmt(result['f1_max'])} @ {_fmt(result['f1_max_threshold'])}"
    )
    op = result["operating_point"]
    lines.append(
        f"operating point at the calibrated threshold {op['threshold']:.4f} ({result['threshold_method']}): "
        f"false rejects {op['false_rejects']}/{op['good']} good ({_pct(op['false_reject_rate'])}), "
        f"escapes {op['escapes']}/{op['defects']} defects ({_pct(op['escape_rate'])}), accuracy {_fmt(result['accuracy'])}"
    )
    rules = result.get("threshold_rules")
    if rules:
        lines.append("other threshold rules (fitted on the same validation-good scores): " + "; ".join(
            f"{name} {r['threshold']:.4f}: FR {_pct(r['false_reject_rate'])} / esc {_pct(r['escape_rate'])}" for name, r in rules.items()))
    return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def main(argv: list[str] | None = None) -> int:
    """``edgead eval RUN_DIR --data DIR [--json OUT] [--overlays DIR] [--device auto]``."""
    p = argparse.ArgumentParser(prog="edgead eval", description="Evaluate a trained run on a test set (metrics table, JSON, overlays).")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", required=True, type=Path, help="dataset root with a test split")
    p.add_argument("--json", type=Path, help="write the metrics as JSON here")
    p.add_argument("--overlays", type=Path, help="folder for heat-map overlays of the best and worst cases")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-pixel-metrics", action="store_true", help="image metrics only (faster, less memory)")
    p.add_argument("--product", default=None, help="UniAD run: the product this data set shows (default: the data folder's name)")
    args = p.parse_args(argv)
    result = evaluate_run(args.run_dir, args.data, device=args.device, batch_size=args.batch_size, overlays=args.overlays, pixel_metrics=not args.no_pixel_metrics,
                          product=args.product)
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"metrics written to {args.json}")
    if args.overlays:
        print(f"overlays in {args.overlays} ({len(result['overlays'])} images)")
    return 0
