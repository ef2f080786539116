"""PatchCore: the graph's distance against a brute-force nearest neighbour, a training image's own features at
distance 0, the bank size rules, the option errors, and the whole CLI path (train -> eval -> export -> Detector) on
tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from build_engines.backbones import StageGrid, load_backbone
from build_engines.onnx_ops import unsupported_ops
from build_engines.patchcore.model import PatchCoreGraph
from build_engines.patchcore.train import PatchCoreConfig, load_patchcore_run
from build_engines.probe import prepared_batch
from build_engines.synthetic import generate
from edgead import Detector
from edgead.datasets import image_color, open_dataset, read_image, split_train_val
from edgead.errors import ConfigError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def grid() -> StageGrid:
    return StageGrid(load_backbone("efficientnet-lite0"), (2, 3, 4, 5), 16).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("pc") / "screws", n_train=12, n_test_good=4, n_test_defect=2, size=128, seed=3)


@pytest.fixture(scope="module")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgead.cli import main as cli

    out = tmp_path_factory.mktemp("runs") / "pc"
    assert cli(["train", "--family", "patchcore", "--data", str(data), "--out", str(out), "--image-size", "128", "--coreset", "0.5"]) == 0
    return out


def test_the_map_is_the_distance_to_the_nearest_bank_feature(grid: StageGrid) -> None:
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(256, generator=g), torch.rand(256, generator=g) + 0.5
    bank = torch.randn(50, 256, generator=g)
    graph = PatchCoreGraph(grid, mean, std, bank).eval()
    raw = torch.randn(2, 256, 3, 5, generator=g) * 2
    amap = graph.distance_map(graph.standardise(raw))
    q = ((raw - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).permute(0, 2, 3, 1).reshape(-1, 256).double()
    ref = torch.cdist(q, bank.double()).min(1).values.reshape(2, 1, 3, 5)  # independent: brute force, float64
    torch.testing.assert_close(amap.double(), ref, rtol=1e-4, atol=1e-4)
    x = torch.randn(2, 3, 64, 96, generator=g)
    m, s = graph(x)
    assert m.shape == (2, 1, 4, 6) and torch.equal(s, m.amax(dim=(1, 2, 3)))


def test_aggregation_is_the_local_mean_of_the_cells_inside_the_grid(grid: StageGrid) -> None:
    from build_engines.patchcore.model import LocalGrid

    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f, g = grid(x)[0], LocalGrid(grid, 3)(x)[0]
    h, w = f.shape[1:]
    for y, xx in ((0, 0), (1, 2), (h - 1, w - 1)):
        ref = f[:, max(0, y - 1) : y + 2, max(0, xx - 1) : xx + 2].mean(dim=(1, 2))
        torch.testing.assert_close(g[:, y, xx], ref, rtol=1e-5, atol=1e-6)


def test_a_bank_checks_its_shapes(grid: StageGrid) -> None:
    with pytest.raises(ConfigError, match="bank"):
        PatchCoreGraph(grid, torch.zeros(256), torch.ones(256), torch.zeros(4, 255))
    with pytest.raises(ConfigError, match="std"):
        PatchCoreGraph(grid, torch.zeros(256), torch.zeros(256), torch.zeros(4, 256))


def test_a_training_image_lies_in_a_full_bank(data: Path, tmp_path: Path) -> None:
    from build_engines.patchcore.train import train

    cfg = PatchCoreConfig(data=str(data), out=str(tmp_path / "full"), image_size=128, coreset=1.0)
    run = load_patchcore_run(train(cfg))
    assert run.graph.bank_size == 11 * 8 * 8  # 12 train/good, 1 held out; an 8 x 8 grid each
    tr, _ = split_train_val(open_dataset(data).train_good, cfg.val_fraction, cfg.seed)
    from build_engines.patchcore.evaluate import patchcore_predictor

    _, predict, *_ = patchcore_predictor(run.run_dir, "screws")
    with torch.no_grad():
        raw_map, _ = run.graph(prepared_batch([read_image(tr[0])], 128))
        other, _ = run.graph(prepared_batch([read_image(open_dataset(data).test[0].path)], 128))
    # its own features are in the bank: 0 up to the rounding of |f|^2 - 2 f.b + |b|^2 in fp32 (~256 per term), far
    # below the distances of an image the bank has not seen
    assert float(raw_map.max()) < 0.05 < 20 * 0.05 < float(other.mean())
    maps, scores = predict([read_image(tr[0])])
    assert maps[0].shape == (8, 8) and np.isfinite(scores).all()


def test_the_bank_keeps_the_coreset_fraction_up_to_max_bank(data: Path, tmp_path: Path) -> None:
    from build_engines.patchcore.train import train

    a = load_patchcore_run(train(PatchCoreConfig(data=str(data), out=str(tmp_path / "a"), image_size=128, coreset=0.25)))
    b = load_patchcore_run(train(PatchCoreConfig(data=str(data), out=str(tmp_path / "b"), image_size=128, coreset=0.25, max_bank=40)))
    assert a.graph.bank_size == round(0.25 * 11 * 64) and b.graph.bank_size == 40
    log = json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-1])
    assert log["bank"] == 40 and log["train_features"] == 11 * 64


def test_cli_path_train_eval_export_detector(run: Path, data: Path, tmp_path: Path) -> None:
    from build_engines.evaluate import evaluate_run
    from build_engines.export import export_bundle
    from build_engines.patchcore.evaluate import patchcore_predictor

    cal = json.loads((run / "calibration.json").read_text())
    assert list(cal) == ["screws"] and cal["screws"]["qb"] > cal["screws"]["qa"]
    copy = tmp_path / "line7"
    copy.symlink_to(data, target_is_directory=True)  # another folder name: the run's one product is implied
    result = evaluate_run(run, copy, device="cpu", pixel_metrics=True)
    assert result["family"] == "patchcore" and result["product"] == "screws"
    # the large defects are found in every image, and the map covers the defects (measured: pixel AUROC 0.96; the
    # few-pixel cracks and spots are below the stride-16 grid at 128 px)
    assert all(result["per_defect"][d]["image_auroc"] == 1.0 for d in ("extra_part", "misplaced_part", "swapped_part"))
    assert result["pixel_auroc"] >= 0.9
    assert "false_reject_rate" in json.dumps(result["operating_point"])
    bundle = export_bundle(run, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["family"] == "patchcore" and list(manifest["classes"]) == ["screws"]
    model = onnx.load(str(bundle / "model_merged.onnx"))
    assert unsupported_ops(model) == []  # TensorRT 10 parses every node
    banks = [i for i in model.graph.initializer if 256 in i.dims and len(i.dims) == 2]
    assert banks and max(int(np.prod(i.dims)) for i in banks) == 256 * load_patchcore_run(run).graph.bank_size  # the bank is a constant
    frame = read_image(open_dataset(data).test[-1].path)
    _, predict, *_ = patchcore_predictor(run, "screws")
    with Detector(bundle, backend="onnxruntime", threads=1) as det:
        assert det.products == ("screws",)
        got = det.infer(frame, color=image_color(frame))  # one product: implied
        assert got.anomaly_map.shape == frame.shape[:2] and got.threshold == pytest.approx(cal["screws"]["threshold"])
    np.testing.assert_allclose(got.score, predict([frame])[1][0], rtol=1e-4, atol=1e-5)  # the bundle scores as the run


def test_a_tiled_bank_scores_frames_as_the_tiled_detector(data: Path, tmp_path: Path) -> None:
    """Tiles of 64 px overlapping by 16 on the 128 px images: 3 x 3 tiles per image, each at the model's 64 px; with
    the 3 x 3 aggregation, so that its pooling goes through the export's parity check and the Detector too."""
    from build_engines.export import export_bundle
    from build_engines.patchcore.evaluate import patchcore_predictor
    from build_engines.patchcore.train import train

    cfg = PatchCoreConfig(data=str(data), out=str(tmp_path / "tiled"), image_size=64, coreset=1.0, tile=64, tile_overlap=16, aggregate=3)
    run = train(cfg)
    log = json.loads((run / "log.jsonl").read_text())
    assert log["train_tiles"] == 11 * 9 and log["bank"] == 11 * 9 * 4 * 4  # every tile's 4 x 4 grid, full bank
    cal = json.loads((run / "calibration.json").read_text())["screws"]
    assert cal["validation_images"] == 1  # one score per held-out image (the max over its 9 tiles), not per tile
    bundle = export_bundle(run, tmp_path / "bundle")
    assert json.loads((bundle / "manifest.json").read_text())["input"]["tiling"] == {"tile": 64, "overlap": 16}
    frames = [read_image(s.path) for s in open_dataset(data).test[:3]]
    _, predict, *_ = patchcore_predictor(run, "screws")
    maps, scores = predict(frames)
    with Detector(bundle, backend="onnxruntime", threads=1) as det:
        got = det.infer_batch(frames, color=image_color(frames[0]))
    for m, sc, r, f in zip(maps, scores, got, frames, strict=True):
        assert m.shape == r.anomaly_map.shape == f.shape[:2]  # stitched at frame resolution
        np.testing.assert_allclose(r.score, sc, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r.anomaly_map, m, rtol=1e-3, atol=1e-4)
    with pytest.raises(ConfigError, match="tile-overlap"):
        PatchCoreConfig(data=str(data), out=str(tmp_path / "x"), tile_overlap=8).validate()


