"""Detector: results against an independent NumPy reference, frames, map sizes, batching, threads, lifetime, no torch."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tiny_bundle as tb

import edgead
from edgead import Detector, Result, load_bundle
from edgead.detector import resize_map
from edgead.errors import BackendError, BundleError, ConfigError, InputError
from edgead.postprocess import efficientad_postprocess, resize_bilinear

S = tb.IMAGE_SIZE


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tb.make_bundle(tmp_path_factory.mktemp("d") / "bundle")


@pytest.fixture(scope="module")
def det(bundle_dir: Path) -> Detector:
    return Detector(bundle_dir, backend="onnxruntime", threads=1)


def frame(seed: int, h: int = S, w: int = S, c: int | None = 3) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def reference(f: np.ndarray, out_h: int, out_w: int) -> tuple[float, np.ndarray]:
    t, s, a = tb.reference_outputs(f)
    maps, scores = efficientad_postprocess(t, s, a, tb.manifest().post)
    return float(scores[0]), resize_bilinear(maps, out_h, out_w)[0]


# ------------------------------------------------------------------ numerics
@pytest.mark.parametrize("variant", ["merged", "raw"])
@pytest.mark.parametrize("map_size", ["model", (40, 24)])
def test_matches_independent_reference(bundle_dir: Path, variant: str, map_size: object) -> None:
    f = frame(3)
    with Detector(bundle_dir, backend="onnxruntime", threads=1, variant=variant) as d:
        r = d.infer(f, map_size=map_size)  # type: ignore[arg-type]
    out_h, out_w = (S, S) if map_size == "model" else map_size  # type: ignore[misc]
    score, amap = reference(f, out_h, out_w)
    assert r.anomaly_map.dtype == np.float32 and r.anomaly_map.shape == (out_h, out_w)
    np.testing.assert_allclose(r.score, score, rtol=1e-5)
    np.testing.assert_allclose(r.anomaly_map, amap, rtol=1e-5, atol=1e-6)


def test_frame_resolution_map_by_default(det: Detector) -> None:
    f = frame(4, 50, 70)
    r = det.infer(f)
    assert r.anomaly_map.shape == (50, 70)
    small = det.infer(f, map_size="model")
    np.testing.assert_allclose(r.score, small.score, rtol=1e-6)


@pytest.mark.parametrize(("h", "w", "oh", "ow"), [(12, 12, 32, 32), (12, 12, 7, 5), (12, 9, 480, 641), (5, 7, 5, 7), (12, 12, 24, 36)])
def test_cv2_resize_has_reference_semantics(h: int, w: int, oh: int, ow: int) -> None:
    m = np.random.default_rng(h * w).standard_normal((h, w)).astype(np.float32)
    np.testing.assert_allclose(resize_map(m, oh, ow), resize_bilinear(m[None], oh, ow)[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ decision / threshold
def test_decision_against_threshold(bundle_dir: Path) -> None:
    f = frame(5)
    base = Detector(bundle_dir, backend="onnxruntime", threads=1)
    score = base.infer(f).score
    assert base.threshold == tb.THRESHOLD
    low = Detector(bundle_dir, backend="onnxruntime", threads=1, threshold=score - 1e-3).infer(f)
    high = Detector(bundle_dir, backend="onnxruntime", threads=1, threshold=score + 1e-3).infer(f)
    assert (low.is_anomalous, low.decision) == (True, "NG")
    assert (high.is_anomalous, high.decision) == (False, "OK")
    assert high.threshold == pytest.approx(score + 1e-3)
    equal = Detector(bundle_dir, backend="onnxruntime", threads=1, threshold=score).infer(f)
    assert equal.decision == "OK"  # strictly greater is anomalous


@pytest.fixture(scope="module")
def broken_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bundles whose model outputs NaN (a corrupt weight) or inf (an overflow), as a bad engine would."""
    out = {}
    for name, value in (("nan", np.nan), ("inf", np.float32(3e38))):
        w = tb.weights(0)
        w["w_t"][0, 0, 0, 0] = value  # NaN everywhere in teacher channel 0 / squares that overflow float32
        out[name] = tb.make_bundle(tmp_path_factory.mktemp(name) / "bundle", w=w)
    return out


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("variant", ["merged", "raw"])
def test_a_non_finite_model_output_is_never_ok(broken_bundles: dict[str, Path], kind: str, variant: str) -> None:
    with Detector(broken_bundles[kind], backend="onnxruntime", threads=1, variant=variant, threshold=1e30) as det:
        single = det.infer(frame(1))
        batch = det.infer_batch([frame(2), frame(3)])
        assert det.nonfinite_count == 3
    for r in [single, *batch]:
        assert (r.decision, r.is_anomalous, r.finite) == ("NG", True, False)
    with Detector(broken_bundles[kind], backend="onnxruntime", threads=1, variant=variant, on_nonfinite="raise") as det:
        with pytest.raises(BackendError, match="non-finite"):
            det.infer(frame(1))


