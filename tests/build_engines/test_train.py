"""EfficientAD training: losses against naive references, a tiny run, resume, refusal, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from build_engines.efficientad import train as train_mod
from build_engines.efficientad.models import EfficientAD
from build_engines.efficientad.run import load_run
from build_engines.efficientad.train import PRESETS, TrainConfig, color_jitter, hard_feature_loss, learning_rate, step_losses, train
from build_engines.synthetic import generate
from edgead.datasets import open_dataset, read_image, split_train_val
from edgead.errors import ConfigError, DataError
from edgead.postprocess import efficientad_maps
from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare

torch.set_num_threads(1)


def _naive_hard_loss(t: np.ndarray, s: np.ndarray, q: float) -> float:
    d = ((t.astype(np.float64) - s.astype(np.float64)) ** 2).ravel()
    sorted_d = np.sort(d)
    pos = q * (d.size - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    thr = sorted_d[lo] + (sorted_d[hi] - sorted_d[lo]) * (pos - lo)
    return float(d[d >= thr].mean())


@pytest.mark.parametrize("q", [0.999, 0.9, 0.5])
@pytest.mark.parametrize("shape", [(1, 384, 8, 8), (3, 16, 5, 7)])
def test_hard_feature_loss_matches_naive(q: float, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    t = rng.normal(size=shape).astype(np.float32)
    s = rng.normal(size=shape).astype(np.float32) + 0.3
    got = float(hard_feature_loss(torch.from_numpy(t), torch.from_numpy(s), q))
    assert got == pytest.approx(_naive_hard_loss(t, s, q), rel=1e-5)
    # the hard loss only keeps the largest differences: it exceeds the plain mean
    assert got > float(((t - s) ** 2).mean())


def test_hard_feature_loss_kthvalue_path_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    t = rng.normal(size=(2, 8, 9, 11)).astype(np.float32)
    s = rng.normal(size=(2, 8, 9, 11)).astype(np.float32)
    monkeypatch.setattr(train_mod, "_QUANTILE_LIMIT", 10)
    got = float(hard_feature_loss(torch.from_numpy(t), torch.from_numpy(s), 0.99))
    assert got == pytest.approx(_naive_hard_loss(t, s, 0.99), rel=1e-5)


def test_hard_feature_loss_has_gradient_only_on_hard_elements() -> None:
    t = torch.zeros(1, 1, 2, 5)
    s = torch.arange(10.0).reshape(1, 1, 2, 5).requires_grad_(True)
    hard_feature_loss(t, s, 0.8).backward()
    grad = s.grad.reshape(-1)
    assert torch.all(grad[:7] == 0) and torch.all(grad[8:] > 0)


def _jitter_reference(rgb: np.ndarray, kind: int, f: float) -> np.ndarray:
    out = np.empty_like(rgb)
    gray = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    for c in range(3):
        for y in range(rgb.shape[1]):
            for x in range(rgb.shape[2]):
                v = rgb[c, y, x]
                if kind == 0:
                    r = v * f
                elif kind == 1:
                    r = f * v + (1 - f) * gray.mean()
                else:
                    r = f * v + (1 - f) * gray[y, x]
                out[c, y, x] = min(max(r, 0.0), 1.0)
    return out


def test_color_jitter_matches_pixel_reference() -> None:
    rng = np.random.default_rng(3)
    rgb = rng.uniform(0.05, 0.95, size=(3, 3, 4, 5))
    mean = np.array(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.array(IMAGENET_STD).reshape(1, 3, 1, 1)
    x = torch.from_numpy(((rgb - mean) / std).astype(np.float32))
    kinds, factors = np.array([0, 1, 2]), np.array([1.19, 0.81, 1.2])
    got = color_jitter(x, kinds, factors, torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)).numpy()
    for i in range(3):
        ref = (_jitter_reference(rgb[i], int(kinds[i]), float(factors[i])) - mean[0]) / std[0]
        np.testing.assert_allclose(got[i], ref, rtol=1e-5, atol=1e-5)


def _jitter_vectorised(x: torch.Tensor, kinds: np.ndarray, factors: np.ndarray) -> torch.Tensor:
    """Independent torchvision-style jitter of normalised images (brightness / contrast / saturation)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = []
    for img, kind, f in zip(x, kinds, factors, strict=True):
        rgb = img * std + mean
        gray = (torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1) * rgb).sum(0, keepdim=True)
        blend = {0: torch.zeros_like(rgb), 1: gray.mean().expand_as(rgb), 2: gray.expand_as(rgb)}[int(kind)]
        out.append(((float(f) * rgb + (1 - float(f)) * blend).clamp(0, 1) - mean) / std)
    return torch.stack(out)


