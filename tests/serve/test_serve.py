"""``edgead serve`` on a real Triton Inference Server (PyTriton wheel, 127.0.0.1) against ``RemoteDetector``.

The server runs in the serve environment (``make serve-venv`` -> .venv-serve: PyTriton pins numpy < 2); these tests
skip without it unless EDGEAD_REQUIRE_SERVE=1 (CI), where they fail instead.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgead import Detector
from edgead.errors import ConfigError, InputError
from edgead.remote import RemoteDetector, RemoteError
from edgead.serve import ServeConfig, ServerProcess, check_config, make_infer_func, model_name, model_version

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "samples"))
import tiny_bundle  # noqa: E402

from edgead.tiling import Tiling  # noqa: E402

SERVE_PYTHON = Path(os.environ.get("EDGEAD_SERVE_PYTHON", ROOT / ".venv-serve" / "bin" / "python"))
TOL = 1e-5


def _need_server() -> None:
    if not SERVE_PYTHON.exists():
        if os.environ.get("EDGEAD_REQUIRE_SERVE") == "1":
            pytest.fail(f"EDGEAD_REQUIRE_SERVE=1 but no serve environment at {SERVE_PYTHON}: run 'make serve-venv'")
        pytest.skip(f"no serve environment at {SERVE_PYTHON} (make serve-venv)")


def free_port_block() -> int:
    """A port p with p, p+1, p+2 free (HTTP, gRPC, metrics)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base > 65000:
            continue
        try:
            for k in (1, 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + k))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port block")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, make_run: Callable[..., Path]) -> dict[str, Path]:
    """Two stations: a real EfficientAD-S export (128 px, the demo size) and a tiled bundle (tiny PDN-shaped convolutions)."""
    from build_engines.export import export_bundle

    root = tmp_path_factory.mktemp("serve")
    run = make_run(root / "run", 128, size="s")
    a = export_bundle(run, root / "station_a", variants=("merged",))
    b = tiny_bundle.make_bundle(root / "station_b", seed=3, tiling=Tiling(tile=64, overlap=16))
    return {"station_a": a, "station_b": b}


def start_server(bundles: list[Path], *extra: str, tmp: Path) -> ServerProcess:
    _need_server()
    srv = ServerProcess([str(SERVE_PYTHON)], [str(b) for b in bundles], http_port=free_port_block(), extra_args=["--backend", "onnxruntime", *extra],
                        log_path=tmp / f"serve_{time.monotonic_ns()}.log")
    return srv.start(timeout_s=180)


@pytest.fixture(scope="module")
def server(bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # a 20 ms batching window, so that concurrent requests of a test are batched together
    srv = start_server(list(bundles.values()), "--max-frame-pixels", "1000000", "--max-queue-delay-us", "20000", tmp=tmp_path_factory.mktemp("log"))
    yield srv
    t0 = time.monotonic()
    code = srv.stop(grace_s=30)
    assert time.monotonic() - t0 < 35 and code == 0, srv.log_tail()  # SIGINT: a clean stop, exit status 0


def frames(seed: int = 0) -> list[tuple[np.ndarray, str]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, 256, (64, 64, 3), np.uint8), "bgr"),
        (rng.integers(0, 256, (120, 170, 3), np.uint8), "rgb"),
        (rng.integers(0, 65536, (90, 100), np.uint16), "gray"),
        (rng.integers(0, 256, (50, 80, 4), np.uint8), "bgra"),
    ]


# ---------------------------------------------------------------------------------------------- real server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_remote_scores_match_local_detector(server: ServerProcess, bundles: dict[str, Path], protocol: str) -> None:
    url = server.url if protocol == "http" else f"grpc://127.0.0.1:{server.grpc_port}"
    for name, path in bundles.items():
        with Detector(path, backend="onnxruntime") as local, RemoteDetector(url, name) as remote:
            for frame, color in frames():
                for map_size in ("model", "frame", (33, 47)):
                    a = local.infer(frame, color=color, map_size=map_size)
                    b = remote.infer(frame, color=color, map_size=map_size)
                    assert abs(a.score - b.score) <= TOL, (name, frame.shape, map_size)
                    assert a.anomaly_map.shape == b.anomaly_map.shape
                    np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, atol=TOL)
                    assert (a.decision, a.threshold, a.finite) == (b.decision, pytest.approx(b.threshold), b.finite)
            # a batch of one size goes as one request; default map: model resolution
            same = [f for f, c in frames(1) if c == "bgr"] * 3
            ra, rb = local.infer_batch(same, map_size="model"), remote.infer_batch(same)
            assert [abs(x.score - y.score) <= TOL for x, y in zip(ra, rb, strict=True)] == [True] * len(same)
            assert rb[0].timings["batch"] >= 1 and rb[0].timings["total"] >= rb[0].timings["server"] > 0


