"""UniAD: the neighbour mask, jitter only in training, per-product calibration, export parity and the op check,
and the whole CLI path (train on two products -> eval -> export -> Detector with product=) on tiny synthetic data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from build_engines.onnx_ops import unsupported_ops
from build_engines.synthetic import generate
from build_engines.uniad.model import MASKED, UniAD, anomaly_map, feature_jitter, image_score, neighbour_mask
from edgead import Detector
from edgead.datasets import open_dataset
from edgead.errors import BundleError, ConfigError

torch.set_num_threads(1)


def test_a_token_never_attends_to_its_own_7x7_neighbourhood() -> None:
    h, w = 14, 14
    mask = neighbour_mask((h, w), 7)
    assert mask.shape == (h * w, h * w)
    for qy, qx in ((0, 0), (7, 7), (13, 5)):
        row = mask[qy * w + qx].reshape(h, w)
        for ky in range(h):
            for kx in range(w):
                blocked = abs(ky - qy) <= 3 and abs(kx - qx) <= 3
                assert (row[ky, kx] == MASKED) == blocked, (qy, qx, ky, kx)
    assert torch.equal(mask, mask.T)  # symmetric neighbourhoods
    with pytest.raises(ConfigError, match="odd"):
        neighbour_mask((4, 4), 4)


def test_masked_attention_ignores_the_neighbourhood() -> None:
    """Changing the keys and values inside a token's neighbourhood (itself included) leaves what it attends to
    unchanged: what the mask promises, checked on the module, not on the mask tensor."""
    m = UniAD(8, (6, 6), hidden=8, heads=2, layers=(1, 0), ffn=8, neighbourhood=3, jitter_prob=0.0).eval()
    attn = m.encoder[0].attn
    x = torch.randn(1, 36, 8)
    y = x.clone()
    y[0, [0, 1, 6, 7]] += 5.0  # the 3x3 neighbourhood of token (0, 0) inside the grid
    with torch.no_grad():
        a, b = attn(x, x, x, m.mask), attn(x, y, y, m.mask)  # same queries, other neighbour keys/values
    torch.testing.assert_close(a[0, 0], b[0, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0, 14], b[0, 14])  # a far token sees the change


def test_jitter_only_in_training_and_scaled_by_the_token_norm() -> None:
    m = UniAD(8, (4, 4), hidden=8, heads=2, layers=(1, 1), ffn=8, neighbourhood=3)
    x = torch.randn(2, 8, 4, 4)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x))  # eval: deterministic, no jitter, no dropout
    tokens = torch.ones(1, 5, 4) * 2.0  # norm 4, C 4: noise std = 20 * 4 / 4 = 20
    noisy = feature_jitter(tokens, 20.0, 1.0, torch.Generator().manual_seed(0))
    assert 10 < float((noisy - tokens).std()) < 30
    assert torch.equal(feature_jitter(tokens, 20.0, 0.0), tokens)


def test_map_and_score_follow_the_reference_protocol() -> None:
    f = torch.zeros(1, 3, 2, 2)
    r = f.clone()
    r[0, :, 1, 1] = 2.0  # distance sqrt(3 * 4)
    amap = anomaly_map(f, r)
    assert amap.shape == (1, 1, 2, 2) and float(amap[0, 0, 1, 1]) == pytest.approx(12**0.5)
    assert float(image_score(amap, 32, pool=1)) == pytest.approx(12**0.5)
    assert float(image_score(amap, 32, pool=16)) < 12**0.5  # the average pool smooths a single hot token


@pytest.fixture(scope="module")
def products(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("uni")
    return [generate(root / name, n_train=12, n_test_good=2, n_test_defect=1, size=128, seed=s) for name, s in (("screws", 1), ("tiles", 2))]


@pytest.fixture(scope="module")
def run(products: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgead.cli import main as cli

    out = tmp_path_factory.mktemp("runs") / "unified"
    argv = ["train", "--family", "uniad", "--data", *map(str, products), "--out", str(out), "--steps", "6", "--image-size", "128", "--hidden", "32", "--layers", "1"]
    assert cli(argv) == 0
    return out


def test_cli_path_train_eval_export_detector(run: Path, products: list[Path], tmp_path: Path) -> None:
    from build_engines.evaluate import evaluate_run
    from build_engines.export import export_bundle

    cal = json.loads((run / "calibration.json").read_text())
    assert sorted(cal) == ["screws", "tiles"] and all(c["qb"] > c["qa"] for c in cal.values())
    result = evaluate_run(run, products[0], device="cpu", pixel_metrics=True)
    assert result["family"] == "uniad" and result["product"] == "screws" and 0 <= result["image_auroc"] <= 1 and 0 <= result["pixel_auroc"] <= 1
    bundle = export_bundle(run, tmp_path / "bundle")
    model = onnx.load(str(bundle / "model_merged.onnx"))
    assert unsupported_ops(model) == []  # TensorRT 10 parses every node
    assert not {n.op_type for n in model.graph.node} & {"If", "Loop", "Scan", "NonZero"}  # no data-dependent control flow
    masks = [i for i in model.graph.initializer if list(i.dims) == [64, 64]]
    assert masks and np.any(onnx.numpy_helper.to_array(masks[0]) == MASKED)  # the mask is a constant of the graph
    frame = np.random.default_rng(0).integers(0, 256, (90, 110, 3), dtype=np.uint8)
    with Detector(bundle, backend="onnxruntime", threads=1) as det:
        assert det.products == ("screws", "tiles")
        with pytest.raises(ConfigError, match="several products"):
            det.infer(frame)
        with pytest.raises(ConfigError, match="product"):
            det.infer(frame, product="bolts")
        a, b = det.infer(frame, product="screws"), det.infer(frame, product="tiles")
        assert a.anomaly_map.shape == (90, 110) and a.threshold == pytest.approx(cal["screws"]["threshold"]) and b.threshold == pytest.approx(cal["tiles"]["threshold"])
    # the bundle and the torch evaluation agree on a product's scores
    from build_engines.uniad.evaluate import uniad_predictor

    _, predict, *_ = uniad_predictor(run, "tiles")
    np.testing.assert_allclose(b.score, predict([frame])[1][0], rtol=1e-4, atol=1e-5)


def test_uniad_int8_quantises_the_transformer_calibrated_on_every_product(run: Path, products: list[Path], tmp_path: Path) -> None:
    from build_engines.export import export_bundle
    from build_engines.fidelity import main as fidelity

    with pytest.raises(ConfigError, match="int8-max-images"):  # fewer images than products: one product would go uncalibrated
        export_bundle(run, tmp_path / "b1", int8_calibration="train", int8_images=1)
    bundle = export_bundle(run, tmp_path / "b8", int8_calibration="train", int8_images=4)
    m = json.loads((bundle / "manifest.json").read_text())
    assert set(m["variants"]) == {"merged", "merged_int8"}
    model = onnx.load(str(bundle / "model_merged_int8.onnx"))
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    quantised = {n.op_type for n in model.graph.node if n.input and n.input[0] in dq_outputs}
    assert {"Gemm", "MatMul"} <= quantised and "Conv" not in quantised  # the transformer; the backbone stays FP32
    frame = np.random.default_rng(3).integers(0, 256, (90, 110, 3), dtype=np.uint8)
    with Detector(bundle, backend="onnxruntime", precision="int8", threads=1) as i8, Detector(bundle, backend="onnxruntime", threads=1) as f32:
        assert i8.variant == "merged_int8"
        got, ref = i8.infer(frame, product="tiles"), f32.infer(frame, product="tiles")
        assert np.isfinite(got.score) and got.score != ref.score and abs(got.score - ref.score) <= 0.25 * abs(ref.score) + 0.05
    # edgead fidelity scores a multi-product bundle with the product named by the data set's folder
    out = tmp_path / "fidelity.json"
    assert fidelity([str(bundle), str(products[1]), "--candidate", "onnxruntime/int8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    row = report["candidates"]["onnxruntime/int8"]
    assert report["product"] == "tiles" and report["n"] == len(open_dataset(products[1]).test)
    assert row["nonfinite_scores"] == 0 and row["score_rank_correlation"] > 0.5  # a tiny, barely trained model: scores still follow FP32
    with pytest.raises(ConfigError, match="--product NAME"):
        fidelity([str(bundle), str(products[1]), "--candidate", "onnxruntime/int8", "--product", "bolts"])
    renamed = tmp_path / "line7"
    renamed.symlink_to(products[1], target_is_directory=True)  # a folder name that is no product: named by --product
    with pytest.raises(ConfigError, match="folder name"):
        fidelity([str(bundle), str(renamed), "--candidate", "onnxruntime/int8"])
    assert fidelity([str(bundle), str(renamed), "--candidate", "onnxruntime/int8", "--product", "tiles", "--max-images", "2"]) == 0


def test_a_lower_cpu_precision_is_allowed_for_a_multi_product_bundle_only_once_every_product_passed(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from build_engines.export import export_bundle
    from edgead.bundle import allow_precision, load_bundle

    bundle = export_bundle(run, tmp_path / "b8", int8_calibration="train", int8_images=2)
    evidence = {"score_rank_correlation": 0.9999, "delta_points": 0.01}
    for bad in (None, "bolts"):
        with pytest.raises(ConfigError, match="per product"):
            allow_precision(bundle, "int8", evidence, product=bad)
    allow_precision(bundle, "int8", evidence, product="screws")
    assert load_bundle(bundle).manifest.auto_cpu_precisions == ()  # faithful on screws says nothing of tiles
    with Detector(bundle, threads=1) as det:
        assert det.precision == "fp32"
    allow_precision(bundle, "int8", {**evidence, "dataset": "tiles"}, product="tiles")
    assert load_bundle(bundle).manifest.auto_cpu_precisions == ("int8",)
    with caplog.at_level(logging.INFO, logger="edgead.detector"), Detector(bundle, threads=1) as det:
        assert det.precision == "int8"
    assert "allowed by the bundle (screws: score_rank_correlation 0.9999" in caplog.records[-1].getMessage()


def test_a_uniad_bundle_needs_its_product_calibration(run: Path, tmp_path: Path) -> None:
    from build_engines.export import export_bundle

    bundle = export_bundle(run, tmp_path / "b")
    m = json.loads((bundle / "manifest.json").read_text())
    del m["classes"]
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="classes"):
        Detector(bundle)


def test_uniad_option_errors(products: list[Path], tmp_path: Path) -> None:
    from build_engines.uniad.train import UniADConfig

    with pytest.raises(ConfigError, match="distinct names"):
        UniADConfig(data=[str(products[0]), str(products[0])], out=str(tmp_path / "r")).validate()
    with pytest.raises(ConfigError, match="image-size"):
        UniADConfig(data=[str(products[0])], out=str(tmp_path / "r"), image_size=100).validate()
    with pytest.raises(ConfigError, match="UniAD input"):
        UniAD(8, (4, 4), hidden=8, heads=2, layers=(1, 1), ffn=8, neighbourhood=3)(torch.zeros(1, 8, 5, 5))


def test_a_uniad_bundle_builds_a_tensorrt_engine_and_runs_on_it(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the existing builder and the TensorRT backend, on the host-simulated device (tests/simdevice)."""
    import simdevice

    from build_engines.export import export_bundle
    from build_engines.trt_build import build_into_bundle

    bundle = export_bundle(run, tmp_path / "b", int8_calibration="train", int8_images=2, int8_target="tensorrt")
    frames = [np.random.default_rng(i).integers(0, 256, (70 + 9 * i, 100, 3), dtype=np.uint8) for i in range(3)]
    network_ops = {"Conv", "Gemm", "MatMul", "Softmax", "LayerNormalization", "QuantizeLinear", "DequantizeLinear"}
    with simdevice.installed(monkeypatch) as sim:
        build_into_bundle(bundle, variant="merged_int8", precision="int8", max_batch=4)
        ops = {n.name: n.op_type for n in onnx.load(str(bundle / "model_merged_int8.onnx")).graph.node}
        tail = {ops[n] for n in sim.trt.builds[-1]["fp32_layers"]}
        assert {"Sqrt", "ReduceMax"} <= tail and not tail & network_ops  # never a Q/DQ layer or a transformer product
        build_into_bundle(bundle, variant="merged", precision="fp16", max_batch=4)
        ops = {n.name: n.op_type for n in onnx.load(str(bundle / "model_merged.onnx")).graph.node}
        tail = {ops[n] for n in sim.trt.builds[-1]["fp32_layers"]}
        # the distance and pooling tail is FP32; the backbone and the transformer (onnxsim's fused, unscoped Gemms
        # included) are free to run in FP16
        assert {"Sub", "Sqrt", "ReduceMax"} <= tail and not tail & network_ops
        with Detector(bundle, backend="tensorrt") as trt, Detector(bundle, backend="onnxruntime", threads=1) as ort:
            for product in ("screws", "tiles"):
                got = [r.score for r in trt.infer_batch(frames, product=product)]
                ref = [r.score for r in ort.infer_batch(frames, product=product)]
                np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-3)  # an FP16 body, as on a GPU


