"""Which parts of a UniAD graph can run in INT8 without moving the score? (the study behind ``uniad.export.INT8_OPS``)

For each rule (which operator types are quantised, which nodes stay FP32), quantise the bundle's FP32 ``merged`` graph
(``build_engines.quantize.quantize_merged``, calibrated on an equal share of every product's train/good) and compare it
with FP32 on a seeded subset of one set's test images: image AUROC and its change, rank correlation of the scores,
mean score error relative to their spread, and the batch-1 time on one thread.

    python scripts/uniad_int8_sensitivity.py BUNDLE --data DIR [DIR ...] --test DIR [--test-images 120] [--json OUT]

``--data``: the products' data sets (calibration); ``--test``: the set whose test images are scored.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sdk"))


def rules(model: Any) -> dict[str, tuple[list[str], list[str]]]:
    """Rule name -> (operator types quantised, nodes kept FP32). ``transformer`` is what ``edgead export --int8`` ships."""
    from build_engines.quantize import float_convs

    stem = float_convs(model, ())
    attention = [n.name for n in model.graph.node if n.op_type == "MatMul" and "/attn" in n.name]
    if not attention:
        raise SystemExit("error: no attention MatMul (node names '/attn') in this graph: is it a UniAD bundle exported by this edgead?")
    return {
        "backbone": (["Conv"], stem),
        "backbone+transformer_weights": (["Conv", "Gemm", "MatMul"], stem + attention),
        "backbone+transformer": (["Conv", "Gemm", "MatMul"], stem),
        "transformer_weights": (["Gemm", "MatMul"], attention),
        "transformer": (["Gemm", "MatMul"], []),
    }


def main(argv: list[str] | None = None) -> int:
    import onnx
    import onnxruntime as ort

    from build_engines.fidelity import fidelity_row
    from build_engines.quantize import quantize_merged
    from build_engines.uniad.export import product_calibration_images
    from edgead.bundle import load_bundle
    from edgead.datasets import image_color, open_dataset, read_image
    from edgead.preprocess import prepare

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, nargs="+", required=True, help="the products' data sets (INT8 calibration on their train/good)")
    p.add_argument("--test", type=Path, required=True, help="data set whose test images are scored")
    p.add_argument("--test-images", type=int, default=120)
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    bundle = load_bundle(args.bundle)
    spec = bundle.manifest.input
    merged = bundle.onnx_path("merged")
    calibration = product_calibration_images(args.data, args.calibration_images)
    samples = open_dataset(args.test).test
    pick = np.random.default_rng(0).choice(len(samples), min(args.test_images, len(samples)), replace=False)
    samples = [samples[i] for i in sorted(pick)]
    images = [prepare(f, spec.image_size, spec.mean, spec.std, image_color(f))[None] for f in (read_image(s.path) for s in samples)]
    labels = [s.label for s in samples]

    def scores(path: Path) -> tuple[np.ndarray, float]:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        t0 = time.perf_counter()
        out = np.array([session.run(["score"], {spec.name: x})[0][0] for x in images])
        return out, 1000.0 * (time.perf_counter() - t0) / len(images)

    ref, ref_ms = scores(merged)
    reference = fidelity_row(labels, ref, ref)
    report: dict[str, Any] = {"command": "python scripts/uniad_int8_sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                              "n": len(images), "threads": 1, "fp32": {"auroc": reference["auroc"], "ms": ref_ms}, "rules": {}}
    print(f"fp32: AUROC {reference['auroc']:.4f}, {ref_ms:.1f} ms")
    model = onnx.load(str(merged), load_external_data=False)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ops, keep) in rules(model).items():
            path = quantize_merged(merged, Path(tmp) / f"{name}.onnx", calibration, spec.image_size, keep_float=keep, op_types=ops)
            got, ms = scores(path)
            row = {"ops": ops, "kept_fp32": len(keep), **fidelity_row(labels, ref, got), "ms": ms}
            report["rules"][name] = row
            print(f"{name}: AUROC {row['auroc']:.4f} ({row['delta_points']:+.2f} points), rank correlation {row['score_rank_correlation']:.4f}, {ms:.1f} ms", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
