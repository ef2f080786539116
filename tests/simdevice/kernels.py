"""The CUDA build of the post-processing kernels on the simulated device: the same C entry points
(``edgead_pp_efficientad`` / ``edgead_pp_resize_bilinear`` with a stream), each call queued on the stream and
run by the real host twin (``libedgead_pp_host.so``) on the simulated device pointers when the stream runs.

Argument checks happen at the call (as the CUDA build's host-side checks do); an out-of-bounds pointer range
makes the stream fail with cudaErrorIllegalAddress at its next synchronise, as a kernel fault would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgead import kernels

from .cudart import SimulatedRuntime


class _SimCudaLib:
    """Looks like the ctypes CDLL of libedgead_pp_cuda.so to ``edgead.kernels.PostprocessLibrary``."""

    def __init__(self, host: kernels.PostprocessLibrary, device: SimulatedRuntime) -> None:
        self._host, self._device = host.lib, device
        self.calls: list[dict[str, Any]] = []
        self._error = b""

    def edgead_pp_version(self) -> int:
        return kernels.ABI_VERSION

    def edgead_pp_is_cuda(self) -> int:
        return 1

    def edgead_pp_error_string(self, code: int) -> bytes:
        return self._host.edgead_pp_error_string(code)

    def edgead_pp_last_error(self) -> bytes:
        return self._error or self._host.edgead_pp_last_error()

    def edgead_pp_cuda_archs(self) -> bytes:
        return b"86,87,89,90"

    def edgead_pp_cuda_runtime_version(self) -> int:
        return 13000

    def edgead_pp_cuda_probe(self, device: int) -> int:
        err, count = self._device.cudaGetDeviceCount()
        if int(err) != 0 or not 0 <= device < (count or 0):
            self._error = f"cudaGetDeviceCount: {getattr(err, 'name', err)} ({count} devices, asked for {device})".encode()
            return 5
        self._error = b""
        return 0

    def _span(self, ptr: int, nbytes: int) -> bool:
        return self._device.find(ptr, nbytes, "device") is not None

    def edgead_pp_efficientad(self, t: int, s: int, a: int, dtype: int, n: int, c: int, h: int, w: int, qa_st: float, qb_st: float, qa_ae: float,
                              qb_ae: float, pad: int, map_out: int, score_out: int, stream: int | None) -> int:
        self._error = b""
        args = (t, s, a, dtype, n, c, h, w, qa_st, qb_st, qa_ae, qb_ae, pad, map_out, score_out)
        self.calls.append({"n": n, "c": c, "h": h, "w": w, "dtype": dtype, "stream": stream, "device": self._device.current_device})
        item = 2 if dtype == kernels.DTYPE_FP16 else 4
        spans = [(t, n * c * h * w * item), (s, n * 2 * c * h * w * item), (a, n * c * h * w * item), (map_out, n * (h + 2 * pad) * (w + 2 * pad) * 4), (score_out, n * 4)]
        inside = all(p == 0 or self._span(p, size) for p, size in spans)

        def run() -> None:
            if not inside:
                raise IndexError("kernel read or wrote outside its buffers")
            rc = self._host.edgead_pp_efficientad_host(*args)
            if rc != 0:
                raise IndexError(self._host.edgead_pp_last_error().decode())

        # the host-side checks of check_efficientad_args (pp_host.cpp) happen at the call, as in the CUDA build
        if 0 in (t, s, a, map_out, score_out):
            self._error = b"null pointer"
            return 1
        if dtype not in (kernels.DTYPE_FP32, kernels.DTYPE_FP16):
            self._error = f"dtype {dtype}".encode()
            return 3
        if min(n, c, h, w) <= 0 or not 0 <= pad <= 4096:
            self._error = f"shape n={n} c={c} h={h} w={w} pad={pad}".encode()
            return 2
        if not (qb_st > qa_st and qb_ae > qa_ae):
            self._error = b"quantiles"
            return 4
        err = self._device.enqueue(stream or 0, run, "edgead_pp_efficientad")
        if err:
            self._error = f"CUDA error {err.name}".encode()
            return 5
        return 0

    def edgead_pp_resize_bilinear(self, src: int, n: int, h: int, w: int, out: int, oh: int, ow: int, stream: int | None) -> int:
        def run() -> None:
            if not (self._span(src, n * h * w * 4) and self._span(out, n * oh * ow * 4)):
                raise IndexError("resize outside its buffers")
            self._host.edgead_pp_resize_bilinear_host(src, n, h, w, out, oh, ow)

        err = self._device.enqueue(stream or 0, run, "edgead_pp_resize_bilinear")
        return 5 if err else 0


def cuda_library(device: SimulatedRuntime, host: kernels.PostprocessLibrary) -> kernels.PostprocessLibrary:
    """A ``PostprocessLibrary`` of kind "cuda" whose kernels run on the simulated device."""
    return kernels.PostprocessLibrary("cuda", Path("<simulated libedgead_pp_cuda.so>"), _SimCudaLib(host, device))  # type: ignore[arg-type]
