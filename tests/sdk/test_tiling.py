"""Tiling: layouts cover frames with the requested overlap, stitching is exact on constants, the Detector's tiled
results match a per-tile reference, and a defect on a tile border is seen by both tiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiny_bundle as tb

from edgead import Detector, load_bundle
from edgead.bundle import Manifest
from edgead.errors import BundleError, ConfigError
from edgead.postprocess import efficientad_postprocess
from edgead.tiling import MARGIN_WEIGHT, Tiling, axis_starts


@pytest.mark.parametrize("length", [1, 31, 32, 33, 56, 100, 640, 2448])
@pytest.mark.parametrize(("tile", "overlap"), [(32, 0), (32, 8), (256, 64), (256, 128)])
def test_axis_starts_cover_the_axis_with_the_overlap(length: int, tile: int, overlap: int) -> None:
    starts = axis_starts(length, tile, overlap)
    extent = min(tile, length)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + extent] = True
    assert covered.all() and starts[0] == 0 and starts[-1] + extent == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))  # overlap at least as asked
    if len(starts) > 1:  # and no more tiles than needed
        assert (len(starts) - 2) * (tile - overlap) + tile < length


@pytest.mark.parametrize(("tile", "overlap"), [(16, 0), (64, 40), (64, -1), (64.0, 8), (True, 0)])
def test_bad_tilings_are_refused(tile: object, overlap: object) -> None:
    with pytest.raises(ConfigError):
        Tiling(tile, overlap)  # type: ignore[arg-type]


@pytest.mark.parametrize(("h", "w"), [(640, 640), (261, 640), (100, 90), (2048, 2448)])
def test_stitching_is_exact_on_a_constant_map(h: int, w: int) -> None:
    t = Tiling(256, 64)
    n = len(t.layout(h, w))
    out = t.stitch(np.full((n, 64, 64), 0.37, np.float32), h, w, pad=4)
    assert out.shape == (h, w)
    np.testing.assert_allclose(out, 0.37, rtol=1e-6)


def test_stitching_takes_the_seen_cells_where_tiles_overlap() -> None:
    t = Tiling(32, 16)  # 48 px: tiles at 0 and 16
    maps = np.stack([np.full((8, 8), 1.0, np.float32), np.full((8, 8), 3.0, np.float32)])
    maps[0, :, 6:] = 100.0  # tile 0's padding band (pad 2 cells) holds junk
    out = t.stitch(maps, 32, 48, pad=2)
    # x in [24, 32): tile 0's junk band, tile 1's seen interior -> tile 1 decides (a plain mean would give 51.5)
    assert np.all(np.abs(out[10:22, 26:30] - 3.0) < 200 * MARGIN_WEIGHT)
    np.testing.assert_allclose(out[8:24, 2:14], 1.0, rtol=1e-6)  # only tile 0 there


@pytest.fixture(scope="module")
def tiled_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tb.make_bundle(tmp_path_factory.mktemp("t") / "bundle", tiling=Tiling(tb.IMAGE_SIZE, 8))


def _reference(tiling: Tiling, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for tile in tiling.cut(frame):
        t, s, a = tb.reference_outputs(tile)
        m, sc = efficientad_postprocess(t, s, a, tb.manifest().post)
        maps.append(m[0])
        scores.append(sc[0])
    return np.stack(maps), np.array(scores)


@pytest.mark.parametrize("variant", ["merged", "raw"])
def test_tiled_detector_matches_the_per_tile_reference(tiled_bundle: Path, variant: str) -> None:
    tiling = load_bundle(tiled_bundle).manifest.input.tiling
    assert tiling == Tiling(tb.IMAGE_SIZE, 8)
    frame = np.random.default_rng(0).integers(0, 256, (56, 80, 3), dtype=np.uint8)
    maps, scores = _reference(tiling, frame)
    assert len(scores) == 2 * 3
    with Detector(tiled_bundle, backend="onnxruntime", threads=1, variant=variant) as det:
        assert det.tiling == tiling
        r = det.infer(frame)
        small = det.infer(frame, map_size="model")
        batch = det.infer_batch([frame, frame[:40, :40].copy()])
    np.testing.assert_allclose(r.score, scores.max(), rtol=1e-5)
    np.testing.assert_allclose(r.anomaly_map, tiling.stitch(maps, 56, 80, tb.PAD), rtol=1e-4, atol=1e-5)
    assert small.anomaly_map.shape == (56, 80)  # tile == model size: model resolution is frame resolution
    np.testing.assert_allclose(batch[0].score, r.score, rtol=1e-6)
    np.testing.assert_allclose(batch[1].score, _reference(tiling, frame[:40, :40].copy())[1].max(), rtol=1e-5)


def test_a_defect_on_a_tile_border_is_found_by_both_tiles(tiled_bundle: Path) -> None:
    tiling = Tiling(tb.IMAGE_SIZE, 8)
    frame = np.full((32, 56, 3), 128, np.uint8)  # tiles at x = 0 and x = 24: overlap [24, 32)
    clean_maps, clean_scores = _reference(tiling, frame)
    frame[12:16, 24:32] = 255  # in both tiles: tile 0's cells 6-7, tile 1's cells 0-1
    maps, scores = _reference(tiling, frame)
    assert np.all(scores > clean_scores + 0.05)
    with Detector(tiled_bundle, backend="onnxruntime", threads=1) as det:
        r = det.infer(frame)
    assert r.score == pytest.approx(scores.max(), rel=1e-5)
    assert r.anomaly_map[12:16, 24:32].max() == pytest.approx(r.anomaly_map.max(), rel=1e-3)


def test_manifest_tiling_round_trips_and_is_validated() -> None:
    m = tb.manifest(tiling=Tiling(256, 64))
    d = m.to_dict()
    assert d["input"]["tiling"] == {"tile": 256, "overlap": 64}
    assert Manifest.from_dict(d).input.tiling == Tiling(256, 64)
    assert "tiling" not in tb.manifest().to_dict()["input"]
    for bad in ({"tile": 8, "overlap": 0}, {"tile": 256}, {"tile": 256, "overlap": 200}, [256, 64]):
        d["input"]["tiling"] = bad
        with pytest.raises(BundleError, match="tiling"):
            Manifest.from_dict(d)
