"""Backends: the base-class checks, ONNX Runtime (IO binding, providers, model checks), and the TensorRT /
CUDA logic that runs without TensorRT (binding and profile checks, engine choice, missing-dependency paths)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tiny_bundle as tb

from edgead.backends import cuda
from edgead.backends import tensorrt as trtb
from edgead.backends.onnxruntime import OnnxRuntimeBackend, import_onnxruntime
from edgead.bundle import MANIFEST, EngineEntry, Platform, add_engine, load_bundle, write_bundle
from edgead.errors import BackendError, BundleError, ConfigError, InputError, MissingDependencyError

S = tb.IMAGE_SIZE
H100 = Platform("9.0", "10.13.0", "NVIDIA H100")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tb.make_bundle(tmp_path_factory.mktemp("b") / "bundle")


@pytest.fixture()
def batch() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 3, S, S)).astype(np.float32)


# ------------------------------------------------------------------ ONNX Runtime
def test_ort_outputs_match_numpy_reference(bundle_dir: Path, batch: np.ndarray) -> None:
    with OnnxRuntimeBackend(load_bundle(bundle_dir), "raw", threads=1) as be:
        out = be.run(batch)
    assert be.closed and be.precision == "fp32" and be.max_batch is None
    w = tb.weights()
    h = S // 4
    patches = batch.astype(np.float64).reshape(2, 3, h, 4, h, 4)
    ref = np.einsum("ncikjl,ockl->noij", patches, w["w_s"].astype(np.float64))
    np.testing.assert_allclose(out["student"], ref, rtol=1e-5, atol=1e-5)
    assert out["teacher"].shape == (2, tb.C, h, h)


def test_ort_io_binding_reuses_buffers_but_returns_fresh_arrays(bundle_dir: Path, batch: np.ndarray) -> None:
    be = OnnxRuntimeBackend(load_bundle(bundle_dir), "merged", threads=1)
    first = be.run(batch)  # plain run, then binds outputs for batch size 2
    assert 2 in be._bound
    second = be.run(batch)  # IO-binding path
    np.testing.assert_array_equal(first["anomaly_map"], second["anomaly_map"])
    kept = second["score"].copy()
    second["score"][:] = -1  # caller owns the result: mutating it must not leak into the next run
    third = be.run(batch[::-1].copy())
    np.testing.assert_allclose(third["score"], kept[::-1], rtol=1e-6)
    assert not np.shares_memory(third["score"], be._bound[2][1]["score"])
    be.close()


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (np.zeros((1, 3, S, S), np.float64), "dtype"),
        (np.zeros((3, S, S), np.float32), "shape"),
        (np.zeros((1, 3, S + 1, S), np.float32), "shape"),
        (np.zeros((0, 3, S, S), np.float32), "shape"),
        (np.zeros((1, 3, S, 2 * S), np.float32)[:, :, :, ::2], "non-contiguous"),
        ([[0.0]], "numpy.ndarray"),
    ],
)
def test_base_rejects_bad_batches(bundle_dir: Path, bad: object, fragment: str) -> None:
    be = OnnxRuntimeBackend(load_bundle(bundle_dir), "merged", threads=1)
    with pytest.raises(InputError) as info:
        be.run(bad)  # type: ignore[arg-type]
    assert fragment in str(info.value) and "how to fix" in str(info.value)


def test_max_batch_is_enforced(bundle_dir: Path) -> None:
    be = OnnxRuntimeBackend(load_bundle(bundle_dir), "merged", threads=1)
    be.max_batch = 1
    with pytest.raises(InputError, match="infer_batch"):
        be.run(np.zeros((2, 3, S, S), np.float32))


def test_closed_backend_refuses(bundle_dir: Path, batch: np.ndarray) -> None:
    be = OnnxRuntimeBackend(load_bundle(bundle_dir), "merged", threads=1)
    be.close()
    be.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        be.run(batch)


def test_ort_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"edgead\[cpu\]"):
        import_onnxruntime()


def test_ort_cuda_provider_unavailable_is_explicit(bundle_dir: Path) -> None:
    with pytest.raises(BackendError, match="CUDAExecutionProvider"):
        OnnxRuntimeBackend(load_bundle(bundle_dir), "merged", provider="cuda")
    with pytest.raises(ConfigError, match="did you mean"):
        OnnxRuntimeBackend(load_bundle(bundle_dir), "merged", provider="cpux")


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_ort_threads_validated(bundle_dir: Path, threads: object) -> None:
    with pytest.raises(ConfigError, match="threads"):
        OnnxRuntimeBackend(load_bundle(bundle_dir), "merged", threads=threads)  # type: ignore[arg-type]


def test_ort_rejects_graph_with_wrong_outputs(tmp_path: Path) -> None:
    # a bundle whose "merged" file is really the raw graph
    src = tmp_path / "raw.onnx"
    import onnx

    onnx.save(tb.raw_model(tb.weights()), str(src))
    b = write_bundle(tmp_path / "b", tb.manifest(("merged",)), {"model_merged.onnx": src})
    with pytest.raises(BundleError, match="outputs"):
        OnnxRuntimeBackend(load_bundle(b), "merged")


def test_ort_rejects_wrong_input_name(tmp_path: Path, bundle_dir: Path) -> None:
    data = json.loads((bundle_dir / MANIFEST).read_text())
    data["input"]["name"] = "pixels"
    from edgead.bundle import Bundle, Manifest

    b = Bundle(bundle_dir, Manifest.from_dict(data))
    with pytest.raises(BundleError, match="pixels"):
        OnnxRuntimeBackend(b, "merged")


def test_unknown_variant(bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="variant"):
        OnnxRuntimeBackend(load_bundle(bundle_dir), "merged_int8")


# ------------------------------------------------------------------ TensorRT: dependency paths
def test_tensorrt_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"edgead\[tensorrt\]"):
        trtb.import_tensorrt()
    ok, why = trtb.tensorrt_status()
    assert not ok and "not installed" in why


def test_tensorrt_stub_only_install_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs gives
    with pytest.raises(MissingDependencyError, match="type stubs"):
        trtb.import_tensorrt()


def test_tensorrt_backend_refuses_without_tensorrt(monkeypatch: pytest.MonkeyPatch, bundle_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    entry = EngineEntry("m.engine", "merged", "fp16", "10.13.0", "9.0", "H100", 4, "now")
    with pytest.raises(MissingDependencyError):
        trtb.TensorRTBackend(load_bundle(bundle_dir), entry)


def test_status_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("tensorrt")
    fake.Runtime = object  # type: ignore[attr-defined]
    fake.__version__ = "10.13.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(cuda, "device_status", lambda: (0, "cudaErrorNoDevice: no NVIDIA GPU is visible"))
    ok, why = trtb.tensorrt_status()
    assert not ok and "no usable NVIDIA GPU (cudaErrorNoDevice" in why
    monkeypatch.setattr(cuda, "device_status", lambda: (1, "1 CUDA device(s)"))
    assert trtb.tensorrt_status(0)[0] is True
    ok, why = trtb.tensorrt_status(3)
    assert not ok and "GPU 3 does not exist" in why


# ------------------------------------------------------------------ TensorRT: binding and profile logic
def _io(**over: object) -> list[trtb.TensorInfo]:
    f32 = np.dtype(np.float32)
    tensors = {
        "image": trtb.TensorInfo("image", True, (-1, 3, S, S), f32),
        "anomaly_map": trtb.TensorInfo("anomaly_map", False, (-1, 1, 12, 12), f32),
        "score": trtb.TensorInfo("score", False, (-1,), np.dtype(np.float16)),
    }
    for k, v in over.items():
        if v is None:
            tensors.pop(k)
        else:
            tensors[k] = v  # type: ignore[assignment]
    return list(tensors.values())


def test_check_bindings_accepts_matching_engine() -> None:
    trtb.check_bindings(_io(), "image", (3, S, S), "merged", "e.engine", "B")


@pytest.mark.parametrize(
    ("over", "fragment"),
    [
        ({"image": trtb.TensorInfo("input", True, (-1, 3, S, S), np.dtype(np.float32))}, "inputs"),
        ({"image": trtb.TensorInfo("image", True, (-1, 3, 64, 64), np.dtype(np.float32))}, "input shape"),
        ({"score": None}, "outputs"),
        ({"score": trtb.TensorInfo("score", False, (-1,), np.dtype(np.int32))}, "dtype"),
        ({"anomaly_map": trtb.TensorInfo("anomaly_map", False, (-1, 1, -1, -1), np.dtype(np.float32))}, "only the batch axis"),
    ],
)
def test_check_bindings_refusals(over: dict[str, object], fragment: str) -> None:
    with pytest.raises(BundleError) as info:
        trtb.check_bindings(_io(**over), "image", (3, S, S), "merged", "e.engine", "BUNDLE")
    assert fragment in str(info.value)
    assert "edgead build BUNDLE --variant merged" in str(info.value)


def test_batch_range() -> None:
    profile = [(1, 3, S, S), (4, 3, S, S), (8, 3, S, S)]
    assert trtb.batch_range(profile, (3, S, S), "e", 8) == (1, 8)
    with pytest.raises(BundleError, match="stale"):
        trtb.batch_range(profile, (3, S, S), "e", 16)
    with pytest.raises(BundleError, match="profile shape"):
        trtb.batch_range([(1, 3, 64, 64)] * 3, (3, S, S), "e", 1)
    with pytest.raises(BundleError, match="min <= max"):
        trtb.batch_range([(4, 3, S, S), (4, 3, S, S), (2, 3, S, S)], (3, S, S), "e", 2)
    with pytest.raises(BundleError, match="optimisation profile"):
        trtb.batch_range([(1, 3, S, S)], (3, S, S), "e", 1)


@pytest.fixture()
def engines_bundle(tmp_path: Path) -> Path:
    b = tb.make_bundle(tmp_path / "bundle")
    for variant, precision, cc in [("merged", "fp32", "9.0"), ("merged", "fp16", "9.0"), ("raw", "fp16", "9.0"), ("merged", "fp16", "8.7")]:
        plan = tmp_path / "plan.engine"
        plan.write_bytes(f"{variant}{precision}{cc}".encode())
        name = f"{variant}_{precision}_sm{cc.replace('.', '')}_trt10.13.0.engine"
        add_engine(b, plan, EngineEntry(name, variant, precision, "10.13.0", cc, "GPU", 4, "2026-11-23T10:00:00Z"))
    return b


def test_choose_engine_preferences(engines_bundle: Path) -> None:
    b = load_bundle(engines_bundle)
    e, why = trtb.choose_engine(b, H100, variant=None, precision=None, kernels_available=True, allow_onnx_fallback=False)
    assert e is not None and (e.variant, e.precision) == ("raw", "fp16")
    e, why = trtb.choose_engine(b, H100, variant=None, precision=None, kernels_available=False, allow_onnx_fallback=False)
    assert e is not None and (e.variant, e.precision) == ("merged", "fp16")
    assert "CUDA post-processing library is not available" in why
    e, _ = trtb.choose_engine(b, H100, variant="merged", precision="fp32", kernels_available=True, allow_onnx_fallback=False)
    assert e is not None and e.precision == "fp32" and e.compute_capability == "9.0"
    with pytest.raises(BundleError, match="--precision int8"):
        trtb.choose_engine(b, H100, variant="merged", precision="int8", kernels_available=True, allow_onnx_fallback=False)
    with pytest.raises(BundleError, match="make kernels"):
        trtb.choose_engine(b, H100, variant="raw", precision=None, kernels_available=False, allow_onnx_fallback=False)
    orin = Platform("8.7", "10.13.0", "Orin")
    e, _ = trtb.choose_engine(b, orin, variant=None, precision=None, kernels_available=True, allow_onnx_fallback=False)
    assert e is not None and e.compute_capability == "8.7"


def test_choose_engine_no_match(engines_bundle: Path) -> None:
    b = load_bundle(engines_bundle)
    l40 = Platform("8.9", "10.13.0", "L40S")
    with pytest.raises(BundleError) as info:
        trtb.choose_engine(b, l40, variant=None, precision=None, kernels_available=False, allow_onnx_fallback=False)
    assert f"edgead build {engines_bundle}" in str(info.value)
    e, why = trtb.choose_engine(b, l40, variant=None, precision=None, kernels_available=False, allow_onnx_fallback=True)
    assert e is None and why


def test_kernel_library_reports_absence(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgead import kernels

    def missing(flavour: str, device: int = 0) -> None:
        raise OSError(f"libedgead_pp_{flavour}.so: cannot open shared object file")

    monkeypatch.setattr(kernels, "load_library", missing)
    lib, why = trtb.kernel_library()
    assert lib is None and "not available" in why and "libedgead_pp_cuda.so" in why


# ------------------------------------------------------------------ CUDA helpers (no GPU here; GPU cases below)
def test_cuda_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_RUNTIME", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda.cudart", None)
    with pytest.raises(MissingDependencyError, match=r"edgead\[tensorrt\]"):
        cuda.runtime()
    assert cuda.gpu_available() is False


def test_cuda_check_unpacks_and_raises() -> None:
    rt = cuda.runtime()
    assert cuda.check((rt.cudaError_t.cudaSuccess, 5), "x") == 5
    assert cuda.check((rt.cudaError_t.cudaSuccess,), "x") is None
    with pytest.raises(BackendError) as info:
        cuda.check((rt.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")
    assert "cudaErrorMemoryAllocation" in str(info.value) and "nvidia-smi" in str(info.value)


def test_cuda_without_device_raises_backend_error() -> None:
    if cuda.gpu_available():
        pytest.skip("a GPU is present")
    assert cuda.device_count() == 0
    with pytest.raises(BackendError, match="backend='onnxruntime'"):
        cuda.device_info(0)
    with pytest.raises(BackendError, match="CUDA cudaMalloc"):
        cuda.DeviceBuffer(16)


def test_cuda_copies_check_both_buffers_before_any_cuda_call() -> None:
    small, big = types.SimpleNamespace(nbytes=400, ptr=1), types.SimpleNamespace(nbytes=800, ptr=2)
    stream = types.SimpleNamespace(raw=None)
    with pytest.raises(BackendError, match="buffer sizing"):
        cuda.copy_htod(big, small, stream, 800)  # type: ignore[arg-type]  # reads past the host buffer
    with pytest.raises(BackendError, match="buffer sizing"):
        cuda.copy_dtoh(big, small, stream, 800)  # type: ignore[arg-type]  # reads past the device buffer


@pytest.mark.gpu
def test_cuda_round_trip_on_gpu() -> None:
    info = cuda.device_info(0)
    assert "." in info.compute_capability and info.total_memory > 0
    with cuda.Stream() as stream, cuda.DeviceBuffer(4 * 1000) as dev:
        src = cuda.PinnedBuffer((1000,), "float32")
        dst = cuda.PinnedBuffer((1000,), "float32")
        src.array[:] = np.arange(1000, dtype=np.float32)
        start, end = cuda.Event(), cuda.Event()
        start.record(stream)
        cuda.copy_htod(dev, src, stream)
        cuda.copy_dtoh(dst, dev, stream)
        end.record(stream)
        stream.synchronize()
        np.testing.assert_array_equal(dst.array, src.array)
        assert cuda.Event.elapsed_ms(start, end) >= 0.0
        with pytest.raises(BackendError, match="buffer sizing"):
            cuda.copy_htod(dev, cuda.PinnedBuffer((2000,), "float32"), stream)
        src.close()
        dst.close()
        start.close()
        end.close()