def test_patchcore_option_errors(data: Path, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from build_engines.export import export_bundle
    from edgead.cli import main as cli

    for data_args in (["--data", str(data), str(data)], ["--data", str(data), "--data", str(data)]):
        assert cli(["train", "--family", "patchcore", *data_args, "--out", str(tmp_path / "x")]) == 2
        assert "one data set" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="coreset"):
        PatchCoreConfig(data=str(data), out=str(tmp_path / "x"), coreset=0.0).validate()
    with pytest.raises(ConfigError, match="image-size"):
        PatchCoreConfig(data=str(data), out=str(tmp_path / "x"), image_size=200).validate()
    with pytest.raises(ConfigError, match="max-bank"):
        from build_engines.patchcore.train import train

        train(PatchCoreConfig(data=str(data), out=str(tmp_path / "huge"), image_size=128, max_bank=2_000_000))
    with pytest.raises(ConfigError, match="aggregate"):
        PatchCoreConfig(data=str(data), out=str(tmp_path / "x"), aggregate=2).validate()
    before = (run / "model.pt").read_bytes()
    assert cli(["train", "--family", "patchcore", "--data", str(data), "--out", str(run), "--image-size", "128"]) == 2
    assert "not an empty folder" in capsys.readouterr().err and (run / "model.pt").read_bytes() == before  # the user's run is kept
    (tmp_path / "notes.txt").write_text("mine")
    assert cli(["train", "--family", "patchcore", "--data", str(data), "--out", str(tmp_path / "notes.txt")]) == 2
    assert "not an empty folder" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="one graph"):
        export_bundle(run, tmp_path / "raw", variants=("raw",))
    with pytest.raises(ConfigError, match="no INT8 variant"):
        export_bundle(run, tmp_path / "i8", int8_calibration="train")


