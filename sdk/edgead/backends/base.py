"""The one base class of inference backends: validates prepared input, owns timing and lifetime.

A backend runs a prepared float32 NCHW batch and returns named outputs. Subclasses implement
``_run`` (and ``_close``); everything else (input checks, output checks, timing, context
manager, use-after-close) lives here once.

>>> with OnnxRuntimeBackend(bundle, "merged") as be:         # doctest: +SKIP
...     outputs, ms = be.timed_run(np.zeros((1, 3, 256, 256), np.float32))
"""

from __future__ import annotations

import os
import time
from typing import ClassVar

import numpy as np

from ..errors import BackendError, ConfigError, InputError, message

__all__ = ["Backend", "check_threads", "MAX_THREADS"]

MAX_THREADS = 4 * (os.cpu_count() or 1)  # more intra-op threads than that only thrashes (10 000 hung the machine)


def check_threads(threads: object) -> int | None:
    """None (the runtime's default) or an int in 1..MAX_THREADS; NumPy integers accepted."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int | np.integer) or not 1 <= int(threads) <= MAX_THREADS:
        raise ConfigError(
            message("threads", repr(threads), f"None or an integer in 1..{MAX_THREADS} (4x this machine's {os.cpu_count()} cores)", "pass threads=2, or leave None for the runtime's default")
        )
    return int(threads)


class Backend:
    """Base of every backend. ``run(batch) -> {output name: array}`` with the batch as first axis.

    Attributes every backend sets: ``name`` ("onnxruntime" | "tensorrt"), ``variant`` (bundle variant
    it runs), ``precision`` ("fp32" | "fp16" | "int8"), ``input_name``, ``input_shape`` (C, H, W),
    ``output_names`` (what ``run`` returns), ``max_batch`` (None: unlimited), ``device`` (words).
    """

    name: ClassVar[str] = "base"

    def __init__(
        self,
        *,
        variant: str,
        precision: str,
        input_name: str,
        input_shape: tuple[int, int, int],
        output_names: tuple[str, ...],
        max_batch: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.variant = variant
        self.precision = precision
        self.input_name = input_name
        self.input_shape = tuple(int(v) for v in input_shape)
        self.output_names = tuple(output_names)
        self.max_batch = max_batch
        self.device = device
        self.closed = False

    # ------------------------------------------------------------------ public
    def check_batch(self, batch: object) -> np.ndarray:
        """Validate a prepared batch: float32, C-contiguous, (N, C, H, W) with the model's C, H, W."""
        if not isinstance(batch, np.ndarray):
            raise InputError(message(f"{self.name} input", type(batch).__name__, "a numpy.ndarray", "prepare frames with edgead.preprocess.prepare_batch"))
        if batch.dtype != np.float32:
            raise InputError(message(f"{self.name} input dtype", batch.dtype, "float32", "prepare frames with edgead.preprocess.prepare_batch"))
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape or batch.shape[0] < 1:
            raise InputError(message(f"{self.name} input shape", batch.shape, f"(N>=1, {', '.join(map(str, self.input_shape))})", "resize frames to the bundle's image_size (prepare_batch does)"))
        if self.max_batch is not None and batch.shape[0] > self.max_batch:
            raise InputError(
                message(f"{self.name} batch size", batch.shape[0], f"<= {self.max_batch} (the engine's max batch)", "split the batch (Detector.infer_batch does) or rebuild with --max-batch")
            )
        if not batch.flags.c_contiguous:
            raise InputError(message(f"{self.name} input memory layout", "a non-contiguous view", "a C-contiguous array", "pass np.ascontiguousarray(batch)"))
        return batch

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one prepared batch; returns arrays owned by the caller (never reused buffers)."""
        return self.timed_run(batch)[0]

    def timed_run(self, batch: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        """``run`` plus its wall time in milliseconds (inputs copied in, outputs copied out)."""
        if self.closed:
            raise BackendError(message(f"{self.name} backend", "closed", "an open backend", "create a new Detector; do not use it after close() / the with block"))
        batch = self.check_batch(batch)
        t0 = time.perf_counter()
        outputs = self._run(batch)
        ms = (time.perf_counter() - t0) * 1e3
        missing = [k for k in self.output_names if k not in outputs]
        if missing or any(outputs[k].shape[:1] != batch.shape[:1] for k in self.output_names):
            # the model (a bundle's ONNX / engine) broke the batch contract: a bundle problem, not an EdgeAD bug
            raise BackendError(
                message(
                    f"{self.name} model outputs",
                    f"{ {k: tuple(v.shape) for k, v in outputs.items()} } for a batch of {batch.shape[0]}",
                    f"{', '.join(self.output_names)} each with batch axis {batch.shape[0]}",
                    "re-export the bundle with 'edgead export' (the model's first axis must be the dynamic batch), or rebuild the engine",
                )
            )
        return {k: outputs[k] for k in self.output_names}, ms

    def close(self) -> None:
        """Release sessions, streams and buffers; idempotent."""
        if not self.closed:
            self.closed = True
            self._close()

    def describe(self) -> str:
        return f"{self.name} ({self.device}, {self.precision}, variant {self.variant})"

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}{' closed' if self.closed else ''}>"

    # ------------------------------------------------------------------ subclass API
    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _close(self) -> None:
        """Subclasses release their resources here."""
