"""Which convolutions can run in INT8 without moving the EfficientAD score? (the study behind ``float_convs``)

For each rule of which Conv nodes stay floating point, quantise the bundle's FP32 ``merged`` graph
(``build_engines.quantize.quantize_merged``, calibrated on the run's train/good) and compare it with FP32
on test images: correlation of the local and global maps, rank correlation of the image scores, and the
batch-1 inference time. Labels are not used.

    python scripts/int8_sensitivity.py RUN_DIR BUNDLE [--rules all,default,...] [--test-images 80] [--json OUT]
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


def rules(model: Any) -> dict[str, list[str]]:
    """Rule name -> Conv nodes kept float. ``default`` is what ``edgead export --int8`` ships."""
    from build_engines.quantize import float_convs

    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]

    def of(net: str) -> list[str]:
        return [c for c in convs if f"/{net}/" in c]

    first = float_convs(model, ())
    return {
        "all": [],
        "default": float_convs(model),
        "input_convs": first,
        "last_teacher_student": [of("teacher")[-1], of("student")[-1]],
        "teacher": of("teacher"),
        "student": of("student"),
        "autoencoder": of("autoencoder"),
    }


def _session(model: Any, threads: int) -> Any:
    import onnx
    import onnxruntime as ort

    for n in model.graph.node:  # expose the two maps before normalisation
        if n.op_type == "ReduceMean":
            model.graph.output.append(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _outputs(path: Path, x: list[np.ndarray], threads: int) -> dict[str, Any]:
    import onnx

    sess = _session(onnx.load(str(path)), threads)
    sess.run(None, {"image": x[0]})
    t0 = time.perf_counter()
    res = [sess.run(None, {"image": xi}) for xi in x]
    ms = (time.perf_counter() - t0) * 1e3 / len(x)
    return {"ms": ms, "score": np.array([r[1][0] for r in res]), "local": np.stack([r[2] for r in res]), "global": np.stack([r[3] for r in res])}


def study(run_dir: Path, bundle: Path, names: list[str], *, test_images: int = 80, calib_images: int = 64, threads: int = 2) -> list[dict[str, Any]]:
    import onnx

    from build_engines.quantize import quantize_merged, rank_correlation
    from edgead.bundle import load_bundle
    from edgead.datasets import image_color, open_dataset, read_image
    from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare

    cfg = json.loads((run_dir / "config.json").read_text())
    size, mean, std = int(cfg["image_size"]), cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    ds = open_dataset(cfg["data"])
    pick = np.random.default_rng(1).choice(len(ds.test), min(test_images, len(ds.test)), replace=False)
    x = []
    for i in sorted(pick):
        frame = read_image(ds.test[i].path)
        x.append(prepare(frame, size, mean, std, image_color(frame))[None])
    fp32 = load_bundle(bundle).onnx_path("merged")
    table = rules(onnx.load(str(fp32)))
    unknown = sorted(set(names) - set(table))
    if unknown:
        raise SystemExit(f"unknown rule(s) {unknown}; choose from {sorted(table)}")
    ref = _outputs(fp32, x, threads)
    rows = [{"rule": "fp32", "ms_per_image": ref["ms"]}]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = quantize_merged(
                fp32,
                Path(tmp) / f"{name}.onnx",
                Path(cfg["data"]) / "train" / "good",
                size,
                max_images=calib_images,
                mean=mean,
                std=std,
                keep_float=table[name],
            )
            q = _outputs(path, x, threads)
            rows.append({
                "rule": name, "float_convs": len(table[name]), "ms_per_image": q["ms"],
                "local_map_corr": float(np.corrcoef(ref["local"].ravel(), q["local"].ravel())[0, 1]),
                "global_map_corr": float(np.corrcoef(ref["global"].ravel(), q["global"].ravel())[0, 1]),
                "score_rank_corr": rank_correlation(ref["score"], q["score"]),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="the training run (its config.json names the dataset)")
    p.add_argument("bundle", type=Path, help="a bundle of that run with the FP32 merged variant")
    p.add_argument(
        "--rules", default="all,input_convs,default", help="comma-separated: all, default, input_convs, last_teacher_student, teacher, student, autoencoder"
    )
    p.add_argument("--test-images", type=int, default=80)
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    rows = study(a.run_dir, a.bundle, a.rules.split(","), test_images=a.test_images, calib_images=a.calib_images, threads=a.threads)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
