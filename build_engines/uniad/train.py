"""`edgead train --family uniad`: one UniAD model for several products, trained on CPU from cached features.

The backbone is frozen, so its feature grid of every training image is computed once (``StageGrid``, cached in
the run folder); the transformer then trains on the cache: AdamW (lr 1e-4, weight decay 1e-4), gradient norm
clipped at 0.1, lr x 0.1 at 80 % of the steps (or for the last 20 % of a session's ``--time-budget-s``: each
resumed session anneals again, so prefer one long session), feature jitter, MSE reconstruction loss, bf16 autocast on CPU.
Several data sets (``--data DIR1 DIR2 ...``, one product each, named by their folder) train one model on the
union of their train/good images; each product is calibrated on its own held-out good images: the quantiles of
its raw maps (qa 0.9 / qb 0.995, as EfficientAD) and its image threshold.

    edgead train --family uniad --data data/ballscrew data/tiles --out runs/unified --steps 3000

Run folder: ``config.json``, ``model.pt``, ``calibration.json`` (per product), ``log.jsonl``,
``checkpoints/last.pt`` (resume), ``cache/`` (features; delete freely, it is rebuilt).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgead.datasets import open_dataset, read_image, split_train_val
from edgead.errors import ConfigError, DataError, message

from ..backbones import BACKBONES, StageGrid, load_backbone, parse_stages
from ..calibrate import DEFAULT_THRESHOLD, parse_threshold_method
from ..devices import resolve_device
from ..feature_distance import calibrate_product
from ..probe import prepared_batch
from .model import UniAD, anomaly_map, image_score

__all__ = ["UniADConfig", "FeatureExtractor", "train", "load_uniad_run", "calibrate_products", "main"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pt"


@dataclass
class UniADConfig:
    """Every option of a UniAD run (saved as config.json)."""

    data: list[str]
    out: str
    backbone: str = "efficientnet-lite0"
    stages: str = "2,3,4,5"
    image_size: int = 224
    stride: int = 16
    hidden: int = 256
    heads: int = 8
    encoder_layers: int = 4
    decoder_layers: int = 4
    ffn: int = 1024
    neighbourhood: int = 7
    jitter_scale: float = 20.0
    jitter_prob: float = 1.0
    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    clip: float = 0.1
    lr_drop_fraction: float = 0.8
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    pool: int = 16  # image score: max of the pool x pool average-pooled map (reference protocol)
    threshold_method: str = DEFAULT_THRESHOLD
    checkpoint_every: int = 250
    time_budget_s: float | None = None
    family: str = "uniad"
    products: list[str] = field(default_factory=list)

    def validate(self) -> UniADConfig:
        if not self.data:
            raise ConfigError(message("--data", "nothing", "one or more data set folders (one per product)", "pass --data DIR1 DIR2 ..."))
        if self.backbone not in BACKBONES or "lite" not in self.backbone:
            raise ConfigError(message("--backbone", repr(self.backbone), "efficientnet-lite0, -lite1 or -lite2", "use efficientnet-lite0"))
        parse_stages(self.stages)
        parse_threshold_method(self.threshold_method)
        if self.image_size % self.stride or self.image_size < 4 * self.stride:
            raise ConfigError(message("--image-size", self.image_size, f"a multiple of the grid stride {self.stride}, >= {4 * self.stride}", "use 224"))
        for name in ("steps", "batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(message(f"--{name.replace('_', '-')}", getattr(self, name), "an integer >= 1", "use the default"))
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(message("--time-budget-s", self.time_budget_s, "a number of seconds > 0", "omit it to train all --steps"))
        names = [Path(d).name for d in self.data]
        if len(set(names)) != len(names):
            raise ConfigError(message("--data", names, "folders with distinct names (each names a product)", "rename or link the folders"))
        self.products = names
        return self


class FeatureExtractor(torch.nn.Module):
    """Frozen backbone feature grid of prepared images (the ``StageGrid`` of the configured backbone)."""

    def __init__(self, cfg: UniADConfig) -> None:
        super().__init__()
        self.grid = StageGrid(load_backbone(cfg.backbone), parse_stages(cfg.stages), cfg.stride).eval()

    @property
    def channels(self) -> int:
        return self.grid.channels

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid(x)


def _cached_features(extractor: FeatureExtractor, paths: list[Path], size: int, file: Path, batch: int = 16) -> np.ndarray:
    """Features of ``paths`` (float16 .npy in the run's cache, reused when present and matching)."""
    meta = file.with_suffix(".json")
    key = {"files": [str(p) for p in paths], "size": size}
    if file.is_file() and meta.is_file() and json.loads(meta.read_text()) == key:
        return np.load(file)
    feats = []
    for i in range(0, len(paths), batch):
        feats.append(extractor(prepared_batch([read_image(p) for p in paths[i : i + batch]], size)).half().numpy())
    out = np.concatenate(feats)
    file.parent.mkdir(parents=True, exist_ok=True)
    np.save(file, out)
    meta.write_text(json.dumps(key))
    return out


def build_model(cfg: UniADConfig, channels: int) -> UniAD:
    g = cfg.image_size // cfg.stride
    return UniAD(channels, (g, g), hidden=cfg.hidden, heads=cfg.heads, layers=(cfg.encoder_layers, cfg.decoder_layers), ffn=cfg.ffn,
                 neighbourhood=cfg.neighbourhood, jitter_scale=cfg.jitter_scale, jitter_prob=cfg.jitter_prob)


@torch.no_grad()
def raw_outputs(model: UniAD, feats: np.ndarray, image_size: int, pool: int, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Raw (un-normalised) maps (N, h, w) and image scores (N,) of cached features, model in eval mode."""
    model.eval()
    maps, scores = [], []
    for i in range(0, len(feats), batch):
        f = torch.from_numpy(feats[i : i + batch].astype(np.float32))
        m = anomaly_map(f, model(f))
        maps.append(m[:, 0].numpy())
        scores.append(image_score(m, image_size, pool).numpy())
    return np.concatenate(maps), np.concatenate(scores)


def calibrate_products(model: UniAD, val: dict[str, np.ndarray], cfg: UniADConfig) -> dict[str, dict[str, Any]]:
    """Per product: qa/qb of its validation maps and the threshold of its validation scores (normalised as the runtime does)."""
    return {product: calibrate_product(*raw_outputs(model, feats, cfg.image_size, cfg.pool), cfg.threshold_method, product) for product, feats in val.items()}


def train(cfg: UniADConfig, *, resume: bool = False) -> Path:
    """Train one UniAD on the union of ``cfg.data``'s train/good, calibrate each product; return the run dir."""
    from tqdm import tqdm

    out = Path(cfg.out)
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise ConfigError(message("--resume", f"{out} without {CHECKPOINT}", "an interrupted UniAD run", "drop --resume"))
        saved = json.loads((out / "config.json").read_text())
        budget = cfg.time_budget_s  # the one option a resume may change: how long this session trains
        cfg = UniADConfig(**{f.name: saved[f.name] for f in fields(UniADConfig) if f.name in saved})
        cfg.time_budget_s = budget if budget is not None else cfg.time_budget_s
        cfg.validate()
    else:
        cfg.validate()
        if out.exists() and any(out.iterdir()):
            raise ConfigError(message("run directory", f"{out} (exists and is not empty)", "a new or empty directory", "choose another --out or pass --resume"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    extractor = FeatureExtractor(cfg)
    train_feats, val_feats = [], {}
    for product, root in zip(cfg.products, cfg.data, strict=True):
        ds = open_dataset(root)
        tr, va = split_train_val(ds.train_good, cfg.val_fraction, cfg.seed)
        log.info("%s: features of %d train / %d validation images", product, len(tr), len(va))
        train_feats.append(_cached_features(extractor, tr, cfg.image_size, out / "cache" / f"{product}_train.npy"))
        val_feats[product] = _cached_features(extractor, va, cfg.image_size, out / "cache" / f"{product}_val.npy")
    feats = torch.from_numpy(np.concatenate(train_feats))
    t_features = time.perf_counter() - t0
    model = build_model(cfg, feats.shape[1]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if resume:
        blob = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        gen.set_state(blob["generator"])
        rng.bit_generator.state = blob["rng"]
        step = int(blob["step"])
    drop_at = int(cfg.lr_drop_fraction * cfg.steps)
    deadline = None if cfg.time_budget_s is None else time.perf_counter() + cfg.time_budget_s
    use_amp = cfg.amp and device.type == "cpu"

    def checkpoint() -> None:
        (out / CHECKPOINT).parent.mkdir(exist_ok=True)
        tmp = out / (CHECKPOINT + ".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(), "rng": rng.bit_generator.state, "step": step}, tmp)
        os.replace(tmp, out / CHECKPOINT)

    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train UniAD", unit="step", dynamic_ncols=True)
    t_train = time.perf_counter()
    try:
        while step < cfg.steps and (deadline is None or time.perf_counter() < deadline):
            # lr / 10 for the last 20 % of the steps, or of this session's time budget when that ends first
            late = deadline is not None and time.perf_counter() > deadline - (1 - cfg.lr_drop_fraction) * float(cfg.time_budget_s or 0)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * (0.1 if step >= drop_at or late else 1.0)
            idx = torch.from_numpy(rng.integers(0, len(feats), cfg.batch_size))
            x = feats[idx].float().to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                rec = model(x, generator=gen)
            loss = F.mse_loss(rec.float(), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            step += 1
            bar.update(1)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DataError(message("training loss", f"{value} at step {step}", "a finite loss", "lower --lr; resume from the last checkpoint"))
            if step % 50 == 0 or step == cfg.steps:
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "loss": value, "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.perf_counter() - t0, 1)}) + "\n")
                bar.set_postfix(loss=f"{value:.4f}")
            if step % cfg.checkpoint_every == 0:
                checkpoint()
    finally:
        bar.close()
    checkpoint()
    train_s = time.perf_counter() - t_train
    calibration = calibrate_products(model, val_feats, cfg)
    torch.save({"state_dict": model.state_dict(), "channels": int(feats.shape[1])}, out / "model.pt")
    (out / "calibration.json").write_text(json.dumps(calibration, indent=2))
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"event": "done", "steps": step, "features_s": round(t_features, 1), "train_s": round(train_s, 1), "train_images": int(len(feats))}) + "\n")
    log.info("UniAD run %s: %d steps on %d images of %d products, %.0f s", out, step, len(feats), len(cfg.products), time.perf_counter() - t0)
    return out


@dataclass
class UniADRun:
    run_dir: Path
    config: UniADConfig
    model: UniAD
    extractor: FeatureExtractor
    calibration: dict[str, dict[str, Any]]


def load_uniad_run(run_dir: str | Path) -> UniADRun:
    run_dir = Path(run_dir)
    for name in ("config.json", "model.pt", "calibration.json"):
        if not (run_dir / name).is_file():
            raise DataError(message("UniAD run", f"{run_dir} without {name}", "a finished `edgead train --family uniad` run", "train first"))
    saved = json.loads((run_dir / "config.json").read_text())
    cfg = UniADConfig(**{f.name: saved[f.name] for f in fields(UniADConfig) if f.name in saved}).validate()
    blob = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model = build_model(cfg, int(blob["channels"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return UniADRun(run_dir, cfg, model, FeatureExtractor(cfg), json.loads((run_dir / "calibration.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    """``edgead train --family uniad --data DIR [DIR ...] --out RUN [...]``."""
    p = argparse.ArgumentParser(prog="edgead train --family uniad", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="uniad")
    p.add_argument("--data", nargs="+", help="one data set folder per product (MVTec layout); the folder name is the product")
    p.add_argument("--out", required=True)
    p.add_argument("--backbone", default="efficientnet-lite0")
    p.add_argument("--stages", default="2,3,4,5")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threshold", default=DEFAULT_THRESHOLD, help=f"image threshold per product from its validation-good scores: sigma:K | quantile:Q | max (default {DEFAULT_THRESHOLD})")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="stop this session after S seconds of training (lr / 10 in its last 20 %%); --resume may give a new budget")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="encoder and decoder layers each")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args(argv)
    cfg = UniADConfig(data=list(a.data or []), out=a.out, backbone=a.backbone, stages=a.stages, image_size=a.image_size, steps=a.steps, batch_size=a.batch_size,
                      lr=a.lr, val_fraction=a.val_fraction, seed=a.seed, threshold_method=a.threshold, time_budget_s=a.time_budget_s, hidden=a.hidden,
                      encoder_layers=a.layers, decoder_layers=a.layers)
    if not a.resume:
        cfg.validate()
    run = train(cfg, resume=a.resume)
    print(f"run written to {run}")
    return 0
