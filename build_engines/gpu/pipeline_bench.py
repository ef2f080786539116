"""EfficientAD GPU pipeline benchmark (paper protocol) for a lent NVIDIA GPU without TensorRT.

The networks run as the PyTorch CUDA model in FP16 (channels-last, captured in a CUDA graph); the
post-processing runs in EdgeAD's own CUDA kernels (kernels/postprocess) on the networks' device outputs.
End to end = pinned uint8 BGR frame on the host -> H2D -> convert/normalise -> teacher, student, autoencoder ->
fused map + score kernel -> bilinear resize kernel -> D2H of the map and the score, all in one graph replay.

Protocol (EfficientAD paper): latency at batch 1 (median of >= 1000 runs after warm-up), throughput at batch 16.
Also: networks alone, post-processing alone, FP16 matrix-rate ceiling measured in the same run (compute floor),
and FP16-vs-FP32 agreement of scores on real images when trained runs are given.

Run from the repository root on the GPU machine (see build_engines/gpu/gpu_job.sh):
    python3 build_engines/gpu/pipeline_bench.py --out $OUT [--runs 1000] [--real RUN_DIR:TEST_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "sdk"), str(REPO), str(REPO / "kernels" / "postprocess")]

from bench_kernels import copy_bandwidth_gbs, gpu_time_ms  # noqa: E402

from build_engines.efficientad.models import EfficientAD, conv_flops  # noqa: E402
from edgead import kernels  # noqa: E402
from edgead.postprocess import EfficientADPost, QuantileAffine  # noqa: E402
from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

PAPER = {"s": {"latency_ms": 2.2, "throughput": 614}, "m": {"latency_ms": 4.5, "throughput": 269}}  # RTX A6000, Table 1


def _device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = "nvidia-smi unavailable"
    return {"name": props.name, "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1), "nvidia_smi": smi, "torch": torch.__version__, "cuda": torch.version.cuda}


def ceilings() -> dict:
    """FP16 matrix rate and device-to-device copy bandwidth, measured now (timers shared with the kernel benchmark)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    ms = gpu_time_ms(lambda: torch.mm(a, b), k=5, reps=10)
    return {"fp16_matmul_tflops": 2 * 8192**3 / (ms * 1e-3) / 1e12, "copy_gbps": copy_bandwidth_gbs()}


