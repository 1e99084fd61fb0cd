"""TensorRT's explicit-quantization rules, checked on an ONNX graph before anything is built.

Pure functions over an ``onnx.ModelProto``; each broken rule is a ``Violation`` naming the
node. The rules (TensorRT developer guide, "Explicit Quantization", and the ONNX parser's
operator list):

* Q/DQ are symmetric: zero point 0, signed int8 (or FP8 E4M3); uint8 is not taken.
* Scales are constant and positive; activations are quantized per tensor.
* Weights are quantized per channel along the output-channel axis (Conv: 0,
  ConvTranspose: 1, MatMul: the last axis, Gemm: 0 with transB else 1).
* A Conv/MatMul/Gemm runs in int8 only with Q/DQ on both inputs: a layer with Q/DQ on one
  input only is half-quantized, and in a quantized graph both attention matmuls (two
  activations, QK^T and PV) need Q/DQ on both inputs.
* Every op is one the TensorRT ONNX parser takes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Ops of the default ONNX domain that TensorRT 10's ONNX parser supports (onnx-tensorrt operators.md).
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Compress Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DFT DeformConv
DepthToSpace DequantizeLinear Div Dropout DynamicQuantizeLinear Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max
MaxPool Mean MeanVarianceNormalization MelWeightMatrix Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND
Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze STFT Sub Sum
Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops that only move data: TensorRT propagates Q/DQ through them, so a DQ behind one still feeds the layer.
SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")
SIGNED_QDQ_TYPES = {3: "int8", 17: "float8e4m3fn"}  # onnx.TensorProto elem types TensorRT quantizes to


@dataclass(frozen=True)
class Violation:
    node: str
    op: str
    rule: str
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.detail}"


class _Graph:
    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.constants = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.producer = {}
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)

    def const(self, name: str):
        return self.constants.get(name)

    def is_constant(self, name: str) -> bool:
        """Whether a tensor is constant: an initializer, a Constant, or computed from constants only."""
        if name in self.constants:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type != "DequantizeLinear" and all(self.is_constant(i) for i in node.input if i)

    def dq_behind(self, name: str):
        """The DequantizeLinear feeding ``name`` directly or through data-movement ops, if any."""
        node = self.producer.get(name)
        while node is not None and node.op_type in SHAPE_OPS:
            node = self.producer.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" else None


def node_name(node, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def check_graph(model) -> list[Violation]:
    """Every broken rule in ``model``, in graph order."""
    g = _Graph(model)
    out: list[Violation] = []
    quantized = any(n.op_type in QDQ_OPS for n in g.graph.node)
    weight_dq = _weight_dequantizers(g)
    for i, node in enumerate(g.graph.node):
        name = node_name(node, i)
        if node.domain not in ("", "ai.onnx"):
            out.append(Violation(name, node.op_type, "unsupported-op",
                                 f"op {node.domain}.{node.op_type} is outside the ONNX domain; TensorRT's parser does not take it"))
            continue
        if node.op_type not in SUPPORTED_OPS:
            out.append(Violation(name, node.op_type, "unsupported-op", f"TensorRT's ONNX parser does not take op {node.op_type}"))
            continue
        if node.op_type in QDQ_OPS:
            out += _check_qdq(g, node, name, weight_dq.get(id(node)))
        elif node.op_type in COMPUTE_OPS and quantized:
            out += _check_layer_inputs(g, node, name)
    return out


def _weight_dequantizers(g: _Graph) -> dict[int, tuple]:
    """DequantizeLinear nodes on constant weights -> (consumer op, the per-channel axis it needs)."""
    found = {}
    for node in g.graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        dq = g.dq_behind(node.input[1])
        if dq is None or not _dq_on_constant(g, dq):
            continue
        found[id(dq)] = (node, _channel_axis(g, node, dq))
    return found


def _dq_on_constant(g: _Graph, dq) -> bool:
    src = dq.input[0]
    if g.is_constant(src):
        return True
    q = g.producer.get(src)  # fake-quantized weights: Q(weight) -> DQ
    return q is not None and q.op_type == "QuantizeLinear" and g.is_constant(q.input[0])


def _channel_axis(g: _Graph, layer, dq) -> int:
    weight = g.const(dq.input[0])
    rank = weight.ndim if weight is not None else 2
    if layer.op_type == "Conv":
        return 0
    if layer.op_type == "ConvTranspose":
        return 1
    if layer.op_type == "Gemm":
        trans_b = next((a.i for a in layer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return rank - 1  # MatMul: weights are (..., K, N), channels are N


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def _check_qdq(g: _Graph, node, name: str, weight_use) -> list[Violation]:
    out = []
    scale = g.const(node.input[1]) if len(node.input) > 1 else None
    zero = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if len(node.input) > 2 and node.input[2] and zero is None:
        out.append(Violation(name, node.op_type, "constant-qparams", f"zero point {node.input[2]} is not a constant"))
    if scale is None:
        out.append(Violation(name, node.op_type, "constant-qparams", f"scale {node.input[1]} is not a constant"))
    elif not np.all(np.asarray(scale, dtype=np.float64) > 0):
        out.append(Violation(name, node.op_type, "positive-scale", "scale has zero or negative entries"))
    if zero is None and not (len(node.input) > 2 and node.input[2]):
        elem = _elem_type(g, node.input[0]) if node.op_type == "DequantizeLinear" else _attr(node, "output_dtype", 2)
        if elem is not None and elem not in SIGNED_QDQ_TYPES:  # QuantizeLinear without a zero point emits uint8
            out.append(Violation(name, node.op_type, "signed-int8",
                                 f"quantizes to {_type_name(elem)} (no int8 zero point given); TensorRT takes signed int8 (or FP8 E4M3) only"))
    if zero is not None:
        elem = _elem_type(g, node.input[2])
        if elem is not None and elem not in SIGNED_QDQ_TYPES:
            out.append(Violation(name, node.op_type, "signed-int8",
                                 f"quantizes to {_type_name(elem)}; TensorRT takes signed int8 (or FP8 E4M3) only"))
        if np.any(np.asarray(zero).astype(np.float64) != 0):
            out.append(Violation(name, node.op_type, "symmetric",
                                 f"zero point is {_describe_values(zero)}; TensorRT needs symmetric quantization with zero point 0"))
    if scale is None:
        return out
    per_channel = np.asarray(scale).size > 1
    axis = _attr(node, "axis", 1)
    if weight_use is not None:
        layer, want = weight_use
        weight = g.const(node.input[0])
        q = g.producer.get(node.input[0])
        if weight is None and q is not None and q.op_type == "QuantizeLinear":
            weight = g.const(q.input[0])
        rank = weight.ndim if weight is not None else None
        if not per_channel:
            out.append(Violation(name, node.op_type, "per-channel-weights",
                                 f"weights of {layer.name or layer.op_type} are quantized per tensor; TensorRT wants per-channel scales along axis {want}"))
        elif rank is not None and axis % rank != want:
            out.append(Violation(name, node.op_type, "per-channel-weights",
                                 f"weights of {layer.name or layer.op_type} are quantized along axis {axis}; the output channels are axis {want}"))
    elif per_channel and not _dq_on_constant_or_weight_q(g, node):
        out.append(Violation(name, node.op_type, "per-tensor-activations",
                             "activations are quantized per channel; TensorRT quantizes activations per tensor"))
    return out


def _dq_on_constant_or_weight_q(g: _Graph, node) -> bool:
    """A QuantizeLinear on constant weights (the Q half of a fake-quantized weight) may be per channel."""
    return g.is_constant(node.input[0]) or (node.op_type == "DequantizeLinear" and _dq_on_constant(g, node))


def _check_layer_inputs(g: _Graph, node, name: str) -> list[Violation]:
    data_inputs = [0, 1]
    fed = {k: g.dq_behind(node.input[k]) is not None for k in data_inputs if k < len(node.input)}
    if all(fed.values()):
        return []
    both_activations = node.op_type == "MatMul" and not any(g.is_constant(node.input[k]) for k in data_inputs)
    if any(fed.values()):
        missing = [k for k, ok in fed.items() if not ok]
        return [Violation(name, node.op_type, "qdq-both-inputs",
                          f"input {missing[0]} ({node.input[missing[0]]}) has no Q/DQ while the other input has; "
                          "TensorRT runs the layer in int8 only with Q/DQ on both inputs")]
    if both_activations:
        return [Violation(name, node.op_type, "qdq-attention-matmul",
                          "attention MatMul (two activations) has no Q/DQ on its inputs in a quantized graph; "
                          "put Q/DQ on both inputs of QK^T and of PV")]
    return []


def _elem_type(g: _Graph, name: str):
    for t in g.graph.initializer:
        if t.name == name:
            return t.data_type
    node = g.producer.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return a.t.data_type
    return None


def _type_name(elem: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem).lower()


def _describe_values(values) -> str:
    arr = np.asarray(values).ravel()
    nonzero = arr[arr != 0]
    return f"{nonzero[0]}" if arr.size == 1 else f"non-zero in {nonzero.size} of {arr.size} channels (e.g. {nonzero[0]})"


def sparse_24_layers(model) -> dict:
    """Weights of Conv/MatMul/Gemm layers whose every group of 4 input channels holds at most 2 non-zeros."""
    g = _Graph(model)
    eligible, sparse = 0, []
    for i, node in enumerate(g.graph.node):
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        dq = g.dq_behind(node.input[1])
        src = dq.input[0] if dq is not None else node.input[1]
        q = g.producer.get(src)
        if q is not None and q.op_type == "QuantizeLinear":
            src = q.input[0]
        weight = g.const(src)
        if weight is None or weight.ndim < 2:
            continue
        axis = {"Conv": 1, "ConvTranspose": 0, "MatMul": weight.ndim - 2}.get(node.op_type)
        if axis is None:  # Gemm: K is axis 1 with transB, else axis 0
            axis = 1 if _attr(node, "transB", 0) else 0
        eligible += 1
        if is_24_sparse(weight, axis):
            sparse.append(node_name(node, i))
    return {"eligible_layers": eligible, "sparse_24_layers": sparse}


def is_24_sparse(weight: np.ndarray, axis: int) -> bool:
    """Whether every 4 consecutive entries along ``axis`` hold at most 2 non-zeros."""
    w = np.moveaxis(np.asarray(weight), axis, -1)
    if w.shape[-1] % 4 or not w.size:
        return False
    groups = (w.reshape(-1, w.shape[-1] // 4, 4) != 0).sum(-1)
    return bool((groups <= 2).all()) and bool((w == 0).any())
