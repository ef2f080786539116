"""Teacher PDN weights: load the published reference files, anomalib's layout, or our own distillations.

Accepted files (``torch.save`` state dicts, read weights-only):

* nn.Sequential index layout of the reference implementation (``teacher_small.pth``):
  ``0.weight, 3.weight, 6.weight, 8.weight`` (S) or ``0, 3, 6, 8, 10, 12`` (M);
* anomalib's PDN layout: ``conv1..conv4`` (S) or ``conv1..conv6`` (M), optionally under a
  ``teacher.`` / ``model.teacher.`` prefix (a whole EfficientAD checkpoint);
* either of those wrapped in a checkpoint dict (``{"state_dict": ...}``), fp16 or fp32 tensors.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from build_engines.backbones import load_state_dict_file
from build_engines.efficientad.models import OUT_CHANNELS, pdn
from edgead.errors import ConfigError, DataError, message
from edgead.registry import FAMILIES, check_choice

__all__ = ["WEIGHTS_DIR", "CONV_INDICES", "default_teacher_path", "load_teacher", "to_sequential_layout", "teacher_state_dict"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Sequential index of each convolution (conv1, conv2, ...) in models.pdn_small / pdn_medium
CONV_INDICES: dict[str, tuple[int, ...]] = {"s": (0, 3, 6, 8), "m": (0, 3, 6, 8, 10, 12)}
_ANOMALIB_KEY = re.compile(r"^conv(\d+)\.(weight|bias)$")
_SEQ_KEY = re.compile(r"^(\d+)\.(weight|bias)$")


def default_teacher_path(size: str) -> Path | None:
    """The embedded teacher file for ``size`` ('s' or 'm'), or None when none ships.

    >>> default_teacher_path("s") in (None, WEIGHTS_DIR / "teacher_s.pth")
    True
    """
    size = check_choice("model size", size, FAMILIES["efficientad"].sizes)
    path = WEIGHTS_DIR / f"teacher_{size}.pth"
    return path if path.is_file() else None


def _select_teacher(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only the teacher's tensors of a whole-model checkpoint (prefix ``...teacher.``)."""
    for prefix in ("model.teacher.", "teacher."):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub
    return state


def to_sequential_layout(state: dict[str, torch.Tensor], size: str) -> dict[str, torch.Tensor]:
    """Rename an anomalib-layout (``convK.*``) state dict to the Sequential layout; others pass through.

    >>> sorted(to_sequential_layout({"conv1.weight": torch.zeros(1), "conv4.bias": torch.zeros(1)}, "s"))
    ['0.weight', '8.bias']
    """
    indices = CONV_INDICES[size]
    if not any(_ANOMALIB_KEY.match(k) for k in state):
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _ANOMALIB_KEY.match(key)
        if m is None or not 1 <= int(m.group(1)) <= len(indices):
            out[key] = value  # reported as unknown by the caller
            continue
        out[f"{indices[int(m.group(1)) - 1]}.{m.group(2)}"] = value
    return out


def _guess_size(state: dict[str, torch.Tensor]) -> str | None:
    """'s' / 'm' when the keys are exactly those of one PDN size in either layout."""
    indices = {int(m.group(1)) for k in state if (m := _SEQ_KEY.match(k))}
    convs = {int(m.group(1)) for k in state if (m := _ANOMALIB_KEY.match(k))}
    for size, conv in CONV_INDICES.items():
        if indices == set(conv) or convs == set(range(1, len(conv) + 1)):
            return size
    return None


def teacher_state_dict(teacher: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """State dict in the Sequential layout, cast to ``dtype`` (what ``edgead distill`` writes)."""
    return {k: v.detach().to("cpu", dtype) for k, v in teacher.state_dict().items()}


def load_teacher(size: str, weights: str | Path = "default", out_channels: int = OUT_CHANNELS) -> nn.Sequential:
    """Unpadded teacher PDN of ``size`` in fp32 eval mode, frozen.

    ``weights``: a file path, ``"default"`` (the embedded ``build_engines/weights/teacher_<size>.pth``)
    or ``"random"`` (random init, for tests and ablations only).

    >>> t = load_teacher("s", "random")
    >>> t(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 384, 8, 8])
    """
    size = check_choice("model size", size, FAMILIES["efficientad"].sizes)
    teacher = pdn(size, out_channels, padding=False)
    if isinstance(weights, str) and weights == "random":
        return teacher.eval().requires_grad_(False)
    if isinstance(weights, str) and weights == "default":
        default = default_teacher_path(size)
        if default is None:
            raise ConfigError(
                message(f"default teacher weights for size '{size}'", f"no {WEIGHTS_DIR / f'teacher_{size}.pth'}", "an embedded teacher file",
                        f"distil one with 'edgead distill --size {size} ...' and pass its path, or use the reference teacher_{'small' if size == 's' else 'medium'}.pth")
            )
        weights = default
    if not isinstance(weights, (str, Path)):
        raise ConfigError(message("teacher weights", repr(weights), "a path, 'default' or 'random'", "pass the teacher .pth path"))
    path = Path(weights)
    raw = _select_teacher(load_state_dict_file(path, "teacher"))
    other = _guess_size(raw)
    state = to_sequential_layout(raw, size)
    expected = teacher.state_dict()
    if other is not None and other != size:
        raise ConfigError(
            message("teacher weights size", f"a PDN-{other.upper()} file ({path})", f"PDN-{size.upper()} weights", f"pass --size {other} or the teacher file for size '{size}'")
        )
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        raise DataError(
            message("teacher weights keys", f"{path}: unknown {unknown[:4]}, missing {missing[:4]}",
                    f"the PDN-{size.upper()} keys {sorted(expected)[:4]}... (Sequential) or conv1..conv{len(CONV_INDICES[size])} (anomalib)",
                    "pass a teacher state dict saved from the PDN (teacher_small.pth / teacher_medium.pth or an 'edgead distill' output)")
        )
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise DataError(message("teacher weights shapes", f"{path}: {wrong[:3]}", f"the PDN-{size.upper()} shapes with {out_channels} output channels", "pass a teacher file of this size"))
    if not all(v.is_floating_point() for v in state.values()):
        raise DataError(message("teacher weights dtype", f"{path}: non-float tensors", "float16/float32/bfloat16 tensors", "re-save the teacher weights"))
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise DataError(message("teacher weights values", f"{path}: NaN/inf in {bad[:3]}", "finite weights", "re-run the distillation (it diverged) or use another teacher file"))
    teacher.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return teacher.eval().requires_grad_(False)
