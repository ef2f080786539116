#!/usr/bin/env python3
"""Live inspection loop: acquire -> Detector.infer -> OK/NG decision, one JSON line per frame.

Copy this file and adapt it. Acquisition runs in its own thread into a bounded queue
(``--policy newest``: lowest latency, ``drop-oldest``: FIFO); when the camera goes away the loop
reconnects with backoff and keeps counting. Rolling FPS, latency p50/p99 (frame timestamp ->
decision) and dropped frames go to stderr; NG frames are saved with a heatmap overlay under a
disk budget. Ctrl-C stops cleanly (a second Ctrl-C aborts).

Examples::

    python samples/camera_loop.py --bundle bundle/ --source gige                  # first GigE camera
    python samples/camera_loop.py --bundle bundle/ --source gige:192.168.1.20 --pixel-format BayerRG8 \\
        --exposure-us 2000 --fps 30 --jsonl decisions.jsonl --ng-dir ng/ --ng-budget-mb 500
    python samples/camera_loop.py --bundle bundle/ --source 0 --preview          # USB camera via OpenCV
    python samples/camera_loop.py --bundle bundle/ --source folder:images/ --max-frames 100
    python samples/camera_loop.py --dry-run --source gige --max-frames 200       # no model: test the camera path
    python samples/camera_loop.py --server http://gpu-box:8000 --model station3 --source gige   # model on 'edgead serve'

With ``--server`` the model runs on an inference server (``edgead serve``); a frame the server could not score
(down, restarting, overloaded, refused) is logged with its error and counted NG: never silently lost, never passed.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import cv2
import numpy as np

from edgead import Result
from edgead.errors import ConfigError, EdgeADError, message
from edgead.remote import RemoteError
from edgead.sources import PIXEL_FORMATS, QUEUE_POLICIES, TRIGGER_MODES, Acquisition, Frame, FrameQueue, FrameSource, open_source

log = logging.getLogger("camera_loop")


# ----------------------------------------------------------------------------- detector stand-in
class DryRunDetector:
    """No model: score = mean brightness (0..1). For testing the camera path without a bundle."""

    backend = "dry-run"

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    def infer(self, frame: np.ndarray, color: str = "bgr") -> Result:
        t0 = time.perf_counter()
        scale = 65535.0 if frame.dtype == np.uint16 else 255.0
        gray = frame if frame.ndim == 2 else frame.mean(axis=2)
        amap = (gray / scale).astype(np.float32)
        score = float(amap.mean())
        return Result(score, amap, score > self.threshold, self.threshold, {"total": (time.perf_counter() - t0) * 1e3})

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- NG frames on disk
def overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """BGR uint8 picture of the frame with the anomaly map as a JET heatmap (red = 2x threshold)."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    bgr = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image
    amap = anomaly_map
    if amap.shape[:2] != bgr.shape[:2]:
        amap = cv2.resize(amap, (bgr.shape[1], bgr.shape[0]), interpolation=cv2.INTER_LINEAR)
    scale = 2.0 * threshold if threshold > 0 else float(amap.max()) or 1.0
    heat = cv2.applyColorMap(np.clip(amap / scale * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(bgr, 0.6, heat, 0.4, 0.0)


class NGWriter:
    """Save NG overlays as JPEG into ``folder``; the oldest go once ``budget_bytes`` is exceeded.

    Only files this writer (or an earlier run of it on the same folder) wrote are ever deleted: each is
    recorded in ``folder/.edgead_ng_index.jsonl`` with its size, and on start only recorded files that
    are still regular files of that size count. A user's own ``ng_*.jpg`` or a folder of that name is
    never touched.
    """

    INDEX = ".edgead_ng_index.jsonl"

    def __init__(self, folder: Path, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ConfigError(message("--ng-budget-mb", budget_bytes / 2**20, "a positive size", "pass e.g. --ng-budget-mb 500"))
        if folder.exists() and not folder.is_dir():
            raise ConfigError(message("--ng-dir", f"{folder} (a file)", "a folder (new or used by an earlier run)", "pass another --ng-dir"))
        self.folder, self.budget = folder, budget_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self.index = folder / self.INDEX
        self.files: collections.deque[tuple[Path, int]] = collections.deque(self._recorded())
        self.total = sum(size for _, size in self.files)
        self._rewrite_index()
        self.saved = self.evicted = 0

    def _recorded(self) -> list[tuple[Path, int]]:
        """Files of earlier runs: recorded, still there, same size (a replaced file is not ours any more)."""
        if not self.index.is_file():
            return []
        alive: dict[str, int] = {}
        for line in self.index.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                name, size = str(rec["name"]), int(rec["bytes"])
            except (ValueError, KeyError, TypeError):
                continue
            if rec.get("deleted"):
                alive.pop(name, None)
            elif "/" not in name and name.startswith("ng_"):
                alive[name] = size
        out = []
        for name, size in alive.items():
            path = self.folder / name
            if path.is_file() and not path.is_symlink() and path.stat().st_size == size:
                out.append((path, size))
        return sorted(out, key=lambda item: item[0].stat().st_mtime)

    def _rewrite_index(self) -> None:
        tmp = self.index.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"name": p.name, "bytes": size}) + "\n" for p, size in self.files))
        tmp.replace(self.index)

    def _record(self, **rec: Any) -> None:
        with open(self.index, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def save(self, frame: Frame, result: Any) -> Path:
        path = self.folder / f"ng_{frame.timestamp_ns}_{frame.frame_id:08d}.jpg"
        ok, data = cv2.imencode(".jpg", overlay(frame.image, result.anomaly_map, result.threshold), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:
            raise EdgeADError(message("NG image", "JPEG encoding failed", "an encodable image", "check the frame format"))
        if path.exists():  # never overwrite something that is already there
            path = path.with_name(f"{path.stem}_{time.monotonic_ns()}.jpg")
        path.write_bytes(data.tobytes())
        self._record(name=path.name, bytes=len(data))
        self.files.append((path, len(data)))
        self.total += len(data)
        self.saved += 1
        while self.total > self.budget and self.files:
            old, size = self.files.popleft()
            old.unlink(missing_ok=True)
            self._record(name=old.name, bytes=size, deleted=True)
            self.total -= size
            self.evicted += 1
        return path


# ----------------------------------------------------------------------------- rolling statistics
class RollingStats:
    """FPS and latency percentiles over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self.events: collections.deque[tuple[float, float]] = collections.deque()
        self.all_latency: list[float] = []

    def add(self, latency_ms: float) -> None:
        now = time.monotonic()
        self.events.append((now, latency_ms))
        self.all_latency.append(latency_ms)
        while self.events and now - self.events[0][0] > self.window_s:
            self.events.popleft()

    def fps(self) -> float:
        if len(self.events) < 2:
            return 0.0
        span = self.events[-1][0] - self.events[0][0]
        return (len(self.events) - 1) / span if span > 0 else 0.0

    @staticmethod
    def percentiles(values: Sequence[float]) -> tuple[float, float]:
        if not values:
            return float("nan"), float("nan")
        p50, p99 = np.percentile(np.asarray(values), [50, 99])
        return float(p50), float(p99)

    def window_latency(self) -> tuple[float, float]:
        return self.percentiles([lat for _, lat in self.events])


# ----------------------------------------------------------------------------- the loop
def build_source(args: argparse.Namespace) -> FrameSource:
    if args.source == "gige" or args.source.startswith("gige:"):
        roi = tuple(int(v) for v in args.roi.split(",")) if args.roi else None
        if roi is not None and len(roi) != 4:
            raise ConfigError(message("--roi", args.roi, "x,y,width,height", "pass e.g. --roi 0,0,512,512"))
        return open_source(
            args.source,
            pixel_format=args.pixel_format,
            exposure_us=args.exposure_us,
            gain_db=args.gain_db,
            frame_rate=args.fps,
            roi=roi,
            trigger=args.trigger,
            n_buffers=args.buffers,
            timeout_s=args.timeout,
            lost_after_s=max(args.timeout * 2, 1.0),
            packet_size=args.packet_size,
            packet_delay_ns=args.packet_delay_ns,
        )
    if args.source.startswith("folder:"):
        return open_source(args.source, loop=args.loop, fps=args.fps)
    return open_source(args.source, fps=args.fps)


def build_detector(args: argparse.Namespace) -> Any:
    if args.dry_run:
        return DryRunDetector(args.threshold if args.threshold is not None else 0.5)
    if args.server is not None or args.model is not None:
        if args.server is None or args.model is None or args.bundle is not None:
            raise ConfigError(message("--server/--model", f"--server {args.server} --model {args.model} --bundle {args.bundle}", "--server and --model together, without --bundle", "pass both (or --bundle for a local model)"))
        from edgead.remote import RemoteDetector

        return RemoteDetector(args.server, args.model, threshold=args.threshold, timeout_s=args.server_timeout, retries=args.server_retries)
    if args.bundle is None:
        raise ConfigError(message("--bundle", "nothing", "a bundle directory", "pass --bundle DIR, --server URL --model NAME, or --dry-run to test the camera alone"))
    from edgead import Detector

    return Detector(args.bundle, backend=args.backend, threshold=args.threshold, threads=args.threads)


class Stopper:
    """First SIGINT/SIGTERM asks the loop to finish; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, _frame: object) -> None:
            if self.event.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            log.warning("stopping (signal %d); press Ctrl-C again to abort", signum)
            self.event.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def check_output_file(option: str, value: str | None) -> None:
    """Refuse an output file that cannot be written, before the camera or the model is touched."""
    if value is None or value == "-":
        return
    path = Path(value)
    if path.is_dir():
        raise ConfigError(message(option, f"{path} (a folder)", "a file path", f"pass a file name, e.g. {option} {path / 'out.json'}"))
    if not path.parent.is_dir():
        raise ConfigError(message(option, f"{path} (folder {path.parent} does not exist)", "a file in an existing folder", "create the folder first"))
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise ConfigError(message(option, f"{path} (not writable)", "a writable file", "choose another path or fix the permissions"))


def run(args: argparse.Namespace, stopper: Stopper | None = None) -> dict[str, Any]:
    """The loop itself; returns the summary dict (also written with --summary)."""
    stopper = stopper or Stopper()
    check_output_file("--jsonl", args.jsonl)
    check_output_file("--summary", args.summary)
    source = build_source(args)  # opened by the acquisition thread, not here
    policy = args.policy or ("newest" if source.is_live else "block")
    queue = FrameQueue(args.queue_size, policy)
    try:
        writer = NGWriter(Path(args.ng_dir), int(args.ng_budget_mb * 2**20)) if args.ng_dir else None
    except OSError as exc:
        raise ConfigError(message("--ng-dir", f"{args.ng_dir} ({exc.strerror})", "a folder this user can create and write", "choose another --ng-dir")) from exc
    if args.preview:
        try:
            cv2.namedWindow("edgead", cv2.WINDOW_NORMAL)
        except cv2.error as exc:
            raise ConfigError(message("--preview", "OpenCV without GUI support", "an OpenCV build with highgui", "pip install opencv-python (not -headless) or drop --preview")) from exc
    # the detector last: every check above fails before it holds a session or GPU memory
    detector = build_detector(args)
    try:
        out: TextIO = sys.stdout if args.jsonl == "-" else open(args.jsonl, "a", buffering=1)  # noqa: SIM115
    except BaseException:
        detector.close()
        raise
    events: list[dict[str, Any]] = []

    def on_event(kind: str, text: str) -> None:
        events.append({"t": time.time(), "event": kind})
        log.warning("%s: %s", kind, text)

    acq = Acquisition(source, queue, backoff_s=args.backoff, max_backoff_s=args.max_backoff, on_event=on_event)
    stats = RollingStats(args.window)
    processed = ng = errors = 0
    started = time.monotonic()
    last_report = started
    summary: dict[str, Any] = {}
    try:
        acq.start()
        while not stopper.event.is_set():
            frame = queue.get(0.2)
            if frame is None:
                if acq.finished.is_set() and len(queue) == 0:
                    break
                if args.duration and time.monotonic() - started > args.duration:
                    break
                continue
            try:
                result = detector.infer(frame.image, color=frame.color)
            except RemoteError as exc:  # the server could not score it: logged, counted and NG (fail safe), never dropped
                result, error = None, exc
            done_ns = time.time_ns()
            latency_ms = (done_ns - frame.timestamp_ns) / 1e6
            stats.add(latency_ms)
            processed += 1
            record = {
                "id": frame.frame_id,
                "timestamp": frame.timestamp_ns / 1e9,
                "score": round(float(result.score), 6) if result is not None else None,
                "decision": result.decision if result is not None else "NG",
                "finite": bool(getattr(result, "finite", True)) if result is not None else False,  # False: no finite model output, decided NG
                "latency_ms": round(latency_ms, 3),
                "infer_ms": round(float(result.timings["total"]), 3) if result is not None and "total" in result.timings else None,
                "connection": frame.meta.get("connection", 0),
            }
            if result is None:
                errors += 1
                record["error"], record["error_kind"] = str(error), error.kind
                log.error("frame %s not scored (%s): %s", frame.frame_id, error.kind, error)
            if "camera_frame_id" in frame.meta:
                record["camera_frame_id"] = frame.meta["camera_frame_id"]
            if record["decision"] == "NG":
                ng += 1
                if writer is not None and result is not None:
                    record["saved"] = str(writer.save(frame, result))
            out.write(json.dumps(record) + "\n")
            if args.preview and result is not None:
                cv2.imshow("edgead", overlay(frame.image, result.anomaly_map, result.threshold))
                if cv2.waitKey(1) & 0xFF in (27, ord("q")):
                    break
            now = time.monotonic()
            if now - last_report >= args.report_every:
                last_report = now
                p50, p99 = stats.window_latency()
                dropped = queue.dropped + source.stats["incomplete"] + source.stats["missed"]
                print(
                    f"[camera_loop] {processed} frames  {stats.fps():6.1f} fps  latency p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  "
                    f"dropped {dropped}  NG {ng}  reconnects {acq.reconnects}",
                    file=sys.stderr,
                    flush=True,
                )
            if args.max_frames and processed >= args.max_frames:
                break
            if args.duration and now - started > args.duration:
                break
    finally:
        acq.stop()
        elapsed = time.monotonic() - started
        p50, p99 = RollingStats.percentiles(stats.all_latency)
        summary = {
            "processed": processed,
            "ng": ng,
            "elapsed_s": round(elapsed, 3),
            "fps": round(processed / elapsed, 2) if elapsed > 0 else 0.0,
            "latency_ms_p50": round(p50, 3) if processed else None,  # JSON has no NaN: null when nothing ran
            "latency_ms_p99": round(p99, 3) if processed else None,
            "nonfinite": int(getattr(detector, "nonfinite_count", 0)),
            "errors": errors,  # frames the inference server could not score (decided NG, each logged in the JSONL)
            "dropped_queue": queue.dropped,
            "incomplete": int(source.stats["incomplete"]),
            "missed": int(source.stats["missed"]),
            "reconnects": acq.reconnects,
            "source_stats": dict(source.stats),
            "events": [e["event"] for e in events],
            "backend": getattr(detector, "backend", "?"),
            "ng_saved": writer.saved if writer else 0,
            "ng_evicted": writer.evicted if writer else 0,
        }
        if acq.error is not None and not isinstance(acq.error, EdgeADError):
            summary["acquisition_error"] = repr(acq.error)
        if out is not sys.stdout:
            out.close()
        if hasattr(detector, "close"):
            detector.close()
        if args.preview:
            cv2.destroyAllWindows()
        print("[camera_loop] summary " + json.dumps(summary), file=sys.stderr, flush=True)
        if args.summary:
            Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    if acq.error is not None and processed == 0 and isinstance(acq.error, EdgeADError):
        raise acq.error
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", help="bundle directory written by `edgead export`")
    p.add_argument("--backend", default="auto", help="auto | tensorrt | onnxruntime")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--threshold", type=float, default=None, help="override the bundle's decision threshold")
    p.add_argument("--dry-run", action="store_true", help="no model: score = mean brightness (tests the camera path)")
    p.add_argument("--server", default=None, help="inference server URL (http://HOST:8000 or grpc://HOST:8001) instead of --bundle")
    p.add_argument("--model", default=None, help="model name on --server (the bundle folder's name by default in edgead serve)")
    p.add_argument("--server-timeout", type=float, default=2.0, help="seconds per request to --server")
    p.add_argument("--server-retries", type=int, default=1, help="retries of a failed request (backoff doubles from 0.2 s); a frame waits at most about timeout x (retries + 1)")
    src = p.add_argument_group("source")
    src.add_argument("--source", default="gige", help="gige | gige:ID/SERIAL/IP | folder:DIR | camera index | rtsp/http URL | video file")
    src.add_argument("--pixel-format", default="Mono8", choices=list(PIXEL_FORMATS), help="GigE pixel format")
    src.add_argument("--exposure-us", type=float, default=None)
    src.add_argument("--gain-db", type=float, default=None)
    src.add_argument("--fps", type=float, default=None, help="camera frame rate (folder: pacing)")
    src.add_argument("--roi", default=None, help="x,y,width,height")
    src.add_argument("--trigger", default="free", choices=list(TRIGGER_MODES))
    src.add_argument("--buffers", type=int, default=8, help="GigE stream buffers")
    src.add_argument("--packet-size", type=int, default=None, help="GVSP packet size (bytes); 8000+ needs jumbo frames")
    src.add_argument("--packet-delay-ns", type=int, default=None, help="GVSP inter-packet delay")
    src.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for one frame")
    src.add_argument("--loop", action="store_true", help="folder source: start over at the end")
    loop = p.add_argument_group("loop")
    loop.add_argument(
        "--policy", default=None, choices=list(QUEUE_POLICIES), help="what to drop when inference falls behind (default: newest for cameras/streams, block for files/folders)"
    )
    loop.add_argument("--queue-size", type=int, default=4)
    loop.add_argument("--backoff", type=float, default=0.5, help="first reconnect delay (s), doubles up to --max-backoff")
    loop.add_argument("--max-backoff", type=float, default=5.0)
    loop.add_argument("--max-frames", type=int, default=0, help="stop after N processed frames (0: run until Ctrl-C)")
    loop.add_argument("--duration", type=float, default=0.0, help="stop after S seconds (0: no limit)")
    out = p.add_argument_group("output")
    out.add_argument("--jsonl", default="-", help="JSON lines file (appended) or - for stdout")
    out.add_argument("--ng-dir", default=None, help="save NG frames with heatmap overlay here")
    out.add_argument("--ng-budget-mb", type=float, default=500.0, help="disk budget for --ng-dir; oldest files are deleted")
    out.add_argument("--preview", action="store_true", help="show a window (needs OpenCV with GUI)")
    out.add_argument("--report-every", type=float, default=2.0, help="seconds between stats lines on stderr")
    out.add_argument("--window", type=float, default=5.0, help="rolling window (s) for FPS and latency")
    out.add_argument("--summary", default=None, help="write the final summary JSON here")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    stopper = Stopper()
    stopper.install()
    try:
        run(args, stopper)
    except EdgeADError as exc:
        print(f"camera_loop: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("camera_loop: aborted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
