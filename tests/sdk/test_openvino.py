"""OpenVINO backend: parity with ONNX Runtime, the precision never changes silently, the compiled-model cache,
auto's choice and its reason, and every refusal."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_bundle as tb

from edgead import Detector
from edgead.backends import openvino as ovb
from edgead.bundle import allow_precision, load_bundle
from edgead.errors import BackendError, BundleError, ConfigError, MissingDependencyError

ov = pytest.importorskip("openvino") if False else __import__("openvino")  # pinned dev dependency: missing is a failure
S = tb.IMAGE_SIZE


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEAD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return tb.make_bundle(tmp_path / "bundle")


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (S + 7 * i, S + 4 * i, 3), dtype=np.uint8) for i in range(n)]


@pytest.mark.parametrize("variant", ["merged", "raw"])
def test_fp32_matches_onnxruntime(bundle: Path, cache: Path, variant: str) -> None:
    batch = frames(5, 1)
    with Detector(bundle, backend="openvino", variant=variant, threads=1) as det, Detector(bundle, backend="onnxruntime", variant=variant, threads=1) as ref:
        assert (det.backend, det.precision) == ("openvino", "fp32")
        assert det._backend.execution_precision.lower() in ("f32", "fp32")  # asked for explicitly, not the CPU's bf16 default
        got, want = det.infer_batch(batch), ref.infer_batch(batch)
    np.testing.assert_allclose([r.score for r in got], [r.score for r in want], rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.anomaly_map, w.anomaly_map, rtol=1e-4, atol=1e-5)


def test_bf16_is_close_to_fp32_where_the_cpu_has_it(bundle: Path, cache: Path) -> None:
    if not ovb.bf16_supported(ov.Core()):
        with pytest.raises(BackendError, match="bf16"):
            Detector(bundle, backend="openvino", precision="bf16")
        return
    batch = frames(4, 2)
    with Detector(bundle, backend="openvino", precision="bf16", threads=1) as det, Detector(bundle, backend="onnxruntime", threads=1) as ref:
        assert det.precision == "bf16" and det._backend.execution_precision.lower() == "bf16"
        got, want = np.array([r.score for r in det.infer_batch(batch)]), np.array([r.score for r in ref.infer_batch(batch)])
    assert np.max(np.abs(got - want)) <= 2e-2 * np.max(np.abs(want)) + 1e-3  # bf16 keeps 8 bits of mantissa: ~0.4 % per value


def test_the_compiled_model_is_cached_per_bundle_content(tmp_path: Path, cache: Path) -> None:
    a = tb.make_bundle(tmp_path / "a", seed=0)
    b = tb.make_bundle(tmp_path / "b", seed=1)  # other weights: another ONNX hash
    c = tb.make_bundle(tmp_path / "c", seed=0)  # the same ONNX as a
    folders = [ovb.OpenVINOBackend.cache_folder(load_bundle(x), "merged", "CPU", ov.__version__, "fp32") for x in (a, b, c)]
    assert folders[0] != folders[1] and folders[0] == folders[2]
    assert ovb.OpenVINOBackend.cache_folder(load_bundle(a), "merged", "GPU", ov.__version__, "fp32") != folders[0]
    assert ovb.OpenVINOBackend.cache_folder(load_bundle(a), "merged", "CPU", ov.__version__, "bf16") != folders[0]
    with Detector(a, backend="openvino", threads=1):
        pass
    assert folders[0].is_dir() and any(folders[0].iterdir())  # OpenVINO wrote its blob there
    with Detector(a, backend="openvino", threads=1) as det:  # second start: loaded from the cache
        assert np.isfinite(det.infer(frames(1)[0]).score)


def test_a_bf16_start_never_loads_the_fp32_starts_blob(bundle: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINO names its blob without the precision hint: with one cache folder for both, a BF16 start re-compiled the
    FP32 blob (every score NaN on a UniAD bundle). Each precision has its own folder, and a BF16 start after an FP32
    one scores exactly as a BF16 start on an empty cache."""
    if not ovb.bf16_supported(ov.Core()):
        pytest.skip("no BF16 on this CPU")
    batch = frames(3, 4)
    with Detector(bundle, backend="openvino", precision="fp32", threads=1) as det:
        det.infer_batch(batch)
    with Detector(bundle, backend="openvino", precision="bf16", threads=1) as det:
        after_fp32 = [r.score for r in det.infer_batch(batch)]
    assert len(list(cache.iterdir())) == 2  # one compiled model per precision
    monkeypatch.setenv("EDGEAD_CACHE_DIR", str(tmp_path / "empty"))
    with Detector(bundle, backend="openvino", precision="bf16", threads=1) as det:
        fresh = [r.score for r in det.infer_batch(batch)]
    assert after_fp32 == fresh


def test_auto_picks_openvino_and_bf16_only_when_the_bundle_allows_it(bundle: Path, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="edgead.detector"), Detector(bundle, threads=1) as det:
        assert (det.backend, det.precision) == ("openvino", "fp32")
    assert "the bundle allows no lower CPU precision" in caplog.records[-1].getMessage()
    allow_precision(bundle, "bf16", {"score_rank_correlation": 0.9996, "delta_points": -0.1, "dataset": "line3"})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edgead.detector"), Detector(bundle, threads=1) as det:
        expected = "bf16" if ovb.bf16_supported(ov.Core()) else "fp32"
        assert det.precision == expected
    assert ("allowed by the bundle (score_rank_correlation 0.9996" in caplog.records[-1].getMessage()) == (expected == "bf16")
    assert load_bundle(bundle).manifest.cpu_precisions["bf16"]["dataset"] == "line3"


def test_refusals(bundle: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="OpenVINO device"):
        ovb.OpenVINOBackend(load_bundle(bundle), "merged", device="npu")
    with pytest.raises(ConfigError, match="merged_int8"):
        Detector(bundle, backend="openvino", precision="int8")  # the bundle has no INT8 variant
    with pytest.raises(ConfigError, match="bf16 needs OpenVINO"):
        Detector(bundle, backend="onnxruntime", precision="bf16")
    with pytest.raises(ConfigError, match="precision to allow"):
        allow_precision(bundle, "fp8", {})
    with pytest.raises(BundleError, match="cpu_precisions"):
        import json

        m = json.loads((bundle / "manifest.json").read_text())
        m["cpu_precisions"] = {"fp4": {}}
        (bundle / "manifest.json").write_text(json.dumps(m))
        load_bundle(bundle)


def test_missing_openvino_names_the_extra(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingDependencyError, match=r"edgead\[openvino\]"):
        Detector(bundle, backend="openvino")
    with pytest.raises(MissingDependencyError, match=r"edgead\[openvino\]"):
        Detector(bundle, precision="bf16")  # bf16 is never swapped for fp32 silently