def test_a_time_budget_ends_a_session_and_resume_continues_with_a_new_budget(products: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget stops training (with the lr drop in its last 20 %); --resume keeps the run's options but takes the
    new session's budget, and continues from the checkpoint's step."""
    import json

    from build_engines.uniad import train as ut

    lrs: list[float] = []
    real_step = torch.optim.AdamW.step

    def spy(self: torch.optim.AdamW, *a: object, **k: object) -> object:
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    clock = iter(range(10**6))  # one 'second' per reading of the clock: the budget ends after a few steps
    monkeypatch.setattr(ut.time, "perf_counter", lambda: float(next(clock)))
    cfg = ut.UniADConfig(data=[str(products[0])], out=str(tmp_path / "r"), steps=10**6, image_size=128, hidden=16, heads=2,
                         encoder_layers=1, decoder_layers=1, ffn=16, time_budget_s=20)
    out = ut.train(cfg)
    first = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["steps"]
    assert 0 < first < 20 and lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-5)
    lrs.clear()
    again = ut.train(ut.UniADConfig(data=[], out=str(out), time_budget_s=40), resume=True)
    second = json.loads((again / "log.jsonl").read_text().splitlines()[-1])["steps"]
    assert len(lrs) == second - first and json.loads((out / "config.json").read_text())["hidden"] == 16
    assert second - first > 1.5 * first  # the new session's 40 s budget, not the saved 20 s
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1e-5)
