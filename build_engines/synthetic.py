"""Procedural industrial dataset in the MVTec AD layout (the demo data of EdgeAD).

A scene is a textured metal plate (low-frequency blotches, illumination gradient, brushed
streaks, fine grain) carrying a 3x3 grid of parts (steel screws at the corners, brass
washers at the edges, a dark pin in the centre). Good images vary: texture, lighting,
part position / rotation / brightness jitter and camera noise. Defect types, one folder each:

* structural: ``scratch`` (thin, blurred, low contrast), ``spot`` (small soft stain),
  ``crack`` (thin dark jagged line on a part), ``hole`` (material missing from a part's edge);
* logical: ``missing_part``, ``extra_part``, ``misplaced_part``, ``swapped_part``.

Masks are exact: they are computed from the same geometry that draws the defect (pixels whose
change reaches at least ``MASK_ALPHA`` of the defect's full strength; for logical anomalies
the footprint of every part that is missing, added, moved (old and new place) or swapped).

Example::

    from build_engines.synthetic import generate
    root = generate("data/synth", n_train=200, n_test_good=40, n_test_defect=10)

or ``edgead datagen --out data/synth``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from edgead.errors import ConfigError, DataError, message

__all__ = ["STRUCTURAL", "LOGICAL", "DEFECT_TYPES", "MASK_ALPHA", "make_image", "generate", "main"]

log = logging.getLogger(__name__)

STRUCTURAL: tuple[str, ...] = ("scratch", "spot", "crack", "hole")
LOGICAL: tuple[str, ...] = ("missing_part", "extra_part", "misplaced_part", "swapped_part")
DEFECT_TYPES: tuple[str, ...] = STRUCTURAL + LOGICAL
MASK_ALPHA = 0.3  # a pixel belongs to a structural defect's mask when its alpha reaches this

_GRID = (("screw", "washer", "screw"), ("washer", "pin", "washer"), ("screw", "washer", "screw"))
_KINDS = ("screw", "washer", "pin")
# base colour (B, G, R) on 0..255
_COLOURS = {"screw": (188.0, 184.0, 178.0), "washer": (80.0, 150.0, 186.0), "pin": (142.0, 140.0, 136.0)}
_SPLITS = {"train": 0, "test": 1}
_SS = 4  # sub-pixel bits for cv2 drawing
_MARKER = "edgead_synthetic.json"
GENERATOR = "build_engines.synthetic"


@dataclass(frozen=True)
class _Part:
    kind: str
    cx: float
    cy: float
    angle: float  # radians
    scale: float  # radius unit in pixels
    gain: float  # brightness factor


def _fix(v: float) -> int:
    return int(round(v * (1 << _SS)))


def _part_alpha(part: _Part, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(coverage alpha in [0,1], darkening detail in [0,1]) of one part, float32 HxW."""
    cov = np.zeros((size, size), np.uint8)
    det = np.zeros((size, size), np.uint8)
    c = (_fix(part.cx), _fix(part.cy))
    r = part.scale
    ca, sa = np.cos(part.angle), np.sin(part.angle)
    if part.kind == "screw":
        cv2.circle(cov, c, _fix(r), 255, -1, cv2.LINE_AA, _SS)
        cv2.circle(det, c, _fix(r * 0.82), 90, max(1, round(r * 0.08)), cv2.LINE_AA, _SS)  # chamfer ring
        for a, b in ((ca, sa), (-sa, ca)):  # cross recess
            p0 = (_fix(part.cx - a * r * 0.55), _fix(part.cy - b * r * 0.55))
            p1 = (_fix(part.cx + a * r * 0.55), _fix(part.cy + b * r * 0.55))
            cv2.line(det, p0, p1, 200, max(1, round(r * 0.16)), cv2.LINE_AA, _SS)
    elif part.kind == "washer":
        cv2.circle(cov, c, _fix(r * 1.1), 255, -1, cv2.LINE_AA, _SS)
        cv2.circle(cov, c, _fix(r * 0.5), 0, -1, cv2.LINE_AA, _SS)
        cv2.circle(det, c, _fix(r * 0.8), 60, max(1, round(r * 0.06)), cv2.LINE_AA, _SS)
    elif part.kind == "pin":
        half, width = r * 1.35, r * 0.62
        p0 = (_fix(part.cx - ca * half), _fix(part.cy - sa * half))
        p1 = (_fix(part.cx + ca * half), _fix(part.cy + sa * half))
        cv2.line(cov, p0, p1, 255, max(1, round(width)), cv2.LINE_AA, _SS)
        g0 = (_fix(part.cx + ca * half * 0.45 - sa * width * 0.5), _fix(part.cy + sa * half * 0.45 + ca * width * 0.5))
        g1 = (_fix(part.cx + ca * half * 0.45 + sa * width * 0.5), _fix(part.cy + sa * half * 0.45 - ca * width * 0.5))
        cv2.line(det, g0, g1, 150, max(1, round(r * 0.1)), cv2.LINE_AA, _SS)  # groove
    else:  # pragma: no cover - internal table
        raise ValueError(part.kind)
    alpha = cov.astype(np.float32) / 255.0
    return alpha, det.astype(np.float32) / 255.0 * alpha


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(78.0, 96.0)
    tint = np.array([1.04, 1.0, 0.95], np.float32) * rng.uniform(0.98, 1.02, 3).astype(np.float32)
    low = cv2.resize(rng.normal(0.0, 1.0, (6, 6)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC) * 5.0
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    grad = (np.cos(theta) * xx + np.sin(theta) * yy) * rng.uniform(10.0, 22.0)
    streak = cv2.blur(rng.normal(0.0, 1.0, (size, size)).astype(np.float32), (max(3, size // 12), 1)) * 6.0
    grain = cv2.GaussianBlur(rng.normal(0.0, 1.0, (size, size)).astype(np.float32), (0, 0), 0.7) * 4.0
    gray = base + low + grad + streak + grain
    return gray[:, :, None] * tint[None, None, :]


def _layout(rng: np.random.Generator, size: int) -> list[_Part]:
    cell = size / 3.0
    parts = []
    for i, row in enumerate(_GRID):
        for j, kind in enumerate(row):
            parts.append(_new_part(rng, kind, (j + 0.5) * cell, (i + 0.5) * cell, cell))
    return parts


def _new_part(rng: np.random.Generator, kind: str, cx: float, cy: float, cell: float, scale: float = 1.0) -> _Part:
    jitter = 0.04 * cell
    angle = rng.uniform(0, np.pi) if kind != "pin" else rng.normal(0.0, 0.08)
    return _Part(
        kind,
        cx + rng.uniform(-jitter, jitter),
        cy + rng.uniform(-jitter, jitter),
        float(angle),
        0.18 * cell * scale * rng.uniform(0.97, 1.03),
        float(rng.uniform(0.92, 1.08)),
    )


def _render(bg: np.ndarray, parts: list[_Part], cuts: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Composite the parts (with shadows) onto the background; also return each part's coverage."""
    size = bg.shape[0]
    cover_all = np.zeros((size, size), np.float32)
    colour = np.zeros((size, size, 3), np.float32)
    covers = []
    for k, part in enumerate(parts):
        alpha, detail = _part_alpha(part, size)
        covers.append(alpha.copy())
        if cuts and k in cuts:
            alpha *= 1.0 - cuts[k]
            detail *= 1.0 - cuts[k]
        reach = 1.8 * part.scale + 2.0  # every part fits in this box around its centre
        x0, x1 = max(0, int(part.cx - reach)), min(size, int(np.ceil(part.cx + reach)) + 1)
        y0, y1 = max(0, int(part.cy - reach)), min(size, int(np.ceil(part.cy + reach)) + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        light = 1.0 - 0.16 * ((xx - part.cx) + (yy - part.cy)) / (1.6 * part.scale)  # light from top-left
        spec = np.exp(-(((xx - part.cx + 0.35 * part.scale) ** 2 + (yy - part.cy + 0.35 * part.scale) ** 2) / (0.3 * part.scale**2)))
        shade = (np.clip(light, 0.75, 1.25) * (1.0 - 0.5 * detail[y0:y1, x0:x1]) * part.gain)[:, :, None]
        col = np.asarray(_COLOURS[part.kind], np.float32)[None, None, :] * shade + 40.0 * spec[:, :, None]
        colour[y0:y1, x0:x1] += col * alpha[y0:y1, x0:x1, None]
        cover_all += alpha
    shift = max(1.0, size / 90.0)
    moved = cv2.warpAffine(cover_all, np.array([[1, 0, shift], [0, 1, shift]], np.float32), (size, size))
    shadow = cv2.GaussianBlur(moved, (0, 0), max(1.0, size / 110.0))
    shaded = bg * (1.0 - 0.45 * np.clip(shadow, 0, 1))[:, :, None]
    return shaded * (1.0 - cover_all)[:, :, None] + colour, covers


def _stroke(size: int, points: np.ndarray, thickness: int, blur: float) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    pts = np.round(points * (1 << _SS)).astype(np.int32).reshape(-1, 1, 2)
    cv2.polylines(canvas, [pts], False, 255, thickness, cv2.LINE_AA, _SS)
    alpha: np.ndarray = canvas.astype(np.float32) / 255.0
    if blur > 0:
        blurred = cv2.GaussianBlur(alpha, (0, 0), blur)
        alpha = np.asarray(blurred / max(float(blurred.max()), 1e-6), np.float32)
    return alpha


# ---- structural defects: (image, parts, covers, rng) -> (image, alpha); mask = alpha >= MASK_ALPHA


def _scratch(img: np.ndarray, parts: list[_Part], covers: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    length = rng.uniform(0.15, 0.32) * size
    p0 = rng.uniform(0.15, 0.85, 2) * size
    theta = rng.uniform(0, 2 * np.pi)
    d = np.array([np.cos(theta), np.sin(theta)])
    bend = rng.normal(0.0, 0.08) * length
    t = np.linspace(0.0, 1.0, 24)[:, None]
    pts = p0 + t * length * d + (4 * t * (1 - t)) * bend * np.array([-d[1], d[0]])
    alpha = _stroke(size, np.clip(pts, 1, size - 2), max(1, round(size / 256)), 0.7 * size / 256)
    contrast = rng.uniform(28.0, 45.0) * rng.choice([-1.0, 1.0])
    return img + contrast * alpha[:, :, None], alpha


def _spot(img: np.ndarray, parts: list[_Part], covers: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    unit = size / 256.0
    canvas = np.zeros((size, size), np.uint8)
    centre = rng.uniform(0.1, 0.9, 2) * size
    axes = rng.uniform(2.5, 6.0, 2) * unit
    cv2.ellipse(canvas, (_fix(centre[0]), _fix(centre[1])), (_fix(axes[0]), _fix(axes[1])), float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA, _SS)
    blurred = cv2.GaussianBlur(canvas.astype(np.float32) / 255.0, (0, 0), 1.0 * unit)
    alpha = blurred / max(float(blurred.max()), 1e-6)
    stain = np.array([30.0, 48.0, 62.0], np.float32)  # brownish (BGR)
    strength = rng.uniform(0.35, 0.6)
    a = (alpha * strength)[:, :, None]
    return img * (1.0 - a) + stain * a, alpha


def _crack(img: np.ndarray, parts: list[_Part], covers: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    least = max(3, round(10 * size / 256))
    for _ in range(100):  # retry until the crack stays on its part long enough to be seen
        k = int(rng.integers(len(parts)))
        ys, xs = np.nonzero(covers[k] > 0.5)
        idx = int(rng.integers(xs.size))
        pos = np.array([xs[idx], ys[idx]], np.float64)
        theta = rng.uniform(0, 2 * np.pi)
        step = 1.5 * size / 256.0
        pts = [pos.copy()]
        for _ in range(int(rng.integers(12, 26))):
            theta += rng.normal(0.0, 0.6)
            pos = pos + step * np.array([np.cos(theta), np.sin(theta)])
            pts.append(pos.copy())
        alpha = _stroke(size, np.clip(np.array(pts), 0, size - 1), 1, 0.0) * (covers[k] > 0.5)
        if (alpha >= MASK_ALPHA).sum() >= least:
            break
    return img * (1.0 - 0.45 * alpha[:, :, None]), alpha


_STRUCTURAL_FNS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {"scratch": _scratch, "spot": _spot, "crack": _crack}


def _hole_cut(parts: list[_Part], covers: list[np.ndarray], rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """A round notch on a part's outer edge: (part index, cut alpha)."""
    size = covers[0].shape[0]
    k = int(rng.integers(len(parts)))
    part = parts[k]
    phi = rng.uniform(0, 2 * np.pi)
    reach = {"screw": 1.0, "washer": 1.1, "pin": 0.31}[part.kind] * part.scale
    if part.kind == "pin":  # notch on the long side
        ca, sa = np.cos(part.angle), np.sin(part.angle)
        along = rng.uniform(-0.8, 0.8) * 1.35 * part.scale
        side = rng.choice([-1.0, 1.0])
        centre = (part.cx + ca * along - side * sa * reach, part.cy + sa * along + side * ca * reach)
    else:
        centre = (part.cx + np.cos(phi) * reach, part.cy + np.sin(phi) * reach)
    radius = rng.uniform(0.3, 0.45) * part.scale
    canvas = np.zeros((size, size), np.uint8)
    cv2.circle(canvas, (_fix(centre[0]), _fix(centre[1])), _fix(radius), 255, -1, cv2.LINE_AA, _SS)
    return k, canvas.astype(np.float32) / 255.0


# ---- logical anomalies: parts -> (new parts, list of footprints that form the mask)


def _logical(kind: str, parts: list[_Part], rng: np.random.Generator, size: int) -> tuple[list[_Part], list[_Part]]:
    """Return (parts to render, parts whose footprints form the mask)."""
    cell = size / 3.0
    parts = list(parts)
    if kind == "missing_part":
        k = int(rng.integers(len(parts)))
        return parts[:k] + parts[k + 1 :], [parts[k]]
    if kind == "extra_part":
        i, j = (int(v) for v in rng.integers(1, 3, 2))  # one of the 4 inner grid corners
        extra = _new_part(rng, str(rng.choice(_KINDS)), j * cell, i * cell, cell, scale=0.85)
        return parts + [extra], [extra]
    if kind == "misplaced_part":
        k = int(rng.integers(len(parts)))
        row, col = divmod(k, 3)
        # towards the inside of the grid (never off the image); free direction in the middle
        sx, sy = ({0: 1.0, 2: -1.0}.get(c, float(rng.choice([-1.0, 1.0]))) for c in (col, row))
        dist = rng.uniform(0.26, 0.34) * cell
        moved = replace(parts[k], cx=parts[k].cx + sx * dist, cy=parts[k].cy + sy * dist)
        return parts[:k] + [moved] + parts[k + 1 :], [parts[k], moved]
    if kind == "swapped_part":
        while True:
            a, b = (int(v) for v in rng.choice(len(parts), 2, replace=False))
            if parts[a].kind != parts[b].kind:
                break
        pa = _new_part(rng, parts[b].kind, parts[a].cx, parts[a].cy, cell)
        pb = _new_part(rng, parts[a].kind, parts[b].cx, parts[b].cy, cell)
        pa, pb = replace(pa, cx=parts[a].cx, cy=parts[a].cy), replace(pb, cx=parts[b].cx, cy=parts[b].cy)
        out = list(parts)
        out[a], out[b] = pa, pb
        return out, [parts[a], parts[b], pa, pb]
    raise ValueError(kind)  # pragma: no cover - internal table


def make_image(seed: int | tuple[int, ...], size: int = 256, defect: str | None = None, *, camera_noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Render one image (uint8 HxWx3 BGR) and its bool mask; deterministic for ``seed``.

    The scene (background, parts, camera noise) depends only on ``seed``, so the same seed
    with and without ``defect`` gives the same scene: the difference is the defect alone.

    >>> img, mask = make_image(3, 128, "spot")
    >>> img.shape, img.dtype, bool(mask.any())
    ((128, 128, 3), dtype('uint8'), True)
    """
    if defect is not None and defect not in DEFECT_TYPES:
        raise ConfigError(message("defect", repr(defect), f"one of {list(DEFECT_TYPES)}", "pick a listed defect type"))
    scene_ss, defect_ss, noise_ss = np.random.SeedSequence(seed).spawn(3)
    scene_rng, defect_rng, noise_rng = (np.random.default_rng(s) for s in (scene_ss, defect_ss, noise_ss))
    bg = _background(scene_rng, size)
    parts = _layout(scene_rng, size)
    mask = np.zeros((size, size), bool)
    if defect in LOGICAL:
        parts, marked = _logical(defect, parts, defect_rng, size)
        img, _ = _render(bg, parts)
        for part in marked:
            mask |= _part_alpha(part, size)[0] >= 0.5
    elif defect == "hole":
        _, covers = _render(bg, parts)
        least = max(2, round(6 * (size / 256) ** 2))
        for _ in range(100):
            k, cut = _hole_cut(parts, covers, defect_rng)
            removed = cut * covers[k]
            if (removed >= 0.5).sum() >= least:
                break
        img, _ = _render(bg, parts, {k: cut})
        mask = removed >= 0.5
    else:
        img, covers = _render(bg, parts)
        if defect is not None:
            img, alpha = _STRUCTURAL_FNS[defect](img, parts, covers, defect_rng)
            mask = alpha >= MASK_ALPHA
    gain = noise_rng.uniform(0.96, 1.04)
    offset = noise_rng.uniform(-3.0, 3.0)
    noise = noise_rng.normal(0.0, 2.0, img.shape).astype(np.float32)
    img = img * gain + offset + (noise if camera_noise else 0.0)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(message(name, repr(value), f"an integer >= {minimum}", f"pass {name}={max(minimum, 1)} or more"))
    return int(value)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(message("output folder", f"'{out}' is a file", "a folder path", "choose another --out"))
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(
                message(
                    "output folder",
                    f"'{out}' is not empty",
                    "an empty or new folder",
                    "choose another --out, or pass overwrite=True / --overwrite to replace the generated data",
                )
            )
        marker = out / _MARKER
        if not marker.is_file() or not _is_our_marker(marker):
            # never delete a real data set: only a folder this generator wrote (its marker says so) is replaced
            raise DataError(
                message(
                    "output folder",
                    f"'{out}' is not empty and holds no {_MARKER} written by `edgead datagen` (not a generated set)",
                    "an empty or new folder, or a folder generated earlier",
                    "choose another --out; --overwrite only replaces data that datagen itself wrote",
                )
            )
        for name in ("train", "test", "ground_truth", _MARKER):
            target = out / name
            if target.is_dir():
                log.warning("overwrite: removing %s", target)
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _is_our_marker(path: Path) -> bool:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("generator") == GENERATOR


def generate(
    out_dir: str | Path,
    *,
    n_train: int,
    n_test_good: int,
    n_test_defect: int,
    size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic MVTec-layout dataset to ``out_dir`` and return its path.

    ``n_test_defect`` images are written per defect type (see ``DEFECT_TYPES``). A non-empty
    ``out_dir`` is refused unless ``overwrite=True``, which replaces only ``train/``, ``test/``
    and ``ground_truth/`` (other files are kept). Each image depends only on (seed, split,
    type, index), so a larger set extends a smaller one.

    >>> root = generate("/tmp/synth_doc", n_train=2, n_test_good=1, n_test_defect=1, size=64, overwrite=True)
    >>> sorted(p.name for p in (root / "test").iterdir())[:3]
    ['crack', 'extra_part', 'good']
    """
    n_train = _check_count("n_train", n_train, 1)
    n_test_good = _check_count("n_test_good", n_test_good, 0)
    n_test_defect = _check_count("n_test_defect", n_test_defect, 0)
    size = _check_count("size", size, 64)
    if size > 4096:
        raise ConfigError(message("size", size, "at most 4096", "pass --size 256 (the EfficientAD input size)"))
    seed = _check_count("seed", seed, 0)
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    (out / _MARKER).write_text(json.dumps({"generator": GENERATOR, "complete": False}) + "\n")  # first: an interrupted run stays replaceable
    started = time.perf_counter()
    png = [cv2.IMWRITE_PNG_COMPRESSION, 1]

    def write(folder: Path, name: str, image: np.ndarray) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(folder / name), image, png):
            raise DataError(message("image write", f"failed for '{folder / name}'", "a writable folder", "check the permissions and free disk space"))

    jobs: list[tuple[Path, tuple[int, ...], str | None, int]] = []
    jobs += [(out / "train" / "good", (seed, _SPLITS["train"], 0, i), None, i) for i in range(n_train)]
    jobs += [(out / "test" / "good", (seed, _SPLITS["test"], 0, i), None, i) for i in range(n_test_good)]
    for t, name in enumerate(DEFECT_TYPES, start=1):
        jobs += [(out / "test" / name, (seed, _SPLITS["test"], t, i), name, i) for i in range(n_test_defect)]
    for folder, key, defect, i in jobs:
        image, mask = make_image(key, size, defect)
        write(folder, f"{i:03d}.png", image)
        if defect is not None:
            write(out / "ground_truth" / defect, f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    info = {
        "generator": GENERATOR,
        "seed": seed,
        "size": size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "structural": list(STRUCTURAL),
        "logical": list(LOGICAL),
    }
    (out / _MARKER).write_text(json.dumps(info, indent=2) + "\n")
    log.info("synthetic dataset: %d images (%dx%d) in %s, %.1f s", len(jobs), size, size, out, time.perf_counter() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    """``edgead datagen --out DIR [--train N] [--test-good N] [--test-defect N] [--size S] [--seed S] [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="edgead datagen", description="Write a synthetic MVTec-layout dataset with structural and logical defects.")
    parser.add_argument("--out", required=True, type=Path, help="output folder (must be new or empty unless --overwrite)")
    parser.add_argument("--train", type=int, default=200, help="good training images (default 200)")
    parser.add_argument("--test-good", type=int, default=40, help="good test images (default 40)")
    parser.add_argument("--test-defect", type=int, default=10, help="test images per defect type (default 10)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace train/, test/ and ground_truth/ in a non-empty --out")
    args = parser.parse_args(argv)
    root = generate(
        args.out, n_train=args.train, n_test_good=args.test_good, n_test_defect=args.test_defect, size=args.size, seed=args.seed, overwrite=args.overwrite
    )
    print(root)
    return 0
