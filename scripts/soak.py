"""Bounded soak of the camera loop against the GigE Vision simulator: N frames, the camera killed and restarted
every K seconds, the loop's memory (RSS) and open file descriptors sampled every second.

Not part of CI (minutes). Needs scripts/ci_camera_setup.sh (arv-fake-gv-camera-0.8 and the Aravis bindings).

    python scripts/soak.py --bundle demo_out/bundle --frames 3000 --fps 10 --kill-every 60 --json bench_out/soak.json

Reports: frames processed against frames asked for, reconnects, every frame accounted for (each JSON line is a
decision; dropped/incomplete/missed frames are counted by the loop), RSS and fd count at the start, the end and
their maximum, and the RSS growth per 1000 frames after the first minute (allocator warm-up excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FAKE = "arv-fake-gv-camera-0.8"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _start_camera(serial: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([FAKE, "-i", "127.0.0.1", "-s", serial], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    if proc.poll() is not None:
        raise SystemExit(f"{FAKE} exited with {proc.returncode} (is UDP 127.0.0.1:3956 taken?)")
    return proc


def soak(bundle: Path, frames: int, fps: float, kill_every: float, work: Path) -> dict[str, Any]:
    serial = "EDGEAD-SOAK"
    load_start = list(os.getloadavg())
    camera = _start_camera(serial)
    out, summary_path = work / "decisions.jsonl", work / "summary.json"
    cmd = [sys.executable, str(REPO / "samples" / "camera_loop.py"), "--bundle", str(bundle), "--backend", "onnxruntime", "--threads", "1"]
    cmd += ["--source", f"gige:{serial}", "--pixel-format", "Mono8", "--roi", "0,0,512,512", "--fps", str(fps), "--exposure-us", "1000"]
    cmd += ["--max-frames", str(frames), "--backoff", "0.2", "--max-backoff", "2", "--jsonl", str(out), "--summary", str(summary_path)]
    cmd += ["--ng-dir", str(work / "ng"), "--ng-budget-mb", "20", "--report-every", "10"]
    loop = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / "loop.log", "w"), env={**os.environ, "OMP_NUM_THREADS": "1"})  # noqa: SIM115
    samples: list[dict[str, float]] = []
    kills = 0
    t0 = last_kill = time.monotonic()
    try:
        while loop.poll() is None:
            time.sleep(1.0)
            now = time.monotonic()
            try:
                lines = sum(1 for _ in open(out)) if out.exists() else 0  # noqa: SIM115
                rss = _rss_kib(loop.pid)
                if rss > 0:  # an exiting (zombie) process has no VmRSS: not a sample of the loop
                    samples.append({"t": round(now - t0, 1), "rss_kib": rss, "fds": _fds(loop.pid), "frames": lines})
            except (FileNotFoundError, ProcessLookupError):
                break
            if kill_every and now - last_kill >= kill_every:
                camera.kill()
                camera.wait()
                time.sleep(2.0)
                camera = _start_camera(serial)
                kills += 1
                last_kill = time.monotonic()
            if now - t0 > frames / fps * 3 + 120:
                loop.terminate()
    finally:
        if loop.poll() is None:
            loop.kill()
        loop.wait()
        camera.kill()
        camera.wait()
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    warm = [s for s in samples if s["t"] >= 60 and s["frames"] > 0]
    growth = None
    if len(warm) >= 2 and warm[-1]["frames"] > warm[0]["frames"]:
        growth = round((warm[-1]["rss_kib"] - warm[0]["rss_kib"]) / (warm[-1]["frames"] - warm[0]["frames"]) * 1000, 1)
    return {
        "command": " ".join([sys.executable, *sys.argv]),
        "load_average_start": load_start,
        "frames_asked": frames,
        "frames_decided": len(records),
        "loop_exit_code": loop.returncode,
        "summary": summary,
        "camera_kills": kills,
        "every_frame_accounted": len(records) == summary.get("processed"),
        "rss_kib": {"start": samples[0]["rss_kib"] if samples else None, "end": samples[-1]["rss_kib"] if samples else None,
                    "max": max((s["rss_kib"] for s in samples), default=None)},
        "rss_growth_kib_per_1000_frames_after_60s": growth,
        "fds": {"start": samples[0]["fds"] if samples else None, "end": samples[-1]["fds"] if samples else None, "max": max((s["fds"] for s in samples), default=None)},
        "duration_s": round(time.monotonic() - t0, 1),
        "load_average_end": list(os.getloadavg()),  # other work on the machine slows the loop (frames then drop by policy)
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--frames", type=int, default=3000)
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--kill-every", type=float, default=60.0, help="seconds between camera kills (0: never)")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    if args.json.is_dir() or not args.json.parent.is_dir():
        raise SystemExit(f"soak: error: --json {args.json}: a file in an existing folder")
    with tempfile.TemporaryDirectory(prefix="edgead-soak-") as tmp:
        report = soak(args.bundle, args.frames, args.fps, args.kill_every, Path(tmp))
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    return 0 if report["every_frame_accounted"] and report["loop_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
