"""ONNX export: parity with PyTorch eager and with the NumPy post-processing reference, TensorRT op table, errors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort  # pinned dev dependency: a missing one fails (no importorskip)
import pytest
import torch

import build_engines.export as export_mod
from build_engines.efficientad.models import EfficientAD
from build_engines.export import (
    OUTPUTS,
    export_bundle,
    export_onnx,
    fold_teacher_normalisation,
    graph_for_variant,
    simplify_onnx,
)
from build_engines.onnx_ops import SUPPORTED_OPS, check_tensorrt_compatible, unsupported_ops
from edgead.errors import BundleError, ConfigError, DataError
from edgead.postprocess import EfficientADPost, QuantileAffine, efficientad_postprocess
from edgead.preprocess import prepare_batch

SIZE = 128
POST = EfficientADPost(QuantileAffine(0.8, 2.5), QuantileAffine(0.3, 1.1), pad=4)


def _model(seed: int = 0) -> EfficientAD:
    torch.manual_seed(seed)
    model = EfficientAD("s", SIZE)
    with torch.no_grad():  # non-trivial teacher statistics so that folding is exercised
        model.teacher_mean.uniform_(-0.5, 0.5)
        model.teacher_std.uniform_(0.5, 2.0)
    return model.eval()


def realistic_frames(n: int, seed: int = 0, size: int = SIZE) -> list[np.ndarray]:
    """uint8 BGR frames: smooth textured background, some with a bright/dark blob ("defect")."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    frames = []
    for i in range(n):
        base = 110 + 40 * np.sin(2 * np.pi * (3 * xx + rng.uniform())) * np.cos(2 * np.pi * (2 * yy))
        img = np.repeat(base[:, :, None], 3, axis=2) + rng.normal(0, 6, (size, size, 3))
        if i % 2:
            cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.05, 0.15)]
            blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r**2
            img[blob] = rng.choice([15.0, 245.0])
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


@functools.lru_cache(maxsize=8)
def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.fixture(scope="module")
def model() -> EfficientAD:
    torch.set_num_threads(1)
    return _model()


@pytest.fixture(scope="module")
def graphs(model: EfficientAD, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("onnx")
    paths = {}
    for variant in ("merged", "raw"):
        path = export_onnx(graph_for_variant(model, POST, variant), out / f"{variant}.onnx", SIZE, OUTPUTS[variant])
        paths[variant] = simplify_onnx(path)
    return paths


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "random": rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32),
        "realistic": prepare_batch(realistic_frames(6), SIZE),
    }


def test_folded_teacher_equals_normalised_teacher(model: EfficientAD) -> None:
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model.normalised_teacher(x)
        got = fold_teacher_normalisation(model)(x)
    assert _rel(got.numpy(), ref.numpy()) < 1e-5
    assert not torch.equal(model.teacher_mean, torch.zeros_like(model.teacher_mean))  # folding was not a no-op


def test_fold_refuses_non_positive_std() -> None:
    m = _model()
    with torch.no_grad():
        m.teacher_std[0, 3] = 0.0
    with pytest.raises(ConfigError, match="teacher_std"):
        fold_teacher_normalisation(m)


@pytest.mark.parametrize("kind", ["random", "realistic"])
def test_raw_graph_matches_pytorch_eager(model: EfficientAD, graphs: dict[str, Path], inputs: dict[str, np.ndarray], kind: str) -> None:
    x = inputs[kind]
    with torch.no_grad():
        ref = [t.numpy() for t in model(torch.from_numpy(x))]
    got = _session(graphs["raw"]).run(list(OUTPUTS["raw"]), {"image": x})
    for name, g, r in zip(OUTPUTS["raw"], got, ref, strict=True):
        assert g.shape == r.shape, name
        assert _rel(g, r) <= 1e-4, name


@pytest.mark.parametrize("kind", ["random", "realistic"])
def test_merged_graph_matches_eager_plus_numpy_reference(model: EfficientAD, graphs: dict[str, Path], inputs: dict[str, np.ndarray], kind: str) -> None:
    x = inputs[kind]
    with torch.no_grad():
        t, s, a = (v.numpy() for v in model(torch.from_numpy(x)))
    ref_maps, ref_scores = efficientad_postprocess(t, s, a, POST)
    maps, scores = _session(graphs["merged"]).run(["anomaly_map", "score"], {"image": x})
    assert maps.shape == (x.shape[0], 1, SIZE // 4, SIZE // 4)
    assert scores.shape == (x.shape[0],)
    assert _rel(maps[:, 0], ref_maps) <= 1e-4
    assert _rel(scores, ref_scores) <= 1e-4
    assert np.array_equal(np.argsort(scores), np.argsort(ref_scores))
    inner = maps[:, 0, 4:-4, 4:-4]  # the padding ring repeats the nearest computed cell (ONNX Pad mode=edge)
    assert np.array_equal(maps[:, 0], np.pad(inner, ((0, 0), (4, 4), (4, 4)), mode="edge"))


def test_in_graph_postprocess_equals_reference_on_onnx_raw_outputs(graphs: dict[str, Path], inputs: dict[str, np.ndarray]) -> None:
    x = inputs["realistic"]
    t, s, a = _session(graphs["raw"]).run(list(OUTPUTS["raw"]), {"image": x})
    ref_maps, ref_scores = efficientad_postprocess(t, s, a, POST)
    maps, scores = _session(graphs["merged"]).run(["anomaly_map", "score"], {"image": x})
    assert _rel(maps[:, 0], ref_maps) <= 1e-5
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)


