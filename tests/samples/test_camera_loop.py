"""samples/camera_loop.py with the real Detector (ONNX Runtime) on a tiny hand-built bundle.

Fast tests run the loop on an image folder. The `camera` tests run it against the Aravis GigE Vision
simulator (arv-fake-gv-camera-0.8 on 127.0.0.1): frames processed, JSON lines well formed, and after
the simulator is killed and restarted mid-run the loop reconnects and goes on. They skip when the
Aravis stack is missing, unless EDGEAD_REQUIRE_CAMERA=1 (set by .ci/run) turns the skip into a failure.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgead.bundle import InputSpec, Manifest, PostprocessSpec, Producer, ThresholdSpec, VariantSpec, write_bundle

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "samples" / "camera_loop.py"
IMAGE_SIZE = 32
KEYS = {"id", "timestamp", "score", "decision", "latency_ms", "infer_ms", "connection"}


def _load_loop() -> ModuleType:
    spec = importlib.util.spec_from_file_location("camera_loop", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["camera_loop"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


loop = _load_loop()


def make_bundle(out: Path, threshold: float = 0.0) -> Path:
    """Merged-variant bundle whose map is the 4x4-pooled channel mean of the normalised image; score = its max.

    With ImageNet mean/std, a uniform gray frame of value v scores mean_c((v/255 - mean_c)/std_c), so
    dark frames score below 0 and bright ones above: an independent reference for the decisions.
    """
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("ReduceMean", ["pooled"], ["anomaly_map"], axes=[1], keepdims=1),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0),
    ]
    h = IMAGE_SIZE // 4
    graph = helper.make_graph(
        nodes,
        "camera_loop_test",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 1, h, h]), helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    src = out.parent / "onnx_src"
    src.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(src / "model_merged.onnx"))
    manifest = Manifest(
        family="efficientad",
        size="s",
        input=InputSpec(IMAGE_SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        variants={"merged": VariantSpec("model_merged.onnx")},
        postprocess=PostprocessSpec(0.0, 1.0, 0.0, 1.0, 0),
        threshold=ThresholdSpec(threshold, "test: fixed"),
        producer=Producer("0.1.0", None, onnx.__version__, None, 17),
    )
    return write_bundle(out, manifest, {"model_merged.onnx": src / "model_merged.onnx"})


def expected_score(value: int) -> float:
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return float(np.mean((value / 255.0 - mean) / std))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "frames"
    d.mkdir()
    for i, value in enumerate([20, 230, 40, 250, 60, 210]):  # dark -> OK, bright -> NG
        assert cv2.imwrite(str(d / f"{i:03d}.png"), np.full((48, 64, 3), value, np.uint8))
    return d


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_records(records: list[dict]) -> None:
    for r in records:
        assert KEYS <= set(r), r
        assert isinstance(r["id"], int) and isinstance(r["connection"], int)
        assert r["decision"] in ("OK", "NG") and r["finite"] is True
        assert isinstance(r["score"], float) and math.isfinite(r["score"])
        assert r["latency_ms"] >= 0 and r["timestamp"] > 1.6e9 and 0 <= r["infer_ms"] <= r["latency_ms"] + 1.0
    ids = [r["id"] for r in records]
    assert ids == sorted(set(ids)), "frame ids must increase"


# ----------------------------------------------------------------------------- loop on a folder (fast)
def test_folder_loop_decides_like_the_reference_and_writes_jsonl(bundle: Path, folder: Path, tmp_path: Path) -> None:
    out, ng_dir, summary_path = tmp_path / "out.jsonl", tmp_path / "ng", tmp_path / "summary.json"
    args = loop.parse_args(
        ["--bundle", str(bundle), "--backend", "onnxruntime", "--threads", "1", "--source", f"folder:{folder}", "--queue-size", "2"]  # default policy for folders: block
        + ["--jsonl", str(out), "--ng-dir", str(ng_dir), "--summary", str(summary_path)]
    )
    summary = loop.run(args)
    records = read_jsonl(out)
    check_records(records)
    values = [20, 230, 40, 250, 60, 210]
    assert [r["id"] for r in records] == list(range(6))
    np.testing.assert_allclose([r["score"] for r in records], [expected_score(v) for v in values], rtol=1e-4, atol=1e-5)
    assert [r["decision"] for r in records] == ["NG" if expected_score(v) > 0 else "OK" for v in values] == ["OK", "NG"] * 3
    assert sorted(Path(r["saved"]).name for r in records if "saved" in r) == sorted(p.name for p in ng_dir.glob("*.jpg"))
    saved = cv2.imread(str(next(ng_dir.glob("*.jpg"))))
    assert saved.shape == (48, 64, 3)
    assert summary["processed"] == 6 and summary["ng"] == 3 and summary["dropped_queue"] == 0
    assert json.loads(summary_path.read_text())["processed"] == 6


def test_ng_writer_keeps_the_disk_budget(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    writer = loop.NGWriter(tmp_path / "ng", budget_bytes=60_000)
    for i in range(30):
        image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # noise: JPEGs of ~10 kB
        result = loop.Result(1.0, rng.random((64, 64), dtype=np.float32), True, 0.5)
        writer.save(loop.Frame(image, i, time.time_ns() + i, "bgr", {}), result)
    files = [p for p in (tmp_path / "ng").iterdir() if p.suffix == ".jpg"]
    total = sum(p.stat().st_size for p in files)
    assert total <= 60_000 and writer.total == total and writer.evicted == 30 - len(files) > 0
    assert f"{29:08d}" in max(p.name for p in files)  # the newest survives
    with pytest.raises(loop.ConfigError, match="ng-budget"):
        loop.NGWriter(tmp_path / "x", 0)


def test_ng_writer_only_ever_deletes_what_it_wrote(tmp_path: Path) -> None:
    """A user's ng_*.jpg, a folder of that name and a file replaced since are never deleted; a restarted loop
    keeps evicting its own earlier files within the budget."""
    folder = tmp_path / "ng"
    folder.mkdir()
    mine = folder / "ng_1_00000001.jpg"
    mine.write_bytes(b"user photo" * 1000)
    (folder / "ng_2_00000002.jpg").mkdir()  # a directory with such a name
    rng = np.random.default_rng(0)

    def fill(writer: loop.NGWriter, n: int, start: int) -> None:
        for i in range(start, start + n):
            image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            writer.save(loop.Frame(image, i, 10**18 + i, "bgr", {}), loop.Result(1.0, rng.random((64, 64), dtype=np.float32), True, 0.5))

    first = loop.NGWriter(folder, budget_bytes=60_000)
    fill(first, 20, 0)
    assert first.evicted > 0 and mine.read_bytes() == b"user photo" * 1000 and (folder / "ng_2_00000002.jpg").is_dir()
    kept = sorted(p for p, _ in first.files)
    replaced = kept[0]
    replaced.write_bytes(b"the user replaced this one")  # not ours any more (size changed)
    second = loop.NGWriter(folder, budget_bytes=60_000)  # a restarted loop
    assert replaced not in [p for p, _ in second.files] and len(second.files) == len(kept) - 1
    fill(second, 20, 100)
    assert mine.is_file() and (folder / "ng_2_00000002.jpg").is_dir() and replaced.read_bytes() == b"the user replaced this one"
    assert all(not p.exists() for p in kept[1:])  # the earlier run's files were evicted first
    assert sum(size for _, size in second.files) <= 60_000
    (tmp_path / "afile").write_text("x")
    with pytest.raises(loop.ConfigError, match="ng-dir"):
        loop.NGWriter(tmp_path / "afile", 1000)


def test_rolling_stats_match_numpy() -> None:
    values = list(np.random.default_rng(1).random(101) * 50)
    p50, p99 = loop.RollingStats.percentiles(values)
    assert p50 == pytest.approx(float(np.median(values))) and p99 == pytest.approx(float(np.quantile(values, 0.99)))
    stats = loop.RollingStats(window_s=60)
    for v in values[:10]:
        stats.add(v)
    assert len(stats.events) == 10 and stats.fps() > 0


def test_overlay_handles_gray_uint16_and_small_maps() -> None:
    img = np.full((40, 50), 40000, np.uint16)
    amap = np.zeros((10, 10), np.float32)
    amap[5, 5] = 1.0
    out = loop.overlay(img, amap, threshold=0.5)
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() != out[22, 27].tolist()  # the hot spot is coloured differently


@pytest.mark.parametrize("option", ["--jsonl", "--summary", "--ng-dir"])
@pytest.mark.parametrize("kind", ["missing_folder", "wrong_kind"])
def test_unusable_outputs_are_refused_before_any_work(bundle: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, kind: str) -> None:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    value = {"missing_folder": tmp_path / "nope" / "x", "wrong_kind": tmp_path / ("a_file" if option == "--ng-dir" else "a_dir")}[kind]
    argv = ["--bundle", str(bundle), "--backend", "onnxruntime", "--source", f"folder:{folder}", option, str(value)]
    if option == "--ng-dir" and kind == "missing_folder":
        (tmp_path / "nope").write_text("a file where the folder should be")
    assert loop.main(argv) == 2
    err = capsys.readouterr().err
    assert f"camera_loop: error: {option}" in err and "Traceback" not in err


def test_no_frame_processed_gives_valid_json_and_unreadable_folders_do_not_spin(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not a png")
    summary = tmp_path / "summary.json"
    argv = ["--bundle", str(bundle), "--backend", "onnxruntime", "--threads", "1", "--source", f"folder:{bad}", "--loop", "--summary", str(summary), "--duration", "30"]
    assert loop.main(argv) == 2  # stops after one pass with a clear error instead of 10 000 warnings a second until --duration
    assert "none of its 3 images can be read" in capsys.readouterr().err
    data = json.loads(summary.read_text(), parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert data["processed"] == 0 and data["latency_ms_p50"] is None and data["elapsed_s"] < 30


def test_missing_bundle_is_a_clear_error(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert loop.main(["--source", f"folder:{folder}"]) == 2
    assert "--bundle" in capsys.readouterr().err


def test_sigint_stops_gracefully_with_a_summary(bundle: Path, folder: Path, tmp_path: Path) -> None:
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    cmd = [sys.executable, str(SCRIPT), "--bundle", str(bundle), "--backend", "onnxruntime", "--threads", "1"]
    cmd += ["--source", f"folder:{folder}", "--loop", "--fps", "50", "--jsonl", str(out), "--summary", str(summary)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not out.exists() or len(read_jsonl(out)) < 3):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    records = read_jsonl(out)
    check_records(records)
    assert len(records) >= 3 and json.loads(summary.read_text())["processed"] == len(records)


# ----------------------------------------------------------------------------- against the GigE Vision simulator
FAKE = "arv-fake-gv-camera-0.8"


def _aravis_ready() -> str | None:
    if shutil.which(FAKE) is None:
        return f"{FAKE} not installed (Debian package aravis-tools)"
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis  # noqa: F401
    except (ImportError, ValueError) as exc:
        return f"Aravis bindings unavailable ({exc}); run scripts/ci_camera_setup.sh"
    return None


def _require_aravis() -> None:
    why = _aravis_ready()
    if why is None:
        return
    if os.environ.get("EDGEAD_REQUIRE_CAMERA") == "1":
        pytest.fail(f"EDGEAD_REQUIRE_CAMERA=1 but {why}")
    pytest.skip(why)


class FakeCamera:
    """arv-fake-gv-camera-0.8 on loopback, started and stopped by its own pid."""

    def __init__(self, serial: str) -> None:
        self.serial = serial
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from edgead.sources import discover_gige

        self.proc = subprocess.Popen([FAKE, "-i", "127.0.0.1", "-s", self.serial], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{FAKE} exited with {self.proc.returncode} (is UDP 127.0.0.1:3956 already taken?)")
            if any(c.serial == self.serial for c in discover_gige()):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{FAKE} did not answer discovery within 10 s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def fake_camera() -> Iterator[FakeCamera]:
    _require_aravis()
    cam = FakeCamera(f"EDGEAD{os.getpid() % 10000}")
    try:
        cam.start()
        yield cam
    finally:
        cam.stop()


@pytest.fixture()
def camera(fake_camera: FakeCamera) -> FakeCamera:
    if fake_camera.proc is None or fake_camera.proc.poll() is not None:
        fake_camera.start()
    return fake_camera


@pytest.mark.camera
@pytest.mark.parametrize("fmt, shape, dtype, color", [("Mono8", (64, 96), np.uint8, "gray"), ("Mono16", (64, 96), np.uint16, "gray"), ("BayerRG8", (64, 96, 3), np.uint8, "bgr"), ("RGB8", (64, 96, 3), np.uint8, "bgr")])
def test_aravis_source_delivers_converted_frames(camera: FakeCamera, fmt: str, shape: tuple, dtype: type, color: str) -> None:
    from edgead.sources import AravisSource, CameraLostError

    src = AravisSource(camera.serial, pixel_format=fmt, roi=(0, 0, 96, 64), frame_rate=50, exposure_us=1000, lost_after_s=5.0)
    frames = []
    with src:
        deadline = time.monotonic() + 10
        while len(frames) < 3 and time.monotonic() < deadline:
            frame = src.read()
            if frame is not None:
                frames.append(frame)
    assert len(frames) == 3, dict(src.stats)
    for f in frames:
        assert f.image.shape == shape and f.image.dtype == dtype and f.color == color
        assert f.meta["pixel_format"] == fmt and f.meta["device"] == f"Aravis-Fake-{camera.serial}"
        assert abs(time.time_ns() - f.timestamp_ns) < 10e9
    assert [f.frame_id for f in frames] == [0, 1, 2]
    cam_ids = [f.meta["camera_frame_id"] for f in frames]
    assert all(0 < (b - a) % 65536 < 1000 for a, b in zip(cam_ids, cam_ids[1:], strict=False))  # increasing (16-bit wrap)
    with pytest.raises(CameraLostError, match="no-such-camera"):
        AravisSource("no-such-camera").open()


@pytest.mark.camera
def test_camera_loop_processes_frames_and_survives_camera_loss(camera: FakeCamera, bundle: Path, tmp_path: Path) -> None:
    out, summary_path, ng_dir = tmp_path / "out.jsonl", tmp_path / "summary.json", tmp_path / "ng"
    n_frames = 120
    cmd = [sys.executable, str(SCRIPT), "--bundle", str(bundle), "--backend", "onnxruntime", "--threads", "1"]
    cmd += ["--source", f"gige:{camera.serial}", "--pixel-format", "Mono8", "--roi", "0,0,512,512", "--fps", "20", "--exposure-us", "1000"]
    cmd += ["--max-frames", str(n_frames), "--duration", "90", "--backoff", "0.2", "--max-backoff", "1"]
    cmd += ["--jsonl", str(out), "--summary", str(summary_path), "--ng-dir", str(ng_dir), "--ng-budget-mb", "2", "--report-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = ""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and (not out.exists() or len(read_jsonl(out)) < 30):
            time.sleep(0.1)
        assert proc.poll() is None and len(read_jsonl(out)) >= 30, "the loop did not process 30 frames in 60 s"
        before = len(read_jsonl(out))
        camera.stop()  # camera loss mid-run
        time.sleep(1.0)
        camera.start()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    records = read_jsonl(out)
    check_records(records)
    summary = json.loads(summary_path.read_text())
    assert len(records) == summary["processed"] == n_frames, err[-3000:]
    assert summary["reconnects"] >= 1 and "camera-lost" in summary["events"] and "reconnected" in summary["events"]
    connections = [r["connection"] for r in records]
    assert connections == sorted(connections) and connections[0] == 0 and connections[-1] >= 1
    assert sum(c >= 1 for c in connections) >= n_frames - before - 10  # it went on after the reconnect
    assert all("camera_frame_id" in r for r in records)
    assert sum(p.stat().st_size for p in ng_dir.glob("*.jpg")) <= 2 * 2**20
