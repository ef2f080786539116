"""`edgead train --family patchcore`: a memory-bank detector of one product, built in minutes on a CPU, no training loop.

1. ``train/good`` is split as for every family (``--val-fraction`` held out for calibration, never a test image);
   with ``--tile T --tile-overlap O`` every image is cut into tiles first (the layout goes into the bundle, and the
   ``Detector`` cuts frames the same way: small defects in large frames keep their pixels);
2. the frozen backbone's feature grid of every training image is computed (``StageGrid``: ``--backbone``,
   ``--stages``, stride 16 at ``--image-size``), and standardised per channel;
3. a greedy k-center coreset keeps ``--coreset`` of the grid features (at most ``--max-bank``): the bank;
4. the held-out goods give the product's quantiles (qa 0.9 / qb 0.995 of their raw maps) and its image threshold.

    edgead train --family patchcore --data data/ballscrew --out runs/ballscrew_pc

The work grows with the bank: each image costs 2 x (S/16)^2 x bank x channels FLOPs in the distance GEMM
(224 px, 10 000 x 256: 1.0 GFLOP, twice the Lite0 backbone's 0.49), and the bank is stored in the bundle
(4 bytes x bank x channels: 10 MB). ``--max-bank`` bounds both for large training sets.

Run folder: ``config.json``, ``model.pt`` (feature statistics and bank), ``calibration.json``, ``log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgead.datasets import open_dataset, split_train_val
from edgead.errors import ConfigError, DataError, message
from edgead.tiling import Tiling

from ..backbones import BACKBONES, StageGrid, load_backbone, parse_stages
from ..calibrate import DEFAULT_THRESHOLD, parse_threshold_method
from ..feature_distance import CHUNK, calibrate_product
from ..probe import greedy_coreset, prepared_batch, tiled_features
from .model import LocalGrid, PatchCoreGraph, check_aggregate

__all__ = ["PatchCoreConfig", "PatchCoreRun", "feature_statistics", "bank_size", "train", "load_patchcore_run", "main"]

log = logging.getLogger(__name__)

STRIDE = 16
MAX_BANK_BYTES = 1.5 * 2**30  # the bank is an initializer of the ONNX graph, whose protobuf file is limited to 2 GiB


@dataclass
class PatchCoreConfig:
    """Every option of a PatchCore run (saved as config.json)."""

    data: str
    out: str
    backbone: str = "efficientnet-lite0"
    stages: str = "2,3,4,5"
    image_size: int = 224
    coreset: float = 0.1
    max_bank: int = 20000
    aggregate: int = 1  # k x k local mean of the grid before the bank (PatchCore's aggregation); 1 = none
    val_fraction: float = 0.1
    seed: int = 0
    batch_size: int = 16
    threshold_method: str = DEFAULT_THRESHOLD  # sigma:4, also PatchCore's most predictable rule (docs/results.md, section 11)
    tile: int | None = None  # cut every image into tiles of this many frame pixels (each resized to image_size)
    tile_overlap: int = 0
    family: str = "patchcore"

    def validate(self) -> PatchCoreConfig:
        if not self.data:
            raise ConfigError(message("--data", "nothing", "one data set folder (MVTec layout)", "pass --data DIR"))
        if self.backbone not in BACKBONES or "lite" not in self.backbone:
            raise ConfigError(message("--backbone", repr(self.backbone), "efficientnet-lite0, -lite1 or -lite2", "use efficientnet-lite0"))
        parse_stages(self.stages)
        parse_threshold_method(self.threshold_method)
        if self.image_size % STRIDE or self.image_size < 4 * STRIDE:
            raise ConfigError(message("--image-size", self.image_size, f"a multiple of the grid stride {STRIDE}, >= {4 * STRIDE}", "use 224"))
        if not 0.0 < self.coreset <= 1.0:
            raise ConfigError(message("--coreset", self.coreset, "a fraction in (0, 1]", "use 0.1 (PatchCore) or 1 to keep every feature"))
        for name in ("max_bank", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(message(f"--{name.replace('_', '-')}", getattr(self, name), "an integer >= 1", "use the default"))
        if self.tile is None and self.tile_overlap:
            raise ConfigError(message("--tile-overlap", self.tile_overlap, "no overlap without --tile", "pass --tile T as well, or drop --tile-overlap"))
        _ = self.tiling  # Tiling checks tile and overlap
        check_aggregate(self.aggregate)
        return self

    @property
    def tiling(self) -> Tiling | None:
        return None if self.tile is None else Tiling(int(self.tile), int(self.tile_overlap))

    @property
    def product(self) -> str:
        return Path(self.data).name


def _grid(cfg: PatchCoreConfig) -> LocalGrid:
    return LocalGrid(StageGrid(load_backbone(cfg.backbone), parse_stages(cfg.stages), STRIDE), cfg.aggregate).eval()


@torch.no_grad()
def _grid_features(grid: LocalGrid, paths: list[Path], size: int, batch: int, tiling: Tiling | None, what: str) -> tuple[torch.Tensor, np.ndarray]:
    """(N, C, h, w) raw grid features of the images at ``paths`` (of each of their tiles, with a tiling) and the image
    index of each row."""
    feats, owner, _ = tiled_features(lambda frames: grid(prepared_batch(frames, size)), paths, tiling, batch, progress=what)
    return feats, owner


def feature_statistics(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the training goods' feature rows (M, C). A channel (nearly) constant over the goods
    must not turn its smallest deviation into a huge distance: its std is floored at 1 % of the median channel's."""
    std = rows.std(0)
    return rows.mean(0), std.clamp_min(0.01 * float(std.median()) + 1e-12)