def test_client_threshold_override_and_product_free_bundle(server: ServerProcess) -> None:
    frame = frames()[0][0]
    with RemoteDetector(server.url, "station_a") as plain, RemoteDetector(server.url, "station_a", threshold=1e9) as lenient:
        assert lenient.infer(frame).decision == "OK" and lenient.infer(frame).threshold == 1e9
        assert plain.infer(frame).threshold != 1e9
        with pytest.raises(RemoteError) as err:
            plain.infer(frame, product="screws")  # a one-product bundle refuses a product, as locally
        assert err.value.kind == "rejected" and "product" in str(err.value)


def test_bad_requests_get_clear_errors_and_server_stays_up(server: ServerProcess) -> None:
    import tritonclient.http as http

    client = http.InferenceServerClient(f"127.0.0.1:{server.http_port}")

    def raw(name: str, array: np.ndarray, dtype: str, model: str = "station_a") -> str:
        t = http.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        try:
            reply = client.infer(model, [t], outputs=[http.InferRequestedOutput("error"), http.InferRequestedOutput("score")])
        except Exception as exc:  # noqa: BLE001 - Triton refused the request itself; its message is the error
            return str(exc)
        return reply.as_numpy("error").reshape(-1)[0].decode()

    assert "FP32" in raw("frame_u8", np.zeros((1, 8, 8, 3), np.float32), "FP32")  # wrong dtype: Triton's own check
    assert "frame" in raw("frame_u8", np.zeros((1, 0, 5, 3), np.uint8), "UINT8")  # empty frame
    assert "pixels" in raw("frame_u8", np.zeros((1, 1100, 1000, 1), np.uint8), "UINT8")  # over --max-frame-pixels
    assert "C in 1, 3, 4" in raw("frame_u8", np.zeros((1, 8, 8, 2), np.uint8), "UINT8")
    assert "unknown model" in raw("frame_u8", np.zeros((1, 8, 8, 3), np.uint8), "UINT8", model="nope").lower()
    with pytest.raises(RemoteError) as err:
        RemoteDetector(server.url, "nope", retries=0)
    assert err.value.kind == "unknown_model" and "'nope'" in str(err.value)
    with RemoteDetector(server.url, "station_a") as det:
        with pytest.raises(InputError):  # refused on the client, as a local Detector refuses it
            det.infer(np.zeros((8, 8, 3), np.float32))
        assert server.ready()
        assert det.infer(frames()[0][0]).finite


def test_bad_frame_in_a_dynamic_batch_does_not_fail_the_others(server: ServerProcess) -> None:
    """Same-size frames with the same inputs sent at once are batched together by Triton; one of them asks for an
    impossible map size. Its reply carries the error; the others in the same model call get their decisions."""
    import tritonclient.http as http

    frame = frames()[0][0]

    def bad() -> tuple[str, int]:
        client = http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        inputs = []
        # the inputs RemoteDetector sends (Triton batches only requests with the same inputs), one value refused
        bad_inputs = (("frame_u8", frame[None], "UINT8"), ("color", np.array([[b"bgr"]], np.object_), "BYTES"), ("map_size", np.array([[5, 99999]], np.int32), "INT32"))
        for name, array, dtype in bad_inputs:
            t = http.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            inputs.append(t)
        reply = client.infer("station_a", inputs, outputs=[http.InferRequestedOutput(k) for k in ("error", "batch_size")])
        client.close()
        return reply.as_numpy("error")[0, 0].decode(), int(reply.as_numpy("batch_size")[0, 0])

    for _attempt in range(5):  # batching depends on timing; a few tries make it certain in practice
        results: dict[int, object] = {}

        def send(i: int, results: dict[int, object] = results) -> None:
            if i == 0:
                results[0] = bad()
                return
            with RemoteDetector(server.url, "station_a") as det:
                results[i] = det.infer(frame)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        error, batch = results[0]  # type: ignore[misc]
        assert "map_size" in error and "99999" in error
        assert all(getattr(results[i], "finite", False) for i in range(1, 6))
        if batch > 1:
            break
    assert batch > 1, "the bad request was never batched with others"


