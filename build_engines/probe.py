"""`edgead probe`: how much anomaly signal a feature extractor carries, in minutes, without a student.

PatchCore-style: the patch features of the good training images form a memory bank (reduced by
greedy k-center coreset selection, PatchCore's choice, or kept whole); a test patch scores its
Euclidean distance to the nearest bank vector, an image the maximum over its patches. Image AUROC
(and pixel AUROC on request) per data set. Features are standardised per channel with the bank's
statistics, so extractors of any scale compare like with like.

Extractors (``--extractor``, repeatable):

* ``target[:BACKBONE[:STAGES]]``: the distillation target (``backbones.PatchFeatures``), e.g.
  ``target``, ``target:efficientnet-lite1:2,3``; the backbone sees the image at ``input_scale`` x
  the model size so that its grid equals the PDN's.
* ``grid[:BACKBONE[:STAGES]]``: UniAD's input (``backbones.StageGrid``: the stages resized to one stride-16 grid
  and concatenated), to choose UniAD's backbone and stages; ``--image-size`` a multiple of 16 (UniAD: 224).
* ``teacher[:PATH]``: an unpadded PDN teacher file (default: the embedded one).
* ``random``: a randomly initialised unpadded PDN-S (a new one per seed; the other extractors have fixed
  weights, their features are extracted once and only the coreset changes with the seed).

Each extractor runs with ``--seeds`` seeds (coreset start, projection and random weights); the
report gives the mean and the spread (min/max) of the AUROCs, so that a ranking is only believed
when it is larger than the spread.

Example::

    edgead probe --data /data/ballscrew --extractor target --extractor teacher --extractor random \\
        --image-size 128 --coreset 0.1 --seeds 3 --json probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgead.datasets import Dataset, image_color, open_dataset, read_image, read_mask, split_train_val
from edgead.errors import ConfigError, DataError, message
from edgead.metrics import image_auroc, pixel_auroc
from edgead.postprocess import resize_bilinear
from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare
from edgead.tiling import Tiling

from .backbones import BACKBONES, PatchFeatures, StageGrid, load_backbone, parse_stages
from .efficientad.models import check_image_size, pdn
from .efficientad.teacher import load_teacher

__all__ = ["Extractor", "ProbeFeatures", "parse_extractor", "greedy_coreset", "nearest_distance", "prepared_batch", "tiled_features", "extract", "score", "probe_dataset", "run_probe", "main"]

log = logging.getLogger(__name__)

PROJECTION_DIM = 128  # coreset selection runs on a random projection (PatchCore)
EXTRACTOR_KINDS = ("target", "grid", "teacher", "random")


@dataclass
class Extractor:
    """A feature function on prepared images and how its grid sits in the image.

    ``forward(images)`` takes a list of frames and returns (N, C, h, w) features; ``pad`` cells
    on each side complete the grid to cover the image (4 for an unpadded PDN, 0 for the target and the grid).
    """

    name: str
    image_size: int
    forward: Callable[[list[np.ndarray]], torch.Tensor]
    pad: int


def prepared_batch(frames: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Frames (uint8/uint16, gray or BGR) -> the ImageNet-normalised (N, 3, size, size) model input."""
    return torch.from_numpy(np.stack([prepare(f, size, IMAGENET_MEAN, IMAGENET_STD, image_color(f)) for f in frames]))


def _pdn_extractor(name: str, net: nn.Module, image_size: int) -> Extractor:
    net = net.float().eval()

    @torch.no_grad()
    def forward(frames: list[np.ndarray]) -> torch.Tensor:
        return net(prepared_batch(frames, image_size))

    return Extractor(name, image_size, forward, pad=4)


