"""Latency / throughput benchmark of a bundle through ``edgead.Detector``, with its context.

Measured in one run, on the same machine state:

- latency at batch 1: p50 / p90 / p99 over ``runs`` calls after ``warmup``, end to end from a
  uint8 BGR frame to a ``Result`` (``Detector.infer``), plus the stage breakdown from ``Result.timings``;
- throughput at ``batch`` frames per ``Detector.infer_batch`` call (images/s);
- the PyTorch eager FP32 model with the same weights (``--torch-baseline RUN_DIR``), same threads;
- a float32 GEMM (2048^3) as the machine's practical compute ceiling, set against the model's
  achieved GFLOP/s (FLOPs counted from the ONNX graph's Conv / MatMul nodes).

    edgead bench BUNDLE [--backend auto|onnxruntime|tensorrt] [--variant V] [--precision P]
                        [--runs 100] [--warmup 10] [--batch 16] [--threads N]
                        [--torch-baseline RUN_DIR] [--json OUT]
    edgead bench BUNDLE --precision fp32,int8 ...   # both in one run, against one baseline and one GEMM

>>> report = run_bench("demo_out/bundle", runs=100, batch=16, threads=2)  # doctest: +SKIP
>>> report["latency_ms"]["p50"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgead.errors import ConfigError, message
from edgead.registry import BACKENDS, check_choice

__all__ = ["percentiles", "count_flops", "gemm_gflops", "synthetic_frame", "machine_info", "run_bench", "comparison_pairs", "run_comparison", "format_report", "main"]

log = logging.getLogger(__name__)

STAGES = ("preprocess", "inference", "postprocess", "total")


def percentiles(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    """p50 / p90 / p99 / mean / min / max of a list of milliseconds.

    >>> percentiles([1.0, 2.0, 3.0])["p50"]
    2.0
    """
    a = np.asarray(samples_ms, np.float64)
    if a.size == 0:
        raise ConfigError(message("samples", "an empty list", "at least one timing", "run at least one iteration"))
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def count_flops(onnx_path: str | Path, image_size: int | None = None) -> dict[str, float]:
    """FLOPs per image of the Conv / MatMul / Gemm nodes of an ONNX graph (2 x multiply-adds).

    ``int8_conv_flops``: the part of ``conv_flops`` in QDQ (INT8) convolutions.

    Tensor shapes come from running the graph once on a zero image with ONNX Runtime (exact even
    where static shape inference gives up, e.g. after a Resize with computed sizes).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))
    inp = model.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    side = image_size or dims[-1]
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    wanted = {name for n in nodes for name in [*n.input[:2], n.output[0]] if name}
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    existing = {o.name for o in model.graph.output}
    for name in sorted(wanted - set(inits) - existing - {inp.name}):
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, {inp.name: np.zeros((1, 3, side, side), np.float32)}), strict=True))
    shapes = {k: tuple(v.shape) for k, v in values.items()}
    shapes.update(inits)
    shapes[inp.name] = (1, 3, side, side)

    def weight_shape(name: str) -> tuple[int, ...]:
        if name in shapes:
            return shapes[name]
        # QDQ graphs: the weight reaches the Conv through DequantizeLinear(initializer)
        producer = next((n for n in model.graph.node if name in n.output), None)
        if producer is not None and producer.input:
            return weight_shape(producer.input[0])
        raise ConfigError(message("FLOP count", f"unknown shape of '{name}'", "a graph exported by edgead export", "re-export the bundle"))

    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    conv = matmul = int8 = 0.0
    for n in nodes:
        out = shapes[n.output[0]]
        if n.op_type == "Conv":
            w = weight_shape(n.input[1])  # (Cout, Cin/groups, kh, kw)
            flops = 2.0 * float(np.prod(out)) * float(np.prod(w[1:]))
            conv += flops
            if n.input[1] in dequantized:  # QDQ convolution: runs in INT8
                int8 += flops
        else:
            a = shapes.get(n.input[0]) or weight_shape(n.input[0])
            k = a[-1]
            matmul += 2.0 * float(np.prod(out)) * float(k)
    return {"conv_flops": conv, "matmul_flops": matmul, "total_flops": conv + matmul, "int8_conv_flops": int8, "image_size": float(side)}