def bank_size(n_features: int, coreset: float, max_bank: int) -> int:
    """Bank features kept of ``n_features``: the coreset fraction, at least 1, at most ``max_bank``."""
    return min(max_bank, max(1, int(round(coreset * n_features))))


@torch.no_grad()
def _raw_outputs(graph: PatchCoreGraph, features: torch.Tensor, batch: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Raw maps (N, h, w) and scores (N,) of standardised features."""
    maps = torch.cat([graph.distance_map(features[i : i + batch]) for i in range(0, len(features), batch)])[:, 0]
    return maps.numpy(), maps.amax(dim=(1, 2)).numpy()


def train(cfg: PatchCoreConfig) -> Path:
    """Build the bank of ``cfg.data``'s training goods, calibrate on its held-out goods; return the run folder."""
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(message("run directory", f"{out} (exists and is not an empty folder)", "a new or empty directory", "choose another --out"))
    ds = open_dataset(cfg.data)
    tr, va = split_train_val(ds.train_good, cfg.val_fraction, cfg.seed)
    t0 = time.perf_counter()
    grid = _grid(cfg)
    if cfg.max_bank * grid.channels * 4 > MAX_BANK_BYTES:
        raise ConfigError(message("--max-bank", f"{cfg.max_bank} ({cfg.max_bank} x {grid.channels} float32 = {cfg.max_bank * grid.channels * 4 / 2**30:.1f} GiB)",
                                  f"a bank of at most {MAX_BANK_BYTES / 2**30:.1f} GiB (it is stored in the ONNX graph, limited to 2 GiB)", "use the default 20000"))
    log.info("%s: features of %d train / %d validation images", cfg.product, len(tr), len(va))
    feats, _ = _grid_features(grid, tr, cfg.image_size, cfg.batch_size, cfg.tiling, "train features")
    n_pieces, c = feats.shape[:2]
    rows = feats.permute(0, 2, 3, 1).reshape(-1, c)  # a copy: two copies at the peak (4 bytes x rows x C each), one after
    del feats
    if not bool(torch.isfinite(rows).all()):
        raise DataError(message("training features", "NaN or infinite values", "finite features", "check the training images (corrupt files?)"))
    mean, std = feature_statistics(rows)
    rows.sub_(mean).div_(std)
    t_features = time.perf_counter() - t0
    n_bank = bank_size(rows.shape[0], cfg.coreset, cfg.max_bank)
    t1 = time.perf_counter()
    bank = rows[greedy_coreset(rows, n_bank, seed=cfg.seed)] if n_bank < rows.shape[0] else rows
    t_coreset = time.perf_counter() - t1
    graph = PatchCoreGraph(grid, mean, std, bank)
    val, owner = _grid_features(grid, va, cfg.image_size, cfg.batch_size, cfg.tiling, "validation features")
    calibration = {cfg.product: calibrate_product(*_raw_outputs(graph, graph.standardise(val)), cfg.threshold_method, cfg.product, owner)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.save({"mean": mean, "std": std, "bank": bank.contiguous()}, out / "model.pt")
    (out / "calibration.json").write_text(json.dumps(calibration, indent=2))
    done = {"event": "done", "train_images": len(tr), "validation_images": len(va), "train_tiles": int(n_pieces), "train_features": int(rows.shape[0]), "bank": int(bank.shape[0]),
            "features_s": round(t_features, 1), "coreset_s": round(t_coreset, 1), "total_s": round(time.perf_counter() - t0, 1)}
    (out / "log.jsonl").write_text(json.dumps(done) + "\n")
    log.info("PatchCore run %s: bank %d of %d features, %.0f s", out, bank.shape[0], rows.shape[0], time.perf_counter() - t0)
    return out


@dataclass
class PatchCoreRun:
    run_dir: Path
    config: PatchCoreConfig
    graph: PatchCoreGraph
    calibration: dict[str, dict[str, Any]]


def load_patchcore_run(run_dir: str | Path) -> PatchCoreRun:
    run_dir = Path(run_dir)
    for name in ("config.json", "model.pt", "calibration.json"):
        if not (run_dir / name).is_file():
            raise DataError(message("PatchCore run", f"{run_dir} without {name}", "a finished `edgead train --family patchcore` run", "train first"))
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = PatchCoreConfig(**{f.name: saved[f.name] for f in fields(PatchCoreConfig) if f.name in saved}).validate()
    blob = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    graph = PatchCoreGraph(_grid(cfg), blob["mean"], blob["std"], blob["bank"]).eval()
    return PatchCoreRun(run_dir, cfg, graph, json.loads((run_dir / "calibration.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    """``edgead train --family patchcore --data DIR --out RUN [...]``."""
    p = argparse.ArgumentParser(prog="edgead train --family patchcore", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="patchcore")
    p.add_argument("--data", nargs="+", action="extend", metavar="DIR", help="the data set folder (MVTec layout); its name is the product")
    p.add_argument("--out", required=True, metavar="RUN", help="new (or empty) run folder")
    p.add_argument("--backbone", default="efficientnet-lite0", help="efficientnet-lite0 (default), -lite1 or -lite2")
    p.add_argument("--stages", default="2,3,4,5", help="backbone stages of the grid (default 2,3,4,5: the probe's choice)")
    p.add_argument("--image-size", type=int, default=224, help="model input in pixels, a multiple of 16 (default 224)")
    p.add_argument("--coreset", type=float, default=0.1, help="fraction of the training goods' grid features kept in the bank (greedy k-center, default 0.1)")
    p.add_argument("--max-bank", type=int, default=20000, help="at most this many bank features (bounds latency and bundle size; default 20000)")
    p.add_argument("--aggregate", type=int, default=1, help="average each grid cell with its k x k neighbourhood first (PatchCore's aggregation; default 1: none)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of train/good held out for calibration (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="split and coreset seed")
    p.add_argument("--threshold", default=DEFAULT_THRESHOLD, help=f"image threshold from the validation-good scores: sigma:K | quantile:Q | max (default {DEFAULT_THRESHOLD})")
    p.add_argument("--tile", type=int, default=None, help="cut frames into tiles of T pixels (small defects in large frames); part of the bundle")
    p.add_argument("--tile-overlap", type=int, default=0, help="minimum overlap of neighbouring tiles in pixels (e.g. a quarter of --tile)")
    a = p.parse_args(argv)
    data = list(a.data or [])
    if len(data) > 1:
        raise ConfigError(message("--data", f"{len(data)} folders", "one data set: a PatchCore bank describes one product", "train one run per product, or --family uniad for one model of several"))
    cfg = PatchCoreConfig(data=data[0] if data else "", out=a.out, backbone=a.backbone, stages=a.stages, image_size=a.image_size, coreset=a.coreset,
                          max_bank=a.max_bank, aggregate=a.aggregate, val_fraction=a.val_fraction, seed=a.seed, threshold_method=a.threshold, tile=a.tile, tile_overlap=a.tile_overlap)
    print(f"run written to {train(cfg)}")
    return 0
