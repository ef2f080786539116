"""Backbones: strict ImageNet weight loading, TF 'same' padding, WRN layout, PatchCore-style targets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from build_engines.backbones import (
    LITE_VARIANTS,
    EfficientNetLite,
    PatchFeatures,
    SameConv2d,
    WideResNet101_2,
    lite0_package_weights,
    lite_package_weights,
    load_backbone,
)
from build_engines.efficientad.models import pdn
from edgead.errors import ConfigError, DataError, EdgeADError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return load_backbone("efficientnet-lite0")


def test_lite0_package_weights_load_strictly(lite0: torch.nn.Module) -> None:
    state = torch.load(lite0_package_weights(), map_location="cpu", weights_only=True)
    assert len(state) == 296
    own = lite0.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    assert not lite0.training
    assert all(not p.requires_grad for p in lite0.parameters())
    with torch.no_grad():
        logits = lite0(torch.randn(2, 3, 96, 96))
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()


def test_lite0_architecture_matches_efficientnet_b0_without_se() -> None:
    net = EfficientNetLite("efficientnet-lite0")
    assert len(net._blocks) == 16
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # Lite0: 4.65 M parameters
    assert not any("_se_" in k for k in net.state_dict())
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("size, pads", [(8, (0, 1, 0, 1)), (9, (1, 1, 1, 1))])
def test_same_conv_pads_like_tensorflow(size: int, pads: tuple[int, int, int, int]) -> None:
    conv = SameConv2d(2, 3, 3, stride=2, bias=False)
    x = torch.randn(1, 2, size, size)
    expected = F.conv2d(F.pad(x, pads), conv.weight, stride=2)
    assert conv(x).shape[-1] == -(-size // 2)
    torch.testing.assert_close(conv(x), expected)


@pytest.mark.parametrize("variant, blocks, params, head_in", [("efficientnet-lite1", 21, 5_416_680, 320), ("efficientnet-lite2", 21, 6_092_072, 352)])
def test_lite1_lite2_package_weights_load_strictly(variant: str, blocks: int, params: int, head_in: int) -> None:
    state = torch.load(lite_package_weights(variant), map_location="cpu", weights_only=True)
    net = load_backbone(variant)
    assert isinstance(net, EfficientNetLite) and len(net._blocks) == blocks
    assert set(net.state_dict()) == set(state) and len(state) == 386
    assert all(torch.equal(net.state_dict()[k], v.float()) for k, v in state.items())
    assert sum(p.numel() for p in net.parameters()) == params
    assert net._conv_head.in_channels == head_in
    assert net.stage_strides == (2, 4, 8, 16, 16, 32, 32)


def test_lite_variants_share_stage_layout_and_differ_in_width() -> None:
    with torch.device("meta"):
        nets = {v: EfficientNetLite(v) for v in LITE_VARIANTS}
    assert nets["efficientnet-lite0"].stage_channels == nets["efficientnet-lite1"].stage_channels == (16, 24, 40, 80, 112, 192, 320)
    assert nets["efficientnet-lite2"].stage_channels == (16, 24, 48, 88, 120, 208, 352)
    assert nets["efficientnet-lite0"].stage_ends == (0, 2, 4, 7, 10, 14, 15)


@pytest.mark.parametrize("stages, scale, grid", [((3, 4, 5), 2, 16), ((2, 3), 1, 16), ((4,), 4, 16)])
def test_patch_features_input_scale_keeps_the_pdn_grid(lite0: torch.nn.Module, stages: tuple[int, ...], scale: int, grid: int) -> None:
    f = PatchFeatures(lite0, stages=stages).eval()
    assert f.input_scale == scale
    with torch.no_grad():
        assert f(torch.zeros(1, 3, 64 * scale, 64 * scale)).shape == (1, 384, grid, grid)


def test_lite0_block_strides(lite0: torch.nn.Module) -> None:
    assert isinstance(lite0, EfficientNetLite)
    outs = lite0.block_outputs(torch.randn(1, 3, 128, 128), (4, 7, 10))
    assert [tuple(o.shape[1:]) for o in outs] == [(40, 16, 16), (80, 8, 8), (112, 8, 8)]


def test_wide_resnet_layout_matches_torchvision() -> None:
    with torch.device("meta"):
        net = WideResNet101_2()
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 126_886_696  # torchvision wide_resnet101_2
    assert tuple(state["layer1.0.conv1.weight"].shape) == (128, 64, 1, 1)
    assert tuple(state["layer2.0.downsample.0.weight"].shape) == (512, 256, 1, 1)
    assert tuple(state["layer3.22.conv3.weight"].shape) == (1024, 512, 1, 1)
    assert tuple(state["fc.weight"].shape) == (1000, 2048)
    assert "layer3.23.conv1.weight" not in state


def _write_wrn_file(path: Path, drop: str | None = None) -> None:
    with torch.device("meta"):
        net = WideResNet101_2()
    state = {}
    for k, v in net.state_dict().items():
        if k == drop:
            continue
        base = torch.full((), 0.5 if "running_var" in k or k.endswith("bn1.weight") else 0.01, dtype=v.dtype)
        state[k] = base.expand(v.shape)  # stride-0 tensors keep the file tiny
    torch.save(state, path)


def test_wide_resnet_loads_from_path_and_gives_targets(tmp_path: Path) -> None:
    path = tmp_path / "wrn.pth"
    _write_wrn_file(path)
    net = load_backbone("wide_resnet101_2", path)
    assert isinstance(net, WideResNet101_2)
    with torch.no_grad():
        t = PatchFeatures(net)(torch.randn(1, 3, 64, 64))
    assert t.shape == (1, 384, 8, 8)


def test_wide_resnet_missing_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrn.pth"
    _write_wrn_file(path, drop="layer3.5.bn2.running_mean")
    with pytest.raises(DataError, match=r"1 missing keys \['layer3.5.bn2.running_mean'\]"):
        load_backbone("wide_resnet101_2", path)


def test_mismatched_backbone_file_is_refused() -> None:
    with pytest.raises(DataError, match="wide_resnet101_2 weights .*unexpected keys"):
        load_backbone("wide_resnet101_2", lite0_package_weights())


def test_lite0_file_with_wrong_shape_is_refused(tmp_path: Path) -> None:
    state = torch.load(lite0_package_weights(), map_location="cpu", weights_only=True)
    state["_fc.weight"] = state["_fc.weight"][:10]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(DataError, match="1 shape mismatches"):
        load_backbone("efficientnet-lite0", tmp_path / "bad.pth")


@pytest.mark.parametrize("content", [b"not a torch file", None])
def test_unreadable_weights_are_refused(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "w.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError):
        load_backbone("efficientnet-lite0", path)


def test_backbone_choice_errors() -> None:
    with pytest.raises(ConfigError, match="backbone"):
        load_backbone("resnet18")
    with pytest.raises(ConfigError, match="--backbone-weights"):
        load_backbone("wide_resnet101_2")
    with pytest.raises(EdgeADError):
        PatchFeatures(torch.nn.Conv2d(3, 3, 1))


@pytest.mark.parametrize("teacher_input", [64, 128])
def test_target_grid_equals_padded_pdn_grid(lite0: torch.nn.Module, teacher_input: int) -> None:
    features = PatchFeatures(lite0)
    with torch.no_grad():
        t = features(torch.randn(1, 3, 2 * teacher_input, 2 * teacher_input))
        p = pdn("s", padding=True)(torch.randn(1, 3, teacher_input, teacher_input))
    assert t.shape == p.shape == (1, 384, teacher_input // 4, teacher_input // 4)


def test_lite0_projection_is_seeded(lite0: torch.nn.Module) -> None:
    a, b, c = PatchFeatures(lite0, seed=0), PatchFeatures(lite0, seed=0), PatchFeatures(lite0, seed=1)
    assert a.projection is not None and b.projection is not None and c.projection is not None
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, c.projection)


def _reference_aggregate(feats: list[torch.Tensor], out_channels: int) -> torch.Tensor:
    """Loop-based reference: 3x3 mean over the valid neighbours, bilinear resize, concat, mean of channel groups."""
    grid = feats[0].shape[-2:]
    parts = []
    for f in feats:
        h, w = f.shape[-2:]
        avg = torch.zeros_like(f)
        for i in range(h):
            for j in range(w):
                avg[..., i, j] = f[..., max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].mean((-1, -2))
        parts.append(F.interpolate(avg, size=grid, mode="bilinear", align_corners=False) if (h, w) != grid else avg)
    z = torch.cat(parts, 1)
    n, c, h, w = z.shape
    return z.view(n, out_channels, c // out_channels, h, w).mean(2)


def test_wrn_aggregation_matches_patchcore_reference() -> None:
    with torch.device("meta"):
        net = WideResNet101_2()
    features = PatchFeatures(net, out_channels=6)
    feats = [torch.randn(2, 8, 6, 6), torch.randn(2, 16, 3, 3)]
    torch.testing.assert_close(features.aggregate(feats), _reference_aggregate(feats, 6))


def test_lite0_aggregation_is_projection_of_reference(lite0: torch.nn.Module) -> None:
    features = PatchFeatures(lite0)
    feats = [torch.randn(1, 40, 4, 4), torch.randn(1, 80, 2, 2), torch.randn(1, 112, 2, 2)]
    z = _reference_aggregate(feats, 232)  # group size 1: no channel reduction
    assert features.projection is not None
    expected = torch.einsum("oc,nchw->nohw", features.projection[:, :, 0, 0], z)
    torch.testing.assert_close(features.aggregate(feats), expected, rtol=1e-5, atol=1e-5)
