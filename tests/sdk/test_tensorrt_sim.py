"""The real TensorRT backend, engine builder and kernels path, run end to end on the host-simulated device
(``tests/simdevice``): same results as ONNX Runtime, correct use of streams, devices, graphs and buffers, and
each defect of the NVIDIA-path review caught by a test."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import simdevice
import tiny_bundle as tb

from edgead import Detector
from edgead.bundle import load_bundle
from edgead.errors import BackendError, BundleError

S = tb.IMAGE_SIZE
MAX_BATCH = 4


@pytest.fixture()
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[simdevice.Sim]:
    with simdevice.installed(monkeypatch) as s:
        yield s


@pytest.fixture()
def bundle(tmp_path: Path, sim: simdevice.Sim) -> Path:
    from build_engines.trt_build import build_into_bundle

    b = tb.make_bundle(tmp_path / "bundle")
    for variant in ("merged", "raw"):
        build_into_bundle(b, variant=variant, precision="fp32", max_batch=MAX_BATCH)
    return b


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (S + 5 * i, S + 3 * i, 3), dtype=np.uint8) for i in range(n)]


def reference(bundle: Path, batch: list[np.ndarray]) -> list:
    with Detector(bundle, backend="onnxruntime", threads=1) as det:
        return det.infer_batch(batch)


# ------------------------------------------------------------------ the run path, against ONNX Runtime
@pytest.mark.parametrize("variant", ["merged", "raw"])
@pytest.mark.parametrize("graph", [False, True])
def test_tensorrt_backend_matches_onnxruntime(sim: simdevice.Sim, bundle: Path, variant: str, graph: bool) -> None:
    sizes = [1, 1, 3, 3, MAX_BATCH, 2, 2, 3, 1, 1]  # shapes repeat (graph replays) and change back and forth (recaptures)
    batches = [frames(n, seed) for seed, n in enumerate(sizes)]
    with Detector(bundle, backend="tensorrt", variant=variant, cuda_graph=graph) as det:
        assert (det.backend, det.variant, det.max_batch) == ("tensorrt", variant, MAX_BATCH)
        for batch in batches:
            got, ref = det.infer_batch(batch), reference(bundle, batch)
            np.testing.assert_allclose([r.score for r in got], [r.score for r in ref], rtol=1e-5, atol=1e-6)
            for g, r in zip(got, ref, strict=True):
                np.testing.assert_allclose(g.anomaly_map, r.anomaly_map, rtol=1e-5, atol=1e-6)
        stream = det._backend._stream.handle
    async_ops = [c for c in sim.cuda.calls if c[0] in ("cudaMemcpyAsync", "cudaGraphLaunch", "cudaStreamSynchronize")]
    assert async_ops and all(c[2] == stream for c in async_ops)  # every asynchronous operation on the backend's own stream
    assert not sim.cuda.live() and not sim.cuda.streams  # close() freed every buffer and the stream
    if graph:
        assert any(c[0] == "cudaGraphLaunch" for c in sim.cuda.calls)
        assert all(g.destroyed for g in sim.cuda.graph_execs) and all(g.destroyed for g in sim.cuda.graphs)


def test_four_threads_share_one_detector(sim: simdevice.Sim, bundle: Path) -> None:
    batch = frames(3, 7)
    ref = [r.score for r in reference(bundle, batch)]
    results: list[list[float]] = []
    errors: list[BaseException] = []
    with Detector(bundle, backend="tensorrt", cuda_graph=True) as det:

        def work() -> None:
            try:
                for _ in range(3):
                    results.append([r.score for r in det.infer_batch(batch)])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(results) == 12
    for r in results:
        np.testing.assert_allclose(r, ref, rtol=1e-5, atol=1e-6)


def test_host_outputs_are_read_only_after_the_synchronise(sim: simdevice.Sim, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The double can tell: skipping the stream synchronise leaves the pinned outputs poisoned (NaN)."""
    from edgead.backends import cuda

    with Detector(bundle, backend="tensorrt", on_nonfinite="raise") as det:
        monkeypatch.setattr(cuda.Stream, "synchronize", lambda self: None)
        with pytest.raises(BackendError, match="non-finite"):
            det.infer(frames(1)[0])


