"""Thin CUDA runtime helpers on cuda-python (``cuda.bindings.runtime``): devices, streams, events, buffers.

Kept apart from the TensorRT backend so that it can be tested on a GPU machine without TensorRT.
cuda-python is imported lazily; without it every entry point raises MissingDependencyError
naming the ``tensorrt`` extra. Nothing here runs on a machine without an NVIDIA driver: those
calls raise BackendError with the CUDA error name.

>>> from edgead.backends import cuda          # doctest: +SKIP
>>> with cuda.Stream() as s, cuda.DeviceBuffer(1024) as d:  # doctest: +SKIP
...     host = cuda.PinnedBuffer((256,), "float32")
...     cuda.copy_htod(d, host, s); s.synchronize()
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import BackendError, MissingDependencyError, message

__all__ = [
    "runtime",
    "check",
    "device_count",
    "device_status",
    "gpu_available",
    "DeviceInfo",
    "device_info",
    "set_device",
    "Stream",
    "Event",
    "DeviceBuffer",
    "PinnedBuffer",
    "copy_htod",
    "copy_dtoh",
]

_RUNTIME: ModuleType | None = None


def runtime() -> ModuleType:
    """``cuda.bindings.runtime`` (cuda-python >= 12.6) or the older ``cuda.cudart``; lazily imported."""
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    try:
        from cuda.bindings import runtime as rt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        try:
            from cuda import cudart as rt  # type: ignore[import-not-found,attr-defined,no-redef,unused-ignore]
        except ImportError as exc:
            raise MissingDependencyError("cuda-python", "tensorrt", "CUDA runtime for the TensorRT backend") from exc
    _RUNTIME = rt
    return rt


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` tuple; raise BackendError when err != cudaSuccess."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if int(err) != 0:
        rt = runtime()
        name = getattr(err, "name", str(err))
        try:
            detail = rt.cudaGetErrorString(err)[1]
            detail = detail.decode() if isinstance(detail, bytes) else str(detail)
        except Exception:  # noqa: BLE001 - best effort detail
            detail = ""
        raise BackendError(
            message(f"CUDA {what}", f"{name} {detail}".strip(), "cudaSuccess", "check the NVIDIA driver (nvidia-smi), the device index, and free GPU memory")
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def device_status() -> tuple[int, str]:
    """(number of usable CUDA devices, why none when 0): the CUDA error is named, because
    ``cudaErrorInsufficientDriver`` (a driver older than the runtime cuda-python links, e.g. cuda-bindings 13
    under a 12.x driver) and ``cudaErrorNoDevice`` (no GPU) call for different fixes."""
    rt = runtime()
    err, count = rt.cudaGetDeviceCount()
    if int(err) == 0 and count:
        return int(count), f"{int(count)} CUDA device(s)"
    if int(err) == 0:
        return 0, "CUDA reports 0 devices"
    name = getattr(err, "name", str(err))
    if name == "cudaErrorInsufficientDriver":
        derr, driver = rt.cudaDriverGetVersion()
        if int(derr) != 0 or not driver:  # no libcuda at all: not an old driver, no driver
            return 0, f"{name}: no NVIDIA driver is installed (libcuda.so.1 not found): a machine without an NVIDIA GPU, or install the driver"
    hint = {
        "cudaErrorInsufficientDriver": "the NVIDIA driver is older than the CUDA runtime of the installed cuda-python: install the cuda-python of your CUDA major "
        "(pip install 'edgead[tensorrt-cu12]' on CUDA 12 / JetPack 6) or upgrade the driver",
        "cudaErrorNoDevice": "no NVIDIA GPU is visible (nvidia-smi; CUDA_VISIBLE_DEVICES)",
    }.get(name, "see nvidia-smi and the driver installation")
    return 0, f"{name}: {hint}"


def device_count() -> int:
    """Number of CUDA devices; 0 when there is no usable driver (never raises for that; ``device_status`` says why)."""
    return device_status()[0]


def gpu_available() -> bool:
    """True when cuda-python imports and at least one device is usable."""
    try:
        return device_count() > 0
    except MissingDependencyError:
        return False


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"
    total_memory: int


def device_info(device: int = 0) -> DeviceInfo:
    """Name and compute capability of one device (BackendError when it does not exist)."""
    count = device_count()
    if not 0 <= device < count:
        raise BackendError(message("CUDA device", device, f"an index in 0..{count - 1}" if count else "a machine with an NVIDIA GPU", "pass device=0, or use backend='onnxruntime'"))
    rt = runtime()
    props = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    name = name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
    return DeviceInfo(device, name, f"{props.major}.{props.minor}", int(props.totalGlobalMem))


def set_device(device: int) -> None:
    check(runtime().cudaSetDevice(device), "cudaSetDevice")


class Stream:
    """A non-blocking CUDA stream owned by a backend; ``handle`` is the int TensorRT wants."""

    def __init__(self) -> None:
        rt = runtime()
        self._stream = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")

    @property
    def handle(self) -> int:
        return int(self._stream)

    @property
    def raw(self) -> Any:
        return self._stream

    def synchronize(self) -> None:
        check(runtime().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self._stream is not None:
            check(runtime().cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Event:
    """A CUDA event for GPU-side timing: ``Event.elapsed_ms(start, end)``."""

    def __init__(self) -> None:
        self._event = check(runtime().cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        check(runtime().cudaEventRecord(self._event, stream.raw), "cudaEventRecord")

    def synchronize(self) -> None:
        check(runtime().cudaEventSynchronize(self._event), "cudaEventSynchronize")

    @staticmethod
    def elapsed_ms(start: Event, end: Event) -> float:
        return float(check(runtime().cudaEventElapsedTime(start._event, end._event), "cudaEventElapsedTime"))

    def close(self) -> None:
        if self._event is not None:
            check(runtime().cudaEventDestroy(self._event), "cudaEventDestroy")
            self._event = None


class DeviceBuffer:
    """``nbytes`` of device memory; ``ptr`` is the int address (for set_tensor_address)."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise BackendError(message("device buffer size", nbytes, "> 0 bytes", "check the engine's tensor shapes"))
        self.nbytes = int(nbytes)
        self.ptr: int = int(check(runtime().cudaMalloc(self.nbytes), "cudaMalloc"))

    def close(self) -> None:
        if self.ptr:
            check(runtime().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0

    def __enter__(self) -> DeviceBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PinnedBuffer:
    """Page-locked host memory viewed as a numpy array (fast, truly asynchronous copies)."""

    def __init__(self, shape: tuple[int, ...], dtype: npt.DTypeLike) -> None:
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dt.itemsize
        if nbytes <= 0:
            raise BackendError(message("pinned buffer shape", shape, "a non-empty shape", "check the engine's tensor shapes"))
        self.nbytes = nbytes
        self.ptr: int = int(check(runtime().cudaMallocHost(nbytes), "cudaMallocHost"))
        raw = (ctypes.c_byte * nbytes).from_address(self.ptr)
        self.array: np.ndarray = np.frombuffer(memoryview(raw).cast("B"), dtype=dt).reshape(shape)

    def close(self) -> None:
        if self.ptr:
            self.array = np.empty(0)
            check(runtime().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


def _copy(dst: DeviceBuffer | PinnedBuffer, src: DeviceBuffer | PinnedBuffer, stream: Stream, nbytes: int, kind: str) -> None:
    if nbytes > src.nbytes or nbytes > dst.nbytes:
        raise BackendError(message(f"CUDA {kind} copy", f"{nbytes} bytes", f"<= {min(src.nbytes, dst.nbytes)} bytes (both buffers)", "this is a bug in the backend's buffer sizing; report it"))
    rt = runtime()
    direction = rt.cudaMemcpyKind.cudaMemcpyHostToDevice if kind == "HtoD" else rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    check(rt.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, direction, stream.raw), f"cudaMemcpyAsync {kind}")


def copy_htod(dst: DeviceBuffer, src: PinnedBuffer, stream: Stream, nbytes: int | None = None) -> None:
    """Asynchronous host -> device copy of ``nbytes`` (default: all of ``src``) on ``stream``."""
    _copy(dst, src, stream, src.nbytes if nbytes is None else nbytes, "HtoD")


def copy_dtoh(dst: PinnedBuffer, src: DeviceBuffer, stream: Stream, nbytes: int | None = None) -> None:
    """Asynchronous device -> host copy of ``nbytes`` (default: all of ``dst``) on ``stream``."""
    _copy(dst, src, stream, dst.nbytes if nbytes is None else nbytes, "DtoH")
