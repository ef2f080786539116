"""Anomaly-detection datasets on disk: image reading, layout detection, masks, splits.

Two layouts are understood and auto-detected by :func:`open_dataset`:

* ``mvtec``  - ``train/good``, ``test/good``, ``test/<defect>``, ``ground_truth/<defect>/<stem>_mask.png``
  (``<stem>.png`` is accepted as well).
* ``folder`` - ``good/`` (all used for training), optional ``bad/`` (images, or one sub-folder per
  defect type) and optional ``masks/`` mirroring ``bad/`` (``<stem>_mask.png`` or ``<stem>.png``).
  The folder layout has no held-out good test images: hold some out with :func:`split_train_val`.

Hidden files (names starting with ``.``) are ignored and every listing is sorted by name, so the
order is the same on every machine. Only numpy and OpenCV are used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .errors import ConfigError, DataError, message

__all__ = [
    "IMAGE_EXTENSIONS",
    "Sample",
    "Dataset",
    "read_image",
    "image_color",
    "list_images",
    "open_dataset",
    "read_mask",
    "split_train_val",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_EXT_TEXT = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Sample:
    """One test image: ``label`` 0 = good, 1 = defective; ``defect`` is its folder name ("good" for good)."""

    path: Path
    label: int
    defect: str
    mask_path: Path | None = None


@dataclass
class Dataset:
    """An opened dataset (see :func:`open_dataset`)."""

    root: Path
    layout: str
    train_good: list[Path]
    test: list[Sample]
    defect_types: list[str] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        """True when every defective test image has a ground-truth mask (pixel metrics possible)."""
        bad = [s for s in self.test if s.label == 1]
        return bool(bad) and all(s.mask_path is not None for s in bad)

    def counts(self) -> dict[str, int]:
        """Image counts: ``train/good`` then one entry per test folder (``test/good``, ``test/<defect>``)."""
        out = {"train/good": len(self.train_good)}
        for s in self.test:
            key = f"test/{s.defect}"
            out[key] = out.get(key, 0) + 1
        return out


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def list_images(folder: str | Path, *, required: bool = True) -> list[Path]:
    """Sorted image files directly inside ``folder`` (hidden files and other extensions ignored).

    With ``required=True`` an empty result raises DataError listing the accepted extensions.

    >>> list_images("/no/such/folder", required=False)
    []
    """
    folder = Path(folder)
    if not folder.is_dir():
        if required:
            raise DataError(message("image folder", f"'{folder}' does not exist", "a folder of images", "check the path"))
        return []
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    images = sorted((p for p in entries if _is_image(p)), key=lambda p: p.name)
    if not images and required:
        others = sorted(p.name for p in entries)[:5]
        got = f"no images in '{folder}'" + (f" (found e.g. {others})" if others else " (folder is empty)")
        raise DataError(
            message("image folder", got, f"at least one file with extension {_EXT_TEXT}", "put the images in this folder or point to the right one")
        )
    return images


def image_color(image: np.ndarray) -> str:
    """The ``color=`` value for an image as :func:`read_image` returns it: ``"gray"`` (HxW) or ``"bgr"``.

    >>> image_color(np.zeros((4, 4), np.uint8)), image_color(np.zeros((4, 4, 3), np.uint8))
    ('gray', 'bgr')
    """
    return "gray" if image.ndim == 2 else "bgr"


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as stored: uint8 or uint16, HxW (gray) or HxWx3 (BGR); alpha is dropped.

    Raises DataError for a missing, unreadable or corrupt file and for unsupported pixel types
    (for example float TIFF). EXIF orientation is not applied (the pixels as the camera wrote them).

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "a.png"); _ = cv2.imwrite(p, np.zeros((4, 5), np.uint8))
    >>> read_image(p).shape
    (4, 5)
    """
    path = Path(path)
    if not path.exists():
        raise DataError(message("image file", f"'{path}' does not exist", "an existing image file", "check the path and the file name"))
    if not path.is_file():
        raise DataError(message("image file", f"'{path}' is not a file", "an image file", "pass a file, not a folder"))
    try:
        raw = np.fromfile(str(path), dtype=np.uint8)  # fromfile + imdecode also handles non-ASCII paths
    except OSError as exc:
        raise DataError(message("image file", f"'{path}' cannot be read ({exc})", "a readable file", "check the file permissions")) from exc
    image = None
    if raw.size:
        try:
            image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
        except cv2.error:
            image = None
    if image is None:
        raise DataError(
            message(
                "image file",
                f"'{path}' could not be decoded ({raw.size} bytes)",
                f"a valid image ({_EXT_TEXT})",
                "re-export the file; it is empty, truncated or not an image",
            )
        )
    if image.dtype not in (np.uint8, np.uint16):
        raise DataError(
            message("image pixel type", f"{image.dtype} in '{path}'", "uint8 or uint16 pixels", "convert the file to 8- or 16-bit integer PNG/TIFF")
        )
    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 1:
            image = image[:, :, 0]
        elif channels == 4:
            image = image[:, :, :3]
        elif channels != 3:
            raise DataError(message("image channels", f"{channels} in '{path}'", "1 (gray), 3 (BGR) or 4 (BGRA)", "convert the file to gray or colour"))
    elif image.ndim != 2:
        raise DataError(message("image shape", f"{image.shape} in '{path}'", "HxW or HxWxC", "convert the file to a plain 2-D image"))
    return np.ascontiguousarray(image)


