"""Teacher loading: both published key layouts, checkpoint wrappers, fp16, embedded default, every refusal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from build_engines.efficientad import teacher as teacher_mod
from build_engines.efficientad.models import pdn
from build_engines.efficientad.teacher import default_teacher_path, load_teacher
from edgead.errors import ConfigError, DataError

torch.set_num_threads(1)


def _random_pdn(size: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = pdn(size, padding=False)
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)  # non-zero biases too
    return net.eval()


def _anomalib_layout(net: nn.Sequential) -> dict[str, torch.Tensor]:
    """Independent renaming: the k-th Conv2d in module order becomes conv{k} (anomalib's PDN names)."""
    out = {}
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    for k, conv in enumerate(convs, start=1):
        out[f"conv{k}.weight"] = conv.weight.detach().clone()
        out[f"conv{k}.bias"] = conv.bias.detach().clone()
    return out


def _check_same(size: str, loaded: nn.Module, reference: nn.Module, atol: float = 1e-5) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x), rtol=1e-5, atol=atol)
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("size", ["s", "m"])
def test_sequential_layout_round_trip(tmp_path: Path, size: str) -> None:
    ref = _random_pdn(size)
    torch.save(ref.state_dict(), tmp_path / "t.pth")
    _check_same(size, load_teacher(size, tmp_path / "t.pth"), ref)


@pytest.mark.parametrize("size, n_convs", [("s", 4), ("m", 6)])
def test_anomalib_layout_round_trip(tmp_path: Path, size: str, n_convs: int) -> None:
    ref = _random_pdn(size, seed=1)
    state = _anomalib_layout(ref)
    assert len(state) == 2 * n_convs
    torch.save(state, tmp_path / "t.pth")
    _check_same(size, load_teacher(size, str(tmp_path / "t.pth")), ref)


def test_checkpoint_wrapper_with_prefix_and_fp16(tmp_path: Path) -> None:
    ref = _random_pdn("s", seed=2)
    state = {f"model.teacher.{k}": v.half() for k, v in _anomalib_layout(ref).items()}
    state["model.student.conv1.weight"] = torch.zeros(3)  # other parts of a whole-model checkpoint are ignored
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = load_teacher("s", tmp_path / "ckpt.pth")
    for p in ref.parameters():
        p.data = p.data.half().float()  # the reference with the same fp16 rounding
    _check_same("s", loaded, ref)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_random_and_output_shape() -> None:
    t = load_teacher("m", "random")
    assert t(torch.zeros(1, 3, 64, 64)).shape == (1, 384, 8, 8)


def test_small_file_for_medium_is_refused(tmp_path: Path) -> None:
    torch.save(_random_pdn("s").state_dict(), tmp_path / "s.pth")
    with pytest.raises(ConfigError, match="PDN-S file.*--size s"):
        load_teacher("m", tmp_path / "s.pth")
    torch.save(_anomalib_layout(_random_pdn("m")), tmp_path / "m.pth")
    with pytest.raises(ConfigError, match="PDN-M file"):
        load_teacher("s", tmp_path / "m.pth")


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    state = _random_pdn("s").state_dict()
    state["9.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "t.pth")
    with pytest.raises(DataError, match=r"unknown \['9.weight'\]"):
        load_teacher("s", tmp_path / "t.pth")


def test_missing_key_is_refused(tmp_path: Path) -> None:
    state = _anomalib_layout(_random_pdn("s"))
    del state["conv3.bias"]
    torch.save(state, tmp_path / "t.pth")
    with pytest.raises(DataError, match=r"missing \['6.bias'\]"):
        load_teacher("s", tmp_path / "t.pth")


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    torch.save(pdn("s", out_channels=128).state_dict(), tmp_path / "t.pth")
    with pytest.raises(DataError, match="shapes.*8.weight: \\(128, 256, 4, 4\\)"):
        load_teacher("s", tmp_path / "t.pth")


def test_not_a_torch_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.pth").write_text("hello")
    with pytest.raises(DataError, match="teacher file"):
        load_teacher("s", tmp_path / "t.pth")
    with pytest.raises(DataError, match="an existing .pth file"):
        load_teacher("s", tmp_path / "absent.pth")


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    torch.save(_random_pdn("s"), tmp_path / "t.pth")  # a whole nn.Module, not a state dict
    with pytest.raises(DataError, match="state dict"):
        load_teacher("s", tmp_path / "t.pth")


def test_non_tensor_dict_is_refused(tmp_path: Path) -> None:
    torch.save({"weights": [1, 2, 3]}, tmp_path / "t.pth")
    with pytest.raises(DataError, match="dict of tensors"):
        load_teacher("s", tmp_path / "t.pth")


def test_bad_size_and_weights_argument() -> None:
    with pytest.raises(ConfigError, match="model size"):
        load_teacher("l", "random")
    with pytest.raises(ConfigError, match="model size"):
        default_teacher_path("xl")
    with pytest.raises(ConfigError, match="teacher weights"):
        load_teacher("s", 3)  # type: ignore[arg-type]


def test_default_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(teacher_mod, "WEIGHTS_DIR", tmp_path)
    assert default_teacher_path("s") is None
    with pytest.raises(ConfigError, match="default teacher weights for size 's'.*edgead distill --size s"):
        load_teacher("s", "default")
    ref = _random_pdn("s", seed=3)
    torch.save({k: v.half() for k, v in ref.state_dict().items()}, tmp_path / "teacher_s.pth")
    assert default_teacher_path("s") == tmp_path / "teacher_s.pth"
    assert default_teacher_path("m") is None
    loaded = load_teacher("s")
    for p in ref.parameters():
        p.data = p.data.half().float()
    _check_same("s", loaded, ref)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    state = _random_pdn("s").state_dict()
    state["6.bias"][3] = float("nan")
    torch.save(state, tmp_path / "t.pth")
    with pytest.raises(DataError, match=r"NaN/inf in \['6.bias'\]"):
        load_teacher("s", tmp_path / "t.pth")


def test_the_shipped_teacher_loads_and_matches_its_model_card() -> None:
    """The embedded default teacher: its file is the one its JSON card describes, loads strictly, and computes."""
    import hashlib
    import json

    from build_engines.efficientad.teacher import WEIGHTS_DIR, default_teacher_path, load_teacher

    path = default_teacher_path("s")
    assert path is not None and path == WEIGHTS_DIR / "teacher_s.pth"
    card = json.loads((WEIGHTS_DIR / "teacher_s.json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["output_sha256"]
    teacher = load_teacher("s", "default")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in teacher.parameters())
    with torch.no_grad():
        out = teacher(torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 384, 24, 24) and torch.isfinite(out).all() and out.std() > 0
