"""Run a detector over a folder of images: CSV of scores and decisions, plus heat-map overlays.

    python samples/infer_folder.py BUNDLE IMAGES_DIR --out results/ [--backend auto] [--threshold T]

Writes results/scores.csv (file, score, decision, threshold, total_ms) and
results/overlays/<name>.png (the frame with the anomaly map blended in; red = anomalous).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np

import edgead
from edgead.datasets import IMAGE_EXTENSIONS, image_color, read_image


def overlay(frame: np.ndarray, anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """Blend the anomaly map (0 .. 2 x threshold -> blue .. red) over an 8-bit BGR copy of the frame."""
    image = frame if frame.dtype == np.uint8 else (frame >> 8).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    scale = 2.0 * threshold if threshold > 0 else float(anomaly_map.max()) or 1.0
    heat = cv2.applyColorMap((np.clip(anomaly_map / scale, 0.0, 1.0) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(image, 0.6, heat, 0.4, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("images", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the bundle's calibrated one)")
    parser.add_argument("--no-overlays", action="store_true")
    args = parser.parse_args()

    files = sorted(p for p in args.images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise SystemExit(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {args.images}")
    (args.out / "overlays").mkdir(parents=True, exist_ok=True)
    n_bad = 0
    with edgead.Detector(args.bundle, backend=args.backend, threshold=args.threshold) as det, open(args.out / "scores.csv", "w", newline="") as fh:
        print(f"{len(files)} images; backend={det.backend} precision={det.precision} threshold={det.threshold:.4f}")
        writer = csv.writer(fh)
        writer.writerow(["file", "score", "decision", "threshold", "total_ms"])
        for path in files:
            frame = read_image(path)
            result = det.infer(frame, color=image_color(frame))
            n_bad += result.is_anomalous
            rel = path.relative_to(args.images)
            writer.writerow([str(rel), f"{result.score:.6f}", result.decision, f"{result.threshold:.6f}", f"{result.timings.get('total', float('nan')):.2f}"])
            if not args.no_overlays:
                name = str(rel.with_suffix(".png")).replace("/", "__")
                cv2.imwrite(str(args.out / "overlays" / name), overlay(frame, result.anomaly_map, result.threshold))
    print(f"{n_bad} NG / {len(files)} images -> {args.out / 'scores.csv'}")


if __name__ == "__main__":
    main()
