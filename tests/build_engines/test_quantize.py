"""INT8 (QDQ) quantisation: graph form (TensorRT-valid), closeness to FP32, bundle entry, errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort  # pinned dev dependency: a missing one fails (no importorskip)
import pytest
import torch

from build_engines.bench import count_flops
from build_engines.efficientad.models import EfficientAD, conv_flops
from build_engines.export import export_bundle
from build_engines.onnx_ops import unsupported_ops
from build_engines.quantize import calibration_images, float_convs, quantize_merged
from build_engines.synthetic import make_image
from edgead.errors import ConfigError, DataError
from edgead.preprocess import prepare_batch

SIZE = 128


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, make_run: Callable[..., Path]) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("q")
    good = root / "good"
    good.mkdir()
    for i in range(8):
        cv2.imwrite(str(good / f"{i:03d}.png"), make_image(i, SIZE)[0])
    torch.manual_seed(0)
    model = EfficientAD("s", SIZE).eval()
    x = torch.from_numpy(prepare_batch([make_image(i, SIZE)[0] for i in range(4)], SIZE))
    with torch.no_grad():  # teacher statistics as training would set them
        t = model.teacher(x)
        model.teacher_mean.copy_(t.mean(dim=(0, 2, 3), keepdim=True))
        model.teacher_std.copy_(t.std(dim=(0, 2, 3), keepdim=True))
    run = make_run(root / "run", SIZE, model=model, quantiles=(0.5, 2.0, 0.3, 1.5), data=str(root / "nowhere"))
    bundle = export_bundle(run, root / "bundle", variants=("merged",), int8_calibration=good, int8_images=8)
    return {"good": good, "run": run, "bundle": bundle}


def _qdq_convs(model: onnx.ModelProto) -> set[str]:
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dequantized}


def test_float_convs_are_the_input_convs_and_the_autoencoder(setup: dict[str, Path]) -> None:
    model = onnx.load(str(setup["bundle"] / "model_merged.onnx"))
    keep = float_convs(model)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 22 and len(keep) == 16 and len(set(keep)) == 16  # 14 autoencoder + first of teacher and student
    assert {c for c in convs if "/autoencoder/" in c} <= set(keep)
    assert {c for c in convs if c not in keep} == {f"/raw/{net}/{net}.{i}/Conv" for net in ("teacher", "student") for i in (3, 6, 8)}
    assert float_convs(model, ()) == [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] == "image"]
    with pytest.raises(ConfigError, match="float module.*re-export"):
        float_convs(model, ("decoder",))


def test_bundle_has_int8_variant_for_onnxruntime(setup: dict[str, Path]) -> None:
    from edgead.bundle import load_bundle

    b = load_bundle(setup["bundle"])
    assert set(b.manifest.variants) == {"merged", "merged_int8"}
    model = onnx.load(str(b.onnx_path("merged_int8")))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 22
    quantised = _qdq_convs(model)
    assert quantised == set(n.name for n in model.graph.node if n.op_type == "Conv") - set(float_convs(onnx.load(str(b.onnx_path("merged")))))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    act_zp = {inits[n.input[2]].dtype for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    assert act_zp == {np.dtype(np.uint8)}  # U8 activations: ONNX Runtime fuses every quantised conv on x86
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.optimized_model_filepath = str(setup["bundle"].parent / "opt.onnx")
    ort.InferenceSession(str(b.onnx_path("merged_int8")), opts, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert fused.count("QLinearConv") == 6 and fused.count("Conv") + fused.count("FusedConv") == 16, fused
    flops = count_flops(b.onnx_path("merged_int8"))
    model_t = EfficientAD("s", SIZE).eval()
    x = torch.zeros(1, 3, SIZE, SIZE)
    bodies = 0
    for net in (model_t.teacher, model_t.student):  # everything but the first conv of teacher and student
        first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        bodies += conv_flops(net, x) - conv_flops(first, x)
    assert flops["int8_conv_flops"] == pytest.approx(bodies, rel=1e-9)
    assert flops["int8_conv_flops"] / flops["conv_flops"] > 0.8
    assert count_flops(b.onnx_path("merged"))["int8_conv_flops"] == 0.0


def test_tensorrt_target_is_symmetric_qdq(setup: dict[str, Path], tmp_path: Path) -> None:
    from build_engines.trt_build import check_int8_graph

    path = quantize_merged(
        setup["bundle"] / "model_merged.onnx", tmp_path / "trt_int8.onnx", setup["good"], SIZE, max_images=2, method="minmax", target="tensorrt"
    )
    assert check_int8_graph(path) > 0
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    n_int8 = len(_qdq_convs(model))
    assert ops.count("Conv") == 22 and n_int8 == 6 and ops.count("QuantizeLinear") >= n_int8 and ops.count("DequantizeLinear") >= 2 * n_int8
    zero_points = {n.input[2] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert zero_points and all(np.all(inits[z] == 0) and inits[z].dtype == np.int8 for z in zero_points)  # TensorRT needs zero points of 0
    assert unsupported_ops(model) == []
    # the post-processing tail stays float: no QDQ around the squared differences / max
    reduce_inputs = {i for n in model.graph.node if n.op_type in ("ReduceMean", "ReduceMax") for i in n.input}
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert all(producers.get(i) != "DequantizeLinear" for i in reduce_inputs)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_percentile_and_entropy_calibration_run_and_keep_the_layer_plan(setup: dict[str, Path], tmp_path: Path, method: str) -> None:
    path = quantize_merged(setup["bundle"] / "model_merged.onnx", tmp_path / f"{method}.onnx", setup["good"], SIZE, max_images=2, method=method)
    model = onnx.load(str(path))
    assert len(_qdq_convs(model)) == 6 and unsupported_ops(model) == []
    frames = prepare_batch([make_image(200 + i, SIZE)[0] for i in range(2)], SIZE)
    ref = ort.InferenceSession(str(setup["bundle"] / "model_merged.onnx"), providers=["CPUExecutionProvider"]).run(["score"], {"image": frames})[0]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["score"], {"image": frames})[0]
    assert np.all(np.isfinite(got)) and np.max(np.abs(got - ref)) <= 0.2 * np.max(np.abs(ref)) + 1e-3


def test_int8_scores_track_fp32(setup: dict[str, Path]) -> None:
    from scipy.stats import spearmanr

    frames = [make_image(100 + i, SIZE)[0] for i in range(4)] + [
        make_image(200 + i, SIZE, defect=d)[0] for i, d in enumerate(["scratch", "spot", "crack", "scratch"])
    ]
    x = prepare_batch(frames, SIZE)
    f32 = _session(setup["bundle"] / "model_merged.onnx").run(None, {"image": x})
    i8 = _session(setup["bundle"] / "model_merged_int8.onnx").run(None, {"image": x})
    maps32, maps8 = f32[0][:, 0], i8[0][:, 0]
    assert not np.array_equal(maps32, maps8)  # really quantised
    per_image = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(maps32, maps8, strict=True)]
    # all-INT8 (input convs and autoencoder included) gave 0.65-0.85 on the real sets; float_convs gives > 0.999
    assert min(per_image) > 0.999, per_image  # all-INT8 scored 0.993-0.998 on this test
    assert spearmanr(f32[1], i8[1])[0] > 0.95


def test_detector_runs_the_int8_variant(setup: dict[str, Path]) -> None:
    from edgead import Detector

    with Detector(setup["bundle"], backend="onnxruntime", precision="int8", threads=1) as det:
        assert det.variant == "merged_int8" and det.precision == "int8"
        r = det.infer(make_image(5, SIZE)[0])
        assert r.anomaly_map.shape == (SIZE, SIZE) and np.isfinite(r.score)


def test_calibration_images_subset_is_reproducible(setup: dict[str, Path]) -> None:
    a = calibration_images(setup["good"], 3)
    assert len(a) == 3 and a == calibration_images(setup["good"], 3)
    assert len(calibration_images(setup["good"], 100)) == 8


def test_calibration_errors(tmp_path: Path, setup: dict[str, Path]) -> None:
    with pytest.raises(DataError, match="folder"):
        calibration_images(tmp_path / "missing")
    with pytest.raises(DataError, match="no .png"):
        calibration_images(tmp_path)
    with pytest.raises(ConfigError, match="max_images"):
        calibration_images(setup["good"], 0)
    with pytest.raises(ConfigError, match="calibration method"):
        quantize_merged(setup["bundle"] / "model_merged.onnx", tmp_path / "q.onnx", setup["good"], SIZE, method="kl")
    with pytest.raises(DataError, match="INT8 calibration images"):
        export_bundle(setup["run"], tmp_path / "b", variants=("merged",), int8_calibration="train")


def test_fidelity_compares_and_records_only_what_meets_the_goals(setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import shutil

    from build_engines.fidelity import compare_precisions, main
    from build_engines.synthetic import generate
    from edgead.bundle import load_bundle

    data = generate(tmp_path / "data", n_train=1, n_test_good=3, n_test_defect=3, size=SIZE, seed=0)
    r = compare_precisions(setup["bundle"], data, [("onnxruntime", "int8"), ("openvino", "fp32")], threads=1)
    int8, ov32 = r["candidates"]["onnxruntime/int8"], r["candidates"]["openvino/fp32"]
    assert r["n"] >= 6 and 0.0 <= r["reference"]["auroc"] <= 1.0 and 0.0 <= int8["auroc"] <= 1.0
    assert int8["delta_points"] == pytest.approx(100 * (int8["auroc"] - r["reference"]["auroc"]))
    assert 0.9 < int8["score_rank_correlation"] <= 1.0 and 0.0 < int8["score_error_rel"] < 0.1
    assert ov32["score_rank_correlation"] == pytest.approx(1.0) and ov32["score_error_rel"] < 1e-3 and ov32["meets_goals"]
    bundle = tmp_path / "b"
    shutil.copytree(setup["bundle"], bundle)
    out = tmp_path / "fid.json"
    assert main([str(bundle), str(data), "--candidate", "openvino/int8", "--record", "--json", str(out), "--threads", "1"]) == 0
    rep = json.loads(out.read_text())
    meets = rep["candidates"]["openvino/int8"]["meets_goals"]
    assert ("int8" in load_bundle(bundle).manifest.cpu_precisions) == meets == (rep["recorded"] == ["int8"])


def test_fidelity_reports_a_candidate_with_nan_scores_as_failing_and_keeps_the_others(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A candidate that outputs NaN (as OpenVINO BF16 did from a stale cached blob) fails with its count; the report survives."""
    import json

    import onnx
    import tiny_bundle as tb

    from build_engines.fidelity import main
    from build_engines.synthetic import generate
    from edgead.bundle import write_bundle

    src = tmp_path / "src"
    src.mkdir()
    bad = tb.weights(0)
    bad["w_t"][0, 0, 0, 0] = np.nan
    onnx.save(tb.merged_model(tb.weights(0)), str(src / "model_merged.onnx"))
    onnx.save(tb.merged_model(bad), str(src / "model_merged_int8.onnx"))  # a broken low-precision variant
    bundle = write_bundle(tmp_path / "b", tb.manifest(("merged", "merged_int8")), {p.name: p for p in src.iterdir()})
    data = generate(tmp_path / "data", n_train=1, n_test_good=3, n_test_defect=3, size=64, seed=0)
    out = tmp_path / "fid.json"
    assert main([str(bundle), str(data), "--candidate", "onnxruntime/int8", "--candidate", "openvino/fp32", "--threads", "1", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["candidates"]["onnxruntime/int8"]["nonfinite_scores"] == rep["n"] and rep["candidates"]["onnxruntime/int8"]["meets_goals"] is False
    assert rep["candidates"]["openvino/fp32"]["meets_goals"] is True
    assert "scores NaN or infinite -> misses the goals" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="drop --product"):  # a one-product bundle has no product to name
        main([str(bundle), str(data), "--candidate", "openvino/fp32", "--product", "tiles"])


def test_float_convs_keeps_the_stem_behind_a_pad_of_the_image() -> None:
    """Lite backbones pad the image ("same" padding) before their stem: that convolution still reads the image."""
    from onnx import TensorProto, helper

    from build_engines.quantize import float_convs

    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], [0.0] * 108)
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [4, 4, 1, 1], [0.0] * 16)
    pads = helper.make_tensor("pads", TensorProto.INT64, [8], [0, 0, 1, 1, 0, 0, 1, 1])
    nodes = [
        helper.make_node("Pad", ["image", "pads"], ["padded"], name="/grid/_conv_stem/Pad"),
        helper.make_node("Conv", ["padded", "w"], ["stem"], name="/grid/_conv_stem/Conv"),
        helper.make_node("Pad", ["stem", "pads"], ["padded2"], name="/grid/block/Pad"),
        helper.make_node("Conv", ["padded2", "w2"], ["out"], name="/grid/block/Conv"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [w, w2, pads])
    assert float_convs(helper.make_model(graph), ()) == ["/grid/_conv_stem/Conv"]  # a later padded conv is quantised


def test_rank_correlation_matches_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    from build_engines.quantize import rank_correlation

    rng = np.random.default_rng(0)
    a = np.where(rng.random(50) < 0.4, 0.0, rng.random(50))  # 40 % tied at 0, as padded score maps give
    b = a + 0.01 * rng.standard_normal(50)
    assert rank_correlation(a, b) == pytest.approx(spearmanr(a, b)[0], abs=1e-12)
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation(np.zeros(5), a[:5]))  # undefined for constant scores