def test_a_failing_backend_fails_only_its_frames(tmp_path: Path) -> None:
    class Broken:
        def infer_batch(self, *_: object, **__: object) -> list[object]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\n  at layer 7")

    out = make_infer_func(Broken())([{"frame_u8": frames()[0][0][None]}, {"frame_u8": frames()[0][0][None]}])
    for o in out:
        err = o["error"][0, 0].decode()
        assert "RuntimeError: CUDA error: an illegal memory access was encountered" in err and "layer 7" not in err and "server log" in err
        assert bool(o["anomalous"][0, 0]) and not bool(o["finite"][0, 0])


def test_metrics_endpoint_counts_requests(server: ServerProcess) -> None:
    import urllib.request

    with RemoteDetector(server.url, "station_b") as det:
        det.infer(frames()[0][0])
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()  # noqa: S310
    assert 'nv_inference_request_success{model="station_b"' in text


def test_server_down_is_unreachable_after_retries() -> None:
    port = free_port_block()
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as err:
        RemoteDetector(f"http://127.0.0.1:{port}", "x", retries=2, backoff_s=0.05, timeout_s=1)
    assert err.value.kind == "unreachable" and err.value.retryable and "start the server" in str(err.value)
    assert time.monotonic() - t0 < 10


def test_overload_is_a_clear_rejection_never_a_hang(bundles: dict[str, Path], tmp_path: Path) -> None:
    import loadtest

    srv = start_server([bundles["station_a"]], "--max-batch", "1", "--preferred-batch", "1", "--queue-limit", "1", tmp=tmp_path)
    try:
        args = SimpleNamespace(server=srv.url, model="station_a", cameras=8, duration=4.0, max_frames=0, fps=0.0, timeout=5.0, retries=0, restart_at=0)
        summary = loadtest.run_load(args, loadtest.load_frames(None, (240, 320)))
    finally:
        srv.stop()
    assert summary["accounted"] and summary["hung_cameras"] == 0
    assert summary["errors"].get("overloaded", 0) > 0 and summary["decided"] > 0
    assert set(summary["errors"]) <= {"overloaded"}


def test_server_killed_and_restarted_every_frame_accounted(bundles: dict[str, Path], tmp_path: Path) -> None:
    import loadtest

    srv = start_server([bundles["station_a"]], tmp=tmp_path)
    try:
        args = SimpleNamespace(server=srv.url, model="station_a", cameras=3, duration=25.0, max_frames=0, fps=20.0, timeout=2.0, retries=1, restart_at=2.0)
        summary = loadtest.run_load(args, loadtest.load_frames(None, (120, 160)), srv)
    finally:
        srv.stop()
    assert summary["accounted"] and summary["hung_cameras"] == 0
    assert summary["restart"]["decided_after_restart"] > 0
    assert set(summary["errors"]) <= {"unreachable", "timeout"} and sum(summary["errors"].values()) > 0


