"""Synthetic dataset generator: layout, determinism, exact masks, refusal to overwrite."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from build_engines.synthetic import DEFECT_TYPES, LOGICAL, STRUCTURAL, generate, main, make_image
from edgead.datasets import open_dataset, read_image, read_mask
from edgead.errors import ConfigError, DataError

SMALL = {"n_train": 3, "n_test_good": 2, "n_test_defect": 1, "size": 64}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_opens_with_reader(tmp_path: Path) -> None:
    root = generate(tmp_path / "ds", **SMALL)
    ds = open_dataset(root)
    assert ds.layout == "mvtec"
    assert sorted(ds.defect_types) == sorted(DEFECT_TYPES) and len(DEFECT_TYPES) == 8
    assert set(STRUCTURAL) == {"scratch", "spot", "crack", "hole"}
    assert set(LOGICAL) == {"missing_part", "extra_part", "misplaced_part", "swapped_part"}
    counts = ds.counts()
    assert counts.pop("train/good") == 3 and counts.pop("test/good") == 2
    assert counts == {f"test/{d}": 1 for d in DEFECT_TYPES}
    assert not (root / "ground_truth" / "good").exists()
    assert ds.has_masks
    for sample in ds.test:
        image = read_image(sample.path)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        mask = read_mask(sample, image.shape)
        assert mask.any() == bool(sample.label), sample  # masks non-empty exactly for defects
        if sample.label:
            assert sample.mask_path is not None
            raw = read_image(sample.mask_path)
            assert set(np.unique(raw).tolist()) <= {0, 255}


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    a = _files(generate(tmp_path / "a", **SMALL, seed=3))
    b = _files(generate(tmp_path / "b", **SMALL, seed=3))
    c = _files(generate(tmp_path / "c", **SMALL, seed=4))
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".png") and "_mask" not in k)


def test_larger_set_extends_smaller(tmp_path: Path) -> None:
    small = _files(generate(tmp_path / "s", n_train=2, n_test_good=1, n_test_defect=1, size=64))
    big = _files(generate(tmp_path / "b", n_train=4, n_test_good=2, n_test_defect=2, size=64))
    assert all(big[k] == v for k, v in small.items() if k.endswith(".png"))


def test_good_images_vary() -> None:
    a, _ = make_image((0, 0, 0, 1), 128)
    b, _ = make_image((0, 0, 0, 2), 128)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.mean() > 5  # texture, lighting, jitter: not one template plus noise


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_mask_marks_the_change(defect: str) -> None:
    """Same seed with and without the defect: the image changes inside the mask, not elsewhere."""
    size = 128
    for seed in range(6):
        clean, no_mask = make_image((9, seed), size, None, camera_noise=False)
        broken, mask = make_image((9, seed), size, defect, camera_noise=False)
        assert not no_mask.any()
        assert 3 <= mask.sum() < 0.2 * size * size
        diff = np.abs(clean.astype(int) - broken.astype(int)).max(axis=2)
        assert (diff[mask] >= 8).mean() > 0.8  # the defect is visible where marked
        # outside the mask only soft edges / the part's shadow may change (few px away)
        near = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=4 if defect in LOGICAL or defect == "hole" else 1) > 0
        assert diff[~near].max() <= 12
        if defect in ("scratch", "spot", "crack"):  # surface defects are deliberately subtle
            assert diff[mask].mean() < 80


def test_structural_defects_are_small_and_logical_cover_parts() -> None:
    area = {d: np.mean([make_image((2, s), 128, d)[1].sum() for s in range(4)]) for d in DEFECT_TYPES}
    assert max(area[d] for d in STRUCTURAL) < min(area[d] for d in LOGICAL)


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="not empty"):
        generate(out, **SMALL)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    generate(tmp_path / "gen", **SMALL)  # a generated set: its marker makes --overwrite legal there
    out = tmp_path / "gen"
    (out / "keep.txt").write_text("user data")
    stale = out / "test" / "scratch" / "999.png"
    stale.write_bytes(b"old")
    generate(out, **SMALL, overwrite=True)
    assert (out / "keep.txt").read_text() == "user data"  # only the generated folders are replaced
    assert not stale.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        generate(tmp_path / "file", **SMALL)


@pytest.mark.parametrize("marker", [None, '{"generator": "someone else"}', "not json"])
def test_overwrite_never_deletes_a_real_dataset(tmp_path: Path, marker: str | None) -> None:
    """--overwrite on a folder datagen did not write (no marker, or a marker it did not write) deletes nothing."""
    real = tmp_path / "line3"
    (real / "train" / "good").mkdir(parents=True)
    (real / "train" / "good" / "part_0001.png").write_bytes(b"precious")
    if marker is not None:
        (real / "edgead_synthetic.json").write_text(marker)
    before = sorted(p.relative_to(real) for p in real.rglob("*"))
    with pytest.raises(DataError, match="not a generated set"):
        generate(real, **SMALL, overwrite=True)
    assert sorted(p.relative_to(real) for p in real.rglob("*")) == before
    assert (real / "train" / "good" / "part_0001.png").read_bytes() == b"precious"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_train": 0}, "n_train"),
        ({"n_test_good": -1}, "n_test_good"),
        ({"n_test_defect": 1.5}, "n_test_defect"),
        ({"size": 32}, "size"),
        ({"size": 10000}, "size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_argument_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        generate(tmp_path / "x", **{**SMALL, **kwargs})
    assert not (tmp_path / "x").exists()


def test_unknown_defect() -> None:
    with pytest.raises(ConfigError, match="defect"):
        make_image(0, 64, "dent")


def test_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--train", "2", "--test-good", "1", "--test-defect", "1", "--size", "64", "--seed", "5"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert len(open_dataset(out).train_good) == 2
    with pytest.raises(DataError):
        main(["--out", str(out), "--train", "1", "--size", "64"])
    assert main(["--out", str(out), "--train", "1", "--test-good", "0", "--test-defect", "0", "--size", "64", "--overwrite"]) == 0
    ds = open_dataset(out)
    assert len(ds.train_good) == 1 and ds.test == []
