"""The ``--device`` choice of the torch toolchain (distill, train, eval), resolved once for all of them."""

from __future__ import annotations

import torch

from edgead.errors import ConfigError, EdgeADError, message
from edgead.registry import check_choice

__all__ = ["DEVICES", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, *, what: str = "device", error: type[EdgeADError] = ConfigError) -> torch.device:
    """``"auto"`` (CUDA when PyTorch sees a GPU, else CPU), ``"cpu"`` or ``"cuda"`` -> torch.device.

    ``what`` names the option in messages; ``error`` is raised for ``"cuda"`` without a CUDA device.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    name = check_choice(what, name, DEVICES)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise error(message(what, "'cuda'", "a CUDA device visible to PyTorch", "pass --device cpu (or auto), or run on a GPU machine with a CUDA build of torch"))
    return torch.device(name)