def test_finite_results_say_so(det: Detector) -> None:
    assert det.infer(frame(1)).finite is True
    with pytest.raises(ConfigError, match="on_nonfinite"):
        Detector(load_bundle(det.bundle.root), backend="onnxruntime", on_nonfinite="ok")


@pytest.mark.parametrize("bad", [float("nan"), "0.5", True, float("inf")])
def test_threshold_validated(bundle_dir: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        Detector(bundle_dir, backend="onnxruntime", threshold=bad)  # type: ignore[arg-type]


def test_timings(det: Detector) -> None:
    r = det.infer(frame(6))
    assert set(r.timings) >= {"preprocess", "inference", "postprocess", "total"}
    assert all(v >= 0 for v in r.timings.values())
    assert r.timings["total"] >= r.timings["inference"]
    assert isinstance(r, Result) and "score=" in repr(r)


# ------------------------------------------------------------------ frames and colours
def test_color_orders_agree(det: Detector) -> None:
    bgr = frame(7)
    ref = det.infer(bgr)
    rgb = det.infer(np.ascontiguousarray(bgr[:, :, ::-1]), color="rgb")
    bgra = det.infer(np.ascontiguousarray(np.dstack([bgr, np.full(bgr.shape[:2], 255, np.uint8)])), color="bgra")
    for r in (rgb, bgra):
        np.testing.assert_allclose(r.anomaly_map, ref.anomaly_map, rtol=1e-6)
    u16 = det.infer(bgr.astype(np.uint16) * 257)  # same pixels at 16-bit full scale
    np.testing.assert_allclose(u16.score, ref.score, rtol=1e-5)


def test_gray_frames(det: Detector) -> None:
    g = frame(8, c=None)
    r = det.infer(g, color="gray")
    same = det.infer(np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2)))
    np.testing.assert_allclose(r.anomaly_map, same.anomaly_map, rtol=1e-6)
    assert r.anomaly_map.shape == g.shape


