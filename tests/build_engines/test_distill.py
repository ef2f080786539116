"""Teacher distillation: crop/target alignment, a tiny CPU run, resume, time budget and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from build_engines.efficientad.distill import DistillConfig, crop_batch, distill, list_images, main, split_items
from build_engines.efficientad.models import pdn
from build_engines.efficientad.teacher import load_teacher
from edgead.errors import BackendError, ConfigError, DataError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:90, 0:110]
    for i in range(5):
        base = np.sin(xx / (3 + i)) * 60 + np.cos(yy / (4 + i)) * 60 + 128
        img = np.clip(base[:, :, None] + rng.normal(0, 20, (90, 110, 3)), 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / f"{i}.png"), img)
    (root / "sub").mkdir()
    cv2.imwrite(str(root / "sub" / "5.jpg"), np.full((70, 70), 90, np.uint8))
    return root


def _cfg(data: Path, out: Path, **kw: object) -> DistillConfig:
    base: dict = dict(data=str(data), out=str(out), steps=3, batch_size=2, image_size=128, crop=64, device="cpu", checkpoint_every=2)
    base.update(kw)
    return DistillConfig(**base)


# ----------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("size", ["s", "m"])
def test_padded_pdn_crop_equals_window_of_full_output(size: str) -> None:
    torch.manual_seed(0)
    net = pdn(size, padding=True).eval()
    full = torch.randn(1, 3, 128, 128)
    cy, cx, crop = 4, 6, 64  # target cells; pixels 16 and 24
    with torch.no_grad():
        out_full = net(full)
        out_crop = net(full[:, :, 4 * cy:4 * cy + crop, 4 * cx:4 * cx + crop])
    assert out_crop.shape[-1] == crop // 4
    # cell j sees input pixels 4j-16 .. 4j+16: interior cells 4..11 never see the crop's padding
    inner = slice(4, crop // 4 - 4)
    torch.testing.assert_close(out_crop[..., inner, inner], out_full[..., cy + 4:cy + crop // 4 - 4, cx + 4:cx + crop // 4 - 4], rtol=1e-4, atol=1e-5)
    # and the border cells do differ (the test can fail: padding reaches them)
    assert not torch.allclose(out_crop[..., 0, 0], out_full[..., cy, cx], atol=1e-3)


@pytest.mark.parametrize("size", ["s", "m"])
def test_unpadded_pdn_on_a_crop_is_exactly_the_window_of_the_full_output(size: str) -> None:
    """What crop training relies on: the unpadded PDN's outputs on a crop are the full image's target cells
    [cy+4, cy+crop/4-4), with no border effect at all."""
    from build_engines.efficientad.distill import UNPADDED_BORDER

    torch.manual_seed(0)
    padded = pdn(size, padding=True).eval()
    net = pdn(size, padding=False).eval()
    net.load_state_dict(padded.state_dict())
    full = torch.randn(1, 3, 128, 128)
    cy, cx, crop = 4, 6, 64
    with torch.no_grad():
        out_full = padded(full)  # the padded grid is the target grid (input / 4)
        out_crop = net(full[:, :, 4 * cy : 4 * cy + crop, 4 * cx : 4 * cx + crop])
    b = UNPADDED_BORDER
    assert out_crop.shape[-1] == crop // 4 - 2 * b
    torch.testing.assert_close(out_crop, out_full[..., cy + b : cy + crop // 4 - b, cx + b : cx + crop // 4 - b], rtol=1e-4, atol=1e-5)


def test_crop_batch_takes_aligned_windows() -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (3, 128, 128, 3), dtype=np.uint8)
    tgts = rng.normal(size=(3, 7, 32, 32)).astype(np.float16)
    idx, cy, cx = torch.tensor([2, 0, 2]), torch.tensor([0, 5, 16]), torch.tensor([16, 3, 0])
    im, tg = crop_batch(torch.from_numpy(imgs), torch.from_numpy(tgts), idx, cy, cx, 64)
    for b in range(3):
        i, y, x = int(idx[b]), int(cy[b]), int(cx[b])
        np.testing.assert_array_equal(im[b].numpy(), imgs[i, 4 * y:4 * y + 64, 4 * x:4 * x + 64].transpose(2, 0, 1))
        np.testing.assert_array_equal(tg[b].numpy(), tgts[i, :, y:y + 16, x:x + 16])


# ----------------------------------------------------------------------------- runs


def test_tiny_run_writes_a_loadable_teacher(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "teacher_s.pth"
    assert main(["--data", str(images), "--out", str(out), "--steps", "3", "--batch-size", "2", "--image-size", "128", "--crop", "64", "--device", "cpu"]) == 0
    state = torch.load(out, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values())
    assert sorted(state) == sorted(pdn("s").state_dict())
    teacher = load_teacher("s", out)
    with torch.no_grad():
        assert teacher(torch.randn(1, 3, 64, 64)).shape == (1, 384, 8, 8)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["steps"] == 3 and meta["backbone"] == "efficientnet-lite0" and meta["n_images"] == 6 and meta["heldout_images"] == 0
    assert np.isfinite(meta["final_loss"]) and meta["final_loss"] > 0
    assert meta["command"].startswith("edgead distill --data")
    cache = tmp_path / "distill_cache_efficientnet-lite0_128"
    targets = np.load(cache / "targets.npy", mmap_mode="r")
    assert targets.dtype == np.float16 and targets.shape == (6 + 1, 384, 32, 32)  # one greyscale copy
    grey = np.load(cache / "images.npy", mmap_mode="r")[-1]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_resume_continues_exactly(images: Path, tmp_path: Path) -> None:
    distill(_cfg(images, tmp_path / "a.pth", steps=2))
    cache_file = tmp_path / "distill_cache_efficientnet-lite0_128" / "targets.npy"
    mtime = cache_file.stat().st_mtime_ns
    distill(_cfg(images, tmp_path / "a.pth", steps=4, resume=True))
    distill(_cfg(images, tmp_path / "b.pth", steps=4))
    assert cache_file.stat().st_mtime_ns == mtime  # the backbone ran once for all three calls
    a, b = torch.load(tmp_path / "a.pth", weights_only=True), torch.load(tmp_path / "b.pth", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    meta_a = json.loads((tmp_path / "a.json").read_text())
    meta_b = json.loads((tmp_path / "b.json").read_text())
    assert meta_a["steps"] == 4 and meta_a["loss_every_100"] == meta_b["loss_every_100"]


def test_lite1_target_with_stages_and_snapshots(images: Path, tmp_path: Path) -> None:
    """Another backbone and stage layout (stride-4 stage 2: the backbone sees the image at the PDN size), and a
    learning curve: a teacher file and its held-out loss every N steps."""
    out = tmp_path / "t.pth"
    distill(_cfg(images, out, steps=4, backbone="efficientnet-lite1", stages="2,3", snapshot_every=2, val_fraction=0.0))
    targets = np.load(tmp_path / "distill_cache_efficientnet-lite1_23_128" / "targets.npy", mmap_mode="r")
    assert targets.shape[1:] == (384, 32, 32)
    snaps = sorted(p.name for p in (tmp_path / "t.pth.snapshots").iterdir())
    assert snaps == ["t_step000002.pth", "t_step000004.pth"]
    assert load_teacher("s", tmp_path / "t.pth.snapshots" / snaps[0]) is not None
    meta = json.loads(out.with_suffix(".json").read_text())
    assert [c["step"] for c in meta["curve"]] == [2, 4] and "efficientnet-lite1 stages 2,3" in meta["targets"]
    with pytest.raises(ConfigError, match="stages"):
        distill(_cfg(images, tmp_path / "u.pth", stages="4,2"))


def test_time_budget_stops_the_run(images: Path, tmp_path: Path) -> None:
    out = distill(_cfg(images, tmp_path / "t.pth", steps=10**6, image_size=64, batch_size=1, time_budget_s=8.0))
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["steps"] < 10**6
    assert load_teacher("s", out) is not None


# ----------------------------------------------------------------------------- refusals


def test_resume_refusals(images: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--resume.*no checkpoint"):
        distill(_cfg(images, tmp_path / "x.pth", resume=True))
    distill(_cfg(images, tmp_path / "x.pth", steps=1))
    with pytest.raises(ConfigError, match="already exists"):
        distill(_cfg(images, tmp_path / "x.pth", steps=1))
    with pytest.raises(ConfigError, match="checkpoint options differ.*batch_size"):
        distill(_cfg(images, tmp_path / "x.pth", steps=2, batch_size=3, resume=True))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"crop": 60}, "--crop"),
        ({"crop": 66}, "--crop"),
        ({"crop": 256}, "--crop"),
        ({"size": "l"}, "model size"),
        ({"backbone": "vgg16"}, "backbone"),
        ({"backbone": "wide_resnet101_2"}, "--backbone-weights"),
        ({"device": "tpu"}, "device"),
        ({"steps": 0}, "--steps"),
        ({"batch_size": 0}, "--batch-size"),
        ({"image_size": 100}, "--image-size"),
        ({"time_budget_s": -1.0}, "--time-budget-s"),
    ],
)
def test_option_refusals(images: Path, tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        distill(_cfg(images, tmp_path / "t.pth", **kw))


def test_data_refusals(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        list_images(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="at least one image"):
        distill(_cfg(tmp_path / "empty", tmp_path / "t.pth"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="readable image"):
        distill(_cfg(tmp_path / "bad", tmp_path / "t.pth"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_refused_without_gpu(images: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="--device"):
        distill(_cfg(images, tmp_path / "t.pth", device="cuda"))


def test_cli_reports_errors(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgead.cli import main as cli_main

    assert cli_main(["distill", "--data", str(images), "--out", str(tmp_path / "t.pth"), "--crop", "10"]) == 2
    assert "--crop | got 10" in capsys.readouterr().err


def test_split_keeps_held_out_images_and_their_grey_copies_apart() -> None:
    grey_of = [0, 3, 3, 17, 25]
    train, held = split_items(40, grey_of, 0.1, seed=0)
    assert len(held) == 4 and held == split_items(40, grey_of, 0.1, seed=0)[1]
    source = list(range(40)) + grey_of
    assert sorted(set(range(45)) - set(train)) == sorted(k for k, src in enumerate(source) if src in held)
    assert split_items(10, [], 0.1, seed=0) == (list(range(10)), [])  # too few images to hold any out