@pytest.fixture(scope="module")
def tiny_model() -> EfficientAD:
    torch.manual_seed(0)
    model = EfficientAD("s", 128).eval()  # eval: no dropout, so two forward passes agree
    with torch.no_grad():  # teacher statistics of image-like inputs: the normalised teacher then varies with its input
        raw = model.teacher((torch.rand(4, 3, 128, 128) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        model.teacher_mean.copy_(raw.mean((0, 2, 3), keepdim=True))
        model.teacher_std.copy_(raw.std((0, 2, 3), keepdim=True))
        # at PyTorch's default init the AE output hardly depends on its input (1e-6 relative) and the student's
        # little; scaled, both do, so that feeding either the wrong image changes the losses by > 0.4 %
        for net, gain in ((model.autoencoder, 2.5), (model.student, 2.0)):
            for conv in net:
                if isinstance(conv, torch.nn.Conv2d):
                    conv.weight.mul_(gain)
    return model


def test_step_losses_match_an_independent_reference(tiny_model: EfficientAD) -> None:
    """Each term from separate forward passes: catches swapped student halves, a dropped term, the AE on the
    un-jittered image, a teacher not normalised, a penalty on the wrong half."""
    m, c = tiny_model, tiny_model.out_channels
    g = torch.Generator().manual_seed(1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (torch.rand(2, 3, 128, 128, generator=g) - mean) / std  # images in the valid pixel range
    pen = torch.randn(1, 3, 128, 128, generator=g)
    kinds, factors = np.array([0, 2]), np.array([0.5, 0.0])  # strong jitter (half brightness, greyscale): easy to tell apart
    with torch.no_grad():
        teacher_x = (m.teacher(x) - m.teacher_mean) / m.teacher_std
        got = step_losses(m, x, teacher_x, kinds, factors, mean, std, penalty=pen, p_hard=0.999)
        x_ae = _jitter_vectorised(x, kinds, factors)
        t_ae = (m.teacher(x_ae) - m.teacher_mean) / m.teacher_std
        s_x, s_ae, a = m.student(x)[:, :c], m.student(x_ae)[:, c:], m.autoencoder(x_ae)
        ref = {
            "hard": _naive_hard_loss(teacher_x.numpy(), s_x.numpy(), 0.999),
            "penalty": float((m.student(pen)[:, :c].double() ** 2).mean()),
            "ae": float(((t_ae.double() - a.double()) ** 2).mean()),
            "stae": float(((a.double() - s_ae.double()) ** 2).mean()),
        }
        # the comparison below can tell the right inputs from the plain image at every place that needs the jittered one
        wrong = {
            "ae": float(((t_ae.double() - m.autoencoder(x).double()) ** 2).mean()),
            "ae (teacher)": float(((((m.teacher(x) - m.teacher_mean) / m.teacher_std).double() - a.double()) ** 2).mean()),
            "stae": float(((a.double() - m.student(x)[:, c:].double()) ** 2).mean()),
        }
    for name, value in wrong.items():
        assert value != pytest.approx(ref[name.split()[0]], rel=2e-3), name
    for name, value in ref.items():
        assert float(getattr(got, name)) == pytest.approx(value, rel=1e-4), name
    assert float(got.total) == pytest.approx(sum(ref.values()), rel=1e-4)
    assert float(step_losses(m, x, teacher_x, kinds, factors, mean, std).penalty) == 0.0


def test_every_trained_part_gets_a_gradient(tiny_model: EfficientAD) -> None:
    m = tiny_model
    m.zero_grad()
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        t = m.normalised_teacher(x)
    step_losses(m, x, t, np.array([0]), np.array([1.1]), mean, std, penalty=x).total.backward()
    last = m.student[-1].weight.grad
    c = m.out_channels
    assert last[:c].abs().sum() > 0 and last[c:].abs().sum() > 0  # both halves learn (hard + penalty, stae)
    assert m.autoencoder[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    m.zero_grad()


def test_learning_rate_drops_tenfold_at_the_configured_fraction() -> None:
    cfg = TrainConfig(data="d", out="o", preset="cpu", steps=40, lr=2e-3, lr_drop_fraction=0.75).with_preset()
    assert [learning_rate(s, cfg) for s in (0, 29, 30, 39)] == pytest.approx([2e-3, 2e-3, 2e-4, 2e-4])


def test_presets_fill_only_unset_options() -> None:
    cfg = TrainConfig(data="d", out="o", preset="cpu", steps=7).with_preset()
    assert cfg.steps == 7 and cfg.image_size == PRESETS["cpu"]["image_size"] and cfg.batch_size == PRESETS["cpu"]["batch_size"]
    assert TrainConfig(data="d", out="o").with_preset().steps == 70_000


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"preset": "cpuu"}, "did you mean 'cpu'"),
        ({"image_size": 100}, "image_size"),
        ({"steps": 0}, "steps"),
        ({"model": "l"}, "model size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"device": "tpu"}, "device"),
        ({"threshold_method": "median"}, "threshold method"),
    ],
)
def test_config_errors_are_precise(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        TrainConfig(data="d", out="o", preset=kwargs.pop("preset", "cpu"), **kwargs).with_preset()
    assert "how to fix" in str(info.value)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "data", n_train=6, n_test_good=2, n_test_defect=1, size=128, seed=0)


def _cfg(data: Path, out: Path, **kw: object) -> TrainConfig:
    base: dict = {"preset": "demo", "teacher": "random", "steps": 4, "val_fraction": 0.34, "checkpoint_every": 2, "seed": 5, "device": "cpu"}
    base.update(kw)
    return TrainConfig(data=str(data), out=str(out), **base)


@pytest.fixture(scope="module")
def full_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(_cfg(data, tmp_path_factory.mktemp("runs") / "full"))


def test_tiny_run_writes_a_complete_loadable_run_dir(full_run: Path, data: Path) -> None:
    for name in ("config.json", "log.jsonl", "model.pt", "calibration.json", "checkpoints/last.pt"):
        assert (full_run / name).is_file(), name
    run = load_run(full_run)
    cfg = run.config
    assert cfg["steps"] == 4 and cfg["image_size"] == 128 and cfg["data"] == str(data) and list(cfg["mean"]) == list(IMAGENET_MEAN)
    records = [json.loads(line) for line in (full_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [4]
    assert records[-1]["event"] == "done" and all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    # teacher normalisation: computed over the training images, not the defaults
    assert not torch.allclose(run.model.teacher_std, torch.ones_like(run.model.teacher_std))

    # independent recomputation of the calibration on the held-out images
    train_paths, val_paths = split_train_val(open_dataset(data).train_good, 0.34, 5)
    assert run.calibration.validation_images == len(val_paths) == 2
    x = torch.from_numpy(np.stack([prepare(read_image(p), 128) for p in val_paths]))
    with torch.no_grad():
        t, s, a = (o.numpy() for o in run.model(x))
    local, glob = efficientad_maps(t, s, a)
    cal = run.calibration
    np.testing.assert_allclose([cal.qa_st, cal.qb_st], np.quantile(local.astype(np.float64), [0.9, 0.995]), rtol=1e-4)
    np.testing.assert_allclose([cal.qa_ae, cal.qb_ae], np.quantile(glob.astype(np.float64), [0.9, 0.995]), rtol=1e-4)
    merged = 0.5 * 0.1 * (local - cal.qa_st) / (cal.qb_st - cal.qa_st) + 0.5 * 0.1 * (glob - cal.qa_ae) / (cal.qb_ae - cal.qa_ae)
    scores = merged.reshape(len(val_paths), -1).max(axis=1)  # edge padding adds no value
    s64 = scores.astype(np.float64)
    assert cal.threshold == pytest.approx(float(s64.mean() + 4 * s64.std()), rel=1e-4)  # the default rule, sigma:4
    assert cal.threshold_method.startswith("mean + 4 std of 2")


def test_teacher_statistics_are_channel_mean_and_std_of_the_training_images(full_run: Path, data: Path) -> None:
    run = load_run(full_run)
    train_paths, _ = split_train_val(open_dataset(data).train_good, 0.34, 5)
    x = torch.from_numpy(np.stack([prepare(read_image(p), 128) for p in train_paths]))
    with torch.no_grad():
        raw = run.model.teacher(x).double().numpy()
    np.testing.assert_allclose(run.model.teacher_mean.flatten().numpy(), raw.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run.model.teacher_std.flatten().numpy(), raw.std(axis=(0, 2, 3)), rtol=1e-4, atol=1e-6)


def test_training_loop_feeds_the_losses_what_the_recipe_says(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wiring: the cached teacher target is the normalised teacher of the very batch, the penalty image is
    given on every step, jitter draws stay in the paper's ranges, and the logged lr follows the schedule."""
    pen_dir = tmp_path / "generic"
    pen_dir.mkdir()
    for i in range(3):
        cv2.imwrite(str(pen_dir / f"{i}.png"), np.random.default_rng(i).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    calls: list[dict] = []
    real = train_mod.step_losses

    def spy(model, x, teacher_x, kinds, factors, mean, std, *, penalty=None, p_hard=0.999):  # type: ignore[no-untyped-def]
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            expected = model.normalised_teacher(x.float())
        # the cache holds fp16 copies: relative error <= 2^-11 of the largest value
        calls.append({"target_error": float((expected - teacher_x.float()).abs().max() / expected.abs().max()), "penalty": penalty, "kinds": kinds, "factors": factors, "p_hard": p_hard})
        return real(model, x, teacher_x, kinds, factors, mean, std, penalty=penalty, p_hard=p_hard)

    monkeypatch.setattr(train_mod, "step_losses", spy)
    out = train(_cfg(data, tmp_path / "run", steps=4, lr=1e-3, lr_drop_fraction=0.5, penalty_data=str(pen_dir), log_every=1))
    assert len(calls) == 4
    assert max(call["target_error"] for call in calls) < 1e-3
    assert all(call["penalty"] is not None and tuple(call["penalty"].shape) == (1, 3, 128, 128) for call in calls)
    assert all(set(call["kinds"].tolist()) <= {0, 1, 2} and np.all((call["factors"] >= 0.8) & (call["factors"] <= 1.2)) for call in calls)
    assert {call["p_hard"] for call in calls} == {0.999}
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"step"' in line]
    assert [r["lr"] for r in records] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    assert all(r["loss_penalty"] > 0 for r in records)


def test_resume_gives_identical_results(full_run: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    assert train(_cfg(data, out, stop_after=2)) == out
    assert not (out / "model.pt").exists()
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["step"] == 2
    train(_cfg(data, out), resume=True)
    a = torch.load(full_run / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((full_run / "calibration.json").read_text()) == json.loads((out / "calibration.json").read_text())
    steps = [json.loads(line).get("step") for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps[:2] == [2, 4]


def test_refuses_non_empty_run_dir_and_keeps_files(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not empty"):
        train(_cfg(data, out))
    assert (out / "notes.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resume_without_checkpoint_is_refused(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--resume"):
        train(_cfg(data, tmp_path / "new"), resume=True)


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgead.cli import main as cli

    assert cli(["train", "--out", str(tmp_path / "r")]) == 2
    assert "--data" in capsys.readouterr().err
    assert cli(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), "--preset", "papr"]) == 2
    assert "did you mean 'paper'" in capsys.readouterr().err
    assert cli(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--image-size", "200"]) == 2
    assert "multiple of 64" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--steps", "0"])
    assert "expected an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_tiled_training_calibrates_per_image_and_the_detector_reproduces_it(tmp_path: Path) -> None:
    """--tile: every image is cut into tiles for training and calibration; the threshold is fitted on per-image
    scores (max over tiles); the exported bundle carries the layout and the torch-free Detector gives the
    scores of the torch evaluation path on the same frames."""
    from build_engines.evaluate import predict
    from build_engines.export import export_bundle
    from edgead import Detector, load_bundle
    from edgead.tiling import Tiling

    data = generate(tmp_path / "big", n_train=6, n_test_good=1, n_test_defect=1, size=200, seed=2)
    out = train(_cfg(data, tmp_path / "run", steps=2, tile=128, tile_overlap=32, snapshot_every=1))
    run = load_run(out)
    assert run.tiling == Tiling(128, 32) and len(Tiling(128, 32).layout(200, 200)) == 4
    _, val_paths = split_train_val(open_dataset(data).train_good, 0.34, 5)
    cal = run.calibration
    assert cal.validation_images == len(val_paths) == len(cal.validation_scores) == 2
    frames = [read_image(p) for p in val_paths]
    _, torch_scores = predict(run.model, run.post, frames, tiling=run.tiling)
    np.testing.assert_allclose(cal.validation_scores, torch_scores, rtol=1e-4)
    v = np.asarray(cal.validation_scores, np.float64)
    assert cal.threshold == pytest.approx(float(v.mean() + 4 * v.std()), rel=1e-6)  # per-image scores, the default sigma:4
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step_000001.pt", "step_000002.pt"]

    bundle = export_bundle(out, tmp_path / "bundle", variants=("merged",))
    assert load_bundle(bundle).manifest.input.tiling == Tiling(128, 32)
    with Detector(bundle, backend="onnxruntime", threads=1) as det:
        results = det.infer_batch(frames)
    np.testing.assert_allclose([r.score for r in results], torch_scores, rtol=1e-4, atol=1e-6)
    assert results[0].anomaly_map.shape == frames[0].shape[:2]


class _Payload:
    """Unpickling this runs code: the classic malicious checkpoint."""

    def __reduce__(self) -> tuple:
        return (Path.write_text, (Path(_PWNED_PATH[0]), "pwned"))


_PWNED_PATH = [""]


def test_resume_never_unpickles_code(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_cfg(data, out, stop_after=2))
    _PWNED_PATH[0] = str(tmp_path / "pwned.txt")
    blob = torch.load(out / "checkpoints/last.pt", weights_only=True)
    blob["extra"] = _Payload()
    torch.save(blob, out / "checkpoints/last.pt")
    with pytest.raises(DataError, match="untrusted or damaged"):
        train(_cfg(data, out), resume=True)
    assert not (tmp_path / "pwned.txt").exists()
