"""Dataset readers: image decoding, MVTec and plain-folder layouts, masks, splits, error paths."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from edgead.datasets import IMAGE_EXTENSIONS, Sample, list_images, open_dataset, read_image, read_mask, split_train_val
from edgead.errors import ConfigError, DataError, EdgeADError

RNG = np.random.default_rng(0)


def _write(path: Path, image: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return image


def _gray(h: int = 12, w: int = 16) -> np.ndarray:
    return RNG.integers(0, 256, (h, w), dtype=np.uint8)


def _bgr(h: int = 12, w: int = 16) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture()
def mvtec(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec"
    _write(root / "train/good/b.png", _gray())
    _write(root / "train/good/a.png", _bgr())
    _write(root / "train/good/c.png", RNG.integers(0, 65536, (12, 16), dtype=np.uint16))
    _write(root / "train/good/d.jpg", _bgr())
    _write(root / "train/good/.hidden.png", _gray())
    (root / "train/good/notes.txt").write_text("not an image")
    _write(root / "test/good/000.png", _gray())
    _write(root / "test/good/001.png", _gray())
    for defect in ("scratch", "hole"):
        for i in range(2):
            _write(root / f"test/{defect}/{i:03d}.png", _gray())
            mask = np.zeros((12, 16), np.uint8)
            mask[2 + i : 5 + i, 3:7] = 255
            _write(root / f"ground_truth/{defect}/{i:03d}_mask.png", mask)
    (root / "test/.DS_Store").mkdir()
    return root


# ---- read_image


def test_read_image_keeps_dtype_and_channels(tmp_path: Path) -> None:
    gray = _write(tmp_path / "g.png", _gray())
    bgr = _write(tmp_path / "c.png", _bgr())
    deep = _write(tmp_path / "d.png", RNG.integers(0, 65536, (12, 16), dtype=np.uint16))
    deep_c = _write(tmp_path / "dc.tiff", RNG.integers(0, 65536, (12, 16, 3), dtype=np.uint16))
    bgra = _write(tmp_path / "a.png", RNG.integers(0, 256, (12, 16, 4), dtype=np.uint8))
    _write(tmp_path / "b.bmp", bgr)
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), gray)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png"), bgr)
    np.testing.assert_array_equal(read_image(tmp_path / "b.bmp"), bgr)
    out = read_image(tmp_path / "d.png")
    assert out.dtype == np.uint16 and out.shape == (12, 16)
    np.testing.assert_array_equal(out, deep)
    np.testing.assert_array_equal(read_image(tmp_path / "dc.tiff"), deep_c)
    out = read_image(tmp_path / "a.png")
    assert out.shape == (12, 16, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, bgra[:, :, :3])


def test_read_image_jpeg_and_non_ascii_path(tmp_path: Path) -> None:
    image = np.full((16, 16, 3), (10, 120, 240), np.uint8)
    _write(tmp_path / "x.jpg", image)
    path = tmp_path / "prüfung_ä.jpg"
    path.write_bytes((tmp_path / "x.jpg").read_bytes())
    out = read_image(path)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).max() <= 3  # BGR order kept (JPEG is lossy)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "not a file"),
        (lambda p: p.write_bytes(b""), "could not be decoded"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200))), "could not be decoded"),
        (lambda p: p.write_text("hello"), "could not be decoded"),
    ],
)
def test_read_image_errors(tmp_path: Path, make, match: str) -> None:
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(DataError, match=match) as info:
        read_image(path)
    assert "how to fix" in str(info.value)


def test_read_image_truncated_png(tmp_path: Path) -> None:
    _write(tmp_path / "ok.png", _bgr(64, 64))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match="could not be decoded"):
        read_image(tmp_path / "cut.png")


def test_read_image_rejects_float_tiff(tmp_path: Path) -> None:
    _write(tmp_path / "f.tiff", RNG.random((8, 8)).astype(np.float32))
    with pytest.raises(DataError, match="float32"):
        read_image(tmp_path / "f.tiff")


# ---- MVTec layout


def test_open_mvtec(mvtec: Path) -> None:
    ds = open_dataset(mvtec)
    assert ds.layout == "mvtec" and ds.root == mvtec
    assert [p.name for p in ds.train_good] == ["a.png", "b.png", "c.png", "d.jpg"]  # sorted, hidden + txt ignored
    assert ds.defect_types == ["hole", "scratch"]
    assert ds.counts() == {"train/good": 4, "test/good": 2, "test/hole": 2, "test/scratch": 2}
    assert [(s.label, s.defect, s.path.name) for s in ds.test] == [
        (0, "good", "000.png"),
        (0, "good", "001.png"),
        (1, "hole", "000.png"),
        (1, "hole", "001.png"),
        (1, "scratch", "000.png"),
        (1, "scratch", "001.png"),
    ]
    assert all(s.mask_path is None for s in ds.test if s.label == 0)
    assert ds.test[3].mask_path == mvtec / "ground_truth/hole/001_mask.png"
    assert ds.has_masks
    assert [read_image(p).dtype for p in ds.train_good] == [np.uint8, np.uint8, np.uint16, np.uint8]


def test_read_mask(mvtec: Path) -> None:
    ds = open_dataset(mvtec)
    good, bad = ds.test[0], ds.test[3]
    assert not read_mask(good, (12, 16, 3)).any() and read_mask(good, (12, 16)).shape == (12, 16)
    expected = np.zeros((12, 16), bool)
    expected[3:6, 3:7] = True
    np.testing.assert_array_equal(read_mask(bad, read_image(bad.path).shape), expected)


def test_read_mask_errors(mvtec: Path) -> None:
    ds = open_dataset(mvtec)
    bad = ds.test[2]
    with pytest.raises(DataError, match=r"mask size \| got \(12, 16\)"):
        read_mask(bad, (10, 16))
    with pytest.raises(DataError, match="none for defective image"):
        read_mask(Sample(bad.path, 1, "hole", None), (12, 16))
    assert bad.mask_path is not None
    bad.mask_path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable"):
        read_mask(bad, (12, 16))
    with pytest.raises(ConfigError):
        read_mask(bad, (12,))


def test_mvtec_missing_mask_is_reported_at_read(mvtec: Path) -> None:
    (mvtec / "ground_truth/scratch/001_mask.png").unlink()
    ds = open_dataset(mvtec)
    sample = ds.test[-1]
    assert sample.mask_path is None and not ds.has_masks
    with pytest.raises(DataError, match="ground_truth/<defect>/<stem>_mask.png"):
        read_mask(sample, (12, 16))


def test_mvtec_mask_without_suffix_accepted(mvtec: Path) -> None:
    (mvtec / "ground_truth/scratch/001_mask.png").rename(mvtec / "ground_truth/scratch/001.png")
    assert open_dataset(mvtec).test[-1].mask_path == mvtec / "ground_truth/scratch/001.png"


def test_mvtec_empty_train(mvtec: Path) -> None:
    for p in (mvtec / "train/good").iterdir():
        p.unlink()
    (mvtec / "train/good/.hidden.png").write_bytes(b"x")
    with pytest.raises(DataError, match="no images") as info:
        open_dataset(mvtec)
    for ext in ("png", "jpg", "jpeg", "bmp", "tif", "tiff"):
        assert ext in str(info.value)


def test_mvtec_train_without_good(tmp_path: Path) -> None:
    _write(tmp_path / "train/ok/a.png", _gray())
    with pytest.raises(DataError, match="train/good"):
        open_dataset(tmp_path)


def test_mvtec_without_test_folder(tmp_path: Path) -> None:
    _write(tmp_path / "train/good/a.png", _gray())
    ds = open_dataset(tmp_path)
    assert ds.test == [] and ds.defect_types == [] and not ds.has_masks


# ---- plain folder layout


def test_open_folder_layout(tmp_path: Path) -> None:
    for name in ("z.png", "y.tif", "x.jpeg"):
        _write(tmp_path / "good" / name, _gray())
    _write(tmp_path / "bad/b1.png", _gray())
    _write(tmp_path / "bad/dent/d1.png", _gray())
    mask = np.zeros((12, 16), np.uint8)
    mask[0, 0] = 1  # any non-zero value is defective
    _write(tmp_path / "masks/b1_mask.png", mask)
    _write(tmp_path / "masks/dent/d1.png", mask)
    ds = open_dataset(tmp_path)
    assert ds.layout == "folder"
    assert [p.name for p in ds.train_good] == ["x.jpeg", "y.tif", "z.png"]
    assert [(s.defect, s.label, s.mask_path) for s in ds.test] == [
        ("bad", 1, tmp_path / "masks/b1_mask.png"),
        ("dent", 1, tmp_path / "masks/dent/d1.png"),
    ]
    assert ds.defect_types == ["bad", "dent"] and ds.has_masks
    assert read_mask(ds.test[0], (12, 16)).sum() == 1


def test_folder_layout_without_masks(tmp_path: Path) -> None:
    _write(tmp_path / "good/a.png", _gray())
    _write(tmp_path / "bad/b.png", _gray())
    ds = open_dataset(tmp_path)
    assert not ds.has_masks and ds.test[0].mask_path is None
    with pytest.raises(DataError, match="image-level metrics only"):
        read_mask(ds.test[0], (12, 16))


def test_folder_layout_good_only(tmp_path: Path) -> None:
    _write(tmp_path / "good/a.png", _gray())
    ds = open_dataset(tmp_path)
    assert ds.test == [] and len(ds.train_good) == 1


# ---- root errors


def test_root_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        open_dataset(tmp_path / "file.txt")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="dataset layout") as info:
        open_dataset(tmp_path)
    text = str(info.value)
    assert "train/good" in text and "good/" in text and "images/" in text
    assert isinstance(info.value, EdgeADError)


def test_list_images(tmp_path: Path) -> None:
    assert list_images(tmp_path / "missing", required=False) == []
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "missing")
    for ext in IMAGE_EXTENSIONS:
        (tmp_path / f"img{ext.upper()}").write_bytes(b"")
    (tmp_path / ".img.png").write_bytes(b"")
    assert len(list_images(tmp_path)) == len(IMAGE_EXTENSIONS)


# ---- split


def test_split_train_val_deterministic() -> None:
    paths = [Path(f"{i:03d}.png") for i in range(50)]
    train, val = split_train_val(paths, 0.2, seed=1)
    assert (train, val) == split_train_val(paths, 0.2, seed=1)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val) == paths and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)  # input order kept
    assert split_train_val(paths, 0.2, seed=2)[1] != val


def test_split_train_val_bounds() -> None:
    two = [Path("a.png"), Path("b.png")]
    assert [len(x) for x in split_train_val(two, 0.01)] == [1, 1]
    assert [len(x) for x in split_train_val(two, 0.99)] == [1, 1]
    with pytest.raises(DataError, match="at least 2"):
        split_train_val(two[:1], 0.5)
    for bad in (0.0, 1.0, -0.1, 2):
        with pytest.raises(ConfigError, match="val_fraction"):
            split_train_val(two, bad)
