"""`edgead fidelity`: how faithfully a lower precision reproduces FP32 on a data set, and (``--record``) the
permission for ``backend="auto"`` to use it on CPUs.

For each candidate (``openvino/bf16``, ``openvino/int8``, ``onnxruntime/int8``...) and the reference (ONNX Runtime
FP32), every test image is read and prepared once and scored by all of them. Reported per candidate: the image
AUROCs and their difference in points, and two label-free figures, the Spearman rank correlation of the scores
and their mean absolute difference relative to the FP32 scores' spread. ``--record`` writes the evidence into
the bundle's manifest (``cpu_precisions``) for each candidate that meets the goals (rank correlation >= 0.999
and |AUROC delta| <= 0.3 points by default); ``Detector(bundle)`` then picks it on a CPU that runs it. For a bundle
of several products (UniAD) the evidence is recorded per product, and ``auto`` uses a precision only once every
product has passed (run ``edgead fidelity`` on each product's set).

    edgead fidelity BUNDLE DATASET --candidate openvino/bf16 --candidate openvino/int8 [--record] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgead.errors import ConfigError, message

__all__ = ["GOALS", "parse_candidate", "compare_precisions", "main"]

GOALS = {"min_rank_correlation": 0.999, "max_abs_delta_points": 0.3}


def parse_candidate(text: str) -> tuple[str, str]:
    """'openvino/bf16' -> ('openvino', 'bf16').

    >>> parse_candidate("onnxruntime/int8")
    ('onnxruntime', 'int8')
    """
    from edgead.registry import BACKENDS, RUNTIME_PRECISIONS, check_choice

    backend, _, precision = str(text).partition("/")
    if not precision:
        raise ConfigError(message("candidate", repr(text), "BACKEND/PRECISION, e.g. openvino/bf16", "pass --candidate openvino/bf16"))
    return check_choice("backend", backend, BACKENDS), check_choice("precision", precision, RUNTIME_PRECISIONS)


def compare_precisions(
    bundle: str | Path,
    dataset: str | Path,
    candidates: Sequence[tuple[str, str]],
    *,
    threads: int | None = None,
    max_images: int | None = None,
    product: str | None = None,
) -> dict[str, Any]:
    """Image AUROC and score fidelity of each (backend, precision) candidate against ONNX Runtime FP32.

    ``product``: the product of a multi-product (UniAD) bundle the set shows; default: the set's folder name (or
    the bundle's only product).

    >>> compare_precisions("bundles/line3", "/data/line3", [("openvino", "bf16")])  # doctest: +SKIP
    {'n': 300, 'reference': {...}, 'candidates': {'openvino/bf16': {'auroc': 0.97, 'delta_points': -0.02, ...}}}
    """
    from edgead import Detector
    from edgead.datasets import image_color, open_dataset, read_image
    from edgead.errors import DataError

    samples = open_dataset(dataset).test
    if max_images is not None and len(samples) > max_images:
        idx = np.random.default_rng(0).choice(len(samples), max_images, replace=False)
        samples = [samples[i] for i in sorted(idx)]
    labels = [s.label for s in samples]
    keys = ["onnxruntime/fp32"] + [f"{b}/{p}" for b, p in candidates]
    scores: dict[str, list[float]] = {k: [] for k in keys}
    with contextlib.ExitStack() as stack:
        dets = [stack.enter_context(Detector(bundle, backend=k.split("/")[0], precision=k.split("/")[1], threads=threads)) for k in keys]
        product = resolve_product(dets[0].products, product, Path(dataset))
        t0 = time.perf_counter()
        for s in samples:  # each image read and prepared once, scored by all
            frame = read_image(s.path)
            for k, det in zip(keys, dets, strict=True):
                scores[k].append(det.infer(frame, color=image_color(frame), map_size="model", product=product).score)
        devices = {k: det.device for k, det in zip(keys, dets, strict=True)}
    ref = np.asarray(scores[keys[0]])
    if not np.all(np.isfinite(ref)):
        raise DataError(message("FP32 reference scores", f"{int(np.count_nonzero(~np.isfinite(ref)))} NaN or infinite of {len(ref)}",
                                "finite scores from the bundle's FP32 model", "re-export the bundle: its FP32 model itself is broken"))
    reference = fidelity_row(labels, ref, ref)
    out: dict[str, Any] = {
        "n": len(samples),
        "dataset": str(dataset),
        "product": product,
        "seconds": round(time.perf_counter() - t0, 1),
        "reference": {"key": keys[0], "auroc": reference["auroc"], "device": devices[keys[0]]},
        "candidates": {k: {**fidelity_row(labels, ref, np.asarray(scores[k])), "device": devices[k]} for k in keys[1:]},
    }
    return out


def fidelity_row(labels: Sequence[int], ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """How faithfully the scores ``got`` reproduce the FP32 scores ``ref`` (same images): image AUROC and its change
    in points (None without both labels), Spearman rank correlation, mean absolute error relative to the FP32 spread,
    the count of NaN/inf scores, and whether ``GOALS`` are met (never with a non-finite score)."""
    from edgead.metrics import image_auroc

    from .quantize import rank_correlation

    nonfinite = int(np.count_nonzero(~np.isfinite(got)))
    if nonfinite:  # a candidate that outputs NaN/inf fails, with the count; the others are still reported
        return {"nonfinite_scores": nonfinite, "auroc": None, "delta_points": None, "score_rank_correlation": None, "score_error_rel": None, "meets_goals": False}
    both = 0 < sum(labels) < len(labels)
    auroc = float(image_auroc(labels, got)) if both else None
    delta = 100.0 * (auroc - float(image_auroc(labels, ref))) if auroc is not None else None
    rank = rank_correlation(ref, got)
    return {
        "nonfinite_scores": 0,
        "auroc": auroc,
        "delta_points": delta,
        "score_rank_correlation": rank,
        "score_error_rel": float(np.mean(np.abs(got - ref)) / max(float(np.std(ref)), 1e-12)),
        "meets_goals": bool(rank >= GOALS["min_rank_correlation"] and (delta is None or abs(delta) <= GOALS["max_abs_delta_points"])),
    }


def resolve_product(products: tuple[str, ...], product: str | None, dataset: Path) -> str | None:
    """The product a data set is scored as, for a bundle or run calibrated per product (UniAD, PatchCore): ``--product``,
    else the only one, else the set's folder name; None for a bundle without products (``--product`` refused)."""
    if not products:
        if product is not None:
            raise ConfigError(message("--product", repr(product), "no product (this bundle inspects one product)", "drop --product"))
        return None
    name = product or (products[0] if len(products) == 1 else dataset.name)
    if name not in products:
        got = repr(name) if product else f"{name!r} (the folder name of {dataset})"
        raise ConfigError(message("product", got, f"one of {', '.join(products)}", "pass --product NAME: the product this data set shows"))
    return name


