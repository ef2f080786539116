"""What the feature-distance families (UniAD, PatchCore) share, written once.

Their graphs have the same contract, ``image (N,3,S,S) -> (anomaly_map (N,1,h,w), score (N,))``, both raw: the
distance between each grid feature and its reconstruction (UniAD: a transformer's; PatchCore: the nearest normal
feature of a memory bank), and the image score. Each product's normalisation (its affine qa -> 0, qb -> 0.1 and
its threshold) is fitted here on held-out good images, stored in the manifest's ``classes`` and applied by the
runtime (``Detector(..., product=...)``), so the graph serves every product unchanged.

* :func:`calibrate_product`: raw validation maps and scores -> one product's calibration;
* :func:`export_feature_distance_bundle`: graph -> simplified ONNX, checked against PyTorch and TensorRT's
  operator table -> bundle;
* :func:`feature_distance_predictor`: the runtime's computation in PyTorch, for ``edgead eval`` of a run.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgead.datasets import image_color
from edgead.errors import DataError, message
from edgead.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare
from edgead.tiling import Tiling

from .calibrate import QA, QB, fit_threshold, frame_scores

__all__ = ["OUTPUTS", "calibrate_product", "export_feature_distance_bundle", "feature_distance_predictor"]

log = logging.getLogger(__name__)

OUTPUTS = ("anomaly_map", "score")
PARITY = 1e-4  # relative error of the ONNX graph against PyTorch
CHUNK = 16  # images (tiles) per graph call in the predictor


def calibrate_product(maps: np.ndarray, scores: np.ndarray, method: str, product: str, groups: np.ndarray | None = None) -> dict[str, Any]:
    """One product's calibration from the raw maps (N, h, w) and scores (N,) of its held-out good images:
    qa/qb (quantiles 0.9 / 0.995 of all map cells, as EfficientAD) and the threshold of the normalised scores.
    With a tiling the rows are tiles and ``groups`` names each tile's image: an image's score is its tiles' max.

    >>> c = calibrate_product(np.arange(200.0).reshape(2, 10, 10), np.array([150.0, 190.0]), "max", "p")
    >>> round(c["qa"], 1), round(c["qb"], 1), round(c["threshold"], 3)
    (179.1, 198.0, 0.058)
    """
    qa, qb = (float(v) for v in np.quantile(np.asarray(maps, np.float64).ravel(), [QA, QB]))
    if not qb > qa:
        raise DataError(message(f"{product} validation maps", f"q{QA}={qa}, q{QB}={qb}", "qb > qa", "hold out more (and varied) good images of this product"))
    norm = (frame_scores(np.asarray(scores, np.float64), groups) - qa) * (0.1 / (qb - qa))
    threshold, how = fit_threshold(norm, method)
    return {"qa": qa, "qb": qb, "threshold": threshold, "method": how, "validation_images": len(norm), "validation_scores": [float(v) for v in norm]}


def export_feature_distance_bundle(
    graph: nn.Module,
    out: Path,
    *,
    family: str,
    size: str,
    image_size: int,
    calibration: Mapping[str, Mapping[str, Any]],
    opset: int,
    overwrite: bool,
    extra_variants: Callable[[Path, Path], dict[str, Path]] | None = None,
    tiling: Tiling | None = None,
) -> Path:
    """Export ``graph`` (eval mode) as the bundle's ``merged`` variant, checked against PyTorch (<= 1e-4 relative) and
    TensorRT's operator table; ``extra_variants(merged_onnx, workdir)`` may add variants (UniAD's INT8). ``tiling``:
    the tile layout the runtime cuts frames into (part of the bundle's input)."""
    import onnx
    import onnxruntime as ort
    import onnxsim

    from edgead import __version__
    from edgead.bundle import ClassSpec, InputSpec, Manifest, PostprocessSpec, Producer, ThresholdSpec, VariantSpec, write_bundle

    from .export import export_onnx, simplify_onnx
    from .onnx_ops import check_tensorrt_compatible

    graph.eval()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"edgead-{family}-export-") as tmp:
        raw = export_onnx(graph, Path(tmp) / "raw.onnx", image_size, OUTPUTS, opset=opset)
        path = simplify_onnx(raw, Path(tmp) / "model_merged.onnx")
        check_tensorrt_compatible(onnx.load(str(path)), f"{family} graph")
        x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = [t.numpy() for t in graph(x)]
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(list(OUTPUTS), {"image": x.numpy()})
        err = max(float(np.max(np.abs(g - r)) / max(float(np.max(np.abs(r))), 1e-12)) for g, r in zip(got, ref, strict=True))
        if err > PARITY:
            raise DataError(message(f"{family} ONNX export", f"relative error {err:.2e} against PyTorch", f"<= {PARITY:g}", "report this as a bug (export mismatch)"))
        files = {"merged": path}
        if extra_variants is not None:
            files.update(extra_variants(path, Path(tmp)))
        classes = {name: ClassSpec(c["qa"], c["qb"], c["threshold"], c["method"]) for name, c in calibration.items()}
        manifest = Manifest(
            family=family,
            size=size,
            input=InputSpec(image_size, tuple(IMAGENET_MEAN), tuple(IMAGENET_STD), tiling=tiling),
            variants={v: VariantSpec(f.name) for v, f in files.items()},
            postprocess=PostprocessSpec.feature_distance(),
            threshold=ThresholdSpec(max(c.threshold for c in classes.values()), "per product: see classes (this value is not used)"),
            producer=Producer(__version__, torch.__version__, onnx.__version__, str(onnxsim.__version__), opset),
            classes=classes,
        )
        bundle = write_bundle(out, manifest, {f.name: f for f in files.values()}, overwrite=overwrite)
    log.info("%s bundle %s: products %s, variants %s, parity %.1e, %.1f s", family, bundle, ", ".join(classes), ", ".join(files), err, time.perf_counter() - t0)
    return Path(bundle)