def parse_extractor(spec: str, image_size: int, seed: int = 0) -> Extractor:
    """Build the extractor named by ``spec`` (see the module doc).

    >>> parse_extractor("random", 128).pad
    4
    """
    kind, _, rest = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind not in EXTRACTOR_KINDS:
        raise ConfigError(message("extractor", repr(spec), "target[:BACKBONE[:STAGES]], grid[:BACKBONE[:STAGES]], teacher[:PATH] or random", "e.g. --extractor target --extractor teacher --extractor random"))
    if kind == "grid":
        from .uniad.train import UniADConfig

        uniad = {f.name: f.default for f in dataclasses.fields(UniADConfig)}  # the grid UniAD trains on by default
        backbone_name, stages_text = _lite_backbone(rest, kind)
        grid = StageGrid(load_backbone(backbone_name), parse_stages(stages_text or uniad["stages"]), uniad["stride"]).eval()
        if image_size % grid.stride or image_size < 4 * grid.stride:  # UniAD's own rule (UniADConfig.validate)
            raise ConfigError(message("--image-size", image_size, f"a multiple of the grid stride {grid.stride}, >= {4 * grid.stride}", f"use {uniad['image_size']} (UniAD)"))

        @torch.no_grad()
        def grid_forward(frames: list[np.ndarray]) -> torch.Tensor:
            return grid(prepared_batch(frames, image_size))

        return Extractor(f"grid {backbone_name} stages {','.join(map(str, grid.stages))}", image_size, grid_forward, pad=0)
    check_image_size(image_size)
    if kind == "random":
        torch.manual_seed(seed)
        return _pdn_extractor(f"random PDN-S (seed {seed})", pdn("s", padding=False), image_size)
    if kind == "teacher":
        weights = rest or "default"
        return _pdn_extractor(f"teacher {weights}", load_teacher("s", weights), image_size)
    backbone_name, stages_text = _lite_backbone(rest, kind)  # target
    features = PatchFeatures(load_backbone(backbone_name), seed=0, stages=parse_stages(stages_text) if stages_text else None).eval()
    size = image_size * features.input_scale

    @torch.no_grad()
    def forward(frames: list[np.ndarray]) -> torch.Tensor:
        return features(prepared_batch(frames, size))

    return Extractor(f"target {backbone_name} stages {','.join(map(str, features.stages))}", image_size, forward, pad=0)


def _lite_backbone(rest: str, kind: str) -> tuple[str, str]:
    """``BACKBONE[:STAGES]`` of a target/grid spec -> (backbone name, stages text), the backbone checked."""
    backbone_name, _, stages_text = rest.partition(":")
    backbone_name = backbone_name or "efficientnet-lite0"
    if backbone_name not in BACKBONES or "lite" not in backbone_name:
        raise ConfigError(message("probe backbone", repr(backbone_name), "an offline Lite backbone: " + ", ".join(b for b in BACKBONES if "lite" in b), f"e.g. {kind}:efficientnet-lite0:3,4,5"))
    return backbone_name, stages_text


