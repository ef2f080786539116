"""A host-simulated CUDA device behind the ``cuda.bindings.runtime`` API (the calls EdgeAD makes, nothing more).

Device allocations are host buffers (pointers are real addresses, copies are real copies), so code written for
a GPU runs unchanged. What a GPU would do asynchronously is asynchronous here too: every operation on a stream
is queued and runs at the stream's synchronisation, in order; pinned output buffers are poisoned, so a host
read before the synchronise sees NaN instead of the result. Checked like the real runtime does, and a little
stricter where a real GPU would fail later or silently:

* every call returns ``(cudaError_t, *values)``; the function signatures are those of cuda-bindings
  (``tests/sdk/test_simdevice.py`` compares them with the installed module);
* the device is current per host thread (``cudaSetDevice``); a stream, event or allocation used from a thread
  whose current device is another one fails with ``cudaErrorInvalidResourceHandle`` / ``cudaErrorInvalidValue``;
* copies and kernels are bounds-checked against the allocations they touch (``cudaErrorInvalidValue`` /
  ``cudaErrorIllegalAddress``);
* stream capture records the operations into a graph instead of running them; a synchronise of a capturing
  stream is ``cudaErrorStreamCaptureUnsupported`` and invalidates the capture (as the real runtime);
* failures can be injected: ``driver_error`` (every call fails, e.g. an R570 driver under cuda-bindings 13, with
  ``driver_version`` 12080),
  ``fail_malloc_after`` (out of memory after N allocations), ``fail_capture`` (capture unsupported).

Every call is recorded in ``calls`` (name, current device, stream) for assertions about correct use.
"""

from __future__ import annotations

import ctypes
import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class cudaError_t(enum.IntEnum):  # noqa: N801 - the cuda-bindings names
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