# ------------------------------------------------------------------ defects of the review, each with its test
def test_a_detector_on_gpu1_works_from_any_thread(sim: simdevice.Sim, bundle: Path) -> None:
    """The CUDA device is current per host thread: a run from a thread whose current device is 0 must set it."""
    batch = frames(2, 8)
    ref = [r.score for r in reference(bundle, batch)]
    det = Detector(bundle, backend="tensorrt", device=1)
    out: list = []
    t = threading.Thread(target=lambda: out.append(det.infer_batch(batch)))  # a new thread: current device 0
    t.start()
    t.join()
    assert out, "the run failed in the other thread"
    np.testing.assert_allclose([r.score for r in out[0]], ref, rtol=1e-5, atol=1e-6)
    t = threading.Thread(target=det.close)  # the release path too
    t.start()
    t.join()
    assert not sim.cuda.live()


def test_graph_capture_failure_falls_back_with_one_warning(sim: simdevice.Sim, bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    sim.cuda.fail_capture = True
    batch = frames(2, 9)
    with caplog.at_level(logging.WARNING), Detector(bundle, backend="tensorrt", cuda_graph=True) as det:
        for _ in range(3):
            np.testing.assert_allclose([r.score for r in det.infer_batch(batch)], [r.score for r in reference(bundle, batch)], rtol=1e-5, atol=1e-6)
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 1


def test_a_half_captured_graph_is_destroyed(sim: simdevice.Sim, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simdevice import tensorrt as fake_trt

    with Detector(bundle, backend="tensorrt", cuda_graph=True) as det:
        real = fake_trt.IExecutionContext.execute_async_v3
        calls = {"n": 0}

        def second_fails(self: fake_trt.IExecutionContext, stream_handle: int) -> bool:
            calls["n"] += 1
            return False if calls["n"] == 2 else real(self, stream_handle)  # the warm-up passes, the captured enqueue fails

        monkeypatch.setattr(fake_trt.IExecutionContext, "execute_async_v3", second_fails)
        with pytest.raises(BackendError, match="execute_async_v3"):
            det.infer(frames(1)[0])
        assert sim.cuda.graphs and all(g.destroyed for g in sim.cuda.graphs)
        assert not any(s.capture is not None for s in sim.cuda.streams.values())  # capture mode left


def test_out_of_memory_context_is_a_clear_error(sim: simdevice.Sim, bundle: Path) -> None:
    sim.trt.fail_context = True
    with pytest.raises(BackendError, match="create_execution_context"):
        Detector(bundle, backend="tensorrt")
    assert not sim.cuda.live()


def test_release_frees_everything_and_keeps_the_first_error(sim: simdevice.Sim, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgead.backends import cuda

    det = Detector(bundle, backend="tensorrt")
    real = cuda.DeviceBuffer.close
    failed: list[int] = []

    def flaky(self: cuda.DeviceBuffer) -> None:
        if not failed:
            failed.append(self.ptr)
            raise BackendError("CUDA cudaFree | got first failure; expected cudaSuccess; how to fix: x")
        real(self)

    monkeypatch.setattr(cuda.DeviceBuffer, "close", flaky)
    with pytest.raises(BackendError, match="first failure"):
        det.close()
    assert [a.ptr for a in sim.cuda.live()] == failed  # only the one that failed is left; every other buffer and the stream went
    assert not sim.cuda.streams


def test_construction_failure_reports_the_cause_not_a_release_error(sim: simdevice.Sim, bundle: Path) -> None:
    sim.cuda.fail_malloc_after = sim.cuda.mallocs + 3  # out of memory while the buffers are allocated
    with pytest.raises(BackendError, match="cudaErrorMemoryAllocation"):
        Detector(bundle, backend="tensorrt")
    assert not sim.cuda.live() and not sim.cuda.streams


def test_raw_engine_with_outputs_the_kernels_cannot_read_is_refused(sim: simdevice.Sim, bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simdevice import tensorrt as fake_trt

    real = fake_trt.ICudaEngine.get_tensor_shape

    def thin_student(self: fake_trt.ICudaEngine, name: str) -> fake_trt.Dims:
        dims = real(self, name)
        return fake_trt.Dims((dims[0], dims[1] // 2, *dims[2:])) if name == "student" else dims

    monkeypatch.setattr(fake_trt.ICudaEngine, "get_tensor_shape", thin_student)
    monkeypatch.setattr(fake_trt.IExecutionContext, "get_tensor_shape", lambda self, name: fake_trt.Dims([MAX_BATCH if d == -1 else d for d in self.engine.get_tensor_shape(name)]))
    with pytest.raises(BundleError, match="raw output shapes"):
        Detector(bundle, backend="tensorrt", variant="raw")
    assert not sim.cuda.live()


def test_auto_names_the_cuda_error(sim: simdevice.Sim, bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    """cuda-bindings 13 under a 12.x driver: every call fails with cudaErrorInsufficientDriver, not 'no GPU'."""
    sim.cuda.driver_error = simdevice.cudart.cudaError_t.cudaErrorInsufficientDriver
    sim.cuda.driver_version = 12080  # an R570 driver: CUDA 12.8
    with caplog.at_level(logging.INFO), Detector(bundle) as det:
        assert det.backend == "openvino"
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "cudaErrorInsufficientDriver" in text and "tensorrt-cu12" in text
    with pytest.raises(BackendError, match="cudaErrorInsufficientDriver"):
        Detector(bundle, backend="tensorrt")


def test_a_raw_engine_has_no_map_tail_to_hold_in_fp32(sim: simdevice.Sim, tmp_path: Path) -> None:
    """The raw variant is the three networks only: an FP16 build constrains nothing (it once held every layer FP32)."""
    from build_engines.trt_build import build_into_bundle

    b = tb.make_bundle(tmp_path / "b")
    meta = build_into_bundle(b, variant="raw", precision="fp16", max_batch=2)
    build = sim.trt.builds[-1]
    assert build["fp32_layers"] == [] and "OBEY_PRECISION_CONSTRAINTS" not in build["flags"] and meta.fp32_layers == 0


def test_a_merged_graph_whose_map_tail_is_not_found_is_refused_not_built_all_fp16(sim: simdevice.Sim, tmp_path: Path) -> None:
    """Tail nodes named inside a scope (another exporter, a wrapped graph): no silent FP16 map and score."""
    from simdevice import tensorrt as fake_trt

    from build_engines.trt_build import keep_map_tail_fp32

    model = tb.merged_model(tb.weights(0))
    for node in model.graph.node[3:]:
        node.name = "/wrapper" + node.name
    onnx.save(model, str(tmp_path / "m.onnx"))
    network = fake_trt.INetworkDefinition(0)
    assert fake_trt.OnnxParser(network, fake_trt.Logger()).parse_from_file(str(tmp_path / "m.onnx"))
    with pytest.raises(BackendError, match="anomaly_map and score"):
        keep_map_tail_fp32(fake_trt, network, fake_trt.IBuilderConfig())


def test_engine_build_records_profile_cache_and_fp32_map_tail(sim: simdevice.Sim, tmp_path: Path) -> None:
    from build_engines.trt_build import build_into_bundle

    b = tb.make_bundle(tmp_path / "b")
    cache = tmp_path / "timing.cache"
    meta = build_into_bundle(b, variant="merged", precision="fp16", max_batch=8, opt_batch=2, timing_cache=cache)
    build = sim.trt.builds[-1]
    assert build["profile"] == [[1, 3, S, S], [2, 3, S, S], [8, 3, S, S]]
    assert "FP16" in build["flags"] and build["timing_cache"] and cache.is_file()
    assert "OBEY_PRECISION_CONSTRAINTS" in build["flags"] and build["fp32_layers"]  # the map tail stays FP32
    entry = next(e for e in load_bundle(b).manifest.engines if e.file == meta.path.name)
    assert entry.precision == "fp16" and entry.fp32_layers == len(build["fp32_layers"])
    with Detector(b, backend="tensorrt") as det:
        got = det.infer_batch(frames(3, 11))
    ref = reference(b, frames(3, 11))
    np.testing.assert_allclose([r.score for r in got], [r.score for r in ref], rtol=2e-2, atol=2e-3)  # fp16 body, fp32 tail


def test_a_rejected_timing_cache_falls_back_to_a_fresh_one(sim: simdevice.Sim, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from build_engines.trt_build import build_into_bundle

    b = tb.make_bundle(tmp_path / "b")
    cache = tmp_path / "other_gpu.cache"
    cache.write_bytes(b"a cache written on another GPU")
    sim.trt.reject_timing_cache = True
    with caplog.at_level(logging.WARNING):
        meta = build_into_bundle(b, variant="merged", precision="fp32", max_batch=2, timing_cache=cache)
    assert meta.path.is_file() and any("timing cache" in r.getMessage() for r in caplog.records)
    assert cache.read_bytes() != b"a cache written on another GPU"  # replaced by this device's cache


def test_buffers_are_sized_for_the_max_batch_and_freed_on_close(sim: simdevice.Sim, bundle: Path) -> None:
    from edgead.backends import tensorrt as trtb

    b = load_bundle(bundle)
    engine = next(e for e in b.manifest.engines if e.variant == "merged")
    be = trtb.TensorRTBackend(b, engine)
    h = S // 4 + 2 * tb.PAD
    assert be.max_batch == MAX_BATCH and be.min_batch == 1 and "Simulated GPU 0" in be.device
    assert be._out_shapes == {"image": (MAX_BATCH, 3, S, S), "anomaly_map": (MAX_BATCH, 1, h, h), "score": (MAX_BATCH,)}
    assert len(sim.cuda.live("device")) == 3 and len(sim.cuda.live("pinned")) == 3 and len(sim.cuda.streams) == 1
    be.close()
    assert not sim.cuda.live() and not sim.cuda.streams and be.closed


def test_cuda_helpers_round_trip_on_the_simulated_device(sim: simdevice.Sim) -> None:
    from edgead.backends import cuda

    info = cuda.device_info(1)
    assert info.compute_capability == "8.7" and info.total_memory > 0
    with cuda.Stream() as stream, cuda.DeviceBuffer(4 * 1000) as dev:
        src, dst = cuda.PinnedBuffer((1000,), "float32"), cuda.PinnedBuffer((1000,), "float32")
        src.array[:] = np.arange(1000, dtype=np.float32)
        start, end = cuda.Event(), cuda.Event()
        start.record(stream)
        cuda.copy_htod(dev, src, stream)
        cuda.copy_dtoh(dst, dev, stream)
        end.record(stream)
        assert np.isnan(dst.array).all()  # asynchronous: nothing has landed before the synchronise
        stream.synchronize()
        np.testing.assert_array_equal(dst.array, src.array)
        assert cuda.Event.elapsed_ms(start, end) > 0.0
        for x in (src, dst, start, end):
            x.close()
    assert not sim.cuda.live()


def test_a_kernel_library_that_cannot_run_makes_auto_use_the_merged_engine(sim: simdevice.Sim, bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    real = sim.kernels.lib.edgead_pp_cuda_probe
    sim.kernels.lib.edgead_pp_cuda_probe = lambda device: 5  # e.g. cudaErrorNoKernelImageForDevice: sm_72 not compiled
    with caplog.at_level(logging.INFO), Detector(bundle, backend="tensorrt") as det:
        assert det.variant == "merged"
    assert "cannot run on GPU 0" in " ".join(r.getMessage() for r in caplog.records)
    sim.kernels.lib.edgead_pp_cuda_probe = real


def test_doctor_reports_a_matching_engine_on_the_simulated_device(sim: simdevice.Sim, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from edgead.cli import main as cli

    assert cli(["doctor", str(bundle), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cuda"]["devices"][0] == {"index": 0, "name": "Simulated GPU 0", "compute_capability": "8.7", "memory_gib": 16.0}
    assert report["cuda"]["compatible"] and report["tensorrt"]["version"] == "10.13.0.35" and report["tensorrt_backend"]["usable"]
    assert report["kernels"]["usable"] and report["kernels"]["archs"] == ["86", "87", "89", "90"]
    engines = {e["variant"]: e for e in report["bundle"]["engines"]}
    assert engines["merged"]["matches"] and engines["raw"]["matches"]
    assert report["bundle"]["auto"]["backend"] == "tensorrt" and "build_command" not in report["bundle"]
    assert cli(["doctor", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert "MATCH  raw_fp32_sm87_trt10.13.0.35.engine" in text and "Detector(bundle) runs: tensorrt raw" in text


def test_doctor_explains_an_engine_for_another_gpu_and_an_old_driver(sim: simdevice.Sim, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from edgead.cli import main as cli

    sim.cuda.props[0].major, sim.cuda.props[0].minor = 9, 0  # the bundle's engines were built on sm 8.7
    assert cli(["doctor", str(bundle), "--json"]) == 0
    b = json.loads(capsys.readouterr().out)["bundle"]
    assert not any(e["matches"] for e in b["engines"]) and "compute capability 8.7 (this GPU: 9.0)" in b["engines"][0]["why"]
    assert b["build_command"] == f"edgead build {bundle} --variant merged --precision fp16" and b["auto"]["backend"] == "openvino"
    sim.cuda.driver_error = simdevice.cudart.cudaError_t.cudaErrorInsufficientDriver
    sim.cuda.driver_version = 12080
    assert cli(["doctor", "--json"]) == 0
    cuda_report = json.loads(capsys.readouterr().out)["cuda"]
    assert cuda_report["compatible"] is False and cuda_report["driver_cuda"] == "12.8" and cuda_report["runtime"] == "13.0"
    assert "tensorrt-cu12" in cuda_report["why"]