def test_batch_axis_stays_dynamic(graphs: dict[str, Path], inputs: dict[str, np.ndarray]) -> None:
    x = inputs["realistic"]
    sess = _session(graphs["merged"])
    for path in graphs.values():
        m = onnx.load(str(path))
        assert m.graph.input[0].name == "image"
        assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        for out in m.graph.output:
            assert out.type.tensor_type.shape.dim[0].dim_param == "batch"
    single = [sess.run(["score"], {"image": x[i : i + 1]})[0][0] for i in range(len(x))]
    batched = sess.run(["score"], {"image": x})[0]
    np.testing.assert_allclose(batched, single, rtol=1e-5)


def test_dropout_is_off_in_the_graph(graphs: dict[str, Path], inputs: dict[str, np.ndarray]) -> None:
    for path in graphs.values():
        assert "Dropout" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    x = inputs["random"][:1]
    sess = _session(graphs["raw"])
    a1, a2 = (sess.run(["autoencoder"], {"image": x})[0] for _ in range(2))
    assert np.array_equal(a1, a2)


def test_every_op_is_in_tensorrt_10_table(graphs: dict[str, Path]) -> None:
    for variant, path in graphs.items():
        model = onnx.load(str(path))
        ops = {n.op_type for n in model.graph.node}
        assert {"Conv", "Resize"} <= ops, variant
        assert ops <= SUPPORTED_OPS, ops - SUPPORTED_OPS
        assert unsupported_ops(model) == []
        check_tensorrt_compatible(model)


def _toy(op: str, domain: str = "", opset: int = 17, **attrs: object) -> onnx.ModelProto:
    h = onnx.helper
    node = h.make_node(op, ["x"], ["y"], domain=domain, name="n0", **attrs)
    graph = h.make_graph(
        [node], "toy", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])], [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])]
    )
    imports = [h.make_opsetid("", opset)] + ([h.make_opsetid(domain, 1)] if domain else [])
    return h.make_model(graph, opset_imports=imports)


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (_toy("Unique"), "Unique"),  # in ONNX, marked N in TensorRT's table
        (_toy("DynamicQuantizeLinear"), "DynamicQuantizeLinear"),
        (_toy("MyPlugin", domain="com.example"), "custom domain"),
        (_toy("Relu", opset=23), "opset 23"),
        (_toy("Resize", mode="cubic"), "mode=cubic"),
        (_toy("Pad", opset=19, mode="wrap"), "mode=wrap"),
    ],
)
def test_op_check_rejects_what_tensorrt_refuses(model: onnx.ModelProto, needle: str) -> None:
    issues = unsupported_ops(model)
    assert issues and needle in " ".join(f"{i.op_type} {i.reason}" for i in issues)
    with pytest.raises(ConfigError, match="n0|opset"):
        check_tensorrt_compatible(model)


def test_op_check_accepts_a_supported_toy_graph() -> None:
    assert unsupported_ops(_toy("Relu")) == []
    assert unsupported_ops(_toy("Pad", mode="edge")) == []


def test_export_refuses_bad_opset_and_training_mode(model: EfficientAD, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(graph_for_variant(model, POST, "raw"), tmp_path / "x.onnx", SIZE, OUTPUTS["raw"], opset=21)
    with pytest.raises(ConfigError, match="variant"):
        graph_for_variant(model, POST, "fused")


# --- the bundle (needs edgead.bundle from the runtime workstream) ---------------------------------


def test_export_bundle_writes_manifest_and_variants(tmp_path: Path, inputs: dict[str, np.ndarray], make_run: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import edgead.bundle as bundle_mod

    run = make_run(tmp_path / "run", SIZE, model=_model(0), quantiles=(POST.st.qa, POST.st.qb, POST.ae.qa, POST.ae.qb), size="s")
    out = export_bundle(run, tmp_path / "bundle", variants=("merged", "raw"))
    loaded = bundle_mod.load_bundle(out)
    manifest = loaded.manifest
    assert set(manifest.variants) == {"merged", "raw"}
    assert manifest.input.image_size == SIZE and manifest.postprocess.pad == 4
    assert manifest.threshold.value == 0.5
    assert manifest.producer.opset == 17
    x = inputs["realistic"]
    maps, _ = _session(loaded.onnx_path("merged")).run(["anomaly_map", "score"], {"image": x})
    with torch.no_grad():
        t, s, a = (v.numpy() for v in _model(0)(torch.from_numpy(x)))
    assert _rel(maps[:, 0], efficientad_postprocess(t, s, a, manifest.post)[0]) <= 1e-4
    with pytest.raises(BundleError, match="overwrite"):
        export_bundle(run, out)
    assert export_bundle(run, out, variants=("merged",), overwrite=True) == out
    (out / "model_merged.a6000.fp16.engine").write_bytes(b"plan")
    monkeypatch.setattr(export_mod, "export_onnx", lambda *a, **k: pytest.fail("exported although the destination is refused"))
    with pytest.raises(BundleError, match="would delete: model_merged.a6000.fp16.engine"):  # refused before any export work
        export_bundle(run, out, variants=("merged",), overwrite=True)
    assert (out / "model_merged.a6000.fp16.engine").read_bytes() == b"plan"
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(BundleError, match="is a file"):
        export_bundle(run, tmp_path / "a_file")


def test_export_bundle_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="model.pt"):
        export_bundle(tmp_path / "missing", tmp_path / "b")
    with pytest.raises(ConfigError, match="variant"):
        export_bundle(tmp_path / "missing", tmp_path / "b", variants=("mergd",))
    with pytest.raises(ConfigError, match="variants"):
        export_bundle(tmp_path / "missing", tmp_path / "b", variants=())
