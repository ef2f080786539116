"""``edgead serve``: many cameras and stations on one inference server (NVIDIA Triton Inference Server via PyTriton).

One Triton model per bundle (station), each backed by ``Detector`` instances (TensorRT on a GPU, OpenVINO / ONNX
Runtime on a CPU), with Triton's dynamic batching, queue limit, health and Prometheus metrics. Clients send frames
as the camera delivers them (``frame_u8`` or ``frame_u16``, HxWxC; pre-processing runs here) and get back the score,
the decision and the anomaly map at the size they ask (model resolution by default: small).

    edgead serve bundles/station1 bundles/station2 --http-port 8000 --max-batch 16 --max-queue-delay-us 2000

Model name: ``--name`` or the bundle folder's name; version: a number derived from the bundle's file hashes, so a
re-exported bundle is a new version. Binds 127.0.0.1 unless ``--host`` says otherwise (Triton's own default is
every interface). Ready (``/v2/health/ready``) only when every model is loaded.

Needs ``pip install 'edgead[serve]'`` in an environment of its own: PyTriton pins numpy < 2 (``make serve-venv``,
docs/serving.md).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, EdgeADError, MissingDependencyError, message

__all__ = ["ServeConfig", "ServerProcess", "check_config", "model_name", "model_version", "make_infer_func", "serve", "main", "INPUTS", "OUTPUTS"]

log = logging.getLogger(__name__)
BANNER = "edgead serve:"  # printed once Triton and every model are up and the process supervises tritonserver

# The wire contract (RemoteDetector speaks it): name -> (numpy dtype, shape without the batch axis).
# A request carries frame_u8 or frame_u16 (N, H, W, C) as the camera delivered them, optional colour order, product
# and map size ((0, 0): model resolution, (-1, -1): the frame's size, (h, w): that size). Every row of the reply has
# ``error``: empty, or why this frame was refused (the other frames of a dynamic batch are still answered).
INPUTS = {
    "frame_u8": (np.uint8, (-1, -1, -1)),
    "frame_u16": (np.uint16, (-1, -1, -1)),
    "color": (np.bytes_, (1,)),
    "product": (np.bytes_, (1,)),
    "map_size": (np.int32, (2,)),
}
OUTPUTS = {
    "score": (np.float32, (1,)),
    "threshold": (np.float32, (1,)),
    "anomalous": (np.bool_, (1,)),
    "finite": (np.bool_, (1,)),
    "anomaly_map": (np.float32, (-1, -1)),
    "server_ms": (np.float32, (1,)),
    "batch_size": (np.int32, (1,)),
    "error": (np.bytes_, (1,)),
}
MAP_MODEL, MAP_FRAME = (0, 0), (-1, -1)
MAX_FRAME_PIXELS = 64_000_000  # 64 MP: beyond any line camera; a bigger frame is refused before pre-processing
_NAME = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class ServeConfig:
    bundles: list[str]
    names: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    backend: str = "auto"
    threads: int | None = None
    instances: int = 1
    max_batch: int = 16
    preferred_batch: list[int] = field(default_factory=lambda: [4, 8, 16])
    max_queue_delay_us: int = 2000
    queue_limit: int = 64
    dynamic_batching: bool = True
    max_frame_pixels: int = MAX_FRAME_PIXELS


def model_name(bundle: str | Path) -> str:
    """A Triton model name from the bundle folder's name (letters, digits, _ . - kept).

    >>> model_name("/data/bundles/Station 3")
    'Station_3'
    """
    name = _NAME.sub("_", Path(bundle).resolve().name).strip("._-")
    if not name:
        raise ConfigError(message("model name", repr(str(bundle)), "a bundle folder with a usable name", "pass --name NAME"))
    return name


def model_version(manifest: Any) -> int:
    """A positive int32 version from the bundle's file hashes: another export, another version."""
    digest = hashlib.sha256("".join(f"{k}:{v.sha256}" for k, v in sorted(manifest.files.items())).encode()).hexdigest()
    return int(digest[:7], 16) + 1


@dataclass
class _Row:
    frame: np.ndarray | None
    color: str
    product: str | None
    map_size: str | tuple[int, int]
    error: str = ""
    result: Any = None


