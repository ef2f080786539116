"""EfficientAD networks: PDN-S / PDN-M teacher and student, and the autoencoder.

Layer-for-layer the architectures of the paper (Tables 6-8). The modules are plain
``nn.Sequential`` with the same indices as the reference implementation, so its
published ``teacher_small.pth`` / ``teacher_medium.pth`` state dicts load directly.

``padding=True`` gives the padded PDN used for distillation (output = input / 4);
``padding=False`` the unpadded one used for anomaly detection (output = input/4 - 8),
whose maps are padded by 4 in post-processing.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from edgead.errors import ConfigError, message
from edgead.registry import FAMILIES, check_choice

__all__ = [
    "OUT_CHANNELS",
    "pdn_small",
    "pdn_medium",
    "pdn",
    "autoencoder",
    "feature_size",
    "check_image_size",
    "EfficientAD",
    "conv_flops",
]

OUT_CHANNELS = 384


def check_image_size(image_size: int) -> int:
    """Input side length must be a multiple of 64, at least 128 (the autoencoder halves it 5 times)."""
    if not isinstance(image_size, int) or image_size < 128 or image_size % 64:
        raise ConfigError(message("image_size", image_size, "a multiple of 64 that is >= 128", "use 256 (paper, cpu preset) or 128 (demo preset)"))
    return image_size


def feature_size(image_size: int, padding: bool) -> int:
    """Side of the PDN output map for a square input (64 / 56 at 256)."""
    check_image_size(image_size)
    return image_size // 4 if padding else image_size // 4 - 8


def pdn_small(out_channels: int = OUT_CHANNELS, padding: bool = False) -> nn.Sequential:
    """PDN-S: 4 convolutions, 2 average pools, 33x33 receptive field."""
    p = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(3, 128, 4, padding=3 * p),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(128, 256, 4, padding=3 * p),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(256, 256, 3, padding=p),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, out_channels, 4),
    )


def pdn_medium(out_channels: int = OUT_CHANNELS, padding: bool = False) -> nn.Sequential:
    """PDN-M: 6 convolutions, 2 average pools, 33x33 receptive field."""
    p = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(3, 256, 4, padding=3 * p),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(256, 512, 4, padding=3 * p),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(512, 512, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(512, 512, 3, padding=p),
        nn.ReLU(inplace=True),
        nn.Conv2d(512, out_channels, 4),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 1),
    )


def pdn(size: str, out_channels: int = OUT_CHANNELS, padding: bool = False) -> nn.Sequential:
    """PDN of size 's' or 'm'."""
    size = check_choice("model size", size, FAMILIES["efficientad"].sizes)
    return (pdn_small if size == "s" else pdn_medium)(out_channels, padding)


def autoencoder(out_channels: int = OUT_CHANNELS, padding: bool = False, image_size: int = 256) -> nn.Sequential:
    """Autoencoder for logical anomalies: strided-conv encoder to a 64-d code, bilinear-upsampling decoder.

    Decoder sizes follow the paper at 256 (3, 8, 15, 32, 63, 127, then the PDN output size)
    and scale with the image size; the last encoder kernel is image_size/32 (8 at 256).
    """
    check_image_size(image_size)
    s = image_size
    ups = [s // 64 - 1, s // 32, s // 16 - 1, s // 8, s // 4 - 1, s // 2 - 1]
    encoder: list[nn.Module] = []
    chans = [3, 32, 32, 64, 64, 64]
    for cin, cout in pairwise(chans):
        encoder += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
    encoder.append(nn.Conv2d(64, 64, s // 32))
    decoder: list[nn.Module] = []
    for size in ups:
        decoder += [
            nn.Upsample(size=size, mode="bilinear", align_corners=False),
            nn.Conv2d(64, 64, 4, stride=1, padding=2),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
        ]
    decoder += [
        nn.Upsample(size=feature_size(image_size, padding), mode="bilinear", align_corners=False),
        nn.Conv2d(64, 64, 3, stride=1, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, out_channels, 3, stride=1, padding=1),
    ]
    return nn.Sequential(*encoder, *decoder)


class EfficientAD(nn.Module):
    """Teacher, student and autoencoder with the teacher's channel normalisation.

    ``forward`` takes a normalised image batch (see ``edgead.preprocess.prepare``) and
    returns ``(teacher_normalised, student, autoencoder)``, the inputs of
    ``edgead.postprocess.efficientad_postprocess``.

    >>> m = EfficientAD("s", image_size=128).eval()
    >>> [t.shape[1] for t in m(torch.zeros(1, 3, 128, 128))]
    [384, 768, 384]
    """

    def __init__(self, size: str = "s", image_size: int = 256, padding: bool = False, out_channels: int = OUT_CHANNELS) -> None:
        super().__init__()
        self.size = check_choice("model size", size, FAMILIES["efficientad"].sizes)
        self.image_size = check_image_size(image_size)
        self.padding = bool(padding)
        self.out_channels = out_channels
        self.teacher = pdn(self.size, out_channels, padding)
        self.student = pdn(self.size, 2 * out_channels, padding)
        self.autoencoder = autoencoder(out_channels, padding, image_size)
        self.register_buffer("teacher_mean", torch.zeros(1, out_channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, out_channels, 1, 1))

    @property
    def map_pad(self) -> int:
        """Padding applied to the maps in post-processing (4 for unpadded PDNs)."""
        return 0 if self.padding else 4

    def normalised_teacher(self, x: torch.Tensor) -> torch.Tensor:
        return (self.teacher(x) - self.teacher_mean) / self.teacher_std

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.normalised_teacher(x), self.student(x), self.autoencoder(x)


def conv_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Floating-point operations (2 per multiply-add) of the convolutions of one forward pass on ``x``.

    >>> round(conv_flops(EfficientAD("s", 256).eval(), torch.zeros(1, 3, 256, 256)) / 1e9, 1)
    75.9
    """
    total = 0

    def hook(mod: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(mod, nn.Conv2d)
        k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        total += 2 * k * out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total
