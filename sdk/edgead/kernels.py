"""Fused EfficientAD post-processing in our own kernels (kernels/postprocess), loaded through ctypes.

Two libraries share one C ABI (kernels/postprocess/edgead_pp.h):

- ``libedgead_pp_host.so``: the host twin (plain C++), used by CPU tests and as a CPU path;
- ``libedgead_pp_cuda.so``: the CUDA kernels (device pointers, asynchronous on a stream) plus the host twin.

Both implement exactly :func:`edgead.postprocess.efficientad_postprocess` and
:func:`edgead.postprocess.resize_bilinear` (the NumPy reference). The libraries are searched in
``$EDGEAD_KERNELS_DIR``, then the repository's ``build/lib`` (``make kernels``), then this package's folder.

>>> import numpy as np
>>> from edgead.postprocess import EfficientADPost, QuantileAffine
>>> post = EfficientADPost(QuantileAffine(0.0, 1.0), QuantileAffine(0.0, 1.0), pad=1)
>>> t, s, a = (np.ones((1, 2, 3, 3), np.float32) * k for k in (1.0, 0.0, 2.0))
>>> s = np.concatenate([s[:, :2], s[:, :2]], axis=1)
>>> maps, scores = postprocess(t, s, a, post, prefer="numpy")
>>> maps.shape, float(scores[0])
((1, 5, 5), 0.25)
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendError, ConfigError, InputError, message
from .postprocess import EfficientADPost, efficientad_postprocess, resize_bilinear

__all__ = [
    "DTYPE_FP32",
    "DTYPE_FP16",
    "NP_DTYPES",
    "LIBRARY_NAMES",
    "PostprocessLibrary",
    "find_library",
    "load_library",
    "host_postprocess",
    "device_postprocess",
    "device_resize",
    "postprocess",
]

log = logging.getLogger(__name__)

DTYPE_FP32 = 0  # same codes as TensorRT's DataType.FLOAT / DataType.HALF
DTYPE_FP16 = 1
ABI_VERSION = 3
LIBRARY_NAMES = {"host": "libedgead_pp_host.so", "cuda": "libedgead_pp_cuda.so"}
_KINDS = tuple(LIBRARY_NAMES)
NP_DTYPES: dict[np.dtype, int] = {np.dtype(np.float32): DTYPE_FP32, np.dtype(np.float16): DTYPE_FP16}
_FALLBACK_WARNED: set[str] = set()

_c_void_p = ctypes.c_void_p
_c_int = ctypes.c_int
_c_double = ctypes.c_double  # quantiles cross as doubles: qb - qa may be below float32 resolution of qa
_PP_ARGS: list[Any] = [_c_void_p, _c_void_p, _c_void_p, _c_int, _c_int, _c_int, _c_int, _c_int, _c_double, _c_double, _c_double, _c_double, _c_int, _c_void_p, _c_void_p]
_RESIZE_ARGS: list[Any] = [_c_void_p, _c_int, _c_int, _c_int, _c_void_p, _c_int, _c_int]


def _search_dirs() -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("EDGEAD_KERNELS_DIR")
    if env:
        dirs.append(Path(env))
    repo = Path(__file__).resolve().parents[2]
    dirs += [repo / "build" / "lib", repo / "build", Path(__file__).resolve().parent]
    return dirs


def find_library(kind: str = "host") -> Path | None:
    """Path of the ``kind`` ("host" or "cuda") library, or None when it was not built.

    >>> find_library("host") is None or find_library("host").name == "libedgead_pp_host.so"
    True
    """
    if kind not in LIBRARY_NAMES:
        raise ConfigError(message("kernel library kind", repr(kind), f"one of {', '.join(_KINDS)}", "pass kind='host' or kind='cuda'"))
    for d in _search_dirs():
        p = d / LIBRARY_NAMES[kind]
        if p.is_file():
            return p
    return None


@dataclass
class PostprocessLibrary:
    """A loaded kernel library; the methods take raw pointers (ints) and raise BackendError on failure."""

    kind: str
    path: Path
    lib: ctypes.CDLL

    def _check(self, rc: int, what: str) -> None:
        if rc == 0:
            return
        detail = self.lib.edgead_pp_last_error().decode(errors="replace")
        kind = self.lib.edgead_pp_error_string(rc).decode(errors="replace")
        if rc == 5:
            raise BackendError(message(what, f"error {rc} ({kind}): {detail}", "a working CUDA device and driver", "check nvidia-smi and the driver version"))
        raise InputError(message(what, f"error {rc} ({kind}): {detail}", "valid pointers, shapes, dtype and quantiles", "fix the argument named above"))

    def efficientad(self, t: int, s: int, a: int, dtype: int, shape: tuple[int, int, int, int], post: EfficientADPost, map_out: int, score_out: int,
                    stream: int | None = None) -> None:
        """Fused maps + scores. ``stream is None``: host pointers, host twin; else device pointers on that stream (CUDA build)."""
        n, c, h, w = shape
        q = (post.st.qa, post.st.qb, post.ae.qa, post.ae.qb)
        if stream is None:
            rc = self.lib.edgead_pp_efficientad_host(t, s, a, dtype, n, c, h, w, *q, post.pad, map_out, score_out)
        else:
            self._require_cuda()
            rc = self.lib.edgead_pp_efficientad(t, s, a, dtype, n, c, h, w, *q, post.pad, map_out, score_out, stream or None)
        self._check(rc, f"{self.kind} post-processing kernel")

    def resize(self, maps: int, n: int, h: int, w: int, out: int, out_h: int, out_w: int, stream: int | None = None) -> None:
        """Bilinear resize of (n,h,w) float32 maps to (n,out_h,out_w); host pointers when ``stream is None``."""
        if stream is None:
            rc = self.lib.edgead_pp_resize_bilinear_host(maps, n, h, w, out, out_h, out_w)
        else:
            self._require_cuda()
            rc = self.lib.edgead_pp_resize_bilinear(maps, n, h, w, out, out_h, out_w, stream or None)
        self._check(rc, f"{self.kind} resize kernel")

    def probe(self, device: int = 0) -> None:
        """CUDA build: BackendError unless the kernels can run on ``device`` (see ``edgead_pp_cuda_probe``)."""
        self._require_cuda()
        rc = self.lib.edgead_pp_cuda_probe(int(device))
        if rc != 0:
            detail = self.lib.edgead_pp_last_error().decode(errors="replace")
            raise BackendError(
                message(f"CUDA post-processing library {self.path}", f"cannot run on GPU {device}: {detail}", "a CUDA driver and GPU this build supports",
                        "update the NVIDIA driver, or rebuild the kernels for this GPU (EDGEAD_CUDA_ARCHS in CMakeLists.txt)")
            )

    def build_info(self) -> dict[str, Any]:
        """CUDA build: compiled SM architectures and the CUDA runtime it links (for ``edgead doctor``)."""
        self._require_cuda()
        archs = self.lib.edgead_pp_cuda_archs().decode()
        v = int(self.lib.edgead_pp_cuda_runtime_version())
        return {"archs": [a for a in archs.split(",") if a], "cuda_runtime": f"{v // 1000}.{v % 1000 // 10}"}

    def _require_cuda(self) -> None:
        if self.kind != "cuda":
            raise ConfigError(message("kernel library", f"the {self.kind} library", "the CUDA library for device pointers", "load_library('cuda')"))


def load_library(kind: str = "host", device: int = 0) -> PostprocessLibrary:
    """Load ``libedgead_pp_{kind}.so``; raises BackendError (saying how to build it) when it is missing.

    The CUDA build is probed on ``device`` at load: a driver too old for its statically linked CUDA runtime or a
    GPU architecture it was not compiled for is a BackendError here (so callers fall back), not at the first run.

    >>> lib = load_library("host")  # doctest: +SKIP
    >>> lib.kind
    'host'
    """
    path = find_library(kind)
    if path is None:
        where = ", ".join(str(d) for d in _search_dirs())
        raise BackendError(
            message(f"{kind} post-processing library", f"no {LIBRARY_NAMES[kind]} in {where}", "a built kernel library", "run `make kernels` (or set EDGEAD_KERNELS_DIR)")
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise BackendError(message(f"{kind} post-processing library", f"{path} failed to load ({exc})", "a loadable shared library", "rebuild with `make kernels`")) from exc
    lib.edgead_pp_version.restype = _c_int
    lib.edgead_pp_is_cuda.restype = _c_int
    lib.edgead_pp_error_string.restype = ctypes.c_char_p
    lib.edgead_pp_error_string.argtypes = [_c_int]
    lib.edgead_pp_last_error.restype = ctypes.c_char_p
    lib.edgead_pp_efficientad_host.argtypes = _PP_ARGS
    lib.edgead_pp_efficientad_host.restype = _c_int
    lib.edgead_pp_resize_bilinear_host.argtypes = _RESIZE_ARGS
    lib.edgead_pp_resize_bilinear_host.restype = _c_int
    if kind == "cuda":
        lib.edgead_pp_efficientad.argtypes = [*_PP_ARGS, _c_void_p]
        lib.edgead_pp_efficientad.restype = _c_int
        lib.edgead_pp_resize_bilinear.argtypes = [*_RESIZE_ARGS, _c_void_p]
        lib.edgead_pp_resize_bilinear.restype = _c_int
        lib.edgead_pp_cuda_probe.argtypes = [_c_int]
        lib.edgead_pp_cuda_probe.restype = _c_int
        lib.edgead_pp_cuda_archs.restype = ctypes.c_char_p
        lib.edgead_pp_cuda_runtime_version.restype = _c_int
    version = lib.edgead_pp_version()
    if version != ABI_VERSION or lib.edgead_pp_is_cuda() != (kind == "cuda"):
        raise BackendError(
            message(f"{kind} post-processing library {path}", f"ABI {version}, cuda={lib.edgead_pp_is_cuda()}", f"ABI {ABI_VERSION} of the {kind} build", "rebuild with `make kernels`")
        )
    loaded = PostprocessLibrary(kind, path, lib)
    if kind == "cuda":
        loaded.probe(device)  # fail here (and fall back) rather than at the first inference
    return loaded


def _check_arrays(teacher: Any, student: Any, ae: Any) -> tuple[int, tuple[int, int, int, int]]:
    arrays = {"teacher": teacher, "student": student, "ae": ae}
    for name, arr in arrays.items():
        if not isinstance(arr, np.ndarray):
            raise InputError(message(name, type(arr).__name__, "a numpy array", "pass numpy arrays (device buffers go through device_postprocess)"))
        if arr.dtype not in NP_DTYPES:
            raise InputError(message(f"{name} dtype", arr.dtype, "float32 or float16", f"convert with {name}.astype(np.float32)"))
        if arr.ndim != 4:
            raise InputError(message(f"{name} shape", arr.shape, "NCHW (4 dimensions)", "pass the raw network output"))
        if not arr.flags.c_contiguous:
            raise InputError(message(f"{name} layout", "a non-contiguous view", "a C-contiguous NCHW array", f"pass np.ascontiguousarray({name})"))
    if len({teacher.dtype, student.dtype, ae.dtype}) != 1:
        raise InputError(message("output dtypes", (teacher.dtype, student.dtype, ae.dtype), "one dtype for teacher, student and ae", "cast all three alike"))
    return NP_DTYPES[teacher.dtype], _check_shape(teacher.shape, student.shape, ae.shape)


def _check_shape(t_shape: tuple[int, ...], s_shape: tuple[int, ...], a_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    if len(t_shape) != 4:
        raise InputError(message("teacher shape", t_shape, "NCHW (4 dimensions)", "pass the raw network output"))
    n, c, h, w = (int(v) for v in t_shape)
    if min(n, c, h, w) <= 0:
        raise InputError(message("teacher shape", t_shape, "every dimension >= 1 (batch >= 1)", "pass at least one image"))
    if tuple(s_shape) != (n, 2 * c, h, w) or tuple(a_shape) != (n, c, h, w):
        raise InputError(
            message("network output shapes", f"teacher {tuple(t_shape)}, student {tuple(s_shape)}, ae {tuple(a_shape)}", f"student {(n, 2 * c, h, w)}, ae {(n, c, h, w)}", "check the model export")
        )
    return n, c, h, w


def _check_post(post: Any) -> EfficientADPost:
    if not isinstance(post, EfficientADPost):
        raise ConfigError(message("post", type(post).__name__, "an EfficientADPost", "build it from the bundle manifest"))
    if not isinstance(post.pad, int) or post.pad < 0:
        raise ConfigError(message("pad", post.pad, "an integer >= 0", "use 4 for unpadded PDNs and 0 for padded ones"))
    return post


def _check_out_size(out_size: Any) -> tuple[int, int] | None:
    if out_size is None:
        return None
    ok = isinstance(out_size, tuple | list) and len(out_size) == 2 and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in out_size)
    if not ok or min(int(out_size[0]), int(out_size[1])) <= 0:
        raise InputError(message("out_size", out_size, "(height, width) with positive integers", "pass the frame's (height, width)"))
    return int(out_size[0]), int(out_size[1])


def _ptr(arr: np.ndarray) -> int:
    return int(arr.ctypes.data)


def host_postprocess(teacher: np.ndarray, student: np.ndarray, ae: np.ndarray, post: EfficientADPost, out_size: tuple[int, int] | None = None,
                     library: PostprocessLibrary | None = None) -> tuple[np.ndarray, ...]:
    """The host twin: ``(maps, scores)`` as the NumPy reference, plus the resized maps when ``out_size`` is given.

    >>> maps, scores, big = host_postprocess(t, s, a, post, out_size=(480, 640))  # doctest: +SKIP
    """
    dtype, (n, c, h, w) = _check_arrays(teacher, student, ae)
    post = _check_post(post)
    size = _check_out_size(out_size)
    lib = library or load_library("host")
    p = post.pad
    maps = np.empty((n, h + 2 * p, w + 2 * p), np.float32)
    scores = np.empty((n,), np.float32)
    lib.efficientad(_ptr(teacher), _ptr(student), _ptr(ae), dtype, (n, c, h, w), post, _ptr(maps), _ptr(scores))
    if size is None:
        return maps, scores
    resized = np.empty((n, size[0], size[1]), np.float32)
    lib.resize(_ptr(maps), n, maps.shape[1], maps.shape[2], _ptr(resized), size[0], size[1])
    return maps, scores, resized


def _check_pointer(name: str, ptr: Any) -> int:
    if isinstance(ptr, bool) or not isinstance(ptr, int | np.integer):
        raise InputError(message(f"{name} pointer", type(ptr).__name__, "an integer device address", f"pass e.g. cupy_array.data.ptr for {name}"))
    if int(ptr) == 0:
        raise InputError(message(f"{name} pointer", "NULL (0)", "a device allocation", f"allocate the {name} buffer before the call"))
    return int(ptr)


def device_postprocess(teacher: int, student: int, ae: int, *, dtype: int | str, shape: tuple[int, int, int, int], post: EfficientADPost, map_out: int,
                       score_out: int, stream: int = 0, library: PostprocessLibrary | None = None) -> None:
    """Run the fused CUDA kernels on device buffers (used by the TensorRT backend on its output bindings).

    ``teacher``/``student``/``ae`` are device addresses of NCHW buffers of ``shape`` (teacher's (N,C,h,w)),
    ``dtype`` is "fp32"/"fp16" (or 0/1); ``map_out`` holds N*(h+2p)*(w+2p) float32, ``score_out`` N float32.
    Asynchronous on ``stream`` (a cudaStream_t as int, 0 = default stream).

    >>> device_postprocess(t.data.ptr, s.data.ptr, a.data.ptr, dtype="fp16", shape=(1, 384, 56, 56), post=post,
    ...                    map_out=m.data.ptr, score_out=sc.data.ptr, stream=0)  # doctest: +SKIP
    """
    codes: dict[object, int] = {"fp32": DTYPE_FP32, "fp16": DTYPE_FP16, DTYPE_FP32: DTYPE_FP32, DTYPE_FP16: DTYPE_FP16}
    code = codes.get(dtype) if isinstance(dtype, str | int) and not isinstance(dtype, bool) else None
    if code is None:
        raise InputError(message("dtype", repr(dtype), "'fp32' or 'fp16'", "pass the dtype of the engine's output bindings"))
    if not isinstance(shape, tuple | list) or len(shape) != 4:
        raise InputError(message("shape", shape, "the teacher output shape (N, C, h, w)", "pass the binding shape"))
    n, c, h, w = (int(v) for v in shape)
    _check_shape((n, c, h, w), (n, 2 * c, h, w), (n, c, h, w))
    post = _check_post(post)
    ptrs = [_check_pointer(k, v) for k, v in (("teacher", teacher), ("student", student), ("ae", ae), ("map_out", map_out), ("score_out", score_out))]
    lib = library or load_library("cuda")
    lib.efficientad(ptrs[0], ptrs[1], ptrs[2], code, (n, c, h, w), post, ptrs[3], ptrs[4], stream=int(stream))


def device_resize(maps: int, shape: tuple[int, int, int], out: int, out_size: tuple[int, int], *, stream: int = 0, library: PostprocessLibrary | None = None) -> None:
    """Bilinear resize (half-pixel centres) of device float32 maps ``shape`` = (N,h,w) into ``out`` (N, *out_size).

    >>> device_resize(m.data.ptr, (1, 64, 64), big.data.ptr, (480, 640))  # doctest: +SKIP
    """
    if not isinstance(shape, tuple | list) or len(shape) != 3 or min(int(v) for v in shape) <= 0:
        raise InputError(message("maps shape", shape, "(N, h, w) with every size >= 1", "pass the padded map shape"))
    size = _check_out_size(out_size)
    if size is None:
        raise InputError(message("out_size", None, "(height, width) with positive integers", "pass the output size"))
    src = _check_pointer("maps", maps)
    dst = _check_pointer("out", out)
    lib = library or load_library("cuda")
    lib.resize(src, int(shape[0]), int(shape[1]), int(shape[2]), dst, size[0], size[1], stream=int(stream))


def _warn_once(key: str, text: str) -> None:
    if key not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(key)
        log.warning(text)


def _cuda_postprocess(teacher: np.ndarray, student: np.ndarray, ae: np.ndarray, post: EfficientADPost, size: tuple[int, int] | None) -> tuple[np.ndarray, ...]:
    """Copy to the device through cuda-python, run the CUDA kernels, copy back (convenience path)."""
    from .backends import cuda  # the one set of CUDA runtime helpers (MissingDependencyError without cuda-python)

    lib = load_library("cuda")
    rt = cuda.runtime()
    dtype, (n, c, h, w) = _check_arrays(teacher, student, ae)
    p = post.pad
    maps = np.empty((n, h + 2 * p, w + 2 * p), np.float32)
    scores = np.empty((n,), np.float32)
    resized = np.empty((n, size[0], size[1]), np.float32) if size else None
    host = [teacher, student, ae, maps, scores] + ([resized] if resized is not None else [])
    dev: list[cuda.DeviceBuffer] = []
    h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    try:
        for arr in host:
            dev.append(cuda.DeviceBuffer(arr.nbytes))
        for d, arr in zip(dev[:3], host[:3], strict=True):
            cuda.check(rt.cudaMemcpy(d.ptr, _ptr(arr), arr.nbytes, h2d), "cudaMemcpy HtoD")
        lib.efficientad(dev[0].ptr, dev[1].ptr, dev[2].ptr, dtype, (n, c, h, w), post, dev[3].ptr, dev[4].ptr, stream=0)
        if resized is not None:
            lib.resize(dev[3].ptr, n, maps.shape[1], maps.shape[2], dev[5].ptr, resized.shape[1], resized.shape[2], stream=0)
        cuda.check(rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        for d, arr in zip(dev[3:], host[3:], strict=True):
            cuda.check(rt.cudaMemcpy(_ptr(arr), d.ptr, arr.nbytes, d2h), "cudaMemcpy DtoH")
    finally:
        for d in dev:
            d.close()
    return (maps, scores) if resized is None else (maps, scores, resized)


def postprocess(teacher: np.ndarray, student: np.ndarray, ae: np.ndarray, post: EfficientADPost, out_size: tuple[int, int] | None = None,
                prefer: str = "cuda") -> tuple[np.ndarray, ...]:
    """EfficientAD post-processing of host arrays with the best available implementation.

    ``prefer`` = "cuda" (CUDA kernels, then host twin, then NumPy), "host" (host twin, then NumPy) or "numpy".
    A missing library or GPU falls back to the next one with a one-time logged warning (never silently).
    Returns ``(maps, scores)`` or ``(maps, scores, resized)`` when ``out_size`` is given.

    >>> maps, scores = postprocess(t, s, a, post, prefer="numpy")  # doctest: +SKIP
    """
    order = {"cuda": ("cuda", "host", "numpy"), "host": ("host", "numpy"), "numpy": ("numpy",)}
    if prefer not in order:
        raise ConfigError(message("prefer", repr(prefer), "one of cuda, host, numpy", "pass prefer='cuda', 'host' or 'numpy'"))
    _check_arrays(teacher, student, ae)
    post = _check_post(post)
    size = _check_out_size(out_size)
    for impl in order[prefer]:
        if impl == "numpy":
            maps, scores = efficientad_postprocess(teacher, student, ae, post)
            return (maps, scores) if size is None else (maps, scores, resize_bilinear(maps, size[0], size[1]))
        try:
            if impl == "host":
                return host_postprocess(teacher, student, ae, post, size, library=load_library("host"))
            return _cuda_postprocess(teacher, student, ae, post, size)
        except (BackendError, ImportError) as exc:
            nxt = order["cuda"][order["cuda"].index(impl) + 1]
            _warn_once(impl, f"edgead.kernels: {impl} post-processing unavailable ({exc}); falling back to {nxt}")
    raise AssertionError("unreachable")  # pragma: no cover
