"""Architectures match the paper: parameter counts, output sizes, FLOPs, reference key layout."""

from __future__ import annotations

import pytest
import torch

from build_engines.efficientad.models import EfficientAD, autoencoder, conv_flops, feature_size, pdn_small
from edgead.errors import ConfigError


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_paper() -> None:
    s = EfficientAD("s", 256)
    assert round(_params(s.teacher) / 1e6, 2) == 2.69
    assert round(_params(s.student) / 1e6, 2) == 4.27
    assert round(_params(s.autoencoder) / 1e6, 2) == 1.10
    m = EfficientAD("m", 256)
    assert round(_params(m.teacher) / 1e6, 1) == 8.0


def test_s_inference_is_about_75_9_gflop_at_256() -> None:
    flops = conv_flops(EfficientAD("s", 256).eval(), torch.zeros(1, 3, 256, 256))
    assert flops / 1e9 == pytest.approx(75.9, abs=0.3)


@pytest.mark.parametrize(("size", "padding", "expected"), [(256, False, 56), (256, True, 64), (128, False, 24), (320, False, 72)])
def test_output_sizes_agree_between_networks(size: int, padding: bool, expected: int) -> None:
    model = EfficientAD("s", size, padding=padding).eval()
    with torch.no_grad():
        t, s, a = model(torch.randn(1, 3, size, size))
    assert feature_size(size, padding) == expected
    assert t.shape == (1, 384, expected, expected) and s.shape == (1, 768, expected, expected) and a.shape == t.shape
    assert model.map_pad == (0 if padding else 4)


def test_reference_sequential_key_layout() -> None:
    keys = [k for k in pdn_small().state_dict() if k.endswith("weight")]
    assert keys == ["0.weight", "3.weight", "6.weight", "8.weight"]


def test_teacher_normalisation_uses_buffers() -> None:
    model = EfficientAD("s", 128).eval()
    model.teacher_mean.fill_(0.5)
    model.teacher_std.fill_(2.0)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], (model.teacher(x) - 0.5) / 2.0)


@pytest.mark.parametrize("bad", [100, 64, 200, "256"])
def test_bad_image_sizes_are_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="multiple of 64"):
        autoencoder(image_size=bad)  # type: ignore[arg-type]