_MESSAGES = {
    cudaError_t.cudaSuccess: "no error",
    cudaError_t.cudaErrorInvalidValue: "invalid argument",
    cudaError_t.cudaErrorMemoryAllocation: "out of memory",
    cudaError_t.cudaErrorInsufficientDriver: "CUDA driver version is insufficient for CUDA runtime version",
    cudaError_t.cudaErrorNoDevice: "no CUDA-capable device is detected",
    cudaError_t.cudaErrorInvalidDevice: "invalid device ordinal",
    cudaError_t.cudaErrorInvalidResourceHandle: "invalid resource handle",
    cudaError_t.cudaErrorIllegalAddress: "an illegal memory access was encountered",
    cudaError_t.cudaErrorStreamCaptureUnsupported: "operation not permitted when stream is capturing",
    cudaError_t.cudaErrorStreamCaptureInvalidated: "operation failed due to a previous error during capture",
}


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(enum.IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


cudaStreamNonBlocking = 1  # noqa: N816
ok = cudaError_t.cudaSuccess


@dataclass
class cudaDeviceProp:  # noqa: N801 - the fields EdgeAD reads
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int  # noqa: N815
    multiProcessorCount: int = 132  # noqa: N815


@dataclass(eq=False)
class Allocation:
    ptr: int
    nbytes: int
    kind: str  # "device" | "pinned"
    device: int
    storage: Any

    def contains(self, ptr: int, n: int) -> bool:
        return self.ptr <= ptr and ptr + n <= self.ptr + self.nbytes


@dataclass(eq=False)
class cudaStream_t:  # noqa: N801
    handle: int
    device: int
    queue: list[Callable[[], None]] = field(default_factory=list)
    capture: list[Callable[[], None]] | None = None
    capture_broken: bool = False
    error: cudaError_t = cudaError_t.cudaSuccess

    def __int__(self) -> int:
        return self.handle


@dataclass(eq=False)
class cudaEvent_t:  # noqa: N801
    handle: int
    device: int
    time_ms: float | None = None

    def __int__(self) -> int:
        return self.handle


@dataclass(eq=False)
class cudaGraph_t:  # noqa: N801
    ops: list[Callable[[], None]]
    destroyed: bool = False


@dataclass(eq=False)
class cudaGraphExec_t:  # noqa: N801
    ops: list[Callable[[], None]]
    device: int
    destroyed: bool = False


class SimulatedRuntime:
    """The state of the simulated machine; its methods are the module functions (see ``as_module``)."""

    def __init__(self, n_devices: int = 2, compute_capability: tuple[int, int] = (8, 7), memory: int = 16 << 30) -> None:
        self.n_devices = n_devices
        self.props = [cudaDeviceProp(f"Simulated GPU {i}".encode(), *compute_capability, memory) for i in range(n_devices)]
        self.allocations: dict[int, Allocation] = {}
        self.streams: dict[int, cudaStream_t] = {}
        self.events: dict[int, cudaEvent_t] = {}
        self.graph_execs: list[cudaGraphExec_t] = []
        self.graphs: list[cudaGraph_t] = []
        self.calls: list[tuple[str, int, int | None]] = []
        self.driver_error: cudaError_t | None = None
        self.driver_version = 13000  # CUDA version the driver supports (12080: an R570 driver; 0: none installed)
        self.fail_malloc_after: int | None = None
        self.fail_capture = False
        self.mallocs = 0
        self.clock_ms = 0.0
        self._local = threading.local()
        self._lock = threading.RLock()
        self._next_handle = 0x5000

    # ------------------------------------------------------------------ helpers for the fakes and the tests
    @property
    def current_device(self) -> int:
        return getattr(self._local, "device", 0)

    def _handle(self) -> int:
        self._next_handle += 16
        return self._next_handle

    def _record(self, name: str, stream: Any = None) -> cudaError_t | None:
        with self._lock:
            self.calls.append((name, self.current_device, None if stream is None else int(stream)))
        return self.driver_error

    def stream_of(self, stream: Any) -> cudaStream_t | None:
        """The stream object of a handle (int or object); None for the legacy default stream 0."""
        handle = int(stream) if stream is not None else 0
        if handle == 0:
            return None
        s = self.streams.get(handle)
        if s is None:
            raise KeyError(handle)
        return s

    def find(self, ptr: int, n: int, kind: str | None = None) -> Allocation | None:
        """The allocation holding [ptr, ptr + n), or None."""
        with self._lock:
            for a in self.allocations.values():
                if a.contains(int(ptr), int(n)) and (kind is None or a.kind == kind):
                    return a
        return None

    def array(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A numpy view of simulated device memory (for the fake TensorRT and kernels)."""
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if self.find(ptr, n, "device") is None:
            raise IndexError(f"{n} bytes at {ptr:#x} are not inside one device allocation")
        raw = (ctypes.c_byte * n).from_address(int(ptr))
        return np.frombuffer(memoryview(raw).cast("B"), dtype=dtype).reshape(shape)

    def enqueue(self, stream: Any, op: Callable[[], None], what: str) -> cudaError_t:
        """Queue ``op`` on ``stream`` (or record it into the stream's capture)."""
        try:
            s = self.stream_of(stream)
        except KeyError:
            return cudaError_t.cudaErrorInvalidResourceHandle
        if s is None:  # the legacy default stream: synchronous
            op()
            return ok
        if s.device != self.current_device:
            return cudaError_t.cudaErrorInvalidResourceHandle
        if s.capture is not None:
            s.capture.append(op)
        else:
            s.queue.append(op)
        return ok

    def _drain(self, s: cudaStream_t) -> cudaError_t:
        while s.queue:
            op = s.queue.pop(0)
            try:
                op()
            except IndexError:  # an out-of-bounds access inside a kernel
                s.error = cudaError_t.cudaErrorIllegalAddress
                s.queue.clear()
        err, s.error = s.error, ok
        return err

    def live(self, kind: str | None = None) -> list[Allocation]:
        return [a for a in self.allocations.values() if kind is None or a.kind == kind]

    def pending(self) -> int:
        return sum(len(s.queue) for s in self.streams.values())

    # ------------------------------------------------------------------ the runtime API
    def cudaGetErrorString(self, error: cudaError_t) -> tuple[cudaError_t, bytes]:  # noqa: N802
        return ok, _MESSAGES.get(cudaError_t(int(error)), "unknown error").encode()

    def cudaGetErrorName(self, error: cudaError_t) -> tuple[cudaError_t, bytes]:  # noqa: N802
        return ok, cudaError_t(int(error)).name.encode()

    def cudaDriverGetVersion(self) -> tuple[cudaError_t, int]:  # noqa: N802
        return ok, self.driver_version  # answers even with a too-old driver (0: no driver installed)

    def cudaRuntimeGetVersion(self) -> tuple[cudaError_t, int]:  # noqa: N802
        return ok, 13000

    def cudaGetDeviceCount(self) -> tuple[cudaError_t, int | None]:  # noqa: N802
        err = self._record("cudaGetDeviceCount")
        if err:
            return err, None
        if self.n_devices == 0:
            return cudaError_t.cudaErrorNoDevice, None
        return ok, self.n_devices

    def cudaGetDeviceProperties(self, device: int) -> tuple[cudaError_t, cudaDeviceProp | None]:  # noqa: N802
        err = self._record("cudaGetDeviceProperties")
        if err:
            return err, None
        if not 0 <= int(device) < self.n_devices:
            return cudaError_t.cudaErrorInvalidDevice, None
        return ok, self.props[int(device)]

    def cudaSetDevice(self, device: int) -> tuple[cudaError_t]:  # noqa: N802
        err = self._record("cudaSetDevice")
        if err:
            return (err,)
        if not 0 <= int(device) < self.n_devices:
            return (cudaError_t.cudaErrorInvalidDevice,)
        self._local.device = int(device)
        return (ok,)

    def cudaGetDevice(self) -> tuple[cudaError_t, int]:  # noqa: N802
        return ok, self.current_device

    def cudaMemGetInfo(self) -> tuple[cudaError_t, int, int]:  # noqa: N802
        used = sum(a.nbytes for a in self.live("device") if a.device == self.current_device)
        total = self.props[self.current_device].totalGlobalMem
        return ok, total - used, total

    def _alloc(self, size: int, kind: str) -> tuple[cudaError_t, int]:
        if int(size) <= 0:
            return cudaError_t.cudaErrorInvalidValue, 0
        with self._lock:
            self.mallocs += 1
            if self.fail_malloc_after is not None and self.mallocs > self.fail_malloc_after:
                return cudaError_t.cudaErrorMemoryAllocation, 0
            storage = ctypes.create_string_buffer(int(size))
            ptr = ctypes.addressof(storage)
            if kind == "pinned":
                ctypes.memset(ptr, 0xFF, int(size))  # NaN in every float layout: a read before the copy lands shows
            self.allocations[ptr] = Allocation(ptr, int(size), kind, self.current_device, storage)
        return ok, ptr

    def cudaMalloc(self, size: int) -> tuple[cudaError_t, int]:  # noqa: N802
        err = self._record("cudaMalloc")
        return (err, 0) if err else self._alloc(size, "device")

    def cudaMallocHost(self, size: int) -> tuple[cudaError_t, int]:  # noqa: N802
        err = self._record("cudaMallocHost")
        return (err, 0) if err else self._alloc(size, "pinned")

    def _free(self, ptr: int, kind: str) -> tuple[cudaError_t]:
        for s in list(self.streams.values()):  # cudaFree / cudaFreeHost synchronise the device first (documented)
            if s.capture is None:
                self._drain(s)
        with self._lock:
            a = self.allocations.get(int(ptr))
            if a is None or a.kind != kind:
                return (cudaError_t.cudaErrorInvalidValue,)
            if kind == "device" and a.device != self.current_device:
                return (cudaError_t.cudaErrorInvalidValue,)
            del self.allocations[int(ptr)]
        return (ok,)

    def cudaFree(self, devPtr: int) -> tuple[cudaError_t]:  # noqa: N802, N803
        err = self._record("cudaFree")
        return (err,) if err else self._free(devPtr, "device")

    def cudaFreeHost(self, ptr: int) -> tuple[cudaError_t]:  # noqa: N802
        err = self._record("cudaFreeHost")
        return (err,) if err else self._free(ptr, "pinned")

    def _copy_check(self, dst: int, src: int, count: int, kind: int) -> cudaError_t:
        kind = cudaMemcpyKind(int(kind))
        want_dst = "device" if kind in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToDevice) else None
        want_src = "device" if kind in (cudaMemcpyKind.cudaMemcpyDeviceToHost, cudaMemcpyKind.cudaMemcpyDeviceToDevice) else None
        for ptr, want in ((dst, want_dst), (src, want_src)):
            a = self.find(ptr, count)
            if want == "device" and (a is None or a.kind != "device" or a.device != self.current_device):
                return cudaError_t.cudaErrorInvalidValue
            if want is None and a is not None and a.kind == "device":
                return cudaError_t.cudaErrorInvalidValue  # a "host" pointer that is device memory: wrong direction
        return ok

    def cudaMemcpy(self, dst: int, src: int, count: int, kind: cudaMemcpyKind) -> tuple[cudaError_t]:  # noqa: N802
        err = self._record("cudaMemcpy") or self._copy_check(int(dst), int(src), int(count), kind)
        if err:
            return (err,)
        for s in self.streams.values():  # the legacy default stream synchronises with the others
            if s.device == self.current_device and s.capture is None:
                self._drain(s)
        ctypes.memmove(int(dst), int(src), int(count))
        return (ok,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        err = self._record("cudaMemcpyAsync", stream) or self._copy_check(int(dst), int(src), int(count), kind)
        if err:
            return (err,)
        d, s_, n = int(dst), int(src), int(count)
        return (self.enqueue(stream, lambda: ctypes.memmove(d, s_, n), "cudaMemcpyAsync"),)

    def cudaMemsetAsync(self, devPtr: int, value: int, count: int, stream: Any) -> tuple[cudaError_t]:  # noqa: N802, N803
        err = self._record("cudaMemsetAsync", stream)
        if err:
            return (err,)
        a = self.find(int(devPtr), int(count), "device")
        if a is None or a.device != self.current_device:
            return (cudaError_t.cudaErrorInvalidValue,)
        p, v, n = int(devPtr), int(value), int(count)
        return (self.enqueue(stream, lambda: ctypes.memset(p, v, n), "cudaMemsetAsync"),)

    def cudaStreamCreateWithFlags(self, flags: int) -> tuple[cudaError_t, cudaStream_t | None]:  # noqa: N802
        err = self._record("cudaStreamCreateWithFlags")
        if err:
            return err, None
        with self._lock:
            s = cudaStream_t(self._handle(), self.current_device)
            self.streams[s.handle] = s
        return ok, s

    def cudaStreamDestroy(self, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        err = self._record("cudaStreamDestroy", stream)
        if err:
            return (err,)
        s = self.streams.get(int(stream))
        if s is None or s.device != self.current_device:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self._drain(s)  # pending work completes before the stream goes (as cudaStreamDestroy documents)
        del self.streams[s.handle]
        return (ok,)

    def cudaStreamSynchronize(self, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        err = self._record("cudaStreamSynchronize", stream)
        if err:
            return (err,)
        try:
            s = self.stream_of(stream)
        except KeyError:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if s is None:
            return (ok,)
        if s.device != self.current_device:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if s.capture is not None:
            s.capture_broken = True
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        return (self._drain(s),)

    def cudaDeviceSynchronize(self) -> tuple[cudaError_t]:  # noqa: N802
        err = self._record("cudaDeviceSynchronize")
        if err:
            return (err,)
        for s in list(self.streams.values()):
            if s.device == self.current_device and s.capture is None:
                e = self._drain(s)
                if e:
                    return (e,)
        return (ok,)

    def cudaStreamIsCapturing(self, stream: Any) -> tuple[cudaError_t, int]:  # noqa: N802
        s = self.streams.get(int(stream))
        return ok, int(s is not None and s.capture is not None)

    def cudaStreamBeginCapture(self, stream: Any, mode: cudaStreamCaptureMode) -> tuple[cudaError_t]:  # noqa: N802
        err = self._record("cudaStreamBeginCapture", stream)
        if err:
            return (err,)
        s = self.streams.get(int(stream))
        if s is None or s.device != self.current_device:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if self.fail_capture:
            return (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        if s.capture is not None:
            return (cudaError_t.cudaErrorInvalidValue,)  # already capturing
        s.capture, s.capture_broken = [], False  # work queued before stays queued, outside the graph
        return (ok,)

    def cudaStreamEndCapture(self, stream: Any) -> tuple[cudaError_t, cudaGraph_t | None]:  # noqa: N802
        err = self._record("cudaStreamEndCapture", stream)
        if err:
            return err, None
        s = self.streams.get(int(stream))
        if s is None or s.capture is None:
            return cudaError_t.cudaErrorInvalidValue, None
        ops, broken = s.capture, s.capture_broken
        s.capture, s.capture_broken = None, False
        if broken:
            return cudaError_t.cudaErrorStreamCaptureInvalidated, None
        g = cudaGraph_t(ops)
        self.graphs.append(g)
        return ok, g

    def cudaGraphInstantiate(self, graph: cudaGraph_t, flags: int) -> tuple[cudaError_t, cudaGraphExec_t | None]:  # noqa: N802
        err = self._record("cudaGraphInstantiate")
        if err:
            return err, None
        if not isinstance(graph, cudaGraph_t) or graph.destroyed:
            return cudaError_t.cudaErrorInvalidValue, None
        g = cudaGraphExec_t(list(graph.ops), self.current_device)
        self.graph_execs.append(g)
        return ok, g

    def cudaGraphLaunch(self, graphExec: cudaGraphExec_t, stream: Any) -> tuple[cudaError_t]:  # noqa: N802, N803
        err = self._record("cudaGraphLaunch", stream)
        if err:
            return (err,)
        if not isinstance(graphExec, cudaGraphExec_t) or graphExec.destroyed or graphExec.device != self.current_device:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        for op in graphExec.ops:
            e = self.enqueue(stream, op, "cudaGraphLaunch")
            if e:
                return (e,)
        return (ok,)

    def cudaGraphExecDestroy(self, graphExec: cudaGraphExec_t) -> tuple[cudaError_t]:  # noqa: N802, N803
        self._record("cudaGraphExecDestroy")
        if not isinstance(graphExec, cudaGraphExec_t) or graphExec.destroyed:
            return (cudaError_t.cudaErrorInvalidValue,)
        graphExec.destroyed = True
        return (ok,)

    def cudaGraphDestroy(self, graph: cudaGraph_t) -> tuple[cudaError_t]:  # noqa: N802
        self._record("cudaGraphDestroy")
        if not isinstance(graph, cudaGraph_t) or graph.destroyed:
            return (cudaError_t.cudaErrorInvalidValue,)
        graph.destroyed = True
        return (ok,)

    def cudaEventCreate(self) -> tuple[cudaError_t, cudaEvent_t | None]:  # noqa: N802
        err = self._record("cudaEventCreate")
        if err:
            return err, None
        e = cudaEvent_t(self._handle(), self.current_device)
        self.events[e.handle] = e
        return ok, e

    def cudaEventRecord(self, event: cudaEvent_t, stream: Any) -> tuple[cudaError_t]:  # noqa: N802
        err = self._record("cudaEventRecord", stream)
        if err:
            return (err,)

        def stamp() -> None:
            self.clock_ms += 0.25
            event.time_ms = self.clock_ms

        return (self.enqueue(stream, stamp, "cudaEventRecord"),)

    def cudaEventSynchronize(self, event: cudaEvent_t) -> tuple[cudaError_t]:  # noqa: N802
        err = self._record("cudaEventSynchronize")
        if err:
            return (err,)
        for s in self.streams.values():
            if s.device == event.device and s.capture is None:
                self._drain(s)
        return (ok,)

    def cudaEventElapsedTime(self, start: cudaEvent_t, end: cudaEvent_t) -> tuple[cudaError_t, float]:  # noqa: N802
        if start.time_ms is None or end.time_ms is None:
            return cudaError_t.cudaErrorNotReady, 0.0
        return ok, end.time_ms - start.time_ms

    def cudaEventDestroy(self, event: cudaEvent_t) -> tuple[cudaError_t]:  # noqa: N802
        self._record("cudaEventDestroy")
        return (ok,) if self.events.pop(event.handle, None) is not None else (cudaError_t.cudaErrorInvalidResourceHandle,)


API = (
    "cudaGetErrorString cudaGetErrorName cudaDriverGetVersion cudaRuntimeGetVersion cudaGetDeviceCount cudaGetDeviceProperties cudaSetDevice "
    "cudaGetDevice cudaMemGetInfo cudaMalloc cudaMallocHost cudaFree cudaFreeHost cudaMemcpy cudaMemcpyAsync cudaMemsetAsync "
    "cudaStreamCreateWithFlags cudaStreamDestroy cudaStreamSynchronize cudaDeviceSynchronize cudaStreamIsCapturing cudaStreamBeginCapture "
    "cudaStreamEndCapture cudaGraphInstantiate cudaGraphLaunch cudaGraphExecDestroy cudaGraphDestroy cudaEventCreate cudaEventRecord "
    "cudaEventSynchronize cudaEventElapsedTime cudaEventDestroy"
).split()


def as_module(sim: SimulatedRuntime) -> Any:
    """A module-like namespace with the runtime's functions, enums and constants bound to ``sim``."""
    import types

    mod = types.ModuleType("cuda.bindings.runtime")
    for name in API:
        setattr(mod, name, getattr(sim, name))
    for obj in (cudaError_t, cudaMemcpyKind, cudaStreamCaptureMode, cudaStream_t, cudaEvent_t, cudaDeviceProp, cudaGraph_t, cudaGraphExec_t):
        setattr(mod, obj.__name__, obj)
    mod.cudaStreamNonBlocking = cudaStreamNonBlocking  # type: ignore[attr-defined]
    mod.simulator = sim  # type: ignore[attr-defined]
    return mod
