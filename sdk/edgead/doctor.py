"""``edgead doctor``: why ``backend="auto"`` picked what it picked, on this machine.

Reports Python and the platform, NumPy / OpenCV / ONNX Runtime (version, providers), cuda-python, the NVIDIA
driver and the CUDA runtime cuda-python links (and whether they are compatible: a CUDA 13 runtime needs an
R580+ driver), the GPUs (name, compute capability, memory) or the CUDA error that hides them, TensorRT (version,
or why it is missing), the CUDA post-processing library (found, probed, compiled architectures), and, given a
bundle, which of its engines matches this GPU and TensorRT, why the others do not, what ``Detector(bundle)``
would run, and the ``edgead build`` command for this machine. Nothing is changed; the exit code is 0 whatever
it finds (2 only for a bundle that cannot be read).

    edgead doctor                 # the machine
    edgead doctor BUNDLE --json   # the machine and that bundle, machine-readable
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import sys
from typing import Any

from . import __version__
from .errors import EdgeADError, MissingDependencyError

__all__ = ["diagnose", "format_report", "main"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _onnxruntime() -> dict[str, Any]:
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        return {"installed": False, "why": "not installed (pip install 'edgead[cpu]')"}
    return {"installed": True, "version": ort.__version__, "providers": list(ort.get_available_providers())}


def _cuda() -> dict[str, Any]:
    from .backends import cuda

    try:
        rt = cuda.runtime()
    except MissingDependencyError:
        return {"cuda_python": None, "why": "cuda-python is not installed (pip install 'edgead[tensorrt-cu12]' or '[tensorrt-cu13]', see docs/deployment.md)"}
    bindings = sys.modules.get("cuda.bindings")
    out: dict[str, Any] = {"cuda_python": getattr(bindings, "__version__", None) or _version("cuda-bindings") or _version("cuda-python")}
    err, runtime_v = rt.cudaRuntimeGetVersion()
    out["runtime"] = _cuda_version(int(runtime_v)) if int(err) == 0 else None
    err, driver_v = rt.cudaDriverGetVersion()
    out["driver_cuda"] = _cuda_version(int(driver_v)) if int(err) == 0 and driver_v else None
    if out["runtime"] and out["driver_cuda"]:
        out["compatible"] = int(driver_v) // 1000 >= int(runtime_v) // 1000
    else:
        out["compatible"] = False
    count, why = cuda.device_status()
    out["devices"] = []
    out["why"] = None if count else why
    for i in range(count):
        info = cuda.device_info(i)
        out["devices"].append({"index": i, "name": info.name, "compute_capability": info.compute_capability, "memory_gib": round(info.total_memory / 2**30, 1)})
    if out["runtime"] and out["driver_cuda"] and not out["compatible"]:
        out["why"] = (f"the driver supports CUDA {out['driver_cuda']}, cuda-python {out['cuda_python']} links the CUDA {out['runtime']} runtime: install the "
                      f"cuda-python of CUDA {out['driver_cuda'].split('.')[0]} (edgead[tensorrt-cu{out['driver_cuda'].split('.')[0]}]) or upgrade the driver")
    return out


def _tensorrt() -> dict[str, Any]:
    from .backends.tensorrt import import_tensorrt

    try:
        trt = import_tensorrt()
    except MissingDependencyError as exc:
        return {"version": None, "why": str(exc)}
    return {"version": str(trt.__version__), "builder": hasattr(trt, "Builder"), "why": None}


def _kernels(device: int) -> dict[str, Any]:
    from . import kernels

    out: dict[str, Any] = {"host_library": str(kernels.find_library("host") or "") or None}
    path = kernels.find_library("cuda")
    out["cuda_library"] = str(path) if path else None
    if path is None:
        out["cuda_why"] = "not built (make kernels with the CUDA toolkit); the TensorRT backend then runs merged engines only"
        return out
    try:
        lib = kernels.load_library("cuda", device)
        out.update(lib.build_info(), usable=True, cuda_why=None)
    except EdgeADError as exc:
        out.update(usable=False, cuda_why=str(exc))
    return out


def _bundle(path: str, device: int, trt: dict[str, Any], cuda: dict[str, Any]) -> dict[str, Any]:
    from .backends import tensorrt as trtb
    from .bundle import engine_matches, load_bundle, rebuild_command

    bundle = load_bundle(path)
    manifest = bundle.manifest
    out: dict[str, Any] = {"path": path, "family": manifest.family, "variants": sorted(manifest.variants), "image_size": manifest.input.image_size,
                           "tiling": manifest.input.tiling.to_dict() if manifest.input.tiling else None, "engines": []}
    platform_ = None
    if trt["version"] and cuda.get("devices") and device < len(cuda["devices"]):
        platform_ = trtb.current_platform(device)
    for e in manifest.engines:
        row: dict[str, Any] = {"file": e.file, "variant": e.variant, "precision": e.precision, "compute_capability": e.compute_capability, "tensorrt": e.tensorrt_version}
        if platform_ is None:
            row.update(matches=False, why="cannot be checked here: " + (trt["why"] or cuda.get("why") or "no GPU"))
        elif engine_matches(e, platform_):
            row.update(matches=True, why="built for this GPU and TensorRT")
        else:
            diff = []
            if e.compute_capability != platform_.compute_capability:
                diff.append(f"compute capability {e.compute_capability} (this GPU: {platform_.compute_capability})")
            if e.tensorrt_version.split(".")[:3] != platform_.tensorrt_version.split(".")[:3]:
                diff.append(f"TensorRT {e.tensorrt_version} (here: {platform_.tensorrt_version})")
            row.update(matches=False, why="built for " + " and ".join(diff))
        out["engines"].append(row)
    if platform_ is not None and not any(r["matches"] for r in out["engines"]):
        out["build_command"] = rebuild_command(path, "merged", "fp16")
    try:
        from .detector import Detector

        with Detector(bundle, device=device) as det:
            out["auto"] = {"backend": det.backend, "variant": det.variant, "precision": det.precision, "device": det.device}
    except EdgeADError as exc:
        out["auto"] = {"backend": None, "why": str(exc)}
    return out


def diagnose(bundle: str | None = None, device: int = 0) -> dict[str, Any]:
    """The report as a dict (what ``--json`` prints)."""
    from .backends.tensorrt import tensorrt_status

    report: dict[str, Any] = {
        "edgead": __version__,
        "python": sys.version.split()[0],
        "platform": {"system": platform.system(), "machine": platform.machine(), "release": platform.release(), "libc": " ".join(platform.libc_ver())},
        "numpy": _version("numpy"),
        "opencv": _version("opencv-python-headless") or _version("opencv-python"),
        "onnxruntime": _onnxruntime(),
        "cuda": _cuda(),
        "tensorrt": _tensorrt(),
    }
    report["kernels"] = _kernels(device)
    ok, why = tensorrt_status(device)
    report["tensorrt_backend"] = {"usable": ok, "why": why}
    if bundle is not None:
        report["bundle"] = _bundle(bundle, device, report["tensorrt"], report["cuda"])
    return report


def format_report(r: dict[str, Any]) -> str:
    """Plain text: one line per item, what is wrong first said on its line."""
    c, t, k = r["cuda"], r["tensorrt"], r["kernels"]
    ort = r["onnxruntime"]
    lines = [
        f"edgead {r['edgead']}, Python {r['python']} on {r['platform']['system']} {r['platform']['machine']} ({r['platform']['libc']})",
        f"numpy {r['numpy']}, opencv {r['opencv']}",
        f"ONNX Runtime: {ort['version'] + ' ' + ','.join(ort['providers']) if ort['installed'] else ort['why']}",
    ]
    if c.get("cuda_python") is None:
        lines.append(f"CUDA: {c['why']}")
    else:
        driver = f"driver supports CUDA {c['driver_cuda']}" + ("" if c["compatible"] else " - NOT COMPATIBLE") if c["driver_cuda"] else "no NVIDIA driver"
        lines.append(f"CUDA: cuda-python {c['cuda_python']} (CUDA runtime {c['runtime']}), {driver}")
        for d in c["devices"]:
            lines.append(f"  GPU {d['index']}: {d['name']}, compute capability {d['compute_capability']}, {d['memory_gib']} GiB")
        if c["why"]:
            lines.append(f"  no usable GPU: {c['why']}")
    lines.append(f"TensorRT: {t['version'] if t['version'] else t['why']}")
    if k["cuda_library"] is None:
        lines.append(f"CUDA kernels: {k['cuda_why']}")
    elif k.get("usable"):
        lines.append(f"CUDA kernels: {k['cuda_library']} (sm {', '.join(k['archs'])}, CUDA runtime {k['cuda_runtime']}): usable")
    else:
        lines.append(f"CUDA kernels: {k['cuda_library']}: not usable here: {k['cuda_why']}")
    lines.append(f"TensorRT backend: {'usable' if r['tensorrt_backend']['usable'] else 'not usable'}: {r['tensorrt_backend']['why']}")
    b = r.get("bundle")
    if b:
        lines.append(f"bundle {b['path']}: {b['family']}, variants {', '.join(b['variants'])}, {b['image_size']} px" + (f", tiles {b['tiling']}" if b["tiling"] else ""))
        if not b["engines"]:
            lines.append("  no TensorRT engine in the bundle")
        for e in b["engines"]:
            lines.append(f"  {'MATCH ' if e['matches'] else 'no    '} {e['file']}: {e['why']}")
        if b.get("build_command"):
            lines.append(f"  build one for this machine: {b['build_command']}")
        auto = b["auto"]
        lines.append(f"  Detector(bundle) runs: {auto['backend']} {auto.get('variant', '')} {auto.get('precision', '')} on {auto.get('device', '')}" if auto["backend"]
                     else f"  Detector(bundle) fails: {auto['why']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``edgead doctor [BUNDLE] [--device N] [--json]``."""
    p = argparse.ArgumentParser(prog="edgead doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="?", help="a bundle to check against this machine")
    p.add_argument("--device", type=int, default=0, help="GPU index (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    report = diagnose(args.bundle, args.device)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