def test_a_patchcore_bundle_builds_a_tensorrt_engine_with_the_distance_in_fp32(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the existing builder and the TensorRT backend, on the host-simulated device (tests/simdevice)."""
    import simdevice

    from build_engines.export import export_bundle
    from build_engines.trt_build import build_into_bundle

    bundle = export_bundle(run, tmp_path / "b")
    frames = [np.random.default_rng(i).integers(0, 256, (70 + 9 * i, 100, 3), dtype=np.uint8) for i in range(3)]
    with simdevice.installed(monkeypatch) as sim:
        build_into_bundle(bundle, variant="merged", precision="fp16", max_batch=4)
        model = onnx.load(str(bundle / "model_merged.onnx"))
        ops = {n.name: n.op_type for n in model.graph.node} | {i.name: "initializer" for i in model.graph.initializer}
        held = sim.trt.builds[-1]["fp32_layers"]
        tail = [ops[n] for n in held]
        # the GEMM against the bank and its min are held in FP32 (|f|^2 - 2 f.b + |b|^2 cancels); the backbone is free
        assert tail.count("MatMul") == 1 and {"ReduceMin", "Sqrt", "ReduceMax"} <= set(tail) and "Conv" not in tail
        assert sum(op == "Conv" for op in ops.values()) > 20  # ... and it has its convolutions
        bank = next(i.name for i in model.graph.initializer if list(i.dims) == [256, load_patchcore_run(run).graph.bank_size])
        assert bank in held  # the bank itself is a constant held in FP32, not rounded to FP16
        assert "Shape" not in tail and not [n for n in held if n.startswith("/grid/")]  # integer shape arithmetic stays INT
        with Detector(bundle, backend="tensorrt") as trt, Detector(bundle, backend="onnxruntime", threads=1) as ort:
            got = [r.score for r in trt.infer_batch(frames)]
            ref = [r.score for r in ort.infer_batch(frames)]
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-3)