def _decode_rows(req: dict[str, np.ndarray], max_pixels: int) -> list[_Row]:
    """The frames of one request, each with its options; a frame that cannot be used carries its error."""
    keys = [k for k in ("frame_u8", "frame_u16") if k in req]
    if len(keys) != 1:
        got = " and ".join(keys) or "neither"
        return [_Row(None, "bgr", None, "model", f"frame | got {got}; expected exactly one of frame_u8, frame_u16; how to fix: send the frame once")]
    batch = req[keys[0]]
    rows = []
    for i in range(batch.shape[0]):
        frame = batch[i]
        row = _Row(frame, _text(req, "color", i, "bgr") or "bgr", _text(req, "product", i, None), _map_size(req, i))
        if frame.ndim != 3 or frame.shape[-1] not in (1, 3, 4) or frame.size == 0:
            row.error = message("frame", f"shape {frame.shape}", "(H, W, C) with C in 1, 3, 4 and H, W > 0", "send HxWxC (HxWx1 for mono)")
        elif frame.shape[0] * frame.shape[1] > max_pixels:
            row.error = message("frame", f"{frame.shape[1]}x{frame.shape[0]} pixels", f"at most {max_pixels} pixels", "send a region of interest or raise --max-frame-pixels")
        elif frame.shape[-1] == 1:
            row.frame = frame[:, :, 0]
        rows.append(row)
    return rows


def _map_size(req: dict[str, np.ndarray], i: int) -> str | tuple[int, int]:
    if "map_size" not in req:
        return "model"
    h, w = (int(v) for v in req["map_size"][i].reshape(-1)[:2])
    return "model" if (h, w) == MAP_MODEL else "frame" if (h, w) == MAP_FRAME else (h, w)


def _text(req: dict[str, np.ndarray], key: str, i: int, default: str | None) -> str | None:
    if key not in req:
        return default
    value = req[key][i].reshape(-1)[0]
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text or default


