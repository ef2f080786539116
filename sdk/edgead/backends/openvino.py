"""OpenVINO backend: the bundle's ONNX graph compiled by OpenVINO for Intel/AMD CPUs (and Intel GPUs).

On a CPU with AVX-512 BF16 / AMX, OpenVINO runs convolutions in BF16 and INT8 QDQ graphs with its low-precision
transformations, several times faster than FP32 (docs/benchmarks.md). Precision is never changed silently:

* ``fp32``: ``INFERENCE_PRECISION_HINT=f32`` is set explicitly (OpenVINO's CPU default is BF16 where supported);
* ``bf16``: the FP32 graph with ``INFERENCE_PRECISION_HINT=bf16`` (refused on a CPU without BF16 support);
* ``int8``: the bundle's ``merged_int8`` QDQ graph (``edgead export --int8``), INT8 where OpenVINO quantises.

The compiled model is cached (OpenVINO ``CACHE_DIR``) in a folder keyed by the bundle's file hash, the precision,
the device and the OpenVINO version, so a restart loads the blob instead of compiling again. The precision must be
part of the key: OpenVINO 2026.4 names the blob without ``INFERENCE_PRECISION_HINT``, so a BF16 start found the FP32
start's blob and re-compiled it for BF16, which turned a UniAD bundle's every score into NaN (a fresh BF16 compile
of the same graph is fine; docs/benchmarks.md). ``device="GPU"`` targets an
Intel integrated GPU through the same documented API; no Intel GPU was available to test it.

openvino is imported lazily (extra ``openvino``).

>>> be = OpenVINOBackend(load_bundle("bundle"), "merged", precision="bf16", threads=2)   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..bundle import VARIANT_OUTPUTS, Bundle
from ..errors import BackendError, BundleError, ConfigError, MissingDependencyError, message
from ..registry import check_choice
from .base import Backend, check_threads

__all__ = ["OpenVINOBackend", "import_openvino", "OPENVINO_DEVICES", "OPENVINO_PRECISIONS", "PERFORMANCE_HINTS", "cache_root", "bf16_supported"]

log = logging.getLogger(__name__)

OPENVINO_DEVICES = ("cpu", "gpu")
OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")
PERFORMANCE_HINTS = ("latency", "throughput")


def import_openvino() -> ModuleType:
    """The openvino module, or MissingDependencyError naming the ``openvino`` extra."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise MissingDependencyError("openvino", "openvino", "OpenVINO backend") from exc
    return ov


def cache_root() -> Path:
    """``$EDGEAD_CACHE_DIR/openvino`` or ``~/.cache/edgead/openvino`` (XDG_CACHE_HOME honoured)."""
    base = os.environ.get("EDGEAD_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgead")
    return Path(base) / "openvino"


def bf16_supported(core: Any, device: str = "CPU") -> bool:
    """Whether the device reports BF16 among its optimisation capabilities."""
    try:
        caps = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - a device without the property: no BF16
        return False
    return "BF16" in [str(c).upper() for c in caps]


class OpenVINOBackend(Backend):
    """One OpenVINO ``CompiledModel`` (and one infer request) on one bundle variant."""

    name = "openvino"

    def __init__(
        self,
        bundle: Bundle,
        variant: str = "merged",
        *,
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        hint: str = "latency",
        cache: bool = True,
    ) -> None:
        ov = import_openvino()
        precision = check_choice("OpenVINO precision", precision, OPENVINO_PRECISIONS)
        device = check_choice("OpenVINO device", device, OPENVINO_DEVICES).upper()
        hint = check_choice("OpenVINO performance hint", hint, PERFORMANCE_HINTS)
        threads = check_threads(threads)
        if (precision == "int8") != variant.endswith("int8"):
            want = "merged_int8" if precision == "int8" else "merged or raw"
            raise ConfigError(message("OpenVINO variant / precision", f"variant {variant!r} with precision {precision!r}", f"variant {want}", "pass only precision= and let the Detector pick the variant"))
        core = ov.Core()
        if device not in core.available_devices:
            raise BackendError(message("OpenVINO device", device, f"one of {core.available_devices}", "use device='cpu' (an Intel GPU needs its driver and OpenVINO's GPU plugin)"))
        if precision == "bf16" and not bf16_supported(core, device):
            raise BackendError(message("OpenVINO precision", f"bf16 on {device}", "a CPU with AVX-512 BF16 or AMX", "use precision='fp32' or 'int8'"))
        path = bundle.onnx_path(variant)
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",  # explicit: the CPU default would be bf16
            "PERFORMANCE_HINT": hint.upper(),
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if cache:
            folder = self.cache_folder(bundle, variant, device, ov.__version__, precision)
            folder.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(folder)
        try:
            model = core.read_model(str(path))
            compiled = core.compile_model(model, device, config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
            raise BundleError(message(f"ONNX model '{path.name}'", f"OpenVINO could not compile it ({str(exc).splitlines()[0][:200]})", "a model OpenVINO supports",
                                      "re-export the bundle with 'edgead export', or use backend='onnxruntime'")) from exc
        manifest = bundle.manifest
        size = manifest.input.image_size
        inputs = compiled.inputs
        if len(inputs) != 1 or inputs[0].get_any_name() != manifest.input.name:
            raise BundleError(message(f"ONNX model '{path.name}' inputs", [i.get_any_name() for i in inputs], f"one input named '{manifest.input.name}'", "re-export the bundle"))
        expected = VARIANT_OUTPUTS[variant]
        self._ports = {o.get_any_name(): o for o in compiled.outputs}
        if sorted(self._ports) != sorted(expected):
            raise BundleError(message(f"ONNX model '{path.name}' outputs", sorted(self._ports), f"{list(expected)} for variant '{variant}'", "re-export the bundle"))
        super().__init__(
            variant=variant,
            precision=precision,
            input_name=manifest.input.name,
            input_shape=(3, size, size),
            output_names=expected,
            max_batch=None,
            device=f"{device} via OpenVINO {ov.__version__} ({precision}, {hint} hint, {threads or 'default'} threads)",
        )
        self.threads = threads
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        hint_type = compiled.get_property("INFERENCE_PRECISION_HINT")
        self.execution_precision = hint_type.to_string() if hasattr(hint_type, "to_string") else str(hint_type)  # "f32" / "bf16"

    @staticmethod
    def cache_folder(bundle: Bundle, variant: str, device: str, version: str, precision: str) -> Path:
        """Cache folder of one compiled model: changes with the ONNX file (its sha256), the precision, the device and OpenVINO."""
        sha = bundle.manifest.files[bundle.manifest.variants[variant].file].sha256
        key = hashlib.sha256(f"{sha}|{variant}|{precision}|{device}|{version}".encode()).hexdigest()[:24]
        return cache_root() / key

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        result = self._request.infer({self.input_name: batch})
        return {k: np.array(result[self._ports[k]], dtype=np.float32, copy=True) for k in self.output_names}

    def _close(self) -> None:
        self._request = None
        self._compiled = None