def feature_distance_predictor(
    graph: nn.Module, image_size: int, calibration: Mapping[str, Mapping[str, Any]], product: str | None, data: str | Path, tiling: Tiling | None = None
) -> tuple[str, Callable[[list[np.ndarray]], tuple[list[np.ndarray], np.ndarray]], float, str, list[float]]:
    """(product, predict(frames) -> (normalised maps, scores), threshold, method, validation scores): the graph's raw
    outputs with the product's affine, as the runtime applies it. Maps at grid resolution; with a tiling, each frame's
    tile maps stitched at frame resolution and its score the max over its tiles (as the ``Detector``).

    ``product`` None: the run's only product, or (several) the one named by the data set folder ``data``
    (``fidelity.resolve_product``, as ``edgead fidelity`` picks it for a bundle)."""
    from .fidelity import resolve_product

    product = resolve_product(tuple(calibration), product, Path(data))
    assert product is not None  # a feature-distance run always has products
    cal = calibration[product]
    scale = 0.1 / (cal["qb"] - cal["qa"])
    from .evaluate import stitch_frames

    graph.eval()

    @torch.no_grad()
    def predict(frames: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        pieces = [t for f in frames for t in tiling.cut(f)] if tiling is not None else frames
        x = torch.from_numpy(np.stack([prepare(f, image_size, IMAGENET_MEAN, IMAGENET_STD, image_color(f)) for f in pieces]))
        # in chunks, as the runtime's max batch: PatchCore's distances are pieces x cells x bank floats at once
        outs = [graph(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)]
        amap, score = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        maps = ((amap[:, 0].double() - cal["qa"]) * scale).float().numpy()
        return stitch_frames(frames, maps, ((score.double() - cal["qa"]) * scale).float().numpy(), tiling, 0)

    return product, predict, float(cal["threshold"]), str(cal["method"]), list(cal.get("validation_scores", []))