def gemm_gflops(n: int = 2048, repeats: int = 5, threads: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Best-of-``repeats`` GEMM rate (GFLOP/s) with torch when importable (thread count set), else numpy (float32 only).

    ``dtype="bfloat16"``: the BF16 GEMM ceiling (oneDNN's AVX-512 BF16 / AMX kernels), for BF16 runtimes.
    """
    a_np = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b_np = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    fn: Callable[[], object]
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        a, b = torch.from_numpy(a_np).to(getattr(torch, dtype)), torch.from_numpy(b_np).to(getattr(torch, dtype))
        fn, engine = (lambda: torch.mm(a, b)), f"torch {torch.__version__} {dtype} ({torch.get_num_threads()} threads)"
    except ImportError:
        if dtype != "float32":
            return {"n": n, "engine": "unavailable", "dtype": dtype, "skipped": "torch not importable"}
        fn, engine = (lambda: a_np @ b_np), f"numpy {np.__version__} (BLAS threads from the environment)"
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"n": n, "engine": engine, "dtype": dtype, "best_s": best, "gflops": 2.0 * n**3 / best / 1e9, "median_gflops": 2.0 * n**3 / float(np.median(times)) / 1e9}


def synthetic_frame(size: int, seed: int = 0) -> np.ndarray:
    """A deterministic textured uint8 BGR frame (the benchmark does not depend on real data)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = 120 + 50 * np.sin(12 * xx) * np.cos(9 * yy)
    img = base[:, :, None] + rng.normal(0, 8, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def machine_info() -> dict[str, Any]:
    """CPU / OS / load / library versions, for the JSON report."""
    import importlib.metadata as md

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("edgead", "numpy", "onnxruntime", "onnx", "torch", "tensorrt", "opencv-python-headless"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": _load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ},
    }


def _progress(it: range, desc: str) -> Any:
    """tqdm progress bar on stderr when available (long CPU runs), else the plain iterable."""
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, desc=desc, unit="run", leave=False, mininterval=2.0)


def _check_positive(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(message(name, repr(value), f"an integer >= {minimum}", f"pass --{name.replace('_', '-')} {max(minimum, 1)} or more"))
    return value


def _torch_baseline(run_dir: Path, frame: np.ndarray, runs: int, warmup: int, batch: int, batch_runs: int, threads: int | None) -> dict[str, Any]:
    """PyTorch eager FP32, same weights, same preprocessing and NumPy post-processing, same threads."""
    import torch

    from build_engines.efficientad.run import load_run
    from edgead.postprocess import efficientad_postprocess
    from edgead.preprocess import prepare

    if threads:
        torch.set_num_threads(threads)
    run = load_run(run_dir)
    model, post, size = run.model.eval(), run.post, run.model.image_size

    def once(frames: list[np.ndarray]) -> None:
        x = torch.from_numpy(np.stack([prepare(f, size) for f in frames]))
        with torch.inference_mode():
            t, s, a = model(x)
        efficientad_postprocess(t.numpy(), s.numpy(), a.numpy(), post)

    for _ in range(warmup):
        once([frame])
    lat = []
    for _ in range(runs):
        t0 = time.perf_counter()
        once([frame])
        lat.append((time.perf_counter() - t0) * 1e3)
    frames = [frame] * batch
    once(frames)
    t0 = time.perf_counter()
    for _ in range(batch_runs):
        once(frames)
    ips = batch * batch_runs / (time.perf_counter() - t0)
    return {"run_dir": str(run_dir), "torch": torch.__version__, "threads": torch.get_num_threads(), "latency_ms": percentiles(lat), "throughput_ips": ips}


def run_bench(
    bundle: str | Path,
    *,
    backend: str = "auto",
    variant: str | None = None,
    precision: str | None = None,
    runs: int = 100,
    warmup: int = 10,
    batch: int = 16,
    batch_runs: int = 3,
    threads: int | None = None,
    torch_baseline: str | Path | None = None,
    torch_runs: int | None = None,
    gemm: bool = True,
) -> dict[str, Any]:
    """Benchmark one bundle; return the report as a JSON-ready dict (see module docstring)."""
    from edgead import Detector

    backend = check_choice("backend", backend, BACKENDS)
    runs, batch, batch_runs = _check_positive("runs", runs), _check_positive("batch", batch), _check_positive("batch_runs", batch_runs)
    warmup = _check_positive("warmup", warmup, 0)
    if threads is not None:
        _check_positive("threads", threads)
    report: dict[str, Any] = {"machine": machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    from edgead.bundle import load_bundle

    products = list(load_bundle(bundle).manifest.classes)  # a multi-product bundle (UniAD): time it as its first product
    with Detector(bundle, backend=backend, variant=variant, precision=precision, threads=threads, product=products[0] if products else None) as det:
        size = det.image_size
        frame = synthetic_frame(size)
        report["config"] = {
            "bundle": str(bundle),
            "backend": det.backend,
            "precision": det.precision,
            "variant": det.variant,
            "device": det.device,
            "image_size": size,
            "family": det.bundle.manifest.family,
            "frame": list(frame.shape),
            "runs": runs,
            "warmup": warmup,
            "batch": batch,
            "batch_runs": batch_runs,
            "threads": threads,
        }
        log.info("bench %s: %s %s %s, %d runs after %d warm-up", bundle, det.backend, det.variant, det.precision, runs, warmup)
        for _ in range(warmup):
            det.infer(frame)
        lat: list[float] = []
        stages: dict[str, list[float]] = {k: [] for k in STAGES}
        for _ in _progress(range(runs), "latency b=1"):
            t0 = time.perf_counter()
            result = det.infer(frame)
            lat.append((time.perf_counter() - t0) * 1e3)
            for k in STAGES:
                stages[k].append(result.timings.get(k, float("nan")))
        report["latency_ms"] = percentiles(lat)
        report["stages_ms_p50"] = {k: float(np.nanmedian(v)) for k, v in stages.items()}
        frames = [synthetic_frame(size, seed=i) for i in range(batch)]
        for _ in range(max(1, min(warmup, 2))):  # the first large batch also grows ONNX Runtime's memory arena
            det.infer_batch(frames)
        t0 = time.perf_counter()
        for _ in range(batch_runs):
            det.infer_batch(frames)
        report["throughput_ips"] = batch * batch_runs / (time.perf_counter() - t0)
        onnx_path = det.bundle.onnx_path(det.variant)
    flops = count_flops(onnx_path, size)
    report["model_flops"] = flops
    report["achieved_gflops"] = flops["total_flops"] * report["throughput_ips"] / 1e9
    baseline = _baseline(torch_baseline, frame, torch_runs or min(runs, 20), min(warmup, 2), batch, batch_runs, threads)
    _relate(report, baseline, gemm_gflops(threads=threads) if gemm else None)
    report["machine"]["load_average_end"] = _load_average()
    return report


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _baseline(run_dir: str | Path | None, frame: np.ndarray, runs: int, warmup: int, batch: int, batch_runs: int, threads: int | None) -> dict[str, Any] | None:
    if run_dir is None:
        return None
    try:
        return _torch_baseline(Path(run_dir), frame, runs, warmup, batch, batch_runs, threads)
    except ImportError as exc:
        return {"skipped": f"torch not importable: {exc}"}


def _relate(report: dict[str, Any], baseline: dict[str, Any] | None, gemm: dict[str, Any] | None) -> None:
    """Add the torch baseline / GEMM (measured in the same run) and the ratios against them to a report."""
    if baseline is not None:
        report["torch_baseline"] = baseline
        if "latency_ms" in baseline:
            report["speedup_vs_torch"] = {
                "latency_p50": baseline["latency_ms"]["p50"] / report["latency_ms"]["p50"],
                "throughput": report["throughput_ips"] / baseline["throughput_ips"],
            }
    if gemm is not None:
        report["gemm"] = gemm
        report["fraction_of_gemm"] = report["achieved_gflops"] / gemm["gflops"]


def comparison_pairs(backends: list[str], precisions: list[str], variants: list[str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Every (backend, precision) pair that can run this bundle, and why the others cannot.

    >>> comparison_pairs(["onnxruntime", "openvino"], ["fp32", "bf16"], ["merged"])[0]
    [('onnxruntime', 'fp32'), ('openvino', 'fp32'), ('openvino', 'bf16')]
    """
    from edgead.registry import RUNTIME_PRECISIONS

    backends = [check_choice("backend", b, BACKENDS) for b in backends]
    precisions = [check_choice("precision", p, RUNTIME_PRECISIONS) for p in precisions]
    if not backends or not precisions or len(set(backends)) != len(backends) or len(set(precisions)) != len(precisions):
        raise ConfigError(message("backends / precisions to compare", (backends, precisions), "distinct values of each", "pass e.g. --backend onnxruntime,openvino --precision fp32,int8"))
    pairs, skipped = [], {}
    for b in backends:
        for p in precisions:
            key = f"{b}/{p}"
            if p == "bf16" and b not in ("openvino", "auto"):
                skipped[key] = "bf16 runs on OpenVINO"
            elif p == "fp16" and b not in ("tensorrt", "auto"):
                skipped[key] = "fp16 is a TensorRT engine precision"
            elif p == "int8" and "merged_int8" not in variants and b != "tensorrt":
                skipped[key] = "the bundle has no merged_int8 variant (edgead export --int8)"
            else:
                pairs.append((b, p))
    if not pairs:
        raise ConfigError(message("backend / precision pairs", skipped, "at least one runnable pair", "see the reasons listed"))
    return pairs, skipped


def run_comparison(bundle: str | Path, precisions: list[str], *, backends: list[str] | None = None, torch_baseline: str | Path | None = None,
                   gemm: bool = True, **kwargs: Any) -> dict[str, Any]:
    """Several backend / precision pairs of one bundle benchmarked in one process, one after the other, then set
    against one PyTorch baseline and one GEMM (FP32, and BF16 when torch has it) measured in the same run
    (``kwargs``: those of ``run_bench``). Results are keyed ``backend/precision``.

    >>> r = run_comparison("bundle", ["fp32", "int8"], backends=["onnxruntime", "openvino"], threads=2, torch_baseline="run")  # doctest: +SKIP
    >>> r["results"]["openvino/int8"]["speedup_vs_torch"]["throughput"]  # doctest: +SKIP
    """
    from edgead.bundle import load_bundle

    kwargs.pop("backend", None)
    pairs, skipped = comparison_pairs(backends or ["auto"], precisions, sorted(load_bundle(bundle).manifest.variants))
    report: dict[str, Any] = {"machine": machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "compare": [f"{b}/{p}" for b, p in pairs], "skipped": skipped}
    results = {f"{b}/{p}": run_bench(bundle, backend=b, precision=p, torch_baseline=None, gemm=False, **kwargs) for b, p in pairs}
    first = next(iter(results.values()))
    c = first["config"]
    baseline = _baseline(
        torch_baseline,
        synthetic_frame(c["image_size"]),
        kwargs.get("torch_runs") or min(c["runs"], 20),
        min(c["warmup"], 2),
        c["batch"],
        c["batch_runs"],
        c["threads"],
    )
    gemm_report = gemm_gflops(threads=c["threads"]) if gemm else None
    for r in results.values():
        _relate(r, baseline, gemm_report)
    if gemm:
        report["gemm_bf16"] = gemm_gflops(threads=c["threads"], dtype="bfloat16")
    report["results"] = results
    report["machine"]["load_average_end"] = _load_average()
    return report


def format_report(r: dict[str, Any]) -> str:
    """A short human-readable summary of ``run_bench``'s report."""
    c, lat = r["config"], r["latency_ms"]
    lines = [
        f"{c['backend']} {c['variant']} {c['precision']} @ {c['image_size']}px on {c['device']}",
        f"  latency b=1 (ms): p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  (n={lat['n']})",
        "  stages p50 (ms): " + "  ".join(f"{k} {v:.2f}" for k, v in r["stages_ms_p50"].items()),
        f"  throughput b={c['batch']}: {r['throughput_ips']:.2f} images/s; model {r['model_flops']['total_flops'] / 1e9:.1f} GFLOP/img -> {r['achieved_gflops']:.1f} GFLOP/s",
    ]
    if r["model_flops"].get("int8_conv_flops"):
        lines[-1] += f" (FP32-equivalent; {100 * r['model_flops']['int8_conv_flops'] / r['model_flops']['conv_flops']:.0f}% of conv FLOPs in INT8)"
    if "gemm" in r:
        lines.append(f"  GEMM {r['gemm']['n']}^3: {r['gemm']['gflops']:.1f} GFLOP/s ({r['gemm']['engine']}); model at {100 * r['fraction_of_gemm']:.0f}% of it")
    tb = r.get("torch_baseline")
    if tb and "latency_ms" in tb:
        lines.append(
            f"  torch eager FP32: p50 {tb['latency_ms']['p50']:.2f} ms, {tb['throughput_ips']:.2f} images/s -> speed-up x{r['speedup_vs_torch']['throughput']:.2f} (throughput)"
        )
    lines.append(f"  load average: start {r['machine']['load_average']}, end {r['machine'].get('load_average_end')}")
    return "\n".join(lines)


def _existing_parent(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def main(argv: list[str] | None = None) -> int:
    """``edgead bench BUNDLE [...] [--json OUT]``."""
    parser = argparse.ArgumentParser(prog="edgead bench", description="latency / throughput benchmark of a bundle (JSON output)")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--backend", default="auto", help="auto (default), onnxruntime, openvino or tensorrt; a list (onnxruntime,openvino) compares them")
    parser.add_argument("--variant", default=None, help="merged, raw or merged_int8 (default: the Detector's choice)")
    parser.add_argument("--precision", default=None, help="fp32, bf16, fp16 or int8 (default: the Detector's choice); a list (fp32,bf16,int8) compares them in one run")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch-runs", type=int, default=3, help="infer_batch calls timed for throughput")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime / torch / GEMM")
    parser.add_argument("--torch-baseline", type=Path, default=None, help="run dir of the same model: PyTorch eager FP32 baseline")
    parser.add_argument("--torch-runs", type=int, default=None, help="batch-1 runs of the torch baseline (default: min(runs, 20))")
    parser.add_argument("--no-gemm", action="store_true", help="skip the GEMM ceiling measurement")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    args = parser.parse_args(argv)
    if args.json is not None and (args.json.is_dir() or (args.json.parent.exists() and not args.json.parent.is_dir())
                                  or not os.access(args.json if args.json.exists() else _existing_parent(args.json), os.W_OK)):
        raise ConfigError(message("--json", str(args.json), "a writable file path", "choose another --json path (checked before the benchmark runs)"))
    common: dict[str, Any] = {
        "backend": args.backend,
        "variant": args.variant,
        "runs": args.runs,
        "warmup": args.warmup,
        "batch": args.batch,
        "batch_runs": args.batch_runs,
        "threads": args.threads,
        "torch_baseline": args.torch_baseline,
        "torch_runs": args.torch_runs,
        "gemm": not args.no_gemm,
    }
    if (args.precision is not None and "," in args.precision) or "," in args.backend:
        backends = [b.strip() for b in args.backend.split(",")]
        precisions = [p.strip() for p in (args.precision or "fp32").split(",")]
        report = run_comparison(args.bundle, precisions, backends=backends, **common)
        print("\n".join(format_report(r) for r in report["results"].values()))
        for key, why in report["skipped"].items():
            print(f"{key}: skipped ({why})")
    else:
        report = run_bench(args.bundle, precision=args.precision, **common)
        print(format_report(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"report: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
