#!/usr/bin/env python3
"""Load test of an inference server: K simulated cameras against ``edgead serve``, each for a bounded time and count.

Every camera is a thread with its own connection that sends frames (from a folder, or random frames of one size) as
fast as the server answers, or at ``--fps``. Reported: throughput, end-to-end latency p50/p99, the batch sizes the
server formed, and the fate of every frame sent: a decision or an error of a named kind (accounted == sent, always).

    # against a running server
    python samples/loadtest.py --server http://127.0.0.1:8000 --model station1 --cameras 8 --duration 30

    # start the server here, with and without dynamic batching, side by side
    python samples/loadtest.py --serve bundles/station1 --cameras 8 --duration 30 --compare-batching --json lt.json

    # crash the server 5 s in and start it again: clients reconnect, nothing is lost
    python samples/loadtest.py --serve bundles/station1 --cameras 4 --duration 30 --restart-at 5

``--serve`` runs ``edgead serve`` with the serve environment's Python (``--serve-python``, default .venv-serve).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgead.errors import ConfigError, EdgeADError, message
from edgead.remote import RemoteDetector, RemoteError
from edgead.serve import ServerProcess

log = logging.getLogger("loadtest")
DEFAULT_SERVE_PYTHON = ".venv-serve/bin/python"


def load_frames(source: str | None, size: tuple[int, int], count: int = 8, seed: int = 0) -> list[np.ndarray]:
    """Frames to send: the images of a folder (as the camera would deliver them), or ``count`` random BGR frames."""
    if source is None:
        rng = np.random.default_rng(seed)
        return [rng.integers(0, 256, (*size, 3), np.uint8) for _ in range(count)]
    folder = Path(source)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"))[:64]
    frames = [f for f in (cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in files) if f is not None]
    if not frames:
        raise ConfigError(message("--frames", str(folder), "a folder with readable images", "pass a folder of .png/.jpg images"))
    return [np.ascontiguousarray(f) for f in frames]


def camera(index: int, args: argparse.Namespace, frames: list[np.ndarray], stop: threading.Event, records: list[dict[str, Any]], sent: list[int]) -> None:
    """One simulated camera: send, wait for the answer, record its fate; until --duration or --max-frames.

    ``sent[index]`` counts frames before they are sent, so that a frame whose fate went unrecorded (a client bug, an
    unexpected exception) shows up as unaccounted instead of vanishing."""
    det = None
    period = 1.0 / args.fps if args.fps else 0.0
    try:
        while not stop.is_set() and (not args.max_frames or sent[index] < args.max_frames):
            frame = frames[(index + sent[index]) % len(frames)]
            color = "gray" if frame.ndim == 2 else "bgra" if frame.shape[2] == 4 else "bgr"
            t0 = time.perf_counter()
            rec: dict[str, Any] = {"camera": index, "frame": sent[index], "t": time.monotonic()}
            sent[index] += 1
            try:
                if det is None:
                    det = RemoteDetector(args.server, args.model, timeout_s=args.timeout, retries=args.retries, backoff_s=0.2, max_backoff_s=1.0)
                r = det.infer(frame, color=color)
                rec.update(decision=r.decision, batch=int(r.timings.get("batch", 0)), server_ms=r.timings.get("server"))
            except RemoteError as exc:
                rec.update(error=exc.kind, message=str(exc)[:300])
            except Exception as exc:  # noqa: BLE001 - anything else is a client-side failure, recorded as such
                rec.update(error="client", message=repr(exc)[:300])
            rec["latency_ms"] = (time.perf_counter() - t0) * 1e3
            records.append(rec)
            if period:
                time.sleep(max(0.0, period - (time.perf_counter() - t0)))
    finally:
        if det is not None:
            det.close()


def summarize(records: list[dict[str, Any]], elapsed: float, cameras: int, sent: int) -> dict[str, Any]:
    decided = [r for r in records if "decision" in r]
    lat = np.array([r["latency_ms"] for r in decided]) if decided else np.array([])
    errors = Counter(r["error"] for r in records if "error" in r)
    batches = Counter(r["batch"] for r in decided)
    return {
        "cameras": cameras,
        "elapsed_s": round(elapsed, 3),
        "sent": sent,
        "decided": len(decided),
        "errors": dict(errors),
        "accounted": len(decided) + sum(errors.values()) == sent,
        "throughput_fps": round(len(decided) / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
        "batch_sizes": {str(k): v for k, v in sorted(batches.items())},
        "mean_batch": round(float(np.mean([r["batch"] for r in decided])), 2) if decided else None,
        "per_camera": {str(c): sum(1 for r in decided if r["camera"] == c) for c in range(cameras)},
    }


def run_load(args: argparse.Namespace, frames: list[np.ndarray], server: ServerProcess | None = None) -> dict[str, Any]:
    """K camera threads for --duration seconds; with --restart-at the server is killed then started again."""
    records: list[dict[str, Any]] = []
    sent = [0] * args.cameras
    stop = threading.Event()
    threads = [threading.Thread(target=camera, args=(i, args, frames, stop, records, sent), daemon=True) for i in range(args.cameras)]
    started = time.monotonic()
    for t in threads:
        t.start()
    restart: dict[str, Any] = {}
    try:
        if args.restart_at and server is not None:
            time.sleep(args.restart_at)
            restart["killed_at_s"] = round(time.monotonic() - started, 3)
            server.kill()
            t0 = time.monotonic()
            server.start()
            restart["restart_s"] = round(time.monotonic() - t0, 3)
    except BaseException:
        stop.set()
        raise
    deadline = started + args.duration
    while time.monotonic() < deadline and any(t.is_alive() for t in threads):
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(timeout=args.timeout * (args.retries + 1) + 10)
    hung = sum(t.is_alive() for t in threads)
    summary = summarize(list(records), time.monotonic() - started, args.cameras, sum(sent))
    summary["hung_cameras"] = hung
    if restart:
        back = started + restart["killed_at_s"] + restart["restart_s"]
        restart["decided_after_restart"] = sum(1 for r in records if "decision" in r and r["t"] >= back)
        summary["restart"] = restart
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", default=None, help="URL of a running server (default with --serve: the one started here)")
    p.add_argument("--model", default=None, help="model name (default with --serve: the first bundle's folder name)")
    p.add_argument("--serve", nargs="+", default=None, metavar="BUNDLE", help="start 'edgead serve BUNDLE ...' here for the test")
    p.add_argument("--serve-python", default=DEFAULT_SERVE_PYTHON, help="Python of the serve environment (make serve-venv)")
    p.add_argument("--serve-args", default="--backend onnxruntime", help="more 'edgead serve' options, one string")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the server started here (gRPC +1, metrics +2)")
    p.add_argument("--compare-batching", action="store_true", help="with --serve: run with, then without, dynamic batching")
    p.add_argument("--restart-at", type=float, default=0.0, help="with --serve: SIGKILL the server after S seconds, start it again")
    p.add_argument("--cameras", type=int, default=4)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    p.add_argument("--max-frames", type=int, default=0, help="frames per camera (0: until --duration)")
    p.add_argument("--fps", type=float, default=0.0, help="frames per second per camera (0: as fast as answered)")
    p.add_argument("--frames", default=None, help="folder of images to send (default: random frames of --frame-size)")
    p.add_argument("--frame-size", default="480x640", help="HxW of the random frames")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise ConfigError(message("--json", args.json, "a file in an existing folder", "create the folder first"))
        if not 1 <= args.cameras <= 256 or args.duration <= 0:
            raise ConfigError(message("--cameras/--duration", f"{args.cameras}/{args.duration}", "1..256 cameras, duration > 0", "fix the options"))
        if (args.compare_batching or args.restart_at) and not args.serve:
            raise ConfigError(message("--compare-batching/--restart-at", "no --serve", "--serve BUNDLE ...", "let the test start the server"))
        h, w = (int(v) for v in args.frame_size.lower().split("x"))
        frames = load_frames(args.frames, (h, w))
        runs: dict[str, Any] = {}
        if args.serve:
            if not Path(args.serve_python).exists():
                raise ConfigError(message("--serve-python", args.serve_python, "the serve environment's Python", "run 'make serve-venv' or pass --serve-python"))
            from edgead.serve import model_name

            args.model = args.model or model_name(args.serve[0])
            modes = [("dynamic_batching", [])] + ([("no_dynamic_batching", ["--no-dynamic-batching"])] if args.compare_batching else [])
            for label, extra in modes:
                srv = ServerProcess([args.serve_python], args.serve, http_port=args.port, extra_args=[*args.serve_args.split(), *extra])
                with srv:
                    args.server = srv.url
                    runs[label] = run_load(args, frames, srv)
        else:
            if not args.server or not args.model:
                raise ConfigError(message("--server/--model", f"{args.server}/{args.model}", "both, or --serve BUNDLE", "pass --server URL --model NAME"))
            runs["run"] = run_load(args, frames)
    except EdgeADError as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "frames": f"{len(frames)} x {frames[0].shape} {frames[0].dtype}",
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = all(r["accounted"] and r["hung_cameras"] == 0 and "client" not in r["errors"] for r in runs.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