@pytest.mark.parametrize(
    ("bad", "color", "fragment"),
    [
        (np.zeros((S, S, 3), np.float32), "bgr", "dtype"),
        (np.zeros((1, S, S, 3), np.uint8), "bgr", "shape"),
        (np.zeros((0, S, 3), np.uint8), "bgr", "non-empty"),
        (np.zeros((S, 2 * S, 3), np.uint8)[:, ::2], "bgr", "non-contiguous"),
        (np.zeros((S, S), np.uint8), "bgr", "channels"),
        ([[0]], "bgr", "numpy"),
    ],
)
def test_bad_frames(det: Detector, bad: object, color: str, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        det.infer(bad, color=color)  # type: ignore[arg-type]
    assert fragment in str(info.value) and "how to fix" in str(info.value)


@pytest.mark.parametrize("bad", ["big", (0, 5), (5,), (2.0, 3)])
def test_bad_map_size(det: Detector, bad: object) -> None:
    with pytest.raises(ConfigError, match="map_size"):
        det.infer(frame(1), map_size=bad)  # type: ignore[arg-type]


def test_bad_color(det: Detector) -> None:
    with pytest.raises(ConfigError, match="did you mean 'bgr'"):
        det.infer(frame(1), color="bgrr")


# ------------------------------------------------------------------ batches
def test_infer_batch_equals_infer_and_chunks(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = Detector(bundle_dir, backend="onnxruntime", threads=1)
    frames = [frame(10 + i, S + 8 * i, S + 4 * i) for i in range(5)]
    singles = [d.infer(f) for f in frames]
    calls: list[int] = []
    real = d._backend.timed_run

    def spy(batch: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        calls.append(batch.shape[0])
        return real(batch)

    monkeypatch.setattr(d._backend, "timed_run", spy)
    monkeypatch.setattr(d._backend, "max_batch", 2)
    batch = d.infer_batch(frames)
    assert calls == [2, 2, 1]
    for b, s in zip(batch, singles, strict=True):
        assert b.anomaly_map.shape == s.anomaly_map.shape
        np.testing.assert_allclose(b.anomaly_map, s.anomaly_map, rtol=1e-5, atol=1e-6)
        assert b.score == pytest.approx(s.score, rel=1e-5)
    assert len(d.infer_batch(np.stack(frames[:1]))) == 1  # an NHWC array is accepted as a batch


def test_infer_batch_errors(det: Detector) -> None:
    with pytest.raises(InputError, match="non-empty"):
        det.infer_batch([])
    with pytest.raises(InputError, match="list of frames"):
        det.infer_batch(frame(1))  # type: ignore[arg-type]
    with pytest.raises(InputError, match="dtype"):
        det.infer_batch([frame(1), np.zeros((S, S, 3), np.float32)])


# ------------------------------------------------------------------ threads and lifetime
def test_concurrent_infer_equals_serial(det: Detector) -> None:
    frames = [frame(20 + i, S + i, S + 2 * i) for i in range(8)]
    serial = [det.infer(f) for f in frames]
    results: dict[tuple[int, int], Result] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                for i, f in enumerate(frames):
                    results[(t, i)] = det.infer(f)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for (_, i), r in results.items():
        np.testing.assert_array_equal(r.anomaly_map, serial[i].anomaly_map)
        assert r.score == serial[i].score


def test_close_and_context_manager(bundle_dir: Path) -> None:
    with Detector(bundle_dir, backend="onnxruntime", threads=1) as d:
        d.infer(frame(1))
    with pytest.raises(BackendError, match="closed"):
        d.infer(frame(1))
    d.close()  # idempotent


# ------------------------------------------------------------------ backend choice
def test_auto_picks_onnxruntime_without_openvino_and_logs_once(bundle_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # not installed
    with caplog.at_level(logging.INFO, logger="edgead.detector"):
        d = Detector(bundle_dir, threads=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "edgead.detector"]
    assert len(lines) == 1
    assert "backend=onnxruntime" in lines[0] and "because" in lines[0] and "edgead[openvino]" in lines[0]
    assert (d.backend, d.precision, d.variant, d.image_size) == ("onnxruntime", "fp32", "merged", S)


def test_explicit_tensorrt_refuses_here(bundle_dir: Path) -> None:
    with pytest.raises(BackendError) as info:
        Detector(bundle_dir, backend="tensorrt")
    assert "backend='onnxruntime'" in str(info.value)


def test_argument_validation(bundle_dir: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'onnxruntime'"):
        Detector(bundle_dir, backend="onnxruntme")
    with pytest.raises(ConfigError, match="variant"):
        Detector(bundle_dir, backend="onnxruntime", variant="fast")
    with pytest.raises(ConfigError, match="merged_int8"):
        Detector(bundle_dir, backend="onnxruntime", precision="int8")
    with pytest.raises(ConfigError, match="TensorRT"):
        Detector(bundle_dir, backend="onnxruntime", precision="fp16")
    with pytest.raises(ConfigError, match="variant / precision"):
        Detector(bundle_dir, backend="onnxruntime", variant="merged", precision="int8")
    with pytest.raises(ConfigError, match="device"):
        Detector(bundle_dir, device=-1)
    with pytest.raises(BundleError, match="does not exist"):
        Detector(bundle_dir.parent / "missing")


def test_accepts_loaded_bundle_and_raw_only(tmp_path: Path) -> None:
    b = tb.make_bundle(tmp_path / "raw_only", variants=("raw",))
    d = Detector(load_bundle(b), backend="onnxruntime", threads=1)
    assert d.variant == "raw"
    score, _ = reference(frame(2), S, S)
    assert d.infer(frame(2)).score == pytest.approx(score, rel=1e-5)


# ------------------------------------------------------------------ torch-free runtime
def test_runtime_never_imports_torch(bundle_dir: Path) -> None:
    code = (
        "import sys, numpy as np, edgead\n"
        "d = edgead.Detector(sys.argv[1], threads=1)\n"
        "r = d.infer(np.zeros((40, 30, 3), np.uint8))\n"
        "d.infer_batch([np.zeros((20, 20), np.uint8)], color='gray')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'build_engines'))\n"
        "print('IMPORTED', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bundle_dir)], capture_output=True, text=True, timeout=60,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "IMPORTED []" in out.stdout


def test_public_exports() -> None:
    assert edgead.Detector is Detector and edgead.Result is Result and edgead.load_bundle is load_bundle
    with pytest.raises(AttributeError):
        edgead.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018


# ------------------------------------------------------------------ backend choice with TensorRT "present" (logic only)
@pytest.fixture()
def trt_present(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object]]:
    """Pretend TensorRT + an H100 are here; record TensorRTBackend constructions instead of running them."""
    from edgead.backends import tensorrt as trtb
    from edgead.backends.base import Backend
    from edgead.bundle import Platform

    built: list[tuple[str, object]] = []

    class Recorder(Backend):
        name = "tensorrt"

        def __init__(self, bundle: object, engine: object, **kw: object) -> None:
            built.append((engine.file, kw.get("kernels")))  # type: ignore[attr-defined]
            super().__init__(variant=engine.variant, precision=engine.precision, input_name="image",  # type: ignore[attr-defined]
                             input_shape=(3, S, S), output_names=("anomaly_map", "score"), max_batch=4, device="GPU 0 (recorded)")

    monkeypatch.setattr(trtb, "tensorrt_status", lambda device=0: (True, "TensorRT 10.13.0 and 1 GPU(s) present"))
    monkeypatch.setattr(trtb, "current_platform", lambda device=0: Platform("9.0", "10.13.0.35", "NVIDIA H100"))
    monkeypatch.setattr(trtb, "kernel_library", lambda device=0: (None, "no CUDA kernels in this test"))
    monkeypatch.setattr(trtb, "TensorRTBackend", Recorder)
    return built


def _with_engine(tmp_path: Path, cc: str, variant: str = "merged") -> Path:
    from edgead.bundle import EngineEntry, add_engine

    b = tb.make_bundle(tmp_path / "bundle")
    plan = tmp_path / "p.engine"
    plan.write_bytes(b"plan")
    add_engine(b, plan, EngineEntry(f"{variant}_fp16.engine", variant, "fp16", "10.13.0", cc, "GPU", 4, "2026-11-23T10:00:00Z"))
    return b


def test_auto_uses_matching_engine(tmp_path: Path, trt_present: list[tuple[str, object]], caplog: pytest.LogCaptureFixture) -> None:
    b = _with_engine(tmp_path, "9.0")
    with caplog.at_level(logging.INFO, logger="edgead.detector"):
        d = Detector(b)
    assert trt_present == [("merged_fp16.engine", None)]
    assert (d.backend, d.precision, d.variant, d.max_batch) == ("tensorrt", "fp16", "merged", 4)
    assert "TensorRT with engine merged_fp16.engine" in caplog.records[-1].getMessage()


def test_auto_with_engine_for_another_gpu_runs_onnxruntime_and_says_why(tmp_path: Path, trt_present: list[tuple[str, object]],
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    b = _with_engine(tmp_path, "8.7")
    with caplog.at_level(logging.INFO):
        d = Detector(b, threads=1)
    assert trt_present == [] and d.backend == "openvino"  # the faster installed CPU runtime (a pinned dev dependency)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert f"edgead build {b} --variant merged --precision fp16" in text


def test_explicit_tensorrt_with_engine_for_another_gpu(tmp_path: Path, trt_present: list[tuple[str, object]]) -> None:
    b = _with_engine(tmp_path, "8.7")
    with pytest.raises(BundleError, match="allow_onnx_fallback=True"):
        Detector(b, backend="tensorrt")
    d = Detector(b, backend="tensorrt", allow_onnx_fallback=True, threads=1)
    assert d.backend == "openvino" and trt_present == []


def test_auto_without_engines_names_the_build_command(tmp_path: Path, trt_present: list[tuple[str, object]],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    b = tb.make_bundle(tmp_path / "bundle")
    with caplog.at_level(logging.INFO, logger="edgead.detector"):
        d = Detector(b, threads=1)
    assert d.backend == "openvino"
    assert "no TensorRT engine" in caplog.records[-1].getMessage() and "edgead build" in caplog.records[-1].getMessage()
    with pytest.raises(BundleError, match="no engine in the bundle"):
        Detector(b, backend="tensorrt")


def test_raw_engine_without_kernels_is_not_picked(tmp_path: Path, trt_present: list[tuple[str, object]]) -> None:
    b = _with_engine(tmp_path, "9.0", variant="raw")
    with pytest.raises(BundleError, match="make kernels"):
        Detector(b, backend="tensorrt")
    assert Detector(b, threads=1).backend == "openvino"


# ------------------------------------------------------------------ what users naturally pass, and what they must not
@pytest.mark.parametrize("value", [np.float32(0.07), np.float64(0.07), np.int64(1), 3])
def test_numpy_scalar_thresholds_are_accepted(bundle_dir: Path, value: object) -> None:
    with Detector(bundle_dir, backend="onnxruntime", threads=1, threshold=value) as det:  # type: ignore[arg-type]
        assert det.threshold == pytest.approx(float(value)) and isinstance(det.threshold, float)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [10**400, np.nan, np.bool_(True), [0.1]])
def test_unusable_thresholds_are_config_errors(bundle_dir: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        Detector(bundle_dir, backend="onnxruntime", threshold=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("threads", [0, 10_000, 2.0, True])
def test_threads_are_bounded(bundle_dir: Path, threads: object) -> None:
    with pytest.raises(ConfigError, match="threads"):
        Detector(bundle_dir, backend="onnxruntime", threads=threads)  # type: ignore[arg-type]
    with Detector(bundle_dir, backend="onnxruntime", threads=np.int64(1)) as det:  # type: ignore[arg-type]
        assert det.infer(frame(1)).finite


def test_map_size_accepts_numpy_ints_and_refuses_absurd_sizes(det: Detector) -> None:
    assert det.infer(frame(1), map_size=(np.int64(20), np.int32(30))).anomaly_map.shape == (20, 30)  # type: ignore[arg-type]
    for bad in [(50_000, 50_000), (0, 5), (5.0, 5), "Frame"]:
        with pytest.raises(ConfigError, match="map_size"):
            det.infer(frame(1), map_size=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bundle", [None, 3, b"bundle"])
def test_detector_of_nothing_is_a_config_error(bundle: object) -> None:
    with pytest.raises(ConfigError, match="bundle"):
        Detector(bundle)  # type: ignore[arg-type]


def test_big_endian_16_bit_frames_keep_their_values(det: Detector) -> None:
    native = np.random.default_rng(4).integers(0, 65536, (S, S, 3), dtype=np.uint16)
    big = native.astype(">u2")
    assert big.dtype.byteorder == ">" and np.array_equal(big, native)
    assert det.infer(big).score == pytest.approx(det.infer(native).score, rel=1e-6)


def test_a_model_breaking_the_batch_axis_is_a_backend_error(det: Detector, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = det._backend
    real = backend._run
    monkeypatch.setattr(backend, "_run", lambda batch: {k: v[:1] for k, v in real(batch).items()})  # one output for two inputs
    with pytest.raises(BackendError, match="batch axis"):
        det.infer_batch([frame(1), frame(2)])
