"""Validation job for a lent GPU (H100/H200): build, GPU tests, compute-sanitizer, benchmark.

Run from the repository root (the lead runs kernels/postprocess/gpu_job.sh, which calls this):

    python3 kernels/postprocess/gpu_validate.py --out "$OUT" --arch 90

Every step runs even if an earlier one failed; logs, bench.json and summary.md go to --out and a
short table is printed at the end. Exit status 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_step(name: str, cmd: list[str], out: Path, timeout: int, env: dict[str, str]) -> dict[str, object]:
    t0 = time.time()
    log = out / f"{name}.log"
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:
        rc, text = 124, (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        text += f"\n[timeout after {timeout}s]"
    except OSError as exc:
        rc, text = 127, f"could not start {cmd[0]}: {exc}"
    log.write_text(" ".join(cmd) + "\n\n" + text)
    tail = "\n".join(text.strip().splitlines()[-3:])
    res = {"step": name, "rc": rc, "seconds": round(time.time() - t0, 1), "tail": tail, "log": str(log)}
    print(f"== {name}: rc={rc} in {res['seconds']}s\n{tail}\n", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    ap.add_argument("--arch", default="90")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    build = REPO / "build"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "sdk"), str(REPO), env.get("PYTHONPATH", "")])
    env["EDGEAD_KERNELS_DIR"] = str(build / "lib")
    env["EDGEAD_REQUIRE_KERNELS"] = "1"
    env.setdefault("OMP_NUM_THREADS", "4")
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    info = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"], capture_output=True, text=True)
    print("GPU:", info.stdout.strip() or info.stderr.strip(), flush=True)

    steps = [
        ("configure", ["cmake", "-S", ".", "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-DEDGEAD_CUDA_ARCHS={args.arch}"], 120),
        ("build", ["cmake", "--build", str(build), "-j", "8"], 240),
        ("pytest_gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/kernels", "-p", "no:cacheprovider"], 240),
        ("pytest_host", [py, "-m", "pytest", "-q", "-m", "not gpu", "tests/kernels", "-p", "no:cacheprovider"], 120),
        ("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", "--leak-check", "no", py, "kernels/postprocess/sanitize_driver.py"], 240),
        ("racecheck", [sanitizer, "--tool", "racecheck", "--error-exitcode", "1", py, "kernels/postprocess/sanitize_driver.py"], 240),
        ("bench", [py, "kernels/postprocess/bench_kernels.py", "--json", str(out / "bench.json")], 300),
    ]
    results = [run_step(name, cmd, out, timeout, env) for name, cmd, timeout in steps]
    lines = ["| step | rc | seconds | last line |", "|---|---|---|---|"]
    for r in results:
        last = str(r["tail"]).splitlines()[-1] if r["tail"] else ""
        lines.append(f"| {r['step']} | {r['rc']} | {r['seconds']} | {last[:110].replace('|', '/')} |")
    summary = "GPU: " + info.stdout.strip() + "\n\n" + "\n".join(lines)
    bench = out / "bench.json"
    if bench.is_file():
        summary += "\n\n" + json.loads(bench.read_text())["table_md"]
    (out / "summary.md").write_text(summary + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n" + summary)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
