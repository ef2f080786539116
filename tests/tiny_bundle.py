"""A tiny, torch-free EfficientAD-shaped bundle for runtime tests (hand-built ONNX via onnx.helper).

Teacher, student and autoencoder are stride-4 4x4 convolutions of the input (patch embeddings) with
fixed random weights, so an independent NumPy reference (``reference_outputs``) is a few lines.
The ``merged`` graph computes the EfficientAD post-processing in-graph from the same convolutions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgead.bundle import InputSpec, Manifest, PostprocessSpec, Producer, ThresholdSpec, VariantSpec, write_bundle
from edgead.tiling import Tiling

IMAGE_SIZE = 32
C = 4
PAD = 2
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
Q = {"qa_st": 0.05, "qb_st": 0.9, "qa_ae": 0.02, "qb_ae": 0.7}
THRESHOLD = 0.08
OPSET = 17


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w_t": (rng.standard_normal((C, 3, 4, 4)) * 0.2).astype(np.float32),
        "w_s": (rng.standard_normal((2 * C, 3, 4, 4)) * 0.2).astype(np.float32),
        "w_a": (rng.standard_normal((C, 3, 4, 4)) * 0.2).astype(np.float32),
    }


def _convs(w: dict[str, np.ndarray], scope: str = "") -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The three networks, named as PyTorch names them: ``/teacher/Conv`` (raw graph), ``/raw/teacher/Conv`` (merged)."""
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    nodes = [helper.make_node("Conv", ["image", k], [out], name=f"{scope}/{out}/Conv", kernel_shape=[4, 4], strides=[4, 4])
             for k, out in (("w_t", "teacher"), ("w_s", "student"), ("w_a", "autoencoder"))]
    return nodes, inits


def _io(outputs: list[tuple[str, list[object]]]) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, IMAGE_SIZE, IMAGE_SIZE])
    return [x], [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]


def raw_model(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes, inits = _convs(w)
    h = IMAGE_SIZE // 4
    ins, outs = _io([("teacher", ["N", C, h, h]), ("student", ["N", 2 * C, h, h]), ("autoencoder", ["N", C, h, h])])
    graph = helper.make_graph(nodes, "tiny_raw", ins, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def merged_model(w: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes, inits = _convs(w, "/raw")
    h = IMAGE_SIZE // 4
    st_scale = 0.1 / (Q["qb_st"] - Q["qa_st"])
    ae_scale = 0.1 / (Q["qb_ae"] - Q["qa_ae"])
    consts = {
        "split": np.array([C, C], np.int64),
        "qa_st": np.array(Q["qa_st"], np.float32),
        "qa_ae": np.array(Q["qa_ae"], np.float32),
        "k_st": np.array(0.5 * st_scale, np.float32),
        "k_ae": np.array(0.5 * ae_scale, np.float32),
        "pads": np.array([0, 0, PAD, PAD, 0, 0, PAD, PAD], np.int64),
    }
    inits += [numpy_helper.from_array(v, k) for k, v in consts.items()]
    nodes += [
        helper.make_node("Split", ["student", "split"], ["s_st", "s_ae"], axis=1),
        helper.make_node("Sub", ["teacher", "s_st"], ["d_st"]),
        helper.make_node("Mul", ["d_st", "d_st"], ["e_st"]),
        helper.make_node("ReduceMean", ["e_st"], ["local"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["autoencoder", "s_ae"], ["d_ae"]),
        helper.make_node("Mul", ["d_ae", "d_ae"], ["e_ae"]),
        helper.make_node("ReduceMean", ["e_ae"], ["glob"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["local", "qa_st"], ["l0"]),
        helper.make_node("Mul", ["l0", "k_st"], ["l1"]),
        helper.make_node("Sub", ["glob", "qa_ae"], ["g0"]),
        helper.make_node("Mul", ["g0", "k_ae"], ["g1"]),
        helper.make_node("Add", ["l1", "g1"], ["merged"]),
        helper.make_node("Pad", ["merged", "pads"], ["anomaly_map"], mode="edge"),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0),
    ]
    for i, node in enumerate(nodes[3:]):  # the map tail at the graph's top level: "/Sub_1", as PyTorch names it
        node.name = f"/{node.op_type}_{i}"
    ins, outs = _io([("anomaly_map", ["N", 1, h + 2 * PAD, h + 2 * PAD]), ("score", ["N"])])
    graph = helper.make_graph(nodes, "tiny_merged", ins, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def manifest(variants: tuple[str, ...] = ("merged", "raw"), tiling: Tiling | None = None) -> Manifest:
    return Manifest(
        family="efficientad",
        size="s",
        input=InputSpec(IMAGE_SIZE, MEAN, STD, tiling=tiling),
        variants={v: VariantSpec(f"model_{v}.onnx") for v in variants},
        postprocess=PostprocessSpec(Q["qa_st"], Q["qb_st"], Q["qa_ae"], Q["qb_ae"], PAD),
        threshold=ThresholdSpec(THRESHOLD, "test: fixed"),
        producer=Producer("0.1.0", None, onnx.__version__, None, OPSET),
    )


def make_bundle(
    out_dir: Path, seed: int = 0, variants: tuple[str, ...] = ("merged", "raw"), *, tiling: Tiling | None = None, w: dict[str, np.ndarray] | None = None
) -> Path:
    """Write the tiny bundle to ``out_dir`` (ONNX sources in a sibling folder) and return it; ``w`` replaces the weights."""
    w = weights(seed) if w is None else w
    src = out_dir.parent / f"{out_dir.name}_src"
    src.mkdir(parents=True, exist_ok=True)
    files = {}
    for v in variants:
        model = merged_model(w) if v == "merged" else raw_model(w)
        onnx.checker.check_model(model)
        path = src / f"model_{v}.onnx"
        onnx.save(model, str(path))
        files[path.name] = path
    return write_bundle(out_dir, manifest(variants, tiling), files)


def reference_outputs(frame_bgr_u8: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher/student/AE of one IMAGE_SIZE x IMAGE_SIZE BGR uint8 frame, computed with NumPy only."""
    assert frame_bgr_u8.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    x = frame_bgr_u8[:, :, ::-1].astype(np.float64) / 255.0
    x = (x - np.array(MEAN)) / np.array(STD)
    h = IMAGE_SIZE // 4
    patches = x.reshape(h, 4, h, 4, 3)  # (i, ki, j, kj, c)
    w = weights(seed)
    outs = [np.einsum("ikjlc,ockl->oij", patches, w[k].astype(np.float64))[None] for k in ("w_t", "w_s", "w_a")]
    return outs[0], outs[1], outs[2]
