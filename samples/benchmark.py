"""Time a bundle on this machine with the public EdgeAD API only.

    python samples/benchmark.py BUNDLE [--backend auto] [--runs 100] [--batch 16] [--threads N]

For the full report (stage breakdown, PyTorch baseline, GEMM ceiling, JSON) use `edgead bench`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import edgead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.runs < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--runs and --batch must be >= 1, --warmup >= 0")

    with edgead.Detector(args.bundle, backend=args.backend, threads=args.threads) as det:
        print(f"backend={det.backend} precision={det.precision} variant={det.variant} device={det.device}")
        rng = np.random.default_rng(0)
        frame = rng.integers(0, 256, (det.image_size, det.image_size, 3), dtype=np.uint8)  # a camera frame (BGR)

        for _ in range(args.warmup):
            det.infer(frame)
        latencies = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            result = det.infer(frame)
            latencies.append((time.perf_counter() - t0) * 1e3)
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
        print(f"batch 1: p50 {p50:.2f} ms, p90 {p90:.2f} ms, p99 {p99:.2f} ms over {args.runs} runs")
        print(f"last result: {result}  stages (ms): {', '.join(f'{k} {v:.2f}' for k, v in result.timings.items())}")

        frames = [frame] * args.batch
        det.infer_batch(frames)
        t0 = time.perf_counter()
        det.infer_batch(frames)
        print(f"batch {args.batch}: {args.batch / (time.perf_counter() - t0):.1f} images/s")


if __name__ == "__main__":
    main()