def test_loadtest_short_form_with_and_without_dynamic_batching(bundles: dict[str, Path], tmp_path: Path) -> None:
    import loadtest

    _need_server()
    out = tmp_path / "lt.json"
    code = loadtest.main(["--serve", str(bundles["station_a"]), "--serve-python", str(SERVE_PYTHON), "--port", str(free_port_block()), "--compare-batching",
                          "--cameras", "3", "--duration", "3", "--frame-size", "120x160", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, result
    for label in ("dynamic_batching", "no_dynamic_batching"):
        run = result["runs"][label]
        assert run["accounted"] and run["decided"] > 0 and run["errors"] == {} and run["latency_ms_p99"] >= run["latency_ms_p50"] > 0
    assert set(result["runs"]["no_dynamic_batching"]["batch_sizes"]) == {"1"}
    assert max(int(b) for b in result["runs"]["dynamic_batching"]["batch_sizes"]) > 1  # 3 cameras, one model: batches form


def test_camera_loop_runs_unchanged_against_the_server(server: ServerProcess, tmp_path: Path) -> None:
    import camera_loop as loop
    import cv2

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, (f, color) in enumerate(frames()):
        if color == "bgr":
            for k in range(3):
                cv2.imwrite(str(folder / f"{i}_{k}.png"), f)
    out = tmp_path / "d.jsonl"
    summary = loop.run(loop.parse_args(["--server", server.url, "--model", "station_a", "--source", f"folder:{folder}", "--jsonl", str(out)]))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert summary["processed"] == len(lines) == 3 and summary["errors"] == 0
    local = Detector(server_bundle(server, "station_a"), backend="onnxruntime")
    for rec, path in zip(lines, sorted(folder.iterdir()), strict=True):
        assert abs(rec["score"] - local.infer(cv2.imread(str(path))).score) <= TOL


def server_bundle(server: ServerProcess, name: str) -> Path:
    return next(Path(a) for a in server.cmd if Path(a).name == name)


def test_camera_loop_server_lost_mid_run_logs_every_frame_as_ng(bundles: dict[str, Path], tmp_path: Path) -> None:
    import camera_loop as loop
    import cv2

    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "0.png"), frames()[0][0])
    out = tmp_path / "d.jsonl"
    srv = start_server([bundles["station_a"]], tmp=tmp_path)
    argv = ["--server", srv.url, "--model", "station_a", "--source", f"folder:{folder}", "--loop", "--fps", "10", "--max-frames", "25", "--jsonl", str(out),
            "--server-timeout", "1", "--server-retries", "0"]
    box: dict[str, object] = {}
    worker = threading.Thread(target=lambda: box.update(summary=loop.run(loop.parse_args(argv))))
    try:
        worker.start()
        time.sleep(1.0)
        srv.kill()  # the server crashes under the running loop
        worker.join(60)
    finally:
        srv.stop()
    assert not worker.is_alive()
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    summary = box["summary"]
    assert summary["processed"] == len(lines) == 25  # every frame has its line
    failed = [x for x in lines if "error" in x]
    assert failed and summary["errors"] == len(failed) and summary["ng"] >= len(failed)
    assert all(x["decision"] == "NG" and x["score"] is None and x["error_kind"] in ("unreachable", "timeout") for x in failed)
    assert lines[0]["decision"] in ("OK", "NG") and "error" not in lines[0]
    with pytest.raises(RemoteError):  # a server that is down at start fails at once, before the camera opens
        loop.run(loop.parse_args([*argv[:-4], "--server-retries", "0"]))


# ---------------------------------------------------------------------------------------------- no server needed
def test_infer_func_isolates_bad_frames_and_groups_the_rest(tmp_path: Path) -> None:
    bundle = tiny_bundle.make_bundle(tmp_path / "b")
    with Detector(bundle, backend="onnxruntime") as det:
        infer = make_infer_func(det, max_pixels=10_000)
        good = frames()[0][0]
        requests = [
            {"frame_u8": good[None]},
            {"frame_u8": np.zeros((1, 200, 200, 3), np.uint8)},  # too many pixels
            {"frame_u8": np.stack([good, good]), "map_size": np.array([[-1, -1], [-1, -1]], np.int32)},
            {"frame_u8": good[None], "product": np.array([[b"x"]], np.object_)},  # this bundle has no products
            {"frame_u16": (good[:, :, :1].astype(np.uint16) * 257)[None], "color": np.array([[b"gray"]], np.object_)},
        ]
        out = infer(requests)
        errors = [o["error"][:, 0].tolist() for o in out]
        assert errors[0] == [b""] and b"pixels" in errors[1][0] and errors[2] == [b"", b""] and b"product" in errors[3][0] and errors[4] == [b""]
        ref = det.infer(good, map_size="model")
        assert out[0]["score"][0, 0] == pytest.approx(ref.score, abs=TOL) and out[0]["anomaly_map"].shape == (1, *ref.anomaly_map.shape)
        assert out[2]["anomaly_map"].shape == (2, 64, 64)
        assert bool(out[1]["anomalous"][0, 0]) and not bool(out[1]["finite"][0, 0])  # a refused frame is never OK
        assert out[0]["batch_size"][0, 0] == 5  # the frames this model call scored


