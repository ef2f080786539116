"""The ONNX operators TensorRT 10 can parse, and a checker for exported graphs.

Source: onnx/onnx-tensorrt ``docs/operators.md`` for TensorRT 10.15 ("supports operators
in the inclusive range of opset 9 to opset 24"), rows marked ``Y``. Operators added to
that table after TensorRT 10.0 (Attention, RotaryEmbedding, TensorScatter, RMSNormalization,
...) are left out so the check is conservative for older JetPack TensorRT 10.x releases;
none of them is produced by EfficientAD.

The check is structural (op type + opset range + the few attribute restrictions that
matter for our graphs); the authoritative test is parsing the graph with TensorRT on
the target device (``edgead build``).

>>> unsupported_ops(onnx.load("bundle/model_merged.onnx"))  # doctest: +SKIP
[]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from edgead.errors import ConfigError, message

__all__ = ["TENSORRT_VERSION", "OPSET_RANGE", "SUPPORTED_OPS", "OpIssue", "unsupported_ops", "check_tensorrt_compatible"]

TENSORRT_VERSION = "10.x (table of onnx-tensorrt docs/operators.md, TensorRT 10.15)"
OPSET_RANGE = (9, 20)  # TensorRT 10.0 accepts opset 9..20; 10.15 accepts up to 24

SUPPORTED_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose
    Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp
    Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
    GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow
    HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
    MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero
    Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike
    RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
    ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape
    Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze
    Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

_RESIZE_MODES = frozenset({"nearest", "linear"})
_RESIZE_TRANSFORMS = frozenset({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"})
_PAD_MODES = frozenset({"constant", "reflect", "edge"})  # TensorRT 10 pads through ISliceLayer (fill / reflect / clamp)


@dataclass(frozen=True)
class OpIssue:
    """One node TensorRT would refuse."""

    node: str
    op_type: str
    reason: str


def _attr(node: Any, name: str, default: object) -> object:
    import onnx

    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _iter_nodes(graph: Any) -> Iterable[Any]:
    for node in graph.node:
        yield node
        for a in node.attribute:  # subgraphs of If / Loop / Scan
            if a.g is not None and len(a.g.node):
                yield from _iter_nodes(a.g)


def unsupported_ops(model: Any) -> list[OpIssue]:
    """Nodes of an ``onnx.ModelProto`` that TensorRT 10 cannot parse (empty list: all fine).

    >>> import onnx
    >>> g = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
    ...     [onnx.helper.make_tensor_value_info("x", 1, [1])], [onnx.helper.make_tensor_value_info("y", 1, [1])])
    >>> unsupported_ops(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    []
    """
    issues: list[OpIssue] = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not (OPSET_RANGE[0] <= opset.version <= OPSET_RANGE[1]):
            issues.append(OpIssue("<model>", "opset", f"opset {opset.version} outside TensorRT 10.0's range {OPSET_RANGE}"))
    for node in _iter_nodes(model.graph):
        name = node.name or f"<{node.op_type}>"
        if node.domain not in ("", "ai.onnx"):
            issues.append(OpIssue(name, f"{node.domain}.{node.op_type}", "custom domain (would need a TensorRT plugin)"))
            continue
        if node.op_type not in SUPPORTED_OPS:
            issues.append(OpIssue(name, node.op_type, "not in TensorRT 10's ONNX operator table"))
            continue
        if node.op_type == "Resize":
            mode = _attr(node, "mode", "nearest")
            transform = _attr(node, "coordinate_transformation_mode", "half_pixel")
            if mode not in _RESIZE_MODES or transform not in _RESIZE_TRANSFORMS or _attr(node, "antialias", 0):
                issues.append(OpIssue(name, "Resize", f"mode={mode}, coordinate_transformation_mode={transform} not supported"))
        if node.op_type == "Pad" and _attr(node, "mode", "constant") not in _PAD_MODES:
            issues.append(OpIssue(name, "Pad", f"mode={_attr(node, 'mode', 'constant')} not supported"))
        if node.op_type == "Dropout" and len(node.input) >= 3 and node.input[2]:
            issues.append(OpIssue(name, "Dropout", "training_mode input present (must be absent/False: export in eval mode)"))
    return issues


def check_tensorrt_compatible(model: Any, what: str = "ONNX graph") -> None:
    """Raise ConfigError listing every node TensorRT 10 would refuse."""
    issues = unsupported_ops(model)
    if issues:
        listed = "; ".join(f"{i.node} ({i.op_type}: {i.reason})" for i in issues[:10])
        raise ConfigError(message(what, listed, f"only operators TensorRT {TENSORRT_VERSION} parses", "export with opset 17 in eval mode, or replace the listed operators"))
