"""Inference backends behind one base class (see :class:`edgead.backends.base.Backend`).

``onnxruntime`` (any machine) and ``tensorrt`` (NVIDIA GPU, TensorRT 10); their heavy dependencies
are imported only when a backend is created.

>>> from edgead.backends import OnnxRuntimeBackend  # doctest: +SKIP
"""

from __future__ import annotations

from .base import Backend
from .onnxruntime import OnnxRuntimeBackend
from .tensorrt import TensorRTBackend

__all__ = ["Backend", "OnnxRuntimeBackend", "TensorRTBackend"]
