"""Property-based tests of the two boundaries a user or a file controls: frames and manifests.

Whatever is thrown at them, the runtime either works or raises an ``EdgeADError`` naming the problem (never a
bare TypeError/ValueError/RecursionError), and never decides ``OK`` on a non-finite score.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_bundle as tb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgead import Detector
from edgead.bundle import MANIFEST, Manifest, load_bundle
from edgead.errors import BundleError, EdgeADError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def det(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    return Detector(tb.make_bundle(tmp_path_factory.mktemp("p") / "bundle"), backend="onnxruntime", threads=1)


_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int8, np.int16, np.int32, np.float16, np.float32, np.float64, np.bool_, np.dtype(">u2"), np.complex64])
_SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=40)


@st.composite
def frames(draw: st.DrawFn) -> np.ndarray:
    arr = draw(hnp.arrays(draw(_DTYPES), draw(_SHAPES), elements=None, fill=None))
    if draw(st.booleans()) and arr.ndim >= 2 and arr.shape[1] > 1:
        arr = arr[:, ::2]  # a non-contiguous view
    return arr


@SETTINGS
@given(frame=frames(), color=st.sampled_from(["bgr", "rgb", "gray", "bgra", "rgba", "BGR", "yuv"]))
def test_any_frame_is_scored_or_refused_clearly(det: Detector, frame: np.ndarray, color: str) -> None:
    try:
        r = det.infer(frame, color=color)
    except EdgeADError as exc:
        assert "how to fix" in str(exc)
        return
    assert r.anomaly_map.shape == frame.shape[:2] and r.anomaly_map.dtype == np.float32
    assert r.decision == ("NG" if not (np.isfinite(r.score) and r.score <= det.threshold) else "OK")


@SETTINGS
@given(score_map=hnp.arrays(np.float32, (12, 12), elements=st.one_of(st.floats(-10, 10, width=32), st.just(np.nan), st.just(np.inf), st.just(-np.inf))))
def test_a_non_finite_output_is_never_ok(det: Detector, score_map: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> None:
    m = score_map[None, None]
    outputs = {"anomaly_map": m, "score": m.reshape(1, -1).max(1)}
    monkeypatch.setattr(det._backend, "_run", lambda batch: outputs)
    r = det.infer(np.zeros((tb.IMAGE_SIZE, tb.IMAGE_SIZE, 3), np.uint8), map_size="model")
    if not np.all(np.isfinite(score_map)):
        assert r.decision == "NG" and not r.finite


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def manifests(draw: st.DrawFn) -> object:
    """A valid manifest with one random field replaced (or deleted), or random JSON altogether."""
    if draw(st.integers(0, 4)) == 0:
        return draw(_JSON)
    d = tb.manifest().to_dict()
    d["files"] = {}
    node: dict = d
    path = draw(st.lists(st.sampled_from(["input", "postprocess", "threshold", "producer", "variants", "merged"]), max_size=2))
    for key in path:
        if isinstance(node.get(key), dict):
            node = node[key]
    keys = sorted(node) or ["x"]
    key = draw(st.sampled_from(keys + ["unexpected"]))
    if draw(st.booleans()):
        node.pop(key, None)
    else:
        node[key] = draw(_JSON)
    return d


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=manifests())
def test_any_manifest_loads_or_is_a_bundle_error(tmp_path_factory: pytest.TempPathFactory, data: object) -> None:
    try:
        Manifest.from_dict(data)
    except BundleError as exc:
        assert "how to fix" in str(exc)
    root = tmp_path_factory.mktemp("m")
    (root / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(BundleError):  # files are missing at the least: never anything but a BundleError
        load_bundle(root)


def test_hypothesis_strategies_reach_both_outcomes(tmp_path: Path) -> None:
    """The manifest strategy is not vacuous: the unmodified example loads, a random one is refused."""
    assert Manifest.from_dict(tb.manifest().to_dict()) == tb.manifest()
    with pytest.raises(BundleError):
        Manifest.from_dict({"schema_version": 1})
