"""Why is a run's pixel AUROC low? Pixel AUROC of the local, global and merged maps, with the map border padded by
the edge value (what EdgeAD does) or by zeros (what it did before), and where the normal pixels' values lie.

A normalised EfficientAD map sends the validation quantile q_a to 0, so most normal pixels are slightly negative.
A zero-padded border is then *above* most normal pixels and outranks them in a pixel AUROC (and can set the
image score): on deeppcb at 128 px this put the pixel AUROC below chance. The script measures that effect and the
others it could be confused with (map/mask alignment, local vs global branch) on one run's test set.

    python scripts/pixel_diagnosis.py RUN_DIR --data DATASET [--max-images 300] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from build_engines.calibrate import model_maps
from build_engines.efficientad.run import load_run
from edgead.datasets import image_color, open_dataset, read_image, read_mask
from edgead.metrics import pixel_auroc
from edgead.postprocess import resize_bilinear
from edgead.preprocess import prepare


def diagnose(run_dir: Path, data: Path, max_images: int = 300, batch: int = 8) -> dict[str, Any]:
    run = load_run(run_dir)
    cfg = run.config
    if cfg.get("tile"):
        raise SystemExit("pixel_diagnosis: tiled runs are not supported (their maps are stitched); use an untiled run")
    ds = open_dataset(data)
    if not ds.has_masks:
        raise SystemExit(f"pixel_diagnosis: {data} has no ground-truth masks")
    samples = list(ds.test)[:max_images]
    post = run.post
    size = run.model.image_size
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    variants: dict[str, list[np.ndarray]] = {f"{branch}_{pad}": [] for branch in ("local", "global", "merged") for pad in ("edge", "zero")}
    masks: list[np.ndarray] = []
    normal_values: list[np.ndarray] = []
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        frames = [read_image(s.path) for s in chunk]
        x = np.stack([prepare(f, size, mean, std, image_color(f)) for f in frames])
        local, glob = model_maps(run.model, x, batch_size=batch)
        branches = {"local": post.st.apply(local.astype(np.float64)), "global": post.ae.apply(glob.astype(np.float64))}
        branches["merged"] = 0.5 * branches["local"] + 0.5 * branches["global"]
        p = post.pad
        for i, (sample, frame) in enumerate(zip(chunk, frames, strict=True)):
            mask = read_mask(sample, frame.shape)
            masks.append(mask)
            for branch, maps in branches.items():
                for pad in ("edge", "zero"):
                    m = np.pad(maps[i], p, mode="edge" if pad == "edge" else "constant") if p else maps[i]
                    full = resize_bilinear(m[None].astype(np.float32), frame.shape[0], frame.shape[1])[0]
                    variants[f"{branch}_{pad}"].append(full)
                    if branch == "merged" and pad == "edge":
                        normal_values.append(full[~mask.astype(bool)][::97])  # a sample of normal pixels
    normal = np.concatenate(normal_values) if normal_values else np.zeros(0)
    return {
        "run_dir": str(run_dir),
        "data": str(data),
        "images": len(samples),
        "map_pad": post.pad,
        "pixel_auroc": {k: round(float(pixel_auroc(masks, v)), 4) for k, v in variants.items()},
        "normal_pixels_below_zero": round(float((normal < 0).mean()), 4) if normal.size else None,
        "normal_pixel_quantiles": {q: round(float(np.quantile(normal, float(q))), 5) for q in ("0.5", "0.9", "0.99")} if normal.size else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--max-images", type=int, default=300)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    report = diagnose(a.run_dir, a.data, a.max_images)
    report["command"] = " ".join(["python", "scripts/pixel_diagnosis.py", *(argv if argv is not None else sys.argv[1:])])
    text = json.dumps(report, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
