"""A host-simulated NVIDIA device for CI: fake ``cuda.bindings.runtime``, ``tensorrt`` and CUDA kernel library,
installed in place of the real ones so that EdgeAD's real TensorRT backend, engine builder and doctor run.

    with simdevice.installed(monkeypatch) as sim:     # sim.cuda: the device, sim.trt: the TensorRT double
        det = Detector(bundle, backend="tensorrt")

The doubles stop at the two external APIs; nothing of EdgeAD is replaced.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from . import cudart, kernels, tensorrt


@dataclass
class Sim:
    cuda: cudart.SimulatedRuntime
    trt: tensorrt.SimState
    kernels: Any  # the simulated CUDA PostprocessLibrary (None without the host twin)


@contextmanager
def installed(monkeypatch: pytest.MonkeyPatch, *, n_devices: int = 2, compute_capability: tuple[int, int] = (8, 7), with_kernels: bool = True) -> Iterator[Sim]:
    """Install the simulated device for the duration of the block (modules restored by ``monkeypatch``)."""
    from edgead import kernels as edgead_kernels
    from edgead.backends import cuda as edgead_cuda

    device = cudart.SimulatedRuntime(n_devices, compute_capability)
    state = tensorrt.SimState(device)
    rt_mod = cudart.as_module(device)
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = rt_mod  # type: ignore[attr-defined]
    bindings.__version__ = "13.0.0"  # type: ignore[attr-defined]
    cuda_pkg = types.ModuleType("cuda")
    cuda_pkg.bindings = bindings  # type: ignore[attr-defined]
    cuda_pkg.__path__ = []  # type: ignore[attr-defined]
    bindings.__path__ = []  # type: ignore[attr-defined]
    for name, mod in (("cuda", cuda_pkg), ("cuda.bindings", bindings), ("cuda.bindings.runtime", rt_mod), ("tensorrt", tensorrt)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(tensorrt, "STATE", state)
    monkeypatch.setattr(edgead_cuda, "_RUNTIME", None)
    lib = None
    if with_kernels:
        lib = kernels.cuda_library(device, edgead_kernels.load_library("host"))
        real_load = edgead_kernels.load_library

        def load(kind: str = "host", device: int = 0) -> Any:
            if kind != "cuda":
                return real_load(kind)
            lib.probe(device)  # as the real loader does
            return lib

        monkeypatch.setattr(edgead_kernels, "load_library", load)
    try:
        yield Sim(device, state, lib)
    finally:
        edgead_cuda._RUNTIME = None