def greedy_coreset(features: torch.Tensor, n: int, *, seed: int = 0, projection_dim: int = PROJECTION_DIM, group: int = 16384) -> torch.Tensor:
    """Indices of ``n`` rows chosen by greedy k-center selection (each new row the farthest from those chosen).

    Distances are taken on a seeded Gaussian projection to ``projection_dim`` dimensions (as PatchCore);
    the first row is a seeded random pick. Above ``group`` rows the selection runs per consecutive group
    of rows with the same kept fraction (a composable coreset: each group keeps its own rare patches,
    and the cost grows linearly instead of quadratically with the bank).

    >>> x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [0.0, 0.2]])
    >>> 2 in greedy_coreset(x, 2, projection_dim=2).tolist()  # the outlier is kept, whichever row starts
    True
    """
    total, dim = features.shape
    if not 1 <= n <= total:
        raise ConfigError(message("coreset size", n, f"1..{total}", "pass a coreset ratio in (0, 1]"))
    g = torch.Generator().manual_seed(seed)
    x = features.float()
    if dim > projection_dim:
        x = x @ (torch.randn(dim, projection_dim, generator=g) / projection_dim**0.5)
    if total > group:
        bounds = np.linspace(0, total, -(-total // group) + 1).round().astype(int)
        counts = np.diff(np.floor(np.linspace(0, n, len(bounds))).astype(int))
        parts = [lo + _greedy(x[lo:hi], max(1, int(k)), g) for lo, hi, k in zip(bounds[:-1], bounds[1:], counts, strict=True)]
        return torch.cat(parts)
    return _greedy(x, n, g)


def _greedy(x: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    total = x.shape[0]
    sq = (x * x).sum(1)
    chosen = torch.empty(n, dtype=torch.long)
    current = int(torch.randint(total, (1,), generator=g))
    min_dist = torch.full((total,), float("inf"))
    for i in range(n):
        chosen[i] = current
        d = sq - 2.0 * (x @ x[current]) + sq[current]  # squared distances to the new centre
        torch.minimum(min_dist, d, out=min_dist)
        current = int(torch.argmax(min_dist))
    return chosen


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 2048, bank_chunk: int = 8192) -> torch.Tensor:
    """Euclidean distance of every query row to its nearest bank row (GEMM-based, chunked to stay in cache).

    >>> nearest_distance(torch.tensor([[0.0, 3.0]]), torch.tensor([[0.0, 0.0], [4.0, 3.0]])).tolist()
    [3.0]
    """
    bank_sq = (bank * bank).sum(1)
    out = torch.empty(queries.shape[0])
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk]
        best = torch.full((q.shape[0],), float("inf"))
        for b0 in range(0, bank.shape[0], bank_chunk):
            part = torch.addmm(bank_sq[b0 : b0 + bank_chunk], q, bank[b0 : b0 + bank_chunk].T, beta=1.0, alpha=-2.0)  # |b|^2 - 2 q.b
            torch.minimum(best, part.min(1).values, out=best)
        out[start : start + chunk] = (best + (q * q).sum(1)).clamp_min(0).sqrt()
    return out


def tiled_features(
    forward: Callable[[list[np.ndarray]], torch.Tensor], paths: Sequence[Path], tiling: Tiling | None = None, batch: int = 8, progress: str | None = None
) -> tuple[torch.Tensor, np.ndarray, list[tuple[int, ...]]]:
    """``forward`` (a batch of frames -> feature maps) of every image (of every tile of it, with a tiling), run
    ``batch`` pieces at a time; returns the features, the image index of each row and the image shapes.
    ``progress``: a progress bar with this label."""
    from tqdm import tqdm

    feats, owner, shapes = [], [], []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            feats.append(forward(pending).float())
            pending.clear()

    for i, path in enumerate(tqdm(paths, desc=progress, unit="img", dynamic_ncols=True, disable=progress is None)):
        image = read_image(path)
        shapes.append(image.shape)
        for piece in tiling.cut(image) if tiling is not None else [image]:
            pending.append(piece)
            owner.append(i)
            if len(pending) == batch:
                flush()
    flush()
    return torch.cat(feats), np.asarray(owner, np.int64), shapes


@dataclass
class ProbeFeatures:
    """Features of one extractor on one data set: the bank (train part of train/good) and the test images."""

    extractor: Extractor
    bank: torch.Tensor  # (P, C) standardised
    test: torch.Tensor  # (T, C, h, w) standardised, one row per test image (per tile with a tiling)
    owner: np.ndarray  # (T,) test image of each row
    labels: np.ndarray
    masks: list[np.ndarray] | None
    seconds: float
    tiling: Tiling | None = None


def extract(
    extractor: Extractor,
    dataset: Dataset,
    *,
    val_fraction: float = 0.1,
    pixel: bool = False,
    max_test: int | None = None,
    tiling: Tiling | None = None,
    max_train: int | None = None,
) -> ProbeFeatures:
    """Bank and test features of ``dataset``; the bank uses the same train part of ``train/good`` as
    ``edgead train`` (``split_train_val`` with ``val_fraction``, seed 0), never a test image. With a tiling
    every image is cut into tiles first (as ``edgead train --tile``)."""
    t0 = time.perf_counter()
    train_paths, _ = split_train_val(dataset.train_good, val_fraction, 0)
    if max_train is not None and len(train_paths) > max_train:  # full-resolution tiles of hundreds of images do not fit in memory
        pick = np.random.default_rng(0).choice(len(train_paths), max_train, replace=False)
        train_paths = [train_paths[i] for i in sorted(pick)]
    bank_maps, _, _ = tiled_features(extractor.forward, train_paths, tiling)
    c = bank_maps.shape[1]
    bank = bank_maps.permute(0, 2, 3, 1).reshape(-1, c)
    mean, std = bank.mean(0), bank.std(0).clamp_min(1e-6)
    samples = list(dataset.test)
    if max_test is not None and len(samples) > max_test:
        pick = np.random.default_rng(0).choice(len(samples), max_test, replace=False)
        samples = [samples[i] for i in sorted(pick)]
    if not samples:
        raise DataError(message("test set", f"no test images in {dataset.root}", "test/good and test/<defect> images", "point --data at a set with a test split"))
    test, owner, shapes = tiled_features(extractor.forward, [s.path for s in samples], tiling)
    masks = [read_mask(s, shape) for s, shape in zip(samples, shapes, strict=True)] if pixel and dataset.has_masks else None
    view = (1, c, 1, 1)
    labels = np.array([s.label for s in samples])
    test.sub_(mean.view(view)).div_(std.view(view))  # in place: full-resolution tiles make this the largest tensor
    return ProbeFeatures(extractor, (bank - mean) / std, test, owner, labels, masks, time.perf_counter() - t0, tiling)


def score(features: ProbeFeatures, *, coreset: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """Image (and pixel) AUROC of nearest-neighbour distances to a coreset of the bank (``coreset``: kept fraction)."""
    if not 0.0 < coreset <= 1.0:
        raise ConfigError(message("--coreset", coreset, "a fraction in (0, 1]", "use 0.1 (PatchCore) or 1 for the whole bank"))
    t0 = time.perf_counter()
    bank = features.bank
    if coreset < 1.0:
        bank = bank[greedy_coreset(bank, max(1, int(round(coreset * bank.shape[0]))), seed=seed)]
    t, c, h, w = features.test.shape
    per = max(1, 65536 // (h * w))  # maps (tiles) per call: a channels-last copy of a few, not of the whole test set
    dist = torch.cat([nearest_distance(features.test[i : i + per].permute(0, 2, 3, 1).reshape(-1, c), bank) for i in range(0, t, per)]).reshape(t, h, w)
    n = len(features.labels)
    scores = np.full(n, -np.inf)
    np.maximum.at(scores, features.owner, dist.reshape(t, -1).max(1).values.numpy().astype(np.float64))
    pixel = None
    if features.masks is not None:
        pad = features.extractor.pad
        padded = (F.pad(dist[:, None], (pad,) * 4, mode="replicate")[:, 0] if pad else dist).numpy()
        maps = []
        for k, m in enumerate(features.masks):
            rows = padded[features.owner == k]
            if features.tiling is not None:
                maps.append(features.tiling.stitch(rows, m.shape[0], m.shape[1], pad))
            else:
                maps.append(resize_bilinear(rows, m.shape[0], m.shape[1])[0])
        pixel = pixel_auroc(features.masks, maps)
    return {
        "extractor": features.extractor.name,
        "image_size": features.extractor.image_size,
        "seed": seed,
        "coreset": coreset,
        "bank_vectors": int(bank.shape[0]),
        "train_patches": int(features.bank.shape[0]),
        "test_images": int(n),
        "tiling": features.tiling.to_dict() if features.tiling is not None else None,
        "image_auroc": image_auroc(features.labels, scores),
        "labels": features.labels.astype(int).tolist(),  # per test image, with its score: paired comparisons of extractors
        "image_scores": [round(float(v), 6) for v in scores],
        "pixel_auroc": pixel,
        "seconds": {"features": round(features.seconds, 1), "score": round(time.perf_counter() - t0, 1)},
    }


def probe_dataset(extractor: Extractor, dataset: Dataset, *, coreset: float = 0.1, seed: int = 0, val_fraction: float = 0.1, pixel: bool = False,
                  max_test: int | None = None, tiling: Tiling | None = None) -> dict[str, Any]:
    """:func:`extract` then :func:`score`: one extractor, one data set, one seed."""
    if not 0.0 < coreset <= 1.0:
        raise ConfigError(message("--coreset", coreset, "a fraction in (0, 1]", "use 0.1 (PatchCore) or 1 for the whole bank"))
    result = score(extract(extractor, dataset, val_fraction=val_fraction, pixel=pixel, max_test=max_test, tiling=tiling), coreset=coreset, seed=seed)
    log.info("probe %s on %s (seed %d): image AUROC %.3f, %d bank vectors", extractor.name, dataset.root.name, seed, result["image_auroc"], result["bank_vectors"])
    return result


def _seeded_weights(spec: str) -> bool:
    return str(spec).strip().lower().startswith("random")


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def run_probe(data: Sequence[str | Path], extractors: Sequence[str], *, image_size: int = 128, seeds: int = 3, coreset: float = 0.1,
              pixel: bool = False, max_test: int | None = None, tiling: Tiling | None = None, max_train: int | None = None) -> dict[str, Any]:
    """Every extractor on every data set, ``seeds`` times; returns the JSON report (``rows`` + ``summary``)."""
    if seeds < 1:
        raise ConfigError(message("--seeds", seeds, "an integer >= 1", "use 3"))
    datasets = [open_dataset(d) for d in data]
    rows = []
    summary: dict[str, dict[str, Any]] = {}
    for spec in extractors:
        for ds in datasets:
            runs = []
            features = None
            for seed in range(seeds):
                if features is None or _seeded_weights(spec):  # fixed weights: extract once, only the coreset changes
                    features = extract(parse_extractor(spec, image_size, seed), ds, pixel=pixel, max_test=max_test, tiling=tiling, max_train=max_train)
                runs.append(score(features, coreset=coreset, seed=seed))
                log.info("probe %s on %s (seed %d): image AUROC %.3f", spec, ds.root.name, seed, runs[-1]["image_auroc"])
            rows.extend({"spec": spec, "data": ds.root.name, **r} for r in runs)
            entry = {"image_auroc": _spread([r["image_auroc"] for r in runs])}
            if pixel and runs[0]["pixel_auroc"] is not None:
                entry["pixel_auroc"] = _spread([r["pixel_auroc"] for r in runs])
            summary.setdefault(spec, {})[ds.root.name] = entry
    return {"image_size": image_size, "tiling": tiling.to_dict() if tiling else None, "max_train": max_train, "max_test": max_test, "coreset": coreset, "seeds": seeds, "torch_threads": torch.get_num_threads(),
            "rows": rows, "summary": summary}


def format_summary(report: dict[str, Any]) -> str:
    """Plain-text table: one row per extractor, mean [min, max] image AUROC per data set."""
    sets = sorted({name for per in report["summary"].values() for name in per})
    lines = [f"{'extractor':<40}" + "".join(f"{s:>28}" for s in sets)]
    for spec, per in report["summary"].items():
        cells = []
        for s in sets:
            a = per.get(s, {}).get("image_auroc")
            cells.append(f"{a['mean']:.3f} [{a['min']:.3f}, {a['max']:.3f}]" if a else "-")
        lines.append(f"{spec:<40}" + "".join(f"{c:>28}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``edgead probe --data DIR [DIR ...] --extractor SPEC [...] [--json OUT]``."""
    p = argparse.ArgumentParser(prog="edgead probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="data sets (MVTec layout) to probe")
    p.add_argument("--extractor", action="append", required=True, help="target[:BACKBONE[:STAGES]] | grid[:BACKBONE[:STAGES]] | teacher[:PATH] | random (repeatable)")
    p.add_argument("--image-size", type=int, default=128, help="model input size (multiple of 64, >= 128; grid: a multiple of 16)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--coreset", type=float, default=0.1, help="fraction of the bank kept by greedy coreset selection (1: whole bank)")
    p.add_argument("--pixel", action="store_true", help="also pixel AUROC (maps resized to each image)")
    p.add_argument("--max-test", type=int, default=None, help="seeded subset of the test images (faster)")
    p.add_argument("--tile", type=int, default=None, help="cut images into tiles of this many pixels (as edgead train --tile)")
    p.add_argument("--tile-overlap", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None, help="seeded subset of the train images for the bank (memory)")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()):
        raise ConfigError(message("--json", str(args.json), "a file path in an existing folder", "pass e.g. --json probe.json"))
    tiling = Tiling(args.tile, args.tile_overlap) if args.tile else None
    report = run_probe(args.data, args.extractor, image_size=args.image_size, seeds=args.seeds, coreset=args.coreset, pixel=args.pixel, max_test=args.max_test, tiling=tiling, max_train=args.max_train)
    report["command"] = "edgead probe " + " ".join(argv if argv is not None else [])
    print(format_summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"report written to {args.json}")
    return 0
