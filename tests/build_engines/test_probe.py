"""Feature probe: coreset and nearest-neighbour against brute force, a separable set reaches ~1.0, a label-free control ~0.5."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from build_engines.backbones import StageGrid, load_backbone
from build_engines.probe import greedy_coreset, main, nearest_distance, parse_extractor, probe_dataset, run_probe
from edgead.datasets import image_color, open_dataset
from edgead.errors import ConfigError
from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare
from edgead.tiling import Tiling

torch.set_num_threads(1)


def _texture(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    base = cv2.GaussianBlur(rng.normal(128, 40, (size, size)).astype(np.float32), (0, 0), 2.0)
    return np.clip(base, 0, 255).astype(np.uint8)


def _write_set(root: Path, *, n_train: int, n_good: int, n_bad: int, defect: bool, seed: int = 0) -> Path:
    """MVTec layout; 'bad' images carry a dark 24x24 square (or nothing at all when ``defect`` is False)."""
    rng = np.random.default_rng(seed)
    for folder, count, bad in (("train/good", n_train, False), ("test/good", n_good, False), ("test/square", n_bad, True)):
        (root / folder).mkdir(parents=True)
        if bad:
            (root / "ground_truth/square").mkdir(parents=True)
        for i in range(count):
            img = _texture(rng)
            mask = np.zeros_like(img)
            if bad and defect:
                y, x = rng.integers(20, 84, 2)
                img[y : y + 24, x : x + 24] = 10
                mask[y : y + 24, x : x + 24] = 255
            cv2.imwrite(str(root / folder / f"{i:03d}.png"), img)
            if bad:
                cv2.imwrite(str(root / "ground_truth/square" / f"{i:03d}_mask.png"), mask)
    return root


def _brute_force_greedy(x: np.ndarray, n: int, first: int) -> list[int]:
    chosen = [first]
    while len(chosen) < n:
        d = np.min([[np.sum((a - x[c]) ** 2) for c in chosen] for a in x], axis=1)
        chosen.append(int(np.argmax(d)))
    return chosen


def test_greedy_coreset_matches_brute_force_k_center() -> None:
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(3))
    got = greedy_coreset(x, 12, seed=1, projection_dim=5)  # no projection: exact distances
    assert got.tolist() == _brute_force_greedy(x.numpy().astype(np.float64), 12, int(got[0]))


def test_greedy_coreset_keeps_the_rare_points_a_random_subsample_loses() -> None:
    g = torch.Generator().manual_seed(0)
    common = torch.randn(5000, 16, generator=g) * 0.1
    rare = torch.randn(5, 16, generator=g) * 0.1 + 10.0 * torch.eye(16)[:5]
    x = torch.cat([common, rare])
    kept = set(greedy_coreset(x, 50, seed=0).tolist())
    assert set(range(5000, 5005)) <= kept


def test_greedy_coreset_groups_cover_every_group_with_the_requested_size() -> None:
    x = torch.randn(10_000, 8, generator=torch.Generator().manual_seed(0))
    idx = greedy_coreset(x, 1000, group=3000)
    assert len(idx) == 1000 and len(set(idx.tolist())) == 1000
    counts = np.histogram(idx.numpy(), bins=[0, 2500, 5000, 7500, 10_000])[0]
    assert counts.min() >= 240  # 4 groups of 2500 rows, 250 each


def test_nearest_distance_matches_cdist() -> None:
    g = torch.Generator().manual_seed(1)
    q, b = torch.randn(300, 7, generator=g), torch.randn(200, 7, generator=g)
    torch.testing.assert_close(nearest_distance(q, b, chunk=64), torch.cdist(q.double(), b.double()).min(1).values.float(), rtol=1e-4, atol=1e-4)


def test_probe_finds_an_obvious_defect(tmp_path: Path) -> None:
    ds = open_dataset(_write_set(tmp_path / "sq", n_train=12, n_good=10, n_bad=10, defect=True))
    result = probe_dataset(parse_extractor("random", 128, seed=0), ds, coreset=0.25, pixel=True)
    assert result["image_auroc"] >= 0.98
    assert result["pixel_auroc"] >= 0.9
    assert result["train_patches"] == 11 * 24 * 24  # 12 train/good, 1 held out like `edgead train`
    assert result["bank_vectors"] == round(0.25 * result["train_patches"])


def test_probe_without_defects_is_at_chance(tmp_path: Path) -> None:
    """Label-free control: 'defective' test images drawn like the good ones must score like them."""
    ds = open_dataset(_write_set(tmp_path / "none", n_train=12, n_good=30, n_bad=30, defect=False, seed=5))
    aurocs = [probe_dataset(parse_extractor("random", 128, seed=s), ds, coreset=0.25, seed=s)["image_auroc"] for s in range(2)]
    assert 0.3 <= float(np.mean(aurocs)) <= 0.7


def test_run_probe_reports_spread_and_cli_writes_json(tmp_path: Path) -> None:
    root = _write_set(tmp_path / "sq", n_train=6, n_good=4, n_bad=4, defect=True)
    report = run_probe([root], ["random"], seeds=2, coreset=0.5)
    entry = report["summary"]["random"]["sq"]["image_auroc"]
    assert entry["min"] <= entry["mean"] <= entry["max"]
    assert len(report["rows"]) == 2 and {r["seed"] for r in report["rows"]} == {0, 1}
    out = tmp_path / "probe.json"
    assert main(["--data", str(root), "--extractor", "random", "--seeds", "1", "--coreset", "1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["summary"]["random"]["sq"]["image_auroc"]["mean"] >= 0.9


def test_target_extractor_grid_matches_the_pdn_grid() -> None:
    frames = [np.zeros((100, 140, 3), np.uint8)]
    target = parse_extractor("target:efficientnet-lite0:3,4,5", 128)
    teacher = parse_extractor("random", 128)
    assert target.forward(frames).shape[-1] == 128 // 4
    assert teacher.forward(frames).shape[-1] + 2 * teacher.pad == 128 // 4
    assert parse_extractor("target:efficientnet-lite1:2,3", 128).forward(frames).shape == (1, 384, 32, 32)


def test_grid_extractor_is_uniads_input_grid() -> None:
    """``grid`` probes exactly what UniAD reconstructs: ``StageGrid`` at stride 16, covering the whole image."""
    frames = [np.full((90, 120, 3), 128, np.uint8)]
    grid = parse_extractor("grid:efficientnet-lite0:2,3,4,5", 224)
    out = grid.forward(frames)
    assert out.shape == (1, 256, 14, 14) and grid.pad == 0  # 24 + 40 + 112 + 80 channels, 224 / 16
    reference = StageGrid(load_backbone("efficientnet-lite0"), (2, 3, 4, 5)).eval()
    x = torch.from_numpy(prepare(frames[0], 224, IMAGENET_MEAN, IMAGENET_STD, image_color(frames[0])))[None]
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x))
    assert parse_extractor("grid:efficientnet-lite1:3,4", 224).forward(frames).shape == (1, 40 + 80, 14, 14)


def test_an_unknown_extractor_is_named_before_the_image_size_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"extractor \| got 'gird'"):
        parse_extractor("gird", 224)
    with pytest.raises(ConfigError, match="grid:efficientnet-lite0"):  # the hint names the kind asked for
        parse_extractor("grid:resnet50", 224)


def test_grid_probe_finds_an_obvious_defect(tmp_path: Path) -> None:
    ds = open_dataset(_write_set(tmp_path / "sq", n_train=12, n_good=8, n_bad=8, defect=True))
    assert probe_dataset(parse_extractor("grid", 224), ds, coreset=1.0)["image_auroc"] >= 0.95


@pytest.mark.parametrize(("spec", "size"), [("resnet", 128), ("target:wide_resnet101_2", 128), ("target:efficientnet-lite0:5,3", 128),
                                            ("grid:wide_resnet101_2", 224), ("grid:efficientnet-lite0:9", 224), ("grid", 200), ("grid", 48), ("random", 224), ("gird", 224)])
def test_bad_extractor_specs_are_refused(spec: str, size: int) -> None:
    with pytest.raises(ConfigError):
        parse_extractor(spec, size)


def test_bad_coreset_is_refused(tmp_path: Path) -> None:
    ds = open_dataset(_write_set(tmp_path / "sq", n_train=3, n_good=1, n_bad=1, defect=True))
    with pytest.raises(ConfigError, match="coreset"):
        probe_dataset(parse_extractor("random", 128), ds, coreset=0.0)


def test_tiled_probe_finds_a_small_defect_the_squeezed_image_loses(tmp_path: Path) -> None:
    """A 2x2-pixel defect in a 256 px image: squeezed to 128 px it is half a pixel of texture; on 128 px tiles
    at full resolution it stays 2x2 pixels."""
    rng = np.random.default_rng(0)
    root = tmp_path / "big"
    for folder, count, bad in (("train/good", 6, False), ("test/good", 5, False), ("test/dot", 5, True)):
        (root / folder).mkdir(parents=True)
        if bad:
            (root / "ground_truth/dot").mkdir(parents=True)
        for i in range(count):
            img = np.clip(cv2.GaussianBlur(rng.normal(128, 30, (256, 256)).astype(np.float32), (0, 0), 3.0), 0, 255).astype(np.uint8)
            mask = np.zeros_like(img)
            if bad:
                y, x = rng.integers(20, 236, 2)
                img[y : y + 2, x : x + 2] = 0
                mask[y : y + 2, x : x + 2] = 255
                cv2.imwrite(str(root / "ground_truth/dot" / f"{i:03d}_mask.png"), mask)
            cv2.imwrite(str(root / folder / f"{i:03d}.png"), img)
    ds = open_dataset(root)
    squeezed = probe_dataset(parse_extractor("random", 128), ds, coreset=0.25)
    tiled = probe_dataset(parse_extractor("random", 128), ds, coreset=0.25, tiling=Tiling(128, 0), pixel=True)
    assert tiled["image_auroc"] >= 0.95 and tiled["image_auroc"] > squeezed["image_auroc"] + 0.1
    assert tiled["tiling"] == {"tile": 128, "overlap": 0} and tiled["pixel_auroc"] > 0.9


def test_scoring_many_maps_in_pieces_gives_the_brute_force_image_scores() -> None:
    """score() runs the nearest-neighbour search a few maps at a time (memory); with more maps than one piece
    holds, the image scores (max over each image's maps) must still be those of the whole tensor at once."""
    from build_engines.probe import Extractor, ProbeFeatures, score
    from edgead.metrics import image_auroc

    g = torch.Generator().manual_seed(0)
    t, c, h, w = 12, 8, 100, 100  # 65536 // (h * w) = 6 maps per piece: two pieces
    test = torch.randn(t, c, h, w, generator=g)
    test[7] += 0.5  # one image's maps further from the bank
    bank = torch.randn(500, c, generator=g)
    owner = np.repeat(np.arange(6), 2)  # two maps (tiles) per image
    labels = np.array([0, 0, 1, 0, 1, 1])
    features = ProbeFeatures(Extractor("synthetic", 64, lambda frames: test, pad=0), bank, test, owner, labels, None, 0.0)
    full = torch.cdist(test.permute(0, 2, 3, 1).reshape(-1, c), bank).min(1).values.reshape(t, -1).max(1).values.numpy()
    expected = np.full(6, -np.inf)
    np.maximum.at(expected, owner, full.astype(np.float64))
    result = score(features, coreset=1.0)
    assert result["image_scores"] == pytest.approx(expected, abs=1e-5)
    assert result["image_auroc"] == pytest.approx(image_auroc(labels, expected))