def main(argv: list[str] | None = None) -> int:
    """``edgead fidelity BUNDLE DATASET --candidate BACKEND/PRECISION [...] [--record] [--json OUT]``."""
    from edgead.bundle import CPU_AUTO_PRECISIONS, allow_precision

    p = argparse.ArgumentParser(prog="edgead fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("dataset", type=Path, help="MVTec-layout data set; its test split is scored")
    p.add_argument("--candidate", action="append", required=True, help="BACKEND/PRECISION, e.g. openvino/bf16 (repeatable)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--product", default=None, help="the product the set shows, for a multi-product (UniAD) bundle (default: the set's folder name)")
    p.add_argument("--record", action="store_true", help="allow backend='auto' to use each candidate that meets the goals (manifest cpu_precisions)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    candidates = [parse_candidate(c) for c in args.candidate]
    report = compare_precisions(args.bundle, args.dataset, candidates, threads=args.threads, max_images=args.max_images, product=args.product)
    report["goals"] = GOALS
    report["command"] = "edgead fidelity " + " ".join(argv if argv is not None else [])
    recorded = []
    for key, row in report["candidates"].items():
        precision = key.split("/")[1]
        if row.get("nonfinite_scores"):
            print(f"{key}: {row['nonfinite_scores']} of {report['n']} scores NaN or infinite -> misses the goals")
            continue
        print(f"{key}: AUROC {row['auroc']} ({row['delta_points']:+.2f} points vs FP32), rank correlation {row['score_rank_correlation']:.5f}, "
              f"score error {row['score_error_rel']:.4f} of the spread -> {'meets' if row['meets_goals'] else 'misses'} the goals" if row["delta_points"] is not None
              else f"{key}: rank correlation {row['score_rank_correlation']:.5f}")
        if args.record and row["meets_goals"] and precision in CPU_AUTO_PRECISIONS:
            evidence = {k: row[k] for k in ("auroc", "delta_points", "score_rank_correlation", "score_error_rel")}
            evidence = {**evidence, "dataset": str(args.dataset), "n": report["n"], "measured_with": key, "device": row["device"]}
            allow_precision(args.bundle, precision, evidence, product=report["product"])  # a multi-product bundle: per product
            recorded.append(precision)
    report["recorded"] = recorded
    if recorded and report["product"] is None:
        print(f"recorded in {args.bundle}/manifest.json: backend='auto' may use {', '.join(recorded)} on CPUs")
    elif recorded:
        print(f"recorded in {args.bundle}/manifest.json for product {report['product']}: backend='auto' uses {', '.join(recorded)} once every product has passed")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0
