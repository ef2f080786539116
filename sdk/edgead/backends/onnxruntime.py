"""ONNX Runtime backend: runs a bundle variant's ONNX graph on the CPU (or the CUDA EP on request).

onnxruntime is imported lazily (extra ``cpu``). Providers are explicit: CPUExecutionProvider unless
``provider="cuda"`` is asked for and the CUDAExecutionProvider is available (else BackendError,
never a silent switch). For each batch size seen, outputs are preallocated once and bound with
IO binding, so steady-state runs allocate nothing inside ONNX Runtime.

>>> be = OnnxRuntimeBackend(load_bundle("bundle"), "merged", threads=2)   # doctest: +SKIP
>>> be.run(np.zeros((1, 3, 256, 256), np.float32))["score"].shape          # doctest: +SKIP
(1,)
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..bundle import VARIANT_OUTPUTS, Bundle
from ..errors import BackendError, BundleError, MissingDependencyError, message
from ..registry import check_choice
from .base import Backend, check_threads

__all__ = ["OnnxRuntimeBackend", "import_onnxruntime"]

log = logging.getLogger(__name__)

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_MAX_CACHED_BATCH_SIZES = 4


def import_onnxruntime() -> ModuleType:
    """The onnxruntime module, or MissingDependencyError naming the ``cpu`` extra."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "cpu", "ONNX Runtime backend") from exc
    return ort


class OnnxRuntimeBackend(Backend):
    """One ``onnxruntime.InferenceSession`` on one bundle variant (``threads``: intra-op threads, None = ORT default)."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, variant: str, *, threads: int | None = None, provider: str = "cpu", device: int = 0) -> None:
        ort = import_onnxruntime()
        provider = check_choice("onnxruntime provider", provider, _PROVIDERS)
        threads = check_threads(threads)
        path = bundle.onnx_path(variant)
        available = list(ort.get_available_providers())
        wanted = _PROVIDERS[provider]
        if wanted not in available:
            raise BackendError(
                message("ONNX Runtime provider", f"{wanted} not available (have {', '.join(available)})", wanted, "install onnxruntime-gpu for the CUDA provider, or use provider='cpu'")
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        providers: list[Any] = [(wanted, {"device_id": device})] if provider == "cuda" else [wanted]
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise BundleError(message(f"ONNX model '{Path(path).name}'", f"ONNX Runtime could not load it ({exc})", "a valid ONNX model", "re-export the bundle with 'edgead export'")) from exc
        manifest = bundle.manifest
        size = manifest.input.image_size
        inputs = session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != manifest.input.name:
            raise BundleError(
                message(f"ONNX model '{path.name}' inputs", [i.name for i in inputs], f"one input named '{manifest.input.name}' (manifest input.name)", "re-export the bundle with 'edgead export'")
            )
        shape = list(inputs[0].shape)
        if len(shape) != 4 or any(isinstance(g, int) and g != e for g, e in zip(shape[1:], (3, size, size), strict=True)):
            raise BundleError(message(f"ONNX model '{path.name}' input shape", inputs[0].shape, f"[N, 3, {size}, {size}] (manifest image_size)", "re-export the bundle with 'edgead export'"))
        expected = VARIANT_OUTPUTS[variant]
        names = tuple(o.name for o in session.get_outputs())
        if sorted(names) != sorted(expected):
            raise BundleError(message(f"ONNX model '{path.name}' outputs", list(names), f"{list(expected)} for variant '{variant}'", "re-export the bundle with 'edgead export'"))
        batch_dim = inputs[0].shape[0]
        precision = "int8" if variant.endswith("int8") else "fp32"
        super().__init__(
            variant=variant,
            precision=precision,
            input_name=manifest.input.name,
            input_shape=(3, size, size),
            output_names=expected,
            max_batch=batch_dim if isinstance(batch_dim, int) else None,
            device=f"{'CPU' if provider == 'cpu' else f'CUDA:{device}'} via ONNX Runtime {ort.__version__}, {threads or 'default'} threads",
        )
        self.provider = wanted
        self.threads = threads
        self._session = session
        self._bound: dict[int, tuple[Any, dict[str, np.ndarray]]] = {}

    def _bind(self, n: int, shapes: dict[str, tuple[int, ...]]) -> tuple[Any, dict[str, np.ndarray]]:
        binding = self._session.io_binding()
        outputs = {k: np.empty(shapes[k], np.float32) for k in self.output_names}
        for k, arr in outputs.items():
            binding.bind_output(k, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        if len(self._bound) >= _MAX_CACHED_BATCH_SIZES:
            self._bound.pop(next(iter(self._bound)))
        self._bound[n] = (binding, outputs)
        return self._bound[n]

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        n = batch.shape[0]
        bound = self._bound.get(n)
        if bound is None or self.provider != "CPUExecutionProvider":
            # first run of this batch size: plain run tells the output shapes, then preallocate
            values = self._session.run(list(self.output_names), {self.input_name: batch})
            result = {k: np.asarray(v) for k, v in zip(self.output_names, values, strict=True)}
            if self.provider == "CPUExecutionProvider" and all(v.dtype == np.float32 for v in result.values()):
                self._bind(n, {k: v.shape for k, v in result.items()})
            return result
        binding, outputs = bound
        binding.bind_cpu_input(self.input_name, batch)
        self._session.run_with_iobinding(binding)
        binding.clear_binding_inputs()
        return {k: v.copy() for k, v in outputs.items()}

    def _close(self) -> None:
        self._bound.clear()
        self._session = None
