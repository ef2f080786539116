"""EfficientAD training (student + autoencoder against a frozen teacher), then calibration.

The paper's recipe (Batzner et al., WACV 2024, Algorithm 1): Adam (lr 1e-4, weight decay 1e-5),
70 000 steps of batch 1, learning rate x0.1 after 95 % of the steps; the student learns the teacher
with the hard-feature loss (mean of the squared differences at or above their 0.999 quantile) plus,
when a generic image folder is given, the ImageNet penalty (mean of the student's output squared on
a generic image); the autoencoder learns the teacher on colour-jittered images (brightness, contrast
or saturation, factor 0.8..1.2, one chosen at random per image) and the student's second half learns
the autoencoder on the same jittered image. Teacher outputs are normalised with channel mean/std over
the training images (stored in the model's buffers).

Faster, equivalent paths: teacher outputs of the non-jittered images are cached (the teacher is frozen),
the two student passes run as one batch, ``channels_last`` on CPU, fp16 autocast on CUDA.

Presets (explicit options override them):

========  ==========  =======  ======  ===============================================================
preset    image size  steps    batch   use
========  ==========  =======  ======  ===============================================================
paper     256         70 000   1       the paper's recipe (GPU: about 1 h on an H100-class GPU)
fast      256         17 500   4       same number of images seen as paper, 4x fewer steps (GPU)
cpu       256         1500     1       real parts on a 2-core CPU: about 25 min of training with the embedded
                                       teacher (lr 1e-4); chosen from time-to-accuracy curves, docs/results.md
demo      128         400      1       the `make demo` recipe: ~4 min on 2 CPU cores, lr 1e-3 (measured better
                                       than 1e-4 at a few hundred steps); a smoke test, not a line recipe
========  ==========  =======  ======  ===============================================================

Example::

    edgead train --data /data/line3 --out runs/line3 --preset cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgead.datasets import image_color, list_images, open_dataset, read_image, split_train_val
from edgead.errors import ConfigError, DataError, message
from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare, resize_image
from edgead.registry import FAMILIES, check_choice
from edgead.tiling import Tiling

from ..calibrate import DEFAULT_THRESHOLD, QA, QB, calibrate, parse_threshold_method
from ..devices import DEVICES, resolve_device
from ..families import toolchain
from .models import EfficientAD, check_image_size, feature_size, pdn
from .run import CONFIG_FILE, save_calibration, save_model

__all__ = ["TrainConfig", "PRESETS", "StepLosses", "hard_feature_loss", "color_jitter", "step_losses", "learning_rate", "train", "main"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoints/last.pt"
SNAPSHOTS = "snapshots"
LOG_FILE = "log.jsonl"

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"image_size": 256, "steps": 70_000, "batch_size": 1, "lr": 1e-4, "checkpoint_every": 1000, "log_every": 100},
    "fast": {"image_size": 256, "steps": 17_500, "batch_size": 4, "lr": 1e-4, "checkpoint_every": 500, "log_every": 50},
    "cpu": {"image_size": 256, "steps": 1500, "batch_size": 1, "lr": 1e-4, "checkpoint_every": 250, "log_every": 50},
    "demo": {"image_size": 128, "steps": 400, "batch_size": 1, "lr": 1e-3, "checkpoint_every": 50, "log_every": 10},
}
_QUANTILE_LIMIT = 16_000_000  # torch.quantile refuses larger inputs
STATS_IMAGES = 256  # teacher channel statistics from at most this many training images when the outputs are not cached


@dataclass
class TrainConfig:
    """All hyper-parameters of one training run (saved as config.json in the run dir).

    >>> TrainConfig(data="data/line3", out="runs/line3").with_preset().steps
    70000
    """

    data: str
    out: str
    model: str = "s"
    preset: str = "paper"
    teacher: str = "default"
    penalty_data: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    image_size: int | None = None
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    lr: float | None = None
    weight_decay: float = 1e-5
    lr_drop_fraction: float = 0.95
    p_hard: float = 0.999
    qa: float = QA
    qb: float = QB
    threshold_method: str = DEFAULT_THRESHOLD
    amp: bool = True  # mixed precision: fp16 autocast on CUDA, bf16 autocast on CPU (AVX-512 BF16: ~3x faster here)
    checkpoint_every: int | None = None
    log_every: int | None = None
    cache_mb: int = 4096  # in-memory cache of the teacher outputs of the training images (fp16)
    tile: int | None = None  # cut every image into tiles of this many pixels (edgead.tiling); None: whole images
    tile_overlap: int = 0
    snapshot_every: int | None = None  # also keep the weights every N steps (snapshots/step_N.pt) for time-to-accuracy curves
    stop_after: int | None = None  # checkpoint and return after this step (resume later)
    mean: tuple[float, ...] = field(default_factory=lambda: tuple(IMAGENET_MEAN))
    std: tuple[float, ...] = field(default_factory=lambda: tuple(IMAGENET_STD))

    def with_preset(self) -> TrainConfig:
        """Fill the options left at None from the preset and validate everything."""
        self.preset = check_choice("preset", self.preset, PRESETS)
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.validate()
        return self

    def validate(self) -> None:
        self.model = check_choice("model size", self.model, FAMILIES["efficientad"].sizes)
        self.device = check_choice("device", self.device, DEVICES)
        parse_threshold_method(self.threshold_method)
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(message(name, value, "an integer >= 1", f"pass --{name.replace('_', '-')} with a positive integer"))
        check_image_size(self.image_size)  # type: ignore[arg-type]
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise ConfigError(message("val_fraction", self.val_fraction, "a number strictly between 0 and 1", "pass --val-fraction 0.1"))
        if not 0.0 < float(self.p_hard) < 1.0:
            raise ConfigError(message("p_hard", self.p_hard, "a number strictly between 0 and 1", "use the paper's 0.999"))
        if not (isinstance(self.lr, float | int) and self.lr > 0 and self.weight_decay >= 0):
            raise ConfigError(message("learning rate / weight decay", (self.lr, self.weight_decay), "lr > 0 and weight decay >= 0", "use 1e-4 / 1e-5"))
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(message("stop_after", self.stop_after, "an integer >= 1", "omit it to train to the end"))
        if self.tile is not None:
            Tiling(self.tile, self.tile_overlap)  # validates
        if self.snapshot_every is not None and (not isinstance(self.snapshot_every, int) or self.snapshot_every < 1):
            raise ConfigError(message("snapshot_every", self.snapshot_every, "an integer >= 1", "omit it, or pass --snapshot-every 500"))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(message("mean/std", (self.mean, self.std), "3 values each, std > 0", "use the ImageNet defaults"))


def hard_feature_loss(teacher: torch.Tensor, student: torch.Tensor, p_hard: float = 0.999) -> torch.Tensor:
    """Mean of the squared differences at or above their ``p_hard`` quantile (over the whole batch).

    >>> t = torch.zeros(1, 2, 2, 2); s = torch.arange(8.0).reshape(1, 2, 2, 2)
    >>> float(hard_feature_loss(t, s, 0.5))
    31.5
    """
    distance = (teacher.float() - student.float()) ** 2
    flat = distance.reshape(-1)
    if flat.numel() <= _QUANTILE_LIMIT:
        d_hard = torch.quantile(flat, p_hard)
    else:  # same linear interpolation as torch.quantile, through kthvalue
        pos = p_hard * (flat.numel() - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        v_lo = torch.kthvalue(flat, lo + 1).values
        v_hi = torch.kthvalue(flat, hi + 1).values
        d_hard = v_lo + (v_hi - v_lo) * (pos - lo)
    return torch.mean(distance[distance >= d_hard])


def color_jitter(x: torch.Tensor, kinds: np.ndarray, factors: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-image brightness (0) / contrast (1) / saturation (2) jitter of normalised NCHW images.

    The jitter acts on the [0, 1] RGB pixels (as torchvision's ColorJitter), then re-normalises.

    >>> x = torch.zeros(1, 3, 4, 4); m = torch.zeros(1, 3, 1, 1); s = torch.ones(1, 3, 1, 1)
    >>> float(color_jitter(x + 0.5, np.array([0]), np.array([1.2]), m, s).mean())
    0.6
    """
    rgb = x * std + mean
    out = []
    for i in range(rgb.shape[0]):
        img, f, kind = rgb[i], float(factors[i]), int(kinds[i])
        gray = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
        if kind == 0:
            img = img * f
        elif kind == 1:
            img = f * img + (1.0 - f) * gray.mean()
        else:
            img = f * img + (1.0 - f) * gray[None]
        out.append(img.clamp(0.0, 1.0))
    return (torch.stack(out) - mean) / std