def make_infer_func(detector: Any, max_pixels: int = MAX_FRAME_PIXELS) -> Callable[..., list[dict[str, np.ndarray]]]:
    """The Triton model function of one Detector: the requests of one dynamic batch in, one reply per request out.

    Frames with the same options and size run as one Detector batch. Frames the Detector refuses (or that fail)
    get the error in their own rows; the other requests of the batch are answered as usual.
    """

    def infer(requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        t0 = time.perf_counter()
        per_request = [_decode_rows(req, max_pixels) for req in requests]
        rows = [r for rs in per_request for r in rs if not r.error]
        groups: dict[tuple[Any, ...], list[_Row]] = {}
        for r in rows:
            assert r.frame is not None
            groups.setdefault((r.color, r.product, r.map_size, r.frame.shape, r.frame.dtype.str), []).append(r)
        for (color, product, map_size, _, _), group in groups.items():
            _run_group(detector, group, color, product, map_size)
        ms = np.float32((time.perf_counter() - t0) * 1e3 / max(1, len(rows)))
        return [_reply(rs, ms, len(rows)) for rs in per_request]

    return infer


def _run_group(detector: Any, group: list[_Row], color: str, product: str | None, map_size: Any) -> None:
    """One Detector batch; a failure becomes these frames' error rows (never the whole dynamic batch's error)."""
    try:
        results = detector.infer_batch([r.frame for r in group], color=color, map_size=map_size, product=product)
    except EdgeADError as exc:  # the frames or options are at fault: the message says how to fix them
        for r in group:
            r.error = str(exc)
        return
    except Exception as exc:  # noqa: BLE001 - a backend failure must not fail other cameras' requests of the batch
        log.exception("inference failed for %d frame(s)", len(group))
        for r in group:
            r.error = message("inference on the server", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", "a result", "see the server log")
        return
    for r, res in zip(group, results, strict=True):
        r.result = res


def _reply(rows: list[_Row], ms: np.float32, batch: int) -> dict[str, np.ndarray]:
    ok = [r.result for r in rows if r.result is not None]
    shape = ok[0].anomaly_map.shape if ok else (1, 1)
    n = len(rows)
    out = {
        "score": np.full((n, 1), np.nan, np.float32),
        "threshold": np.full((n, 1), np.nan, np.float32),
        "anomalous": np.ones((n, 1), np.bool_),  # fail safe: a refused frame is never OK
        "finite": np.zeros((n, 1), np.bool_),
        "anomaly_map": np.zeros((n, *shape), np.float32),
        "server_ms": np.full((n, 1), ms, np.float32),
        "batch_size": np.full((n, 1), batch, np.int32),
        "error": np.array([[r.error.encode() if r.result is None else b""] for r in rows], np.object_),
    }
    for i, r in enumerate(rows):
        res = r.result
        if res is None:
            continue
        if res.anomaly_map.shape != shape:  # one reply holds one map size: the frames of a request share their options
            r.error = message("frames of one request", "frames of different sizes", "one size per request", "send one request per frame size")
            out["error"][i, 0] = r.error.encode()
            continue
        out["score"][i, 0], out["threshold"][i, 0] = res.score, res.threshold
        out["anomalous"][i, 0], out["finite"][i, 0] = res.is_anomalous, res.finite
        out["anomaly_map"][i] = res.anomaly_map
    return out


def _pytriton() -> Any:
    try:
        import pytriton.triton as triton
    except ImportError as exc:
        raise MissingDependencyError("nvidia-pytriton", "serve", "edgead serve (Triton Inference Server)") from exc
    return triton


def check_config(cfg: ServeConfig) -> list[str]:
    """Validate a ServeConfig before anything is loaded; returns the model names."""
    if not cfg.bundles:
        raise ConfigError(message("bundles", "none", "at least one bundle folder", "pass edgead serve BUNDLE [BUNDLE ...]"))
    if cfg.names and len(cfg.names) != len(cfg.bundles):
        raise ConfigError(message("--name", cfg.names, f"one name per bundle ({len(cfg.bundles)})", "pass --name once per bundle, or not at all"))
    for option, value, low, high in (
        ("--instances", cfg.instances, 1, 16),
        ("--max-batch", cfg.max_batch, 1, 1024),
        ("--queue-limit", cfg.queue_limit, 1, 1_000_000),
        ("--max-queue-delay-us", cfg.max_queue_delay_us, 0, 10_000_000),
        ("--max-frame-pixels", cfg.max_frame_pixels, 1, 1_000_000_000),
    ):
        if not low <= value <= high:
            raise ConfigError(message(option, value, f"{low}..{high}", f"pass {option} within that range"))
    if cfg.dynamic_batching and (not cfg.preferred_batch or any(not 1 <= b <= cfg.max_batch for b in cfg.preferred_batch)):
        raise ConfigError(message("--preferred-batch", cfg.preferred_batch, f"sizes in 1..--max-batch ({cfg.max_batch})", "e.g. --preferred-batch 4,8,16"))
    ports = [cfg.http_port, cfg.grpc_port, cfg.metrics_port]
    if len(set(ports)) != 3 or any(not 1 <= q <= 65535 for q in ports):
        raise ConfigError(message("ports", ports, "three distinct ports in 1..65535", "pass --http-port, --grpc-port, --metrics-port"))
    names = cfg.names or [model_name(b) for b in cfg.bundles]
    for name in names:
        if not name or _NAME.search(name):
            raise ConfigError(message("--name", repr(name), "letters, digits, _ . -", "pass another --name"))
    if len(set(names)) != len(names):
        raise ConfigError(message("model names", names, "distinct names", "pass --name for each bundle"))
    return names


def serve(cfg: ServeConfig, *, block: bool = True) -> Any:
    """Start Triton with one model per bundle and serve until SIGINT/SIGTERM (returns 0) or until tritonserver dies
    (returns 1, so that a supervisor restarts it); ``block=False`` returns the running server (call ``.stop()``).

    Every bundle is loaded and every Detector created before the server starts, so that a bad bundle fails here
    with its own error and the server never reports ready with some stations missing.
    """
    names = check_config(cfg)
    triton_mod = _pytriton()
    from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor, TimeoutAction

    from .bundle import load_bundle
    from .detector import Detector

    models: list[tuple[str, int, list[Any]]] = []

    def close_all() -> None:
        for _, _, detectors in models:
            for d in detectors:
                d.close()

    server = None
    try:
        for bundle_path, name in zip(cfg.bundles, names, strict=True):
            bundle = load_bundle(bundle_path)
            models.append((name, model_version(bundle.manifest), []))
            for _ in range(cfg.instances):
                models[-1][2].append(Detector(bundle, backend=cfg.backend, threads=cfg.threads))
            log.info("model %s version %d: %s, %d instance(s)", name, models[-1][1], models[-1][2][0].device, cfg.instances)
        config = triton_mod.TritonConfig(
            http_address=cfg.host, grpc_address=cfg.host, metrics_address=cfg.host, http_port=cfg.http_port, grpc_port=cfg.grpc_port,
            metrics_port=cfg.metrics_port, allow_metrics=True, strict_readiness=True, exit_timeout_secs=5,
        )
        # models are written to the model store before tritonserver starts (it loads them all at start-up), so that
        # /v2/health/ready (strict readiness) is 200 only once every station is loaded
        server = triton_mod.Triton(config=config, triton_lifecycle_policy=triton_mod.TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True))
        for name, version, detectors in models:
            # without dynamic batching (the load test's baseline) every request runs alone and there is no queue limit
            batcher = (
                DynamicBatcher(
                    max_queue_delay_microseconds=cfg.max_queue_delay_us,
                    preferred_batch_size=list(cfg.preferred_batch),
                    default_queue_policy=QueuePolicy(max_queue_size=cfg.queue_limit, timeout_action=TimeoutAction.REJECT),
                )
                if cfg.dynamic_batching
                else None
            )
            server.bind(
                model_name=name,
                model_version=version,
                infer_func=[make_infer_func(d, cfg.max_frame_pixels) for d in detectors],
                inputs=[Tensor(name=k, dtype=t, shape=s, optional=True) for k, (t, s) in INPUTS.items()],
                outputs=[Tensor(name=k, dtype=t, shape=s) for k, (t, s) in OUTPUTS.items()],
                config=ModelConfig(max_batch_size=cfg.max_batch, batcher=batcher),
                strict=True,
            )
        server.run()
    except BaseException:
        if server is not None:
            server.stop()
        close_all()
        raise
    if not block:
        return _Running(server, close_all)
    print(f"{BANNER} {', '.join(names)} on http://{cfg.host}:{cfg.http_port} grpc :{cfg.grpc_port} metrics :{cfg.metrics_port}", flush=True)
    asked = threading.Event()

    def on_signal(*_: object) -> None:
        asked.set()
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    try:
        server.serve()  # returns when asked to stop, or when tritonserver or a model's proxy died
    except KeyboardInterrupt:
        asked.set()
    finally:
        server.stop()
        close_all()
    if not asked.is_set():
        log.error("tritonserver stopped on its own (see its log above): exiting with status 1 so that a supervisor restarts it")
        return 1
    return 0


@dataclass
class _Running:
    """A server started with ``block=False``: ``stop()`` stops Triton and releases the Detectors."""

    triton: Any
    _close: Callable[[], None]

    def stop(self) -> None:
        self.triton.stop()
        self._close()


class ServerProcess:
    """``edgead serve`` in a child process (its own session, so that stopping it stops tritonserver too).

    ``python`` is the interpreter of the serve environment (``.venv-serve/bin/python``: PyTriton pins numpy < 2).
    ``start()`` returns once ``/v2/health/ready`` answers 200 (every model loaded) and the server printed its banner
    (it now supervises tritonserver: a crash from then on makes it exit 1), or raises with the log's tail;
    ``kill()`` is a crash (SIGKILL), ``stop()`` a clean shutdown (SIGINT, then SIGKILL after ``grace_s``).

    >>> with ServerProcess([".venv-serve/bin/python"], ["bundles/a"], http_port=8000) as srv:  # doctest: +SKIP
    ...     RemoteDetector(srv.url, "a").infer(frame)
    """

    def __init__(self, python: Sequence[str], bundles: Sequence[str], *, http_port: int = 8000, grpc_port: int | None = None,
                 metrics_port: int | None = None, extra_args: Sequence[str] = (), log_path: str | Path | None = None) -> None:
        self.http_port = http_port
        self.grpc_port = grpc_port if grpc_port is not None else http_port + 1
        self.metrics_port = metrics_port if metrics_port is not None else http_port + 2
        self.cmd = [*python, "-m", "edgead.cli", "serve", *map(str, bundles), "--http-port", str(http_port), "--grpc-port", str(self.grpc_port),
                    "--metrics-port", str(self.metrics_port), *extra_args]
        self.log_path = Path(log_path) if log_path is not None else None
        self._proc: Any = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
        import subprocess
        import tempfile

        if self._proc is not None and self._proc.poll() is None:
            raise ConfigError(message("ServerProcess", "already running", "a stopped server", "stop() it first"))
        if self._log is None:  # a restart appends to the same log
            self._log = open(self.log_path, "ab+") if self.log_path else tempfile.TemporaryFile()  # noqa: SIM115
            fd = self._log.fileno()  # O_APPEND: the child always writes at the end, whatever this side reads
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        log_start = os.fstat(self._log.fileno()).st_size
        self._proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ConfigError(message("edgead serve", f"exit code {self._proc.returncode}: {self.log_tail()}", "a running server", "read the log above"))
            if self._banner_since(log_start) and self.ready():
                return self
            time.sleep(0.25)
        self.kill()
        raise ConfigError(message("edgead serve", f"not ready after {timeout_s:g} s: {self.log_tail()}", "a ready server", "read the log above"))

    def ready(self) -> bool:
        import urllib.error
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through http_proxy
        try:
            with opener.open(f"{self.url}/v2/health/ready", timeout=1.0) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _read_log(self, offset: int) -> bytes:
        """The log from ``offset`` on, read without moving the file offset the child shares."""
        fd = self._log.fileno()
        return os.pread(fd, max(0, os.fstat(fd).st_size - offset), offset)

    def _banner_since(self, offset: int) -> bool:
        # this server's own banner (argparse's "edgead serve: error: ..." does not name the port)
        mine = f":{self.http_port} grpc :".encode()
        return any(line.startswith(BANNER.encode()) and mine in line for line in self._read_log(offset).splitlines())

    def log_tail(self, n: int = 2000) -> str:
        if self._log is None:
            return ""
        size = os.fstat(self._log.fileno()).st_size
        return self._read_log(max(0, size - n)).decode(errors="replace")

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else int(self._proc.pid)

    def wait(self, timeout_s: float) -> int:
        """Wait for the server to exit on its own; its exit code (raises subprocess.TimeoutExpired)."""
        if self._proc is None:
            raise ConfigError(message("ServerProcess", "never started", "a started server", "start() it first"))
        return int(self._proc.wait(timeout=timeout_s))

    def kill(self) -> None:
        """A crash: SIGKILL to the whole process group (PyTriton and tritonserver)."""
        self._signal(signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait()

    def stop(self, grace_s: float = 20.0) -> int | None:
        """A clean shutdown; returns the exit code (None if never started)."""
        import subprocess

        if self._proc is None:
            return None
        self._signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("edgead serve did not stop within %.0f s: killed", grace_s)
            self.kill()
        return int(self._proc.returncode)

    def _signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, sig)
            except ProcessLookupError:
                pass

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``edgead serve BUNDLE [BUNDLE ...] [--host 127.0.0.1] [--http-port 8000] ...``."""
    p = argparse.ArgumentParser(prog="edgead serve", description=__doc__.split("\n\n")[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("--name", action="append", default=[], help="model name per bundle (default: the bundle folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics (/metrics)")
    p.add_argument("--backend", default="auto", help="Detector backend: auto | tensorrt | openvino | onnxruntime")
    p.add_argument("--threads", type=int, default=None, help="threads per Detector (CPU backends)")
    p.add_argument("--instances", type=int, default=1, help="Detector instances per model (Triton instance group)")
    p.add_argument("--max-batch", type=int, default=16, help="largest batch Triton forms")
    p.add_argument("--preferred-batch", default=None, help="preferred dynamic batch sizes (default: 4, 8, 16 up to --max-batch)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="how long the batcher waits to fill a batch")
    p.add_argument("--queue-limit", type=int, default=64, help="requests queued per model before new ones are rejected")
    p.add_argument("--no-dynamic-batching", action="store_true", help="every request runs alone (baseline; no queue limit)")
    p.add_argument("--max-frame-pixels", type=int, default=MAX_FRAME_PIXELS, help="larger frames are refused")
    a = p.parse_args(list(argv) if argv is not None else None)
    try:
        preferred = [int(v) for v in a.preferred_batch.split(",") if v.strip()] if a.preferred_batch else [b for b in (4, 8, 16) if b <= a.max_batch] or [a.max_batch]
    except ValueError as exc:
        raise ConfigError(message("--preferred-batch", repr(a.preferred_batch), "comma-separated ints", "e.g. --preferred-batch 4,8,16")) from exc
    cfg = ServeConfig(
        a.bundles, a.name, a.host, a.http_port, a.grpc_port, a.metrics_port, a.backend, a.threads, a.instances, a.max_batch, preferred,
        a.max_queue_delay_us, a.queue_limit, not a.no_dynamic_batching, a.max_frame_pixels,
    )
    return int(serve(cfg) or 0)


if __name__ == "__main__":
    sys.exit(main())
