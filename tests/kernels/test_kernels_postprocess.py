"""kernels/postprocess (host build and CUDA build) against the NumPy reference in edgead.postprocess.

One parameter list drives both builds; CUDA cases carry the `gpu` marker and skip cleanly without a GPU.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import numpy as np
import pytest
from kernel_requirements import require_module, required

from edgead import kernels
from edgead.errors import BackendError, ConfigError, InputError
from edgead.postprocess import EfficientADPost, QuantileAffine, efficientad_maps, efficientad_postprocess, resize_bilinear

BUILDS = ["host", pytest.param("cuda", marks=pytest.mark.gpu)]
# (n, c, h, w): batch 1 and 16, the real channel count, odd and degenerate sizes
SHAPES = [(1, 384, 7, 9), (16, 24, 5, 3), (3, 5, 1, 1), (2, 384, 13, 11), (1, 3, 33, 1)]
TOL = {np.float32: 1e-5, np.float16: 4e-3}


def _outputs(shape: tuple[int, int, int, int], dtype: Any, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, c, h, w = shape
    rng = np.random.default_rng(seed)
    t = rng.normal(0.3, 1.0, (n, c, h, w)).astype(np.float32)
    s = rng.normal(-0.2, 1.0, (n, 2 * c, h, w)).astype(np.float32)
    a = rng.normal(0.1, 0.8, (n, c, h, w)).astype(np.float32)
    return t.astype(dtype), s.astype(dtype), a.astype(dtype)


def _post_for(t: np.ndarray, s: np.ndarray, a: np.ndarray, pad: int) -> EfficientADPost:
    local, glob = efficientad_maps(t, s, a)
    st = QuantileAffine(float(np.quantile(local, 0.9)) * 0.5, float(np.quantile(local, 0.995)) * 1.5 + 1e-3)
    ae = QuantileAffine(float(np.quantile(glob, 0.9)) * 0.5, float(np.quantile(glob, 0.995)) * 1.5 + 1e-3)
    return EfficientADPost(st, ae, pad=pad)


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _run(build: str, t: np.ndarray, s: np.ndarray, a: np.ndarray, post: EfficientADPost, out_size: tuple[int, int] | None,
         request: pytest.FixtureRequest) -> tuple[np.ndarray, ...]:
    if build == "host":
        return kernels.host_postprocess(t, s, a, post, out_size, library=request.getfixturevalue("host_library"))
    lib = request.getfixturevalue("cuda_library")
    cp = require_module("cupy")
    n, c, h, w = t.shape
    p = post.pad
    stream = cp.cuda.Stream(non_blocking=True)  # a real, non-default stream
    with stream:
        dt, ds, da = (cp.asarray(x) for x in (t, s, a))
        dm = cp.full((n, h + 2 * p, w + 2 * p), np.nan, cp.float32)  # poison: every element must be written
        dsc = cp.full((n,), np.nan, cp.float32)
        kernels.device_postprocess(dt.data.ptr, ds.data.ptr, da.data.ptr, dtype="fp16" if t.dtype == np.float16 else "fp32", shape=t.shape,
                                   post=post, map_out=dm.data.ptr, score_out=dsc.data.ptr, stream=stream.ptr, library=lib)
        out = [dm, dsc]
        if out_size is not None:
            dr = cp.full((n, *out_size), np.nan, cp.float32)
            kernels.device_resize(dm.data.ptr, dm.shape, dr.data.ptr, out_size, stream=stream.ptr, library=lib)
            out.append(dr)
    stream.synchronize()
    return tuple(cp.asnumpy(x) for x in out)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("pad", [0, 4])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(build: str, dtype: Any, pad: int, shape: tuple[int, int, int, int], request: pytest.FixtureRequest) -> None:
    t32, s32, a32 = _outputs(shape, np.float32, seed=sum(shape) + pad)
    post = _post_for(t32, s32, a32, pad)
    t, s, a = (x.astype(dtype) for x in (t32, s32, a32))
    out_size = (shape[2] * 3 + 1, shape[3] * 2 + 3)
    maps, scores, resized = _run(build, t, s, a, post, out_size, request)

    ref_maps, ref_scores = efficientad_postprocess(t32, s32, a32, post)  # fp32 originals: the fp16 tolerance covers input rounding
    exact_maps, exact_scores = efficientad_postprocess(t, s, a, post)  # the very same (fp16) values: fp32-accumulation tolerance
    assert maps.shape == ref_maps.shape and maps.dtype == np.float32 and scores.shape == (shape[0],)
    assert np.abs(ref_maps).max() > 0.01  # non-trivial maps
    assert _rel(maps, ref_maps) <= TOL[dtype]
    assert _rel(maps, exact_maps) <= 1e-5
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-5 * float(np.abs(exact_maps).max()))
    if pad:  # edge padding, bit-exact copies of the nearest computed pixel
        inner = maps[:, pad:-pad, pad:-pad]
        assert np.array_equal(maps, np.pad(inner, ((0, 0), (pad, pad), (pad, pad)), mode="edge"))
    ref_resized = resize_bilinear(exact_maps, *out_size)
    assert _rel(resized, ref_resized) <= 1e-5
    assert _rel(scores, ref_scores) <= TOL[dtype]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("pad", [0, 2])
def test_negative_maps_score(build: str, pad: int, request: pytest.FixtureRequest) -> None:
    """A map below the quantile qa is negative everywhere: the max must handle negative floats (edge padding adds no 0)."""
    t, s, a = _outputs((2, 8, 6, 5), np.float32, seed=3)
    post = EfficientADPost(QuantileAffine(100.0, 200.0), QuantileAffine(50.0, 60.0), pad=pad)
    maps, scores = _run(build, t, s, a, post, None, request)
    ref_maps, ref_scores = efficientad_postprocess(t, s, a, post)
    assert np.all(ref_maps[:, pad : pad + 6, pad : pad + 5] < 0)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
    assert (scores < 0).all()
    assert _rel(maps, ref_maps) <= 1e-5


@pytest.mark.parametrize("build", BUILDS)
def test_nan_input_gives_nan_score(build: str, request: pytest.FixtureRequest) -> None:
    t, s, a = _outputs((2, 4, 3, 3), np.float32, seed=5)
    t[1, 2, 1, 1] = np.nan
    post = EfficientADPost(QuantileAffine(0.0, 1.0), QuantileAffine(0.0, 1.0), pad=1)
    _, scores = _run(build, t, s, a, post, None, request)
    _, ref_scores = efficientad_postprocess(t, s, a, post)
    assert np.isfinite(scores[0]) and np.isnan(scores[1]) and np.isnan(ref_scores[1])


@pytest.mark.parametrize("shape,out", [((1, 1, 1), (5, 7)), ((2, 9, 4), (3, 17)), ((3, 64, 64), (256, 256)), ((1, 64, 64), (21, 13)), ((1, 5, 5), (1, 1))])
def test_resize_host_matches_reference(host_library: kernels.PostprocessLibrary, shape: tuple[int, int, int], out: tuple[int, int]) -> None:
    maps = np.random.default_rng(1).normal(0.0, 1.0, shape).astype(np.float32)
    got = np.empty((shape[0], *out), np.float32)
    host_library.resize(int(maps.ctypes.data), *shape, int(got.ctypes.data), *out)
    assert _rel(got, resize_bilinear(maps, *out)) <= 1e-5


def test_fp16_special_values_convert_exactly(host_library: kernels.PostprocessLibrary) -> None:
    """Subnormal and tiny fp16 inputs go through the hand-written half->float conversion."""
    rng = np.random.default_rng(7)
    vals = np.array([6e-8, -6e-8, 3e-5, -2e-5, 6.1e-5, -1e-4, 2e-4], np.float16)
    assert np.count_nonzero(np.abs(vals) < 6.1e-5) >= 4  # mostly fp16 subnormals
    t = rng.choice(vals, (1, 6, 4, 4)).astype(np.float16)
    s = rng.choice(vals, (1, 12, 4, 4)).astype(np.float16)
    a = rng.choice(vals, (1, 6, 4, 4)).astype(np.float16)
    post = _post_for(t, s, a, 0)
    maps, scores = kernels.host_postprocess(t, s, a, post, library=host_library)
    ref_maps, ref_scores = efficientad_postprocess(t, s, a, post)
    assert _rel(maps, ref_maps) <= 1e-5 and _rel(scores, ref_scores) <= 1e-5


# ---------------------------------------------------------------- error paths (Python validation)

def _good() -> tuple[np.ndarray, np.ndarray, np.ndarray, EfficientADPost]:
    t, s, a = _outputs((1, 4, 3, 3), np.float32)
    return t, s, a, EfficientADPost(QuantileAffine(0.0, 1.0), QuantileAffine(0.0, 1.0), pad=1)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda t, s, a: (t.astype(np.float64), s, a), "teacher dtype"),
        (lambda t, s, a: (t, s.astype(np.int32), a), "student dtype"),
        (lambda t, s, a: (t, s, a.astype(np.float16)), "output dtypes"),
        (lambda t, s, a: (t[0], s, a), "teacher shape"),
        (lambda t, s, a: (t, s[:, :4], a), "network output shapes"),
        (lambda t, s, a: (t, s, np.ascontiguousarray(a[:, :, :2])), "network output shapes"),
        (lambda t, s, a: (t[:0], s[:0], a[:0]), "batch >= 1"),
        (lambda t, s, a: (np.asfortranarray(t), s, a), "teacher layout"),
        (lambda t, s, a: (t, s[:, :, :, ::-1], a), "student layout"),
        (lambda t, s, a: (t.tolist(), s, a), "a numpy array"),
    ],
)
def test_input_errors(host_library: kernels.PostprocessLibrary, mutate: Any, match: str) -> None:
    t, s, a, post = _good()
    t, s, a = mutate(t, s, a)
    with pytest.raises(InputError, match=match):
        kernels.host_postprocess(t, s, a, post, library=host_library)
    with pytest.raises(InputError, match=match):
        kernels.postprocess(t, s, a, post, prefer="host")


@pytest.mark.parametrize("out_size", [(0, 5), (5, -1), (5,), "64x64", (5.0, 5), (True, 4)])
def test_bad_out_size(host_library: kernels.PostprocessLibrary, out_size: Any) -> None:
    t, s, a, post = _good()
    with pytest.raises(InputError, match="out_size"):
        kernels.host_postprocess(t, s, a, post, out_size, library=host_library)


def test_bad_post_and_prefer(host_library: kernels.PostprocessLibrary) -> None:
    t, s, a, post = _good()
    with pytest.raises(ConfigError, match="EfficientADPost"):
        kernels.host_postprocess(t, s, a, {"pad": 4}, library=host_library)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="did you mean|prefer"):
        kernels.postprocess(t, s, a, post, prefer="gpu")
    bad = EfficientADPost(QuantileAffine(0.0, 1.0), QuantileAffine(0.0, 1.0), pad=0)
    object.__setattr__(bad, "pad", -1)  # bypass the dataclass check to reach the kernel-side validation
    with pytest.raises(ConfigError, match="pad"):
        kernels.host_postprocess(t, s, a, bad, library=host_library)
    with pytest.raises(ConfigError, match="kind"):
        kernels.find_library("tpu")


def test_device_entry_validation_without_gpu(host_library: kernels.PostprocessLibrary) -> None:
    _, _, _, post = _good()
    ok = {"dtype": "fp32", "shape": (1, 4, 3, 3), "post": post, "map_out": 1000, "score_out": 2000}
    with pytest.raises(InputError, match="teacher pointer.*NULL"):
        kernels.device_postprocess(0, 8, 16, **ok)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="score_out pointer"):
        kernels.device_postprocess(8, 8, 16, **{**ok, "score_out": None})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="dtype"):
        kernels.device_postprocess(8, 8, 16, **{**ok, "dtype": "int8"})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="dtype"):
        kernels.device_postprocess(8, 8, 16, **{**ok, "dtype": True})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="shape"):
        kernels.device_postprocess(8, 8, 16, **{**ok, "shape": (1, 4, 3)})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="batch >= 1"):
        kernels.device_postprocess(8, 8, 16, **{**ok, "shape": (0, 4, 3, 3)})  # type: ignore[arg-type]
    with pytest.raises(InputError, match="out pointer"):
        kernels.device_resize(8, (1, 5, 5), 0, (9, 9))
    with pytest.raises(InputError, match="maps shape"):
        kernels.device_resize(8, (1, 0, 5), 16, (9, 9))
    with pytest.raises(InputError, match="out_size"):
        kernels.device_resize(8, (1, 5, 5), 16, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="CUDA library"):  # device pointers never reach the host twin
        kernels.device_postprocess(8, 8, 16, **ok, library=host_library)  # type: ignore[arg-type]


# ---------------------------------------------------------------- error paths (C ABI)

def test_c_abi_error_codes(host_library: kernels.PostprocessLibrary) -> None:
    lib = host_library.lib
    t, s, a, _ = _good()
    m = np.empty((1, 5, 5), np.float32)
    sc = np.empty((1,), np.float32)
    p = [int(x.ctypes.data) for x in (t, s, a, m, sc)]

    def call(**kw: Any) -> int:
        args = {"t": p[0], "s": p[1], "a": p[2], "dtype": 0, "n": 1, "c": 4, "h": 3, "w": 3, "qa_st": 0.0, "qb_st": 1.0, "qa_ae": 0.0, "qb_ae": 1.0,
                "pad": 1, "map": p[3], "score": p[4]}
        args.update(kw)
        return int(lib.edgead_pp_efficientad_host(*args.values()))

    assert call() == 0 and lib.edgead_pp_last_error() == b""
    cases = {1: [{"t": None}, {"s": None}, {"a": None}, {"map": None}, {"score": None}], 2: [{"n": 0}, {"c": -1}, {"h": 0}, {"w": 0}, {"pad": -1}],
             3: [{"dtype": 2}, {"dtype": -1}], 4: [{"qb_st": 0.0}, {"qa_ae": float("nan")}, {"qb_ae": float("inf")}]}
    for code, variants in cases.items():
        for kw in variants:
            assert call(**kw) == code, kw
            assert lib.edgead_pp_last_error(), kw
            assert lib.edgead_pp_error_string(code) != b"unknown error code"
    r = np.empty((1, 4, 4), np.float32)
    assert lib.edgead_pp_resize_bilinear_host(None, 1, 5, 5, int(r.ctypes.data), 4, 4) == 1
    assert lib.edgead_pp_resize_bilinear_host(p[3], 1, 5, 5, int(r.ctypes.data), 0, 4) == 2
    assert lib.edgead_pp_is_cuda() == 0 and lib.edgead_pp_version() == kernels.ABI_VERSION
    with pytest.raises(InputError, match=r"error 3 \(unsupported dtype\)"):
        host_library.efficientad(p[0], p[1], p[2], 5, (1, 4, 3, 3), _good()[3], p[3], p[4])
    with pytest.raises(InputError, match="error 1"):
        host_library.resize(0, 1, 5, 5, int(r.ctypes.data), 4, 4)


# ---------------------------------------------------------------- missing library and fallbacks

def test_missing_library_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kernels, "find_library", lambda kind="host": None)
    monkeypatch.setattr(kernels, "_FALLBACK_WARNED", set())
    with pytest.raises(BackendError, match="make kernels"):
        kernels.load_library("host")
    t, s, a, post = _good()
    ref = efficientad_postprocess(t, s, a, post)
    with caplog.at_level(logging.WARNING, logger="edgead.kernels"):
        first = kernels.postprocess(t, s, a, post, out_size=(7, 7), prefer="host")
        second = kernels.postprocess(t, s, a, post, prefer="cuda")
    np.testing.assert_array_equal(first[0], ref[0])
    np.testing.assert_array_equal(second[1], ref[1])
    assert first[2].shape == (1, 7, 7)
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("host post-processing unavailable" in w for w in warnings) == 1
    assert sum("cuda post-processing unavailable" in w for w in warnings) == 1
    with caplog.at_level(logging.WARNING, logger="edgead.kernels"):
        caplog.clear()
        kernels.postprocess(t, s, a, post, prefer="host")
    assert not caplog.records  # one-time


def test_unloadable_library(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / kernels.LIBRARY_NAMES["host"]
    bad.write_bytes(b"not an ELF file")
    monkeypatch.setenv("EDGEAD_KERNELS_DIR", str(tmp_path))
    with pytest.raises(BackendError, match="failed to load"):
        kernels.load_library("host")


def test_postprocess_prefers_host_library(host_library: kernels.PostprocessLibrary, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = kernels.host_postprocess
    monkeypatch.setattr(kernels, "host_postprocess", lambda *a, **k: calls.append("host") or real(*a, **k))
    t, s, a, post = _good()
    maps, scores = kernels.postprocess(t, s, a, post, prefer="host")
    assert calls == ["host"]
    assert _rel(maps, efficientad_postprocess(t, s, a, post)[0]) <= 1e-5


# ---------------------------------------------------------------- CUDA-only checks

@pytest.mark.gpu
def test_cuda_library_reports_bad_arguments(cuda_library: kernels.PostprocessLibrary) -> None:
    assert cuda_library.lib.edgead_pp_is_cuda() == 1
    lib = cuda_library.lib
    assert lib.edgead_pp_efficientad(None, 8, 8, 0, 1, 4, 3, 3, 0.0, 1.0, 0.0, 1.0, 0, 8, 8, None) == 1
    assert lib.edgead_pp_efficientad(8, 8, 8, 9, 1, 4, 3, 3, 0.0, 1.0, 0.0, 1.0, 0, 8, 8, None) == 3
    assert lib.edgead_pp_efficientad(8, 8, 8, 0, 1, 4, 3, 3, 0.0, 1.0, 0.0, 1.0, -2, 8, 8, None) == 2
    assert lib.edgead_pp_resize_bilinear(8, 1, 3, 3, 8, 0, 3, None) == 2
    lib.edgead_pp_efficientad(8, 8, 8, 0, 1, 4, 3, 3, 0.0, 1.0, 0.0, 1.0, -2, 8, 8, None)
    assert b"pad=-2" in lib.edgead_pp_last_error()


@pytest.mark.gpu
def test_postprocess_cuda_path_from_host_arrays(cuda_library: kernels.PostprocessLibrary, caplog: pytest.LogCaptureFixture) -> None:
    t, s, a = _outputs((2, 384, 9, 7), np.float16, seed=11)
    post = _post_for(t, s, a, 4)
    with caplog.at_level(logging.WARNING, logger="edgead.kernels"):
        maps, scores, big = kernels.postprocess(t, s, a, post, out_size=(31, 29), prefer="cuda")
    assert not [r for r in caplog.records if "unavailable" in r.getMessage()]
    ref_maps, ref_scores = efficientad_postprocess(t, s, a, post)
    assert _rel(maps, ref_maps) <= 1e-5 and _rel(scores, ref_scores) <= 1e-5
    assert _rel(big, resize_bilinear(ref_maps, 31, 29)) <= 1e-5


def test_ctypes_signatures_are_declared(host_library: kernels.PostprocessLibrary) -> None:
    """Quantiles go through c_double (an undeclared signature would pass garbage, not fail)."""
    fn = host_library.lib.edgead_pp_efficientad_host
    assert all(fn.argtypes[i] is ctypes.c_double for i in range(8, 12)) and fn.restype is ctypes.c_int and len(fn.argtypes) == 15


def test_quantiles_closer_than_float_resolution_are_accepted(host_library: kernels.PostprocessLibrary) -> None:
    """qa=1000, qb=1000.00003: equal in float32, distinct in the double the Python side holds; the kernel must
    take them as the NumPy reference does (it refused them when they crossed as floats)."""
    t, s, a = _outputs((1, 4, 3, 3), np.float32, seed=9)
    t += 1000.0
    post = EfficientADPost(QuantileAffine(1000.0, 1000.00003), QuantileAffine(0.0, 1.0), pad=1)
    assert np.float32(post.st.qa) == np.float32(post.st.qb)
    maps, scores = kernels.host_postprocess(t, s, a, post, library=host_library)
    ref_maps, ref_scores = efficientad_postprocess(t, s, a, post)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-3)


def test_the_cuda_library_is_built_wherever_nvcc_is() -> None:
    """CI has nvcc: `make kernels` must have produced an up-to-date CUDA library, or the kernels silently stopped compiling."""
    import shutil
    from pathlib import Path

    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)
    if nvcc is None:
        if required():
            pytest.fail("nvcc not found under CI: the CUDA kernels must compile and link there")
        pytest.skip("no nvcc on this machine")
    found = kernels.find_library("cuda")
    assert found is not None, "nvcc is installed but libedgead_pp_cuda.so was not built: run `make kernels` and read its output"
    sources = Path(__file__).resolve().parents[2] / "kernels" / "postprocess"
    newest = max(p.stat().st_mtime for p in sources.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
    assert found.stat().st_mtime >= newest, f"{found} is older than its sources: the last `make kernels` did not rebuild it"


def test_the_real_cuda_library_refuses_to_load_where_it_cannot_run() -> None:
    """On a machine without a usable GPU (CI) the CUDA build is found but its probe fails at load, naming the
    CUDA error, so the TensorRT backend falls back at construction instead of failing at the first inference."""
    from edgead.backends import cuda

    if kernels.find_library("cuda") is None:
        if required():
            pytest.fail("libedgead_pp_cuda.so not built under CI")
        pytest.skip("CUDA library not built")
    try:
        usable = cuda.gpu_available()
    except Exception:  # noqa: BLE001 - no cuda-python: no GPU either
        usable = False
    if usable:
        pytest.skip("a GPU is present: the probe passes there (gpu tests)")
    with pytest.raises(BackendError, match="cannot run on GPU 0: cudaGetDeviceCount"):
        kernels.load_library("cuda")
