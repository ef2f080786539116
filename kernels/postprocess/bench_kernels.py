"""Time the fused post-processing kernels against the same post-processing in PyTorch CUDA ops.

GPU time per call = (time of K back-to-back calls queued behind a torch.cuda._sleep) / K, median of R
repetitions, measured with CUDA events (host launch overhead is hidden, so this is device time).
Achieved bandwidth = (bytes of T, S, A read once + map written + scores) / fused-kernel time, compared with
the device-to-device copy bandwidth (2 x bytes / time of a 512 MiB tensor copy) measured here too.

    python3 kernels/postprocess/bench_kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "sdk"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from edgead import kernels  # noqa: E402
from edgead.postprocess import EfficientADPost, QuantileAffine  # noqa: E402

C, OUT = 384, (256, 256)
TOLERANCE = {"fp32": 1e-5, "fp16": 4e-3}  # max relative error against the PyTorch computation on the same inputs


def gpu_time_ms(fn, k: int = 20, reps: int = 25, sleep_cycles: int = 20_000_000) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(sleep_cycles)  # keep the GPU busy while the host queues k calls
        start.record()
        for _ in range(k):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / k)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    nbytes = 512 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = gpu_time_ms(lambda: dst.copy_(src), k=5, reps=15)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def torch_pp(t, s, a, q, pad, out_size):
    c = t.shape[1]
    local = (t.float() - s[:, :c].float()).pow(2).mean(1)
    glob = (a.float() - s[:, c:].float()).pow(2).mean(1)
    m = 0.5 * ((local - q[0]) * (0.1 / (q[1] - q[0]))) + 0.5 * ((glob - q[2]) * (0.1 / (q[3] - q[2])))
    if pad:
        m = F.pad(m, (pad, pad, pad, pad))
    score = m.flatten(1).amax(1)
    if out_size is None:
        return m, score
    return m, score, F.interpolate(m[:, None], size=out_size, mode="bilinear", align_corners=False)[:, 0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    lib = kernels.load_library("cuda")
    dev = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth_gbs()
    print(f"device: {dev}; measured device-to-device copy bandwidth: {copy_bw:.0f} GB/s")
    rows = []
    q = (0.5, 4.0, 0.4, 3.0)
    post = EfficientADPost(QuantileAffine(q[0], q[1]), QuantileAffine(q[2], q[3]), pad=4)
    for n in (1, 16):
        for dtype in (torch.float16, torch.float32):
            for h, pad in ((56, 4), (64, 0)):
                p = EfficientADPost(post.st, post.ae, pad=pad)
                g = torch.Generator(device="cuda").manual_seed(0)
                t = torch.randn((n, C, h, h), device="cuda", generator=g).to(dtype)
                s = torch.randn((n, 2 * C, h, h), device="cuda", generator=g).to(dtype)
                a = torch.randn((n, C, h, h), device="cuda", generator=g).to(dtype)
                hp = h + 2 * pad
                m = torch.empty((n, hp, hp), device="cuda")
                sc = torch.empty((n,), device="cuda")
                big = torch.empty((n, *OUT), device="cuda")
                code = "fp16" if dtype == torch.float16 else "fp32"

                def fused(t=t, s=s, a=a, m=m, sc=sc, n=n, h=h, p=p, code=code):
                    kernels.device_postprocess(t.data_ptr(), s.data_ptr(), a.data_ptr(), dtype=code, shape=(n, C, h, h), post=p,
                                               map_out=m.data_ptr(), score_out=sc.data_ptr(), stream=torch.cuda.current_stream().cuda_stream, library=lib)

                def full(fused=fused, m=m, big=big):
                    fused()
                    kernels.device_resize(m.data_ptr(), tuple(m.shape), big.data_ptr(), OUT, stream=torch.cuda.current_stream().cuda_stream, library=lib)

                full()
                tm, ts, tb = torch_pp(t, s, a, q, pad, OUT)
                torch.cuda.synchronize()
                err = max(float((m - tm).abs().max() / tm.abs().max()), float((big - tb).abs().max() / tb.abs().max()), float((sc - ts).abs().max() / tm.abs().max()))
                ms_fused = gpu_time_ms(fused)
                ms_full = gpu_time_ms(full)
                ms_torch = gpu_time_ms(lambda t=t, s=s, a=a, pad=pad: torch_pp(t, s, a, q, pad, None))
                ms_torch_full = gpu_time_ms(lambda t=t, s=s, a=a, pad=pad: torch_pp(t, s, a, q, pad, OUT))
                nbytes = 4 * n * C * h * h * t.element_size() + 4 * n * hp * hp + 4 * n
                bw = nbytes / (ms_fused * 1e-3) / 1e9
                row = {"batch": n, "dtype": code, "h": h, "pad": pad, "ours_fused_ms": ms_fused, "ours_with_resize_ms": ms_full, "torch_ms": ms_torch,
                       "torch_with_resize_ms": ms_torch_full, "speedup_with_resize": ms_torch_full / ms_full, "bytes": nbytes, "achieved_GBs": bw,
                       "fraction_of_copy_bw": bw / copy_bw, "max_rel_err_vs_torch": err}
                rows.append(row)
                print(json.dumps(row))
    lines = [f"Device: {dev}; measured D2D copy bandwidth {copy_bw:.0f} GB/s (2 x 512 MiB / time). C=384, resize to {OUT[0]}x{OUT[1]}.", "",
             "| batch | dtype | h (pad) | ours fused ms | ours +resize ms | torch ms | torch +resize ms | speed-up | achieved GB/s | % of copy BW | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['dtype']} | {r['h']} ({r['pad']}) | {r['ours_fused_ms']:.4f} | {r['ours_with_resize_ms']:.4f} | {r['torch_ms']:.4f} | "
                     f"{r['torch_with_resize_ms']:.4f} | {r['speedup_with_resize']:.1f}x | {r['achieved_GBs']:.0f} | {100 * r['fraction_of_copy_bw']:.0f}% | {r['max_rel_err_vs_torch']:.1e} |")
    table = "\n".join(lines)
    print(table)
    bad = [r for r in rows if not r["max_rel_err_vs_torch"] <= TOLERANCE[r["dtype"]]]
    if args.json:
        args.json.write_text(json.dumps({"device": dev, "copy_bandwidth_GBs": copy_bw, "rows": rows, "table_md": table, "tolerance": TOLERANCE,
                                         "passed": not bad}, indent=1))
    if bad:  # a fast wrong kernel is a failure, not a benchmark figure
        print(f"FAILED: {len(bad)} configuration(s) above the tolerance {TOLERANCE}: {[(r['batch'], r['dtype'], r['h']) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