def _mask_for(mask_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        candidate = mask_dir / name
        if candidate.is_file():
            return candidate
    return None


def _open_mvtec(root: Path) -> Dataset:
    train_dir = root / "train" / "good"
    if not train_dir.is_dir():
        raise DataError(
            message(
                "MVTec layout",
                f"'{root / 'train'}' without a 'good' folder",
                "train/good/ with the good training images",
                "create train/good and put the good images there",
            )
        )
    train = list_images(train_dir)
    test: list[Sample] = []
    defects: list[str] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        loose = [p.name for p in test_dir.iterdir() if _is_image(p)]
        if loose:
            log.warning("ignoring %d image(s) directly in %s (expected test/good or test/<defect> sub-folders)", len(loose), test_dir)
        for sub in _visible_dirs(test_dir):
            images = list_images(sub, required=False)
            if not images:
                log.warning("ignoring %s: no images in it", sub)
                continue
            if sub.name == "good":
                test += [Sample(p, 0, "good", None) for p in images]
                continue
            defects.append(sub.name)
            gt_dir = root / "ground_truth" / sub.name
            test += [Sample(p, 1, sub.name, _mask_for(gt_dir, p.stem)) for p in images]
    else:
        log.warning("%s has no test/ folder: the dataset can train but not be evaluated", root)
    return Dataset(root, "mvtec", train, test, defects)


def _open_folder(root: Path) -> Dataset:
    train = list_images(root / "good")
    test: list[Sample] = []
    defects: list[str] = []
    bad_dir, mask_dir = root / "bad", root / "masks"
    if bad_dir.is_dir():
        groups: list[tuple[str, list[Path], Path]] = []
        direct = list_images(bad_dir, required=False)
        if direct:
            groups.append(("bad", direct, mask_dir))
        for sub in _visible_dirs(bad_dir):
            images = list_images(sub, required=False)
            if images:
                groups.append((sub.name, images, mask_dir / sub.name))
        for name, images, mdir in groups:
            defects.append(name)
            test += [Sample(p, 1, name, _mask_for(mdir, p.stem)) for p in images]
    return Dataset(root, "folder", train, test, defects)


def open_dataset(root: str | Path) -> Dataset:
    """Open a dataset folder, detecting its layout (``mvtec`` or ``folder``).

    >>> ds = open_dataset("/work/shared/data/ad/deeppcb")  # doctest: +SKIP
    >>> ds.layout, len(ds.train_good), ds.defect_types  # doctest: +SKIP
    ('mvtec', 400, ['defect'])
    """
    root = Path(root)
    if not root.exists():
        raise DataError(message("dataset root", f"'{root}' does not exist", "an existing dataset folder", "check the path (and the current directory)"))
    if not root.is_dir():
        raise DataError(
            message("dataset root", f"'{root}' is a file", "a dataset folder", "pass the folder that contains train/ (MVTec) or good/ (plain folder)")
        )
    if (root / "train").is_dir():
        return _open_mvtec(root)
    if (root / "good").is_dir():
        return _open_folder(root)
    found = [p.name + "/" for p in _visible_dirs(root)][:8]
    raise DataError(
        message(
            "dataset layout",
            f"'{root}' with folders {found or 'none'}",
            "MVTec (train/good, test/<good|defect>, ground_truth/<defect>) or plain (good/, optional bad/ and masks/)",
            "arrange the images in one of these layouts or point to the dataset's top folder",
        )
    )


def read_mask(sample: Sample, shape: Sequence[int]) -> np.ndarray:
    """Ground-truth mask of ``sample`` as a bool HxW array (any non-zero pixel is defective).

    ``shape`` is the image shape (HxW or HxWxC). Good samples give all-False. A defective
    sample without a mask, an unreadable mask or one of another size raises DataError.

    >>> read_mask(Sample(Path("x.png"), 0, "good"), (2, 3)).tolist()
    [[False, False, False], [False, False, False]]
    """
    if len(shape) < 2:
        raise ConfigError(message("read_mask shape", tuple(shape), "the image shape (H, W) or (H, W, C)", "pass image.shape"))
    hw = (int(shape[0]), int(shape[1]))
    if sample.label == 0:
        return np.zeros(hw, dtype=bool)
    if sample.mask_path is None:
        raise DataError(
            message(
                "ground-truth mask",
                f"none for defective image '{sample.path}'",
                "ground_truth/<defect>/<stem>_mask.png (MVTec) or masks/<stem>_mask.png (plain folder)",
                "add the mask, or evaluate image-level metrics only (Dataset.has_masks is False)",
            )
        )
    try:
        mask = read_image(sample.mask_path)
    except DataError as exc:
        raise DataError(message("ground-truth mask", f"unreadable '{sample.mask_path}' ({exc})", "a readable PNG mask", "re-export the mask")) from exc
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.shape != hw:
        raise DataError(
            message(
                "ground-truth mask size",
                f"{mask.shape} for '{sample.mask_path}'",
                f"the image size {hw} of '{sample.path}'",
                "re-export the mask at the image's resolution",
            )
        )
    out = mask > 0
    if not out.any():
        log.warning("ground-truth mask %s of defective image %s is empty (no defective pixel)", sample.mask_path, sample.path)
    return out


def split_train_val(paths: Sequence[Path], val_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Deterministic random split of good images into (train, val), at least one in each.

    The validation images are held out for quantile / threshold calibration. Both lists
    keep the input order.

    >>> split_train_val([Path(f"{i}.png") for i in range(10)], 0.2, seed=0)[1]  # doctest: +SKIP
    [PosixPath('3.png'), PosixPath('7.png')]
    """
    paths = list(paths)
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(message("val_fraction", val_fraction, "a number strictly between 0 and 1", "pass e.g. 0.1"))
    if len(paths) < 2:
        raise DataError(message("good images for a train/val split", len(paths), "at least 2", "add more good images"))
    n_val = min(max(1, round(len(paths) * float(val_fraction))), len(paths) - 1)
    order = np.random.default_rng(seed).permutation(len(paths))
    val_idx = set(order[:n_val].tolist())
    train = [p for i, p in enumerate(paths) if i not in val_idx]
    val = [p for i, p in enumerate(paths) if i in val_idx]
    return train, val