@dataclass
class StepLosses:
    """The four loss terms of one EfficientAD training step (Algorithm 1 of the paper)."""

    hard: torch.Tensor  # hard-feature loss, student's first half vs the teacher on the image
    penalty: torch.Tensor  # mean squared student output (first half) on a generic image; 0 without one
    ae: torch.Tensor  # autoencoder vs the teacher on the jittered image
    stae: torch.Tensor  # student's second half vs the autoencoder on the jittered image

    @property
    def total(self) -> torch.Tensor:
        return self.hard + self.penalty + self.ae + self.stae


def step_losses(
    model: EfficientAD,
    x: torch.Tensor,
    teacher_x: torch.Tensor,
    kinds: np.ndarray,
    factors: np.ndarray,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    penalty: torch.Tensor | None = None,
    p_hard: float = 0.999,
) -> StepLosses:
    """Loss terms of one step on the normalised batch ``x`` whose normalised teacher output is ``teacher_x``.

    The autoencoder, the teacher it learns and the student's second half all see the colour-jittered
    image (``color_jitter(x, kinds, factors, mean, std)``); the student's two halves run as one batch.
    """
    c, b = model.out_channels, x.shape[0]
    x_ae = color_jitter(x, kinds, factors, mean, std)
    if x.is_contiguous(memory_format=torch.channels_last):
        x_ae = x_ae.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        t_ae = model.normalised_teacher(x_ae)
    s = model.student(torch.cat([x, x_ae]))
    loss_hard = hard_feature_loss(teacher_x, s[:b, :c], p_hard)
    loss_pen = torch.mean(model.student(penalty)[:, :c].float() ** 2) if penalty is not None else torch.zeros((), device=x.device)
    a = model.autoencoder(x_ae)
    loss_ae = torch.mean((t_ae.float() - a.float()) ** 2)
    loss_stae = torch.mean((a.float() - s[b:, c:].float()) ** 2)
    return StepLosses(loss_hard, loss_pen, loss_ae, loss_stae)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based ``step``: ``cfg.lr``, times 0.1 from ``lr_drop_fraction`` of the steps on.

    >>> cfg = TrainConfig(data="d", out="o", preset="cpu", steps=100, lr=1e-3)
    >>> learning_rate(94, cfg), learning_rate(95, cfg)
    (0.001, 0.0001)
    """
    assert cfg.lr is not None and cfg.steps is not None
    return cfg.lr * (0.1 if step >= int(cfg.lr_drop_fraction * cfg.steps) else 1.0)


def tiling_of(cfg: TrainConfig) -> Tiling | None:
    return None if cfg.tile is None else Tiling(cfg.tile, cfg.tile_overlap)


def prepare_images(paths: list[Path], image_size: int, mean: tuple[float, ...], std: tuple[float, ...], tiling: Tiling | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Prepared NCHW images (every tile of every image with a tiling) and the image index of each row."""
    rows, owner = [], []
    for i, path in enumerate(paths):
        img = read_image(path)
        for piece in tiling.cut(img) if tiling is not None else [img]:
            rows.append(prepare(piece, image_size, mean, std, image_color(piece)))
            owner.append(i)
    return np.stack(rows), np.asarray(owner, np.int64)


