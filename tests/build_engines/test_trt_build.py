"""TensorRT build: pure logic here; the TensorRT calls against the stubs' API and a recording double.

The real build needs TensorRT + a GPU (see docs/deployment.md); the `gpu` test at the end runs it.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from build_engines import trt_build
from build_engines.trt_build import (
    EngineMeta,
    build_engine,
    check_build_args,
    check_variant_precision,
    engine_entry,
    engine_file_name,
    import_tensorrt,
    profile_shapes,
)
from edgead.errors import ConfigError, MissingDependencyError


def test_check_build_args_defaults_and_normalisation() -> None:
    s = check_build_args("FP16", 16)
    assert (s.precision, s.max_batch, s.opt_batch, s.workspace_mb) == ("fp16", 16, 16, 2048)
    assert check_build_args("fp32", 8, 2).opt_batch == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("fp61", 16), "did you mean 'fp16'"),
        (("fp16", 0), "max_batch"),
        (("fp16", 1000), "max_batch"),
        (("fp16", True), "max_batch"),
        (("fp16", 4, 8), "opt_batch"),
        (("fp16", 4, 0), "opt_batch"),
        (("fp16", 4, None, 1), "workspace_mb"),
    ],
)
def test_check_build_args_refuses(args: tuple[Any, ...], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        check_build_args(*args)


def test_profile_shapes() -> None:
    assert profile_shapes(256, 16, 4) == ((1, 3, 256, 256), (4, 3, 256, 256), (16, 3, 256, 256))
    assert profile_shapes(128, 1, 1)[2] == (1, 3, 128, 128)
    with pytest.raises(ConfigError):
        profile_shapes(256, 4, 8)


def test_engine_file_name_follows_the_contract() -> None:
    assert engine_file_name("merged", "fp16", "8.7", "10.3.0.30") == "merged_fp16_sm87_trt10.3.0.30.engine"
    assert engine_file_name("raw", "fp32", "9.0", "10.13.0") == "raw_fp32_sm90_trt10.13.0.engine"
    with pytest.raises(ConfigError, match="compute capability"):
        engine_file_name("merged", "fp16", "sm_87", "10.3")


def test_variant_precision_pairs() -> None:
    assert check_variant_precision("merged", "fp16", ("merged", "raw")) == "merged"
    assert check_variant_precision("merged_int8", "int8", ("merged", "merged_int8")) == "merged_int8"
    with pytest.raises(ConfigError, match="--int8"):
        check_variant_precision("merged", "int8", ("merged",))
    with pytest.raises(ConfigError, match="precision int8"):
        check_variant_precision("merged_int8", "fp16", ("merged_int8",))
    with pytest.raises(ConfigError, match="variant"):
        check_variant_precision("raw", "fp16", ("merged",))


def _qdq_graph(zp_dtype: type, zp: int) -> object:
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(zp, zp_dtype), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q0"), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq0")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_int8_graph_check_accepts_symmetric_and_refuses_uint8(tmp_path: Path) -> None:
    import numpy as np
    import onnx

    from build_engines.trt_build import check_int8_graph

    good, bad_u8, bad_zp = tmp_path / "g.onnx", tmp_path / "u8.onnx", tmp_path / "zp.onnx"
    onnx.save(_qdq_graph(np.int8, 0), str(good))
    onnx.save(_qdq_graph(np.uint8, 128), str(bad_u8))
    onnx.save(_qdq_graph(np.int8, 3), str(bad_zp))
    assert check_int8_graph(good) == 2
    for path in (bad_u8, bad_zp):
        with pytest.raises(ConfigError, match="--int8-target tensorrt"):
            check_int8_graph(path)
    plain = tmp_path / "plain.onnx"
    import onnx.helper as h

    g = h.make_graph([h.make_node("Relu", ["x"], ["y"])], "g", [h.make_tensor_value_info("x", 1, [1])], [h.make_tensor_value_info("y", 1, [1])])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)]), str(plain))
    with pytest.raises(ConfigError, match="without QuantizeLinear"):
        check_int8_graph(plain)


def test_engine_entry_is_a_valid_manifest_entry(tmp_path: Path) -> None:
    meta = EngineMeta(tmp_path / "merged_fp16_sm87_trt10.3.0.engine", "fp16", "10.3.0", "8.7", "Orin", 16, 16, 123, 1.0)
    entry = engine_entry(meta, "merged", built_at="2026-11-23T10:00:00+00:00")
    assert entry.to_dict() == {
        "file": "merged_fp16_sm87_trt10.3.0.engine",
        "variant": "merged",
        "precision": "fp16",
        "tensorrt_version": "10.3.0",
        "compute_capability": "8.7",
        "device_name": "Orin",
        "max_batch": 16,
        "built_at": "2026-11-23T10:00:00+00:00",
        "fp32_layers": 0,
    }


def _real_tensorrt() -> bool:
    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin not in (None, "namespace") and hasattr(__import__("tensorrt"), "Builder")


@pytest.mark.skipif(_real_tensorrt(), reason="TensorRT is installed here")
def test_missing_tensorrt_names_the_tensorrt_extra(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match=r"edgead\[tensorrt\]"):
        import_tensorrt()
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"x")
    with pytest.raises(MissingDependencyError, match="tensorrt"):
        build_engine(onnx_file, tmp_path / "m.engine")


def test_missing_onnx_file_is_reported_before_tensorrt(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ONNX file"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "m.engine")


# --- the TensorRT calls: every attribute we use exists in TensorRT 10's API (tensorrt-stubs) ------

USED_API = {
    "Builder": ["create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network", "platform_has_fast_fp16"],
    "INetworkDefinition": ["get_input", "num_inputs"],
    "OnnxParser": ["parse_from_file", "get_error", "num_errors"],
    "IBuilderConfig": ["set_memory_pool_limit", "set_flag", "add_optimization_profile", "create_timing_cache", "set_timing_cache", "get_timing_cache"],
    "IOptimizationProfile": ["set_shape"],
    "ITimingCache": ["serialize"],
    "MemoryPoolType": ["WORKSPACE"],
    "BuilderFlag": ["FP16", "INT8"],
    "Logger": ["WARNING"],
    "Dims": [],
}


def _class_body(text: str, name: str) -> str:
    m = re.search(rf"^class {name}\b.*?(?=^class |\Z)", text, re.S | re.M)
    assert m, f"class {name} not in the TensorRT stubs"
    return m.group(0)


def test_tensorrt_calls_exist_in_tensorrt_10_api() -> None:
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tensorrt-stubs not installed")
    text = (Path(list(spec.submodule_search_locations)[0]) / "tensorrt.pyi").read_text()
    for cls, members in USED_API.items():
        body = _class_body(text, cls)
        for member in members:
            assert re.search(rf"(def {member}\(|\b{member}\b\s*[:(])", body), f"{cls}.{member} not in TensorRT 10 API"
    # TensorRT 10: explicit batch is implicit, the flag is deprecated (we pass 0)
    assert "DEPRECATED" in _class_body(text, "NetworkDefinitionCreationFlag")


# --- orchestration, on the host-simulated TensorRT of tests/simdevice (the run path is in tests/sdk) ----


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    import simdevice

    with simdevice.installed(monkeypatch) as s:
        yield s


def _merged_onnx(tmp_path: Path) -> Path:
    import tiny_bundle as tb

    return tb.make_bundle(tmp_path / "b") / "model_merged.onnx"


def test_build_flow_profile_flags_pure_plan_and_timing_cache(sim: Any, tmp_path: Path) -> None:
    onnx_file = _merged_onnx(tmp_path)
    cache = tmp_path / "cache.bin"
    meta = build_engine(onnx_file, tmp_path / "out" / "m.engine", precision="fp16", max_batch=8, opt_batch=2, workspace_mb=64, timing_cache=cache)
    build = sim.trt.builds[-1]
    assert build["network_flags"] == 0 and build["workspace"] == 64 << 20 and build["timing_cache"] and "FP16" in build["flags"]
    assert build["profile"][0][0] == 1 and build["profile"][1][0] == 2 and build["profile"][2][0] == 8
    assert cache.is_file() and cache.stat().st_size > 0
    assert meta.path.read_bytes().startswith(b"EDGEAD-SIM-PLAN")  # pure: the plan as TensorRT wrote it, nothing prepended
    assert (meta.max_batch, meta.bytes) == (8, meta.path.stat().st_size)
    assert (meta.tensorrt_version, meta.compute_capability) == ("10.13.0.35", "8.7") and meta.device_name  # from TensorRT and the device


def test_build_flow_fp32_sets_no_flag_and_int8_sets_both(sim: Any, tmp_path: Path) -> None:
    onnx_file = _merged_onnx(tmp_path)
    build_engine(onnx_file, tmp_path / "a.engine", precision="fp32")
    assert not {"FP16", "INT8"} & set(sim.trt.builds[-1]["flags"])
    build_engine(onnx_file, tmp_path / "b.engine", precision="int8")
    assert {"FP16", "INT8"} <= set(sim.trt.builds[-1]["flags"])


def test_failed_build_raises_and_writes_nothing(sim: Any, tmp_path: Path) -> None:
    from edgead.errors import BackendError

    sim.trt.fail_build = True
    with pytest.raises(BackendError, match="TensorRT build"):
        build_engine(_merged_onnx(tmp_path), tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


# --- the real thing, on a machine with TensorRT and a GPU ----------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not _real_tensorrt(), reason="TensorRT not installed")
def test_real_build_of_an_exported_bundle(tmp_path: Path, make_run: Callable[..., Path]) -> None:
    from build_engines.export import export_bundle
    from edgead.bundle import load_bundle

    run = make_run(tmp_path / "run", 128)
    bundle = export_bundle(run, tmp_path / "bundle", variants=("merged",))
    meta = trt_build.build_into_bundle(bundle, variant="merged", precision="fp16", max_batch=4)
    assert meta.path.is_file()
    assert [e.file for e in load_bundle(bundle).manifest.engines] == [meta.path.name]