def test_model_name_and_version(tmp_path: Path) -> None:
    a = tiny_bundle.make_bundle(tmp_path / "Station 1")
    b = tiny_bundle.make_bundle(tmp_path / "other", seed=5)
    from edgead.bundle import load_bundle

    assert model_name(a) == "Station_1"
    va, vb = model_version(load_bundle(a).manifest), model_version(load_bundle(b).manifest)
    assert 0 < va < 2**31 and va != vb and va == model_version(load_bundle(a).manifest)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"names": ["a", "b"]}, "--name"),
        ({"instances": 0}, "--instances"),
        ({"preferred_batch": [32]}, "--preferred-batch"),
        ({"http_port": 8001}, "ports"),
        ({"bundles": []}, "bundles"),
        ({"names": ["bad name"]}, "--name"),
    ],
)
def test_serve_config_errors(change: dict[str, object], needle: str) -> None:
    cfg = ServeConfig(bundles=["x"])
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError, match=needle):
        check_config(cfg)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"url": "ftp://x:1"}, "server url"), ({"url": ""}, "server url"), ({"model": ""}, "model"), ({"timeout_s": 0}, "timeout_s"),
     ({"retries": -1}, "retries"), ({"threshold": float("nan")}, "threshold"), ({"map_size": "big"}, "map_size")],
)
def test_remote_detector_argument_errors(kwargs: dict[str, object], needle: str) -> None:
    args: dict[str, object] = {"url": "http://127.0.0.1:1", "model": "m", **kwargs}
    with pytest.raises(ConfigError, match=needle):
        RemoteDetector(**args)  # type: ignore[arg-type]


def test_server_exits_with_status_1_when_tritonserver_dies(bundles: dict[str, Path], tmp_path: Path) -> None:
    """A supervisor (systemd Restart=on-failure) must see the crash: the edgead serve process exits 1."""
    import signal
    import subprocess

    srv = start_server([bundles["station_b"]], tmp=tmp_path)
    try:
        children = subprocess.run(["pgrep", "-s", str(srv.pid), "-f", "tritonserver"], capture_output=True, text=True, check=False).stdout.split()
        assert children, "no tritonserver process in the server's session"
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        assert srv.wait(60) == 1, srv.log_tail()
    finally:
        srv.kill()


def _bare_remote(protocol: str = "http") -> RemoteDetector:
    """A RemoteDetector that never connected: for the classification of client failures."""
    from tritonclient.utils import InferenceServerException

    det = RemoteDetector.__new__(RemoteDetector)
    det._protocol, det._address, det._model, det._timeout = protocol, "127.0.0.1:8000", "m", 2.0
    det._server_exception = InferenceServerException
    return det


@pytest.mark.parametrize(
    ("status", "text", "kind"),
    [
        ("503", "Exceeds maximum queue size", "overloaded"),
        ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", "overloaded"),
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", "unreachable"),
        ("503", "Server is shutting down", "unreachable"),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", "timeout"),
        ("400", "Request for unknown model: 'm' is not found", "unknown_model"),
        ("400", "Traceback (most recent call last):\n  File x, in connect\nreset timeout", "protocol"),
    ],
)
def test_server_replies_are_classified_by_status_not_by_words(status: str, text: str, kind: str) -> None:
    from tritonclient.utils import InferenceServerException

    err = _bare_remote()._classify(InferenceServerException(text, status=status))
    assert err.kind == kind
    assert "\n" not in str(err)  # one line: a traceback is cut to its first line


def test_transport_failures_are_classified_by_type() -> None:
    from geventhttpclient.response import HTTPConnectionClosed

    det = _bare_remote()
    assert det._classify(TimeoutError("timed out")).kind == "timeout"
    assert det._classify(ConnectionRefusedError(111, "Connection refused")).kind == "unreachable"
    assert det._classify(HTTPConnectionClosed("connection closed.")).kind == "unreachable"
    assert det._classify(KeyError("score")).kind == "protocol"