class Pipeline:
    """Static buffers + one CUDA graph for the whole frame -> (map, score) path."""

    def __init__(self, model: EfficientAD, batch: int, frame_hw: tuple[int, int], channels_last: bool, post: EfficientADPost, lib: kernels.PostprocessLibrary) -> None:
        self.model, self.batch, self.post, self.lib = model, batch, post, lib
        self.size = model.image_size
        self.cl = channels_last
        fh, fw = frame_hw
        self.frame_hw = frame_hw
        self.host_frame = torch.randint(0, 256, (batch, fh, fw, 3), dtype=torch.uint8).pin_memory()
        self.dev_frame = torch.empty((batch, fh, fw, 3), dtype=torch.uint8, device="cuda")
        self.mean = torch.tensor(IMAGENET_MEAN, device="cuda").view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device="cuda").view(1, 3, 1, 1)
        with torch.no_grad():
            t, _, _ = model(self._normalise())
        self.c, self.h, self.w = t.shape[1:]
        p = post.pad
        self.map = torch.empty((batch, self.h + 2 * p, self.w + 2 * p), device="cuda")
        self.score = torch.empty((batch,), device="cuda")
        self.big = torch.empty((batch, fh, fw), device="cuda")
        self.host_map = torch.empty((batch, fh, fw)).pin_memory()
        self.host_score = torch.empty((batch,)).pin_memory()
        self.static_x = self._normalise()

    def _normalise(self) -> torch.Tensor:
        x = self.dev_frame.permute(0, 3, 1, 2).flip(1).float().div_(255.0)  # BGR uint8 NHWC -> RGB float NCHW
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = ((x - self.mean) / self.std).half()
        return x.contiguous(memory_format=torch.channels_last) if self.cl else x.contiguous()

    def networks(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(o.contiguous() for o in self.model(x))  # kernels read NCHW

    def postprocess(self, t: torch.Tensor, s: torch.Tensor, a: torch.Tensor) -> None:
        stream = torch.cuda.current_stream().cuda_stream
        self.lib.efficientad(t.data_ptr(), s.data_ptr(), a.data_ptr(), kernels.DTYPE_FP16, (self.batch, self.c, self.h, self.w), self.post, self.map.data_ptr(), self.score.data_ptr(), stream=stream)
        self.lib.resize(self.map.data_ptr(), self.batch, self.map.shape[1], self.map.shape[2], self.big.data_ptr(), *self.frame_hw, stream=stream)

    def end_to_end(self) -> None:
        self.dev_frame.copy_(self.host_frame, non_blocking=True)
        t, s, a = self.networks(self._normalise())
        self.postprocess(t, s, a)
        self.host_map.copy_(self.big, non_blocking=True)
        self.host_score.copy_(self.score, non_blocking=True)

    def capture(self, fn) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return graph


def _wall_ms(graph: torch.cuda.CUDAGraph, runs: int, warmup: int = 50) -> list[float]:
    """Host wall clock around replay + synchronise: what a caller waiting for the result sees."""
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _stats(ms: list[float]) -> dict:
    arr = np.asarray(ms)
    return {"median_ms": float(np.median(arr)), "p90_ms": float(np.percentile(arr, 90)), "p99_ms": float(np.percentile(arr, 99)), "runs": len(ms)}


def time_model(size: str, image_size: int, runs: int, batch: int, lib: kernels.PostprocessLibrary, frame_hw: tuple[int, int]) -> dict:
    torch.manual_seed(0)
    model = EfficientAD(size, image_size).eval().cuda()
    flops = conv_flops(model, torch.zeros(1, 3, image_size, image_size, device="cuda"))
    post = EfficientADPost(QuantileAffine(0.5, 2.0), QuantileAffine(0.4, 1.5), model.map_pad)
    result: dict = {"size": size, "image_size": image_size, "frame": list(frame_hw), "gflop_per_image": flops / 1e9}
    best = None
    for cl in (True, False):
        m16 = EfficientAD(size, image_size).eval().cuda()
        m16.load_state_dict(model.state_dict())
        m16 = m16.half()
        if cl:
            m16 = m16.to(memory_format=torch.channels_last)
        row: dict = {"channels_last": cl}
        for b, key in ((1, "batch1"), (batch, f"batch{batch}")):
            pipe = Pipeline(m16, b, frame_hw, cl, post, lib)
            e2e = _wall_ms(pipe.capture(pipe.end_to_end), runs if b == 1 else max(200, runs // 5))
            nets = _wall_ms(pipe.capture(lambda p=pipe: p.networks(p.static_x)), runs if b == 1 else max(200, runs // 5))
            t, s, a = pipe.networks(pipe.static_x)
            pp = _wall_ms(pipe.capture(lambda p=pipe, t=t, s=s, a=a: p.postprocess(t, s, a)), runs)
            row[key] = {"end_to_end": _stats(e2e), "networks": _stats(nets), "postprocess": _stats(pp)}
            row[key]["throughput_img_s"] = b / (row[key]["end_to_end"]["median_ms"] * 1e-3)
        result["channels_last" if cl else "nchw"] = row
        lat = row["batch1"]["end_to_end"]["median_ms"]
        if best is None or lat < best[0]:
            best = (lat, "channels_last" if cl else "nchw")
        del m16
        torch.cuda.empty_cache()
    result["best_layout"] = best[1] if best else None
    return result


def fp16_vs_fp32(run_dir: Path, test_dir: Path) -> dict:
    """Scores of the same trained run in FP32 and FP16 on a real test set: AUROC and rank agreement."""
    from build_engines.efficientad.run import load_run
    from edgead.datasets import open_dataset, read_image
    from edgead.metrics import image_auroc
    from edgead.postprocess import efficientad_postprocess
    from edgead.preprocess import prepare

    run = load_run(run_dir)
    data = open_dataset(test_dir)
    m32 = run.model.cuda().eval()
    m16 = EfficientAD(m32.size, m32.image_size, m32.padding).cuda().eval()
    m16.load_state_dict(m32.state_dict())
    m16 = m16.half().to(memory_format=torch.channels_last)
    scores = {"fp32": [], "fp16": []}
    rel = []
    labels = [s.label for s in data.test]
    for sample in data.test:
        x = torch.from_numpy(prepare(read_image(sample.path), m32.image_size))[None].cuda()
        maps = {}
        with torch.no_grad():
            for key, model, inp in (("fp32", m32, x), ("fp16", m16, x.half().contiguous(memory_format=torch.channels_last))):
                outs = [o.float().cpu().numpy() for o in model(inp)]
                mp, sc = efficientad_postprocess(*outs, run.post)
                maps[key] = mp
                scores[key].append(float(sc[0]))
        rel.append(float(np.linalg.norm(maps["fp16"] - maps["fp32"]) / max(np.linalg.norm(maps["fp32"]), 1e-12)))
    s32, s16 = np.asarray(scores["fp32"]), np.asarray(scores["fp16"])
    order_same = bool(np.array_equal(np.argsort(s32, kind="stable"), np.argsort(s16, kind="stable")))
    r32, r16 = np.argsort(np.argsort(s32)), np.argsort(np.argsort(s16))
    spearman = float(np.corrcoef(r32, r16)[0, 1])
    swapped = int(np.sum(r32 != r16))
    return {
        "run": str(run_dir), "data": str(test_dir), "images": len(labels),
        "image_auroc_fp32": image_auroc(labels, s32), "image_auroc_fp16": image_auroc(labels, s16),
        "rank_identical": order_same, "spearman": spearman, "images_with_changed_rank": swapped,
        "max_abs_score_diff": float(np.max(np.abs(s32 - s16))), "map_rel_err_median": float(np.median(rel)), "map_rel_err_max": float(np.max(rel)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sizes", nargs="+", default=["s", "m"])
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--real", nargs="*", default=[], help="RUN_DIR:TEST_DIR pairs for the FP16-vs-FP32 check")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    lib = kernels.load_library("cuda")
    report: dict = {"device": _device_info(), "ceilings": ceilings(), "models": [], "fp16_vs_fp32": []}
    frame = (args.image_size, args.image_size)
    for size in args.sizes:
        r = time_model(size, args.image_size, args.runs, args.batch, lib, frame)
        r["paper_a6000"] = PAPER.get(size)
        r["compute_floor_ms_per_image"] = r["gflop_per_image"] / (report["ceilings"]["fp16_matmul_tflops"] * 1e3)
        report["models"].append(r)
        (args.out / "pipeline_bench.json").write_text(json.dumps(report, indent=2))
    for pair in args.real:
        run_dir, test_dir = pair.split(":", 1)
        try:
            report["fp16_vs_fp32"].append(fp16_vs_fp32(Path(run_dir), Path(test_dir)))
        except Exception as exc:  # report and go on: one bad pair must not lose the timings
            report["fp16_vs_fp32"].append({"run": run_dir, "error": repr(exc)})
        (args.out / "pipeline_bench.json").write_text(json.dumps(report, indent=2))
    dev = report["device"]
    print(f"\ndevice: {dev['name']} | {dev['nvidia_smi']} | torch {dev['torch']} CUDA {dev['cuda']}")
    c = report["ceilings"]
    print(f"measured ceilings: FP16 matmul {c['fp16_matmul_tflops']:.0f} TFLOP/s, D2D copy {c['copy_gbps']:.0f} GB/s")
    print(f"{'model':<6}{'layout':<14}{'b1 e2e ms':>10}{'b1 nets':>9}{'b1 pp':>8}{'b16 img/s':>11}{'b16 nets img/s':>15}{'floor ms':>9}{'paper ms/img/s':>16}")
    for r in report["models"]:
        for layout in ("channels_last", "nchw"):
            row = r[layout]
            b16 = row[f"batch{args.batch}"]
            print(
                f"{r['size']:<6}{layout:<14}{row['batch1']['end_to_end']['median_ms']:>10.3f}{row['batch1']['networks']['median_ms']:>9.3f}"
                f"{row['batch1']['postprocess']['median_ms']:>8.3f}{b16['throughput_img_s']:>11.0f}{args.batch / (b16['networks']['median_ms'] * 1e-3):>15.0f}"
                f"{r['compute_floor_ms_per_image']:>9.3f}{str(r['paper_a6000']['latency_ms']) + '/' + str(r['paper_a6000']['throughput']):>16}"
            )
    for q in report["fp16_vs_fp32"]:
        print("fp16 vs fp32:", json.dumps(q))
    return 0


if __name__ == "__main__":
    sys.exit(main())
