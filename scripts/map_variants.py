"""Why a set's pixel AUROC stays low: PatchCore's map against its variants, on the same grid features.

For one data set (MVTec layout, no tiling) the Lite0 grid features (stages 2-5, stride 16, as ``edgead train --family
patchcore``, its split: ``--val-fraction 0.1``, ``--seed 0``) of the training images and of the test images are
computed once and kept in memory; then each variant's raw map is scored
with EdgeAD's metrics (maps resized bilinearly to each image, image score = max of the variant's map):

* ``coreset``: the shipped PatchCore (greedy coreset 10 %, at most 20 000), and (several defect types) the same map with each type
  left out in turn;
* ``blur K``: its map averaged over K x K grid cells (image score still from the unblurred map);
* ``centred``: each image's features with its own mean feature subtracted, next to the features (``[f, f - mean]``);
* ``full bank``: every training feature in the bank (no coreset);
* ``position``: each cell compared only with the training features at the same grid cell (aligned parts);
* ``spade``: each cell compared with the cells of the 50 training images nearest by pooled feature;
* ``gaussian``: a Gaussian per cell (over its 3 x 3 neighbourhood of training cells), Mahalanobis distance.

    OMP_NUM_THREADS=1 python scripts/map_variants.py --data $D/magnetic_tile --json docs/measurements/accuracy/patchcore_magnetic_tile_map_variants.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from build_engines.backbones import StageGrid, load_backbone, parse_stages
from build_engines.patchcore.train import PatchCoreConfig, bank_size, feature_statistics
from build_engines.probe import greedy_coreset, nearest_distance, prepared_batch, tiled_features
from edgead.datasets import open_dataset, read_image, read_mask, split_train_val
from edgead.metrics import aupro, image_auroc, pixel_auroc


def _rows(f: torch.Tensor) -> torch.Tensor:
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


def _bank_map(tr: torch.Tensor, te: torch.Tensor, coreset: float | None) -> np.ndarray:
    """Nearest-bank-feature distance map (N, h, w) of ``te`` against the rows of ``tr`` (standardised here)."""
    rows = _rows(tr)
    mean, std = feature_statistics(rows)
    rows = (rows - mean) / std
    if coreset is not None:
        rows = rows[greedy_coreset(rows, bank_size(len(rows), coreset, PatchCoreConfig.max_bank), seed=PatchCoreConfig.seed)]
    return nearest_distance((_rows(te) - mean) / std, rows).reshape(te.shape[0], te.shape[2], te.shape[3]).numpy()


def _standardised(tr: torch.Tensor, te: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = (v[:, None, None] for v in feature_statistics(_rows(tr)))
    return (tr - mean) / std, (te - mean) / std


def _position_map(tr: torch.Tensor, te: torch.Tensor) -> np.ndarray:
    tr, te = _standardised(tr, te)
    out = np.zeros((te.shape[0], te.shape[2], te.shape[3]), np.float32)
    for i in range(te.shape[2]):
        for j in range(te.shape[3]):
            out[:, i, j] = torch.cdist(te[:, :, i, j], tr[:, :, i, j]).amin(1).numpy()
    return out


def _spade_map(tr: torch.Tensor, te: torch.Tensor, k: int = 50) -> np.ndarray:
    tr, te = _standardised(tr, te)
    nearest = torch.cdist(te.mean((2, 3)), tr.mean((2, 3))).topk(min(k, len(tr)), largest=False).indices
    return np.stack([nearest_distance(_rows(te[n : n + 1]), _rows(tr[nearest[n]])).reshape(te.shape[2:]).numpy() for n in range(len(te))])


def _gaussian_map(tr: torch.Tensor, te: torch.Tensor, eps: float = 0.01) -> np.ndarray:
    tr, te = _standardised(tr, te)
    c, h, w = tr.shape[1:]
    out = np.zeros((te.shape[0], h, w), np.float32)
    for i in range(h):
        for j in range(w):
            x = _rows(tr[:, :, max(0, i - 1) : i + 2, max(0, j - 1) : j + 2]).double()
            precision = torch.linalg.inv(torch.cov(x.T) + eps * torch.eye(c, dtype=torch.float64))
            q = te[:, :, i, j].double() - x.mean(0)
            out[:, i, j] = ((q @ precision) * q).sum(1).clamp_min(0).sqrt().numpy()
    return out


def _centred(f: torch.Tensor) -> torch.Tensor:
    return torch.cat([f, f - f.mean((2, 3), keepdim=True)], 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="data set folder (MVTec layout, with masks)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--json", type=Path, default=None, help="write the table here")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    ds = open_dataset(a.data)
    train, _ = split_train_val(ds.train_good, PatchCoreConfig.val_fraction, PatchCoreConfig.seed)  # the run's split: the same goods stay out
    grid = StageGrid(load_backbone("efficientnet-lite0"), parse_stages("2,3,4,5"), 16).eval()
    with torch.no_grad():
        def features(paths: list[Path], what: str) -> torch.Tensor:
            return tiled_features(lambda frames: grid(prepared_batch(frames, a.image_size)), paths, None, 16, progress=what)[0]

        tr, te = features(train, "train features"), features([s.path for s in ds.test], "test features")
    frames = [read_image(s.path) for s in ds.test]
    masks = [read_mask(s, f.shape) for s, f in zip(ds.test, frames, strict=True)]
    labels = np.array([s.label for s in ds.test])
    defects = np.array([s.defect for s in ds.test])

    def score(small: np.ndarray, image_scores: np.ndarray | None = None, keep: np.ndarray | None = None) -> dict[str, Any]:
        keep = np.ones(len(labels), bool) if keep is None else keep
        idx = np.flatnonzero(keep)
        maps = [cv2.resize(small[i].astype(np.float32), (masks[i].shape[1], masks[i].shape[0]), interpolation=cv2.INTER_LINEAR) for i in idx]
        s = small.reshape(len(small), -1).max(1) if image_scores is None else image_scores
        per = {}
        for d in sorted(set(defects[idx]) - {"good"}):
            sub = [k for k, i in enumerate(idx) if defects[i] in (d, "good")]
            per[str(d)] = pixel_auroc([masks[idx[k]] for k in sub], [maps[k] for k in sub])
        sub_masks = [masks[i] for i in idx]
        return {"image_auroc": image_auroc(labels[idx], s[idx]), "pixel_auroc": pixel_auroc(sub_masks, maps), "aupro": float(aupro(sub_masks, maps)), "pixel_auroc_per_defect": per}

    base = _bank_map(tr, te, PatchCoreConfig.coreset)
    variants: dict[str, Callable[[], dict[str, Any]]] = {"coreset 10 % (shipped)": lambda: score(base)}
    types = sorted(set(defects) - {"good"})
    for d in types if len(types) > 1 else []:
        variants[f"coreset 10 %, without {d}"] = lambda d=d: score(base, keep=defects != d)
    for k in (3, 5, 7):
        variants[f"blur {k}"] = lambda k=k: score(np.stack([cv2.blur(m, (k, k), borderType=cv2.BORDER_REPLICATE) for m in base]), base.reshape(len(base), -1).max(1))
    variants["centred"] = lambda: score(_bank_map(_centred(tr), _centred(te), PatchCoreConfig.coreset))
    variants["full bank"] = lambda: score(_bank_map(tr, te, None))
    variants["position"] = lambda: score(_position_map(tr, te))
    variants["spade"] = lambda: score(_spade_map(tr, te))
    variants["gaussian"] = lambda: score(_gaussian_map(tr, te))
    table: dict[str, Any] = {}
    for name, run in variants.items():
        table[name] = run()
        r = table[name]
        per = ", ".join(f"{d} {v:.3f}" for d, v in r["pixel_auroc_per_defect"].items())
        print(f"{name:32s} image {r['image_auroc']:.3f}  pixel {r['pixel_auroc']:.3f}  AU-PRO {r['aupro']:.3f}  pixel per type: {per}", flush=True)
    report = {"data": str(ds.root), "image_size": a.image_size, "train_images": len(train), "variants": table, "wall_s": round(time.perf_counter() - t0, 1)}
    if a.json is not None:
        a.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
