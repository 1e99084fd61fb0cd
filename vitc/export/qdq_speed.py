"""Speed rewrites of QDQ ONNX graphs, the form both int8 runtimes (ONNX Runtime, OpenVINO) fold.

Each pass takes an ``onnx.ModelProto`` whose weights are already int8 initializers (the output
of ``vitc.export.qdq.store_int8_weights``, or any QDQ graph with int8 weight initializers, as
the ONNX-in quantizer writes), rewrites it in place and returns what it changed, so the
PyTorch export and the ONNX-in path call the same code:

    from vitc.export.qdq_speed import SpeedConfig, apply_speed
    report = apply_speed(model, SpeedConfig(fuse_qkv=True))

Every pass here is exact on the integer grid: no scale, zero point or weight code changes, so
the runtimes compute the same int8 products as before and fidelity holds by construction (the
tests compare outputs). Passes that would change numerics are not here.

Which pass helps on which runtime was measured with ``vitc bench --profile`` and interleaved
rounds (``benchmarks/speed_vs_peers.py``); docs/quantize.md records the figures.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class SpeedConfig:
    fuse_qkv: bool = True  # one int8 GEMM for sibling projections of one quantized input (q, k, v)

    def to_dict(self) -> dict:
        return asdict(self)


def apply_speed(model, config: SpeedConfig = SpeedConfig()) -> dict:
    """Run the enabled passes on ``model`` (in place); returns {pass: count of rewrites}."""
    report = {}
    if config.fuse_qkv:
        report["fuse_qkv"] = fuse_sibling_matmuls(model)
    return report


def _index(graph):
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    values = {name: numpy_helper.to_array(t) for name, t in inits.items()}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return inits, producer, consumers, values


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weight_branch(mm, x_name, producer, consumers, values, inits):
    """(weight DQ, bias Add or None, codes, scale, zero, bias) when ``mm`` is ``x @ DQ(int8 W[K, N], axis=1)`` (+ bias)."""
    if mm.op_type != "MatMul" or mm.input[0] != x_name:
        return None
    dq = producer.get(mm.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or len(consumers.get(dq.output[0], [])) != 1:
        return None
    codes = values[dq.input[0]]
    if codes.ndim != 2 or codes.dtype not in (np.int8, np.uint8):
        return None
    scale = values.get(dq.input[1])
    zero = values.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale, dtype=codes.dtype)
    if scale is None or zero is None:
        return None
    axis = _attr(dq, "axis", 1) % 2
    if scale.size > 1 and axis != 1:  # per-row scales of W[K, N] do not concatenate along N
        return None
    n = codes.shape[1]
    scale, zero = np.broadcast_to(scale.reshape(-1), (n,)).astype(np.float32), np.broadcast_to(zero.reshape(-1), (n,))
    users = consumers.get(mm.output[0], [])
    bias_add, bias = None, None
    if len(users) == 1 and users[0].op_type == "Add":
        other = [i for i in users[0].input if i != mm.output[0]]
        if len(other) == 1 and other[0] in values and values[other[0]].size == n:
            bias_add, bias = users[0], values[other[0]].reshape(-1).astype(np.float32)
    return dq, bias_add, codes, scale, zero.astype(codes.dtype), bias


def fuse_sibling_matmuls(model) -> int:
    """Concatenate sibling int8 GEMMs that read one quantized activation into one GEMM, then Split.

    Why: a ViT's q, k and v projections read the same quantized LayerNorm output; as three GEMMs
    of N=384 each, the runtimes quantize or reorder that input three times (ONNX Runtime needs a
    Q/DQ pair per consumer to fuse at all, see ``split_shared_activation_qdq``) and run three
    small GEMMs whose tiles fill the cores poorly at batch 1. One GEMM of N=1152 with the weight
    codes, per-channel scales, zero points and biases concatenated computes the same integers
    (each output column depends only on its own weight column and scale). Returns the number
    of fused groups."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits, producer, consumers, values = _index(graph)
    groups = []
    for x_name, users in consumers.items():
        src = producer.get(x_name)
        if src is None or src.op_type != "DequantizeLinear" or len(users) < 2:
            continue
        branches = [(mm, _weight_branch(mm, x_name, producer, consumers, values, inits)) for mm in users]
        branches = [(mm, b) for mm, b in branches if b is not None]
        if len(branches) < 2:
            continue
        k = {b[2].shape[0] for _, b in branches}
        dtypes = {b[2].dtype for _, b in branches}
        with_bias = {b[1] is not None for _, b in branches}
        if len(k) != 1 or len(dtypes) != 1 or len(with_bias) != 1:
            continue
        groups.append((x_name, branches, with_bias.pop()))
    removed, count = set(), 0
    for g, (x_name, branches, has_bias) in enumerate(groups):
        tag = f"{x_name}/fused_matmul{g}"
        codes = np.concatenate([b[2] for _, b in branches], axis=1)
        scale = np.concatenate([b[3] for _, b in branches])
        zero = np.concatenate([b[4] for _, b in branches])
        sizes = [b[2].shape[1] for _, b in branches]
        graph.initializer.extend([numpy_helper.from_array(codes, tag + "/weight_quantized"),
                                  numpy_helper.from_array(scale, tag + "/weight_scale"),
                                  numpy_helper.from_array(zero, tag + "/weight_zero_point"),
                                  numpy_helper.from_array(np.array(sizes, np.int64), tag + "/split")])
        new = [helper.make_node("DequantizeLinear", [tag + "/weight_quantized", tag + "/weight_scale", tag + "/weight_zero_point"],
                                [tag + "/weight"], name=tag + "/DequantizeLinear", axis=1),
               helper.make_node("MatMul", [x_name, tag + "/weight"], [tag + "/matmul"], name=tag + "/MatMul")]
        last = tag + "/matmul"
        if has_bias:
            graph.initializer.append(numpy_helper.from_array(np.concatenate([b[5] for _, b in branches]), tag + "/bias"))
            new.append(helper.make_node("Add", [last, tag + "/bias"], [tag + "/add"], name=tag + "/Add"))
            last = tag + "/add"
        outs = [(b[1] if has_bias else mm).output[0] for mm, b in branches]
        new.append(helper.make_node("Split", [last, tag + "/split"], outs, name=tag + "/Split", axis=-1))
        for mm, b in branches:
            removed.update({id(mm), id(b[0])} | ({id(b[1])} if has_bias else set()))
        graph.node.extend(new)  # ordered by _toposort below
        count += 1
    keep = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(_toposort(keep, graph))
    _drop_unused_initializers(graph)
    return count


def _toposort(nodes: list, graph) -> list:
    """``nodes`` in an order where every input is produced before it is read (stable otherwise)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, out = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError(f"the graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    return out


def _drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