def _prepare_paths(paths: list[Path], cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    assert cfg.image_size is not None
    return prepare_images(paths, cfg.image_size, cfg.mean, cfg.std, tiling_of(cfg))


def _penalty_image(path: Path, cfg: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """Generic image as the reference: resize to 2S x 2S, centre crop S, grayscale with p=0.3."""
    import cv2

    s = cfg.image_size
    assert s is not None
    img = read_image(path)
    img = resize_image(img, 2 * s, 2 * s)
    img = np.ascontiguousarray(img[s // 2 : s // 2 + s, s // 2 : s // 2 + s])
    color = image_color(img)
    if rng.random() < 0.3 and color == "bgr":
        img, color = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), "gray"
    return prepare(img, s, cfg.mean, cfg.std, color)


def _load_teacher_into(model: EfficientAD, spec: str) -> str:
    """Load the frozen teacher; returns a description for the log/config."""
    try:
        from .teacher import load_teacher
    except ImportError:
        if spec != "random":
            raise
        teacher = pdn(model.size, model.out_channels, padding=False)
    else:
        teacher = load_teacher(model.size, spec, model.out_channels)
    model.teacher.load_state_dict(teacher.state_dict())
    for p in model.teacher.parameters():
        p.requires_grad_(False)
    return spec


def _check_run_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / CHECKPOINT).is_file() or not (out / CONFIG_FILE).is_file():
            raise ConfigError(message("--resume", f"{out} without {CHECKPOINT} and {CONFIG_FILE}", "a run dir written by an interrupted `edgead train`", "drop --resume to start a new run"))
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            message("run directory", f"{out} (exists and is not empty)", "a new or empty directory", "choose another --out, delete it yourself, or pass --resume to continue it")
        )


def _save_checkpoint(out: Path, step: int, model: EfficientAD, opt: torch.optim.Optimizer, scaler: Any, rng: np.random.Generator) -> None:
    path = out / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_numpy": rng.bit_generator.state,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "rng_python": random.getstate(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def _save_snapshot(out: Path, step: int, model: EfficientAD, elapsed_s: float) -> None:
    """Weights of ``step`` for later evaluation (``scripts/time_to_accuracy.py``); the teacher statistics are buffers."""
    folder = out / SNAPSHOTS
    folder.mkdir(exist_ok=True)
    torch.save({"step": step, "elapsed_s": round(elapsed_s, 2), "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}, folder / f"step_{step:06d}.pt")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A resume checkpoint, read weights-only: tensors, numbers, strings and containers, never code.

    Resuming from a run folder someone else wrote must not run their code (``torch.load`` with
    ``weights_only=False`` unpickles arbitrary objects).
    """
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for foreign objects, RuntimeError / EOFError for damaged files
        raise DataError(
            message("checkpoint", f"{path} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", "a checkpoint of tensors and plain values written by EdgeAD",
                    "do not resume from an untrusted or damaged run folder; start a new run")
        ) from exc
    if not isinstance(blob, dict):
        raise DataError(message("checkpoint", f"{path} holding {type(blob).__name__}", "a dict written by EdgeAD", "start a new run"))
    return blob


def _log(out: Path, record: dict[str, Any]) -> None:
    with open(out / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


@torch.no_grad()
def _teacher_raw(model: EfficientAD, images: np.ndarray, device: torch.device, batch: int = 8) -> torch.Tensor:
    """Teacher outputs (fp32 compute, kept as fp16 to halve the memory) of prepared images."""
    outs = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch])).to(device)
        outs.append(model.teacher(x).half().cpu())
    return torch.cat(outs)


def _channel_stats(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and std over all training images and positions (reference: mean of per-image means),
    accumulated in float64 per image (the outputs are kept in fp16)."""
    total = torch.zeros(raw.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for r in raw:
        r64 = r.double()
        total += r64.sum((1, 2))
        total_sq += (r64 * r64).sum((1, 2))
    count = raw.shape[0] * raw.shape[2] * raw.shape[3]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(1e-12)
    return mean.float().view(1, -1, 1, 1), var.sqrt().float().view(1, -1, 1, 1)


def train(config: TrainConfig, *, resume: bool = False) -> Path:
    """Train EfficientAD on ``config.data`` (good images), calibrate, and return the run dir.

    >>> train(TrainConfig(data="data/line3", out="runs/line3", preset="cpu"))  # doctest: +SKIP
    PosixPath('runs/line3')
    """
    from tqdm import tqdm

    out = Path(config.out)
    _check_run_dir(out, resume)
    if resume:
        saved = json.loads((out / CONFIG_FILE).read_text())
        saved["mean"], saved["std"] = tuple(saved["mean"]), tuple(saved["std"])
        cfg = TrainConfig(**{f.name: saved[f.name] for f in fields(TrainConfig) if f.name in saved})
        cfg.stop_after, cfg.device = config.stop_after, config.device
        cfg.validate()
    else:
        cfg = config.with_preset()
    assert cfg.steps is not None and cfg.batch_size is not None and cfg.image_size is not None
    assert cfg.checkpoint_every is not None and cfg.log_every is not None and cfg.lr is not None
    device = resolve_device(cfg.device)
    dataset = open_dataset(cfg.data)
    train_paths, val_paths = split_train_val(dataset.train_good, cfg.val_fraction, cfg.seed)
    penalty_paths = list_images(cfg.penalty_data) if cfg.penalty_data else []
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2))

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t_start = time.perf_counter()

    model = EfficientAD(cfg.model, cfg.image_size)
    teacher_desc = _load_teacher_into(model, cfg.teacher)
    model.to(device)
    channels_last = device.type == "cpu"
    if channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    params = list(model.student.parameters()) + list(model.autoencoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    use_amp = bool(cfg.amp) and device.type in ("cuda", "cpu")
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if use_amp and device.type == "cuda" else None

    start_step = 0
    if resume:
        blob = load_checkpoint(out / CHECKPOINT, device)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        if scaler is not None and blob["scaler"] is not None:
            scaler.load_state_dict(blob["scaler"])
        rng.bit_generator.state = blob["rng_numpy"]
        torch.set_rng_state(blob["rng_torch"])
        if blob["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(blob["rng_cuda"])
        random.setstate(blob["rng_python"])
        start_step = int(blob["step"])
        log.info("resuming %s at step %d of %d", out, start_step, cfg.steps)
    log.info("loading %d training / %d validation images from %s", len(train_paths), len(val_paths), cfg.data)
    images, _ = _prepare_paths(train_paths, cfg)
    model.teacher.eval()
    buf_mean, buf_std = model.get_buffer("teacher_mean"), model.get_buffer("teacher_std")
    fs = feature_size(cfg.image_size, model.padding)
    fits = len(images) * model.out_channels * fs * fs * 2 <= cfg.cache_mb * 2**20
    # the teacher is frozen: its outputs on the non-augmented training images are computed once (fp16) when they
    # fit in --cache-mb; its channel statistics come from those, or from a seeded subsample of STATS_IMAGES
    stats_idx = np.arange(len(images)) if fits or len(images) <= STATS_IMAGES else np.sort(np.random.default_rng(cfg.seed).choice(len(images), STATS_IMAGES, replace=False))
    raw = _teacher_raw(model, images[stats_idx], device)
    if not resume:
        t_mean, t_std = _channel_stats(raw)
        buf_mean.copy_(t_mean.to(device))
        buf_std.copy_(t_std.to(device))
    cached_teacher = ((raw.to(device) - buf_mean) / buf_std).half() if fits else None
    del raw
    images_t = torch.from_numpy(images)
    mean_t = torch.tensor(cfg.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(cfg.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    end_step = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    model.student.train()
    model.autoencoder.train()
    bar = tqdm(total=cfg.steps, initial=start_step, desc=f"train EfficientAD-{cfg.model.upper()}", unit="step", dynamic_ncols=True)
    step = start_step
    try:
        while step < end_step:
            for g in opt.param_groups:
                g["lr"] = learning_rate(step, cfg)
            idx = rng.integers(0, len(images), cfg.batch_size)
            kinds = rng.integers(0, 3, cfg.batch_size)
            factors = rng.uniform(0.8, 1.2, cfg.batch_size)
            pen_idx = int(rng.integers(0, len(penalty_paths))) if penalty_paths else -1
            x = images_t[torch.from_numpy(idx)].to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            penalty = torch.from_numpy(_penalty_image(penalty_paths[pen_idx], cfg, rng)[None]).to(device) if pen_idx >= 0 else None
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                with torch.no_grad():
                    t_st = cached_teacher[torch.from_numpy(idx).to(device)] if cached_teacher is not None else model.normalised_teacher(x)
                losses = step_losses(model, x, t_st, kinds, factors, mean_t, std_t, penalty=penalty, p_hard=cfg.p_hard)
                loss = losses.total
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            step += 1
            bar.update(1)
            loss_value = loss.detach().item()
            if not math.isfinite(loss_value):
                raise DataError(message("training loss", f"{loss_value} at step {step}", "a finite loss", "check the images; lower --lr; resume from the last checkpoint"))
            if step % cfg.log_every == 0 or step == end_step:
                rec = {
                    "step": step,
                    "loss": loss_value,
                    "loss_hard": losses.hard.detach().item(),
                    "loss_penalty": losses.penalty.detach().item(),
                    "loss_ae": losses.ae.detach().item(),
                    "loss_stae": losses.stae.detach().item(),
                    "lr": opt.param_groups[0]["lr"],
                    "elapsed_s": round(time.perf_counter() - t_start, 2),
                }
                _log(out, rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}")
            if step % cfg.checkpoint_every == 0 or step == end_step:
                _save_checkpoint(out, step, model, opt, scaler, rng)
            if cfg.snapshot_every and step % cfg.snapshot_every == 0:
                _save_snapshot(out, step, model, time.perf_counter() - t_start)
    except KeyboardInterrupt:
        _save_checkpoint(out, step, model, opt, scaler, rng)
        log.warning("interrupted at step %d; checkpoint saved, continue with: edgead train --out %s --resume", step, out)
        raise
    finally:
        bar.close()
    if step < cfg.steps:
        log.info("stopped after step %d of %d; continue with: edgead train --out %s --resume", step, cfg.steps, out)
        return out

    model.eval()
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    val_images, owner = _prepare_paths(val_paths, cfg)
    cal = calibrate(model, val_images, qa=cfg.qa, qb=cfg.qb, threshold_method=cfg.threshold_method, device=str(device), groups=owner)
    model.cpu()
    save_model(model, out)
    save_calibration(cal, out)
    wall = time.perf_counter() - t_start
    _log(out, {"event": "done", "steps": cfg.steps, "teacher": teacher_desc, "train_images": len(train_paths), "val_images": len(val_paths), "wall_s": round(wall, 2)})
    log.info("run %s: %d steps, %.1f s, threshold %.4f", out, cfg.steps, wall, cal.threshold)
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}; expected an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgead train", description="Train EfficientAD on good images and calibrate it on held-out good images.")
    p.add_argument("--family", default="efficientad", help="efficientad (default), uniad (one model for several products: --data DIR1 DIR2 ...) or patchcore (memory bank, no training loop)")
    p.add_argument("--data", help="dataset root (MVTec layout or good/ folder)")
    p.add_argument("--out", required=True, help="run directory (new or empty, or an interrupted run with --resume)")
    p.add_argument("--model", default="s", help="s (PDN-S) or m (PDN-M)")
    p.add_argument("--preset", default="paper", help="paper | fast | cpu | demo (see module docs); explicit options override")
    p.add_argument("--teacher", default="default", help="teacher weights: PATH, 'default' (embedded) or 'random'")
    p.add_argument("--penalty-data", help="folder of generic images for the ImageNet penalty (optional)")
    p.add_argument("--steps", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--lr", type=float, help="Adam learning rate (presets: paper/fast/cpu 1e-4, demo 1e-3)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threshold", default=DEFAULT_THRESHOLD, help=f"image threshold from validation-good scores: sigma:K (mean + K std) | quantile:Q | max (default {DEFAULT_THRESHOLD})")
    p.add_argument("--checkpoint-every", type=_positive_int)
    p.add_argument("--stop-after", type=_positive_int, help="checkpoint and exit after this step (continue with --resume)")
    p.add_argument("--no-amp", action="store_true", help="train in fp32 (default: fp16 autocast on CUDA, bf16 autocast on CPU)")
    p.add_argument("--tile", type=_positive_int, help="cut images into tiles of this many pixels (small defects in large frames); the bundle keeps the layout")
    p.add_argument("--tile-overlap", type=int, default=0, help="minimum overlap of neighbouring tiles in pixels (e.g. a quarter of --tile)")
    p.add_argument("--snapshot-every", type=_positive_int, help="keep the weights every N steps in snapshots/ (time-to-accuracy curves)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out (its config.json is used)")
    return p


def main(argv: list[str] | None = None) -> int:
    """``edgead train --data DIR --out RUN_DIR [--preset cpu] ...``; returns 0 on success.

    ``--family uniad`` (one model for several products) and ``--family patchcore`` (a memory bank, no training loop)
    hand over to their toolchains (``build_engines.families``).
    """
    family_parser = argparse.ArgumentParser(add_help=False)
    family_parser.add_argument("--family", default="efficientad")
    known, _ = family_parser.parse_known_args(argv)
    family = check_choice("model family", known.family, FAMILIES)
    chain = toolchain(family)
    if chain is not None:
        return int(chain.load("train_main")(argv))
    if family != "efficientad":
        available = ", ".join(f.name for f in FAMILIES.values() if f.available)
        raise ConfigError(message("--family", family, f"one of {available}", f"{family} is planned, not yet trainable; use one of {available}"))
    args = build_parser().parse_args(argv)
    if not args.resume and not args.data:
        raise ConfigError(message("--data", "nothing", "a dataset folder", "pass --data DIR (or --resume to continue a run)"))
    cfg = TrainConfig(
        data=str(args.data or ""),
        out=str(args.out),
        model=args.model,
        preset=args.preset,
        teacher=args.teacher,
        penalty_data=args.penalty_data,
        steps=args.steps,
        batch_size=args.batch_size,
        image_size=args.image_size,
        val_fraction=args.val_fraction,
        seed=args.seed,
        lr=args.lr,
        device=args.device,
        threshold_method=args.threshold,
        amp=not args.no_amp,
        tile=args.tile,
        tile_overlap=args.tile_overlap,
        snapshot_every=args.snapshot_every,
        checkpoint_every=args.checkpoint_every,
        stop_after=args.stop_after,
    )
    if not args.resume:
        cfg.with_preset()
    run_dir = train(cfg, resume=args.resume)
    if (run_dir / "model.pt").is_file():
        print(f"run written to {run_dir}")
    else:
        print(f"stopped early; checkpoint in {run_dir / CHECKPOINT}; continue with: edgead train --out {run_dir} --resume")
    return 0
