"""The post-training quantization pass: ``apply(backbone, config, data) -> Backbone``.

Module swaps guided by ``backbone.structure`` (no graph capture): every Linear/Conv2d becomes a
``QuantLinear``/``QuantConv2d`` at the same path, and a family adapter routes self-attention
through ``AttentionCore`` so both attention matmuls get quantized inputs. The steps:

1. fold BatchNorms into their convs (exact);
2. post-LayerNorm reparameterisation (optional SmoothQuant with a shift, then RepQ-ViT), from
   per-channel statistics of the LayerNorm outputs (exact in float);
3. two observation passes over the calibration images (ranges, then histograms) feed every
   activation quantizer's calibrator at once;
4. per-layer scheme choice (symmetric/asymmetric, and per-tensor/per-channel for conv inputs of
   CNN/hybrid backbones below 8 bits) by the layer's output reconstruction error on a batch;
   conv-to-attention bridges always use the MSE calibrator and this choice;
5. weights on per-output-channel symmetric grids (zero point 0, so zeros stay zeros), then
   bias correction;
6. per-layer SQNR of every quantized layer's output against the float model.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vitc.backbone import Backbone
from vitc.calibration import observers as obs
from vitc.errors import VitcError

from . import quantizers as Q
from . import range_search, reparam
from .adapters import for_family
from .config import QuantConfig
from .modules import (ActQuant, AttentionCore, QuantConv2d, QuantLinear, act_quantizers, set_mode,
                      weighted_layers)
from .plan import LOG_MASS_LOSS_MAX

PASS_NAME = "quantize"
CALIB_BATCH = 64
CHOICE_IMAGES = 16  # images used to choose per-layer schemes and to measure SQNR


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, new)


@dataclass
class Plan:
    """What ``install`` did to a module: enough to redo it on a fresh copy when loading."""

    folded_bn: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    attention_family: str | None = None
    ends: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- structural steps

def fold_batchnorms(module: nn.Module, structure) -> list[str]:
    """Fold each BatchNorm2d of a conv stage into the conv registered just before it; return the folded BN paths.

    Registration order is the pairing rule: it holds for transformers' ConvLayer (``convolution``
    then ``normalization``) and for plain ``nn.Sequential`` stems (conv, BN, act, conv, BN, ...).
    """
    stage_norms = {n for stage in structure.conv_stages for n in stage.norms}
    pairs, last_conv = [], None
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            last_conv = (name, m)
        elif name in stage_norms and isinstance(m, nn.BatchNorm2d) and last_conv is not None \
                and last_conv[1].out_channels == m.num_features:
            pairs.append((last_conv[0], name))
            last_conv = None
    folded = []
    for conv_path, bn_path in pairs:
        conv, bn = get_module(module, conv_path), get_module(module, bn_path)
        if not isinstance(bn, nn.BatchNorm2d) or not isinstance(conv, nn.Conv2d):
            continue
        w, b = reparam.fold_bn(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                               bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        conv.weight = nn.Parameter(w)
        conv.bias = nn.Parameter(b)
        set_module(module, bn_path, nn.Identity())
        folded.append(bn_path)
    return folded


def end_layers(structure, module: nn.Module) -> list[str]:
    """The layers kept at 8 bits under ``keep_ends_8bit``: the first weighted layer (of the patch
    embedding, which in a hybrid is a whole conv stem, or of the first conv stage), the classifier,
    and each conv that hands a feature map over to attention (a hybrid's bridge).

    Why the bridges: Q-HyViT's finding, measured here too: the conv->token transition carries the
    largest activation ranges of a hybrid, and at 4 bits it alone costs most of the accuracy
    (zoo:convvit-c10 W4A4 calibration only: drop 6.25 pt with a 4-bit stem, 0.65 with its first
    conv at 8, 0.15 with its bridge too)."""
    first = structure.patch_embed or (structure.conv_stages[0].path if structure.conv_stages else None)
    ends = [first_weighted(module, first)] if first else []
    for bridge in structure.bridges:
        ends.append(bridge.conv)
    if structure.classifier:
        ends.append(first_weighted(module, structure.classifier))
    return list(dict.fromkeys(e for e in ends if e))


def first_weighted(module: nn.Module, path: str) -> str | None:
    """``path`` itself when it is a Linear/Conv2d, else the first one inside it (a conv stem is a container)."""
    try:
        m = get_module(module, path)
    except AttributeError:
        return None
    for name, sub in m.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            return f"{path}.{name}" if name else path
    return None


def install(module: nn.Module, structure, config: QuantConfig, folded_bn: list[str] | None = None) -> Plan:
    """Swap in the quantization modules (all quantizers off). ``folded_bn`` redoes a saved plan."""
    plan = Plan()
    if folded_bn is None:
        plan.folded_bn = fold_batchnorms(module, structure) if config.fold_bn else []
    else:
        for path in folded_bn:
            conv_parent = path.rpartition(".")[0]
            conv = next(m for n, m in get_module(module, conv_parent).named_children() if isinstance(m, nn.Conv2d))
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
            set_module(module, path, nn.Identity())
        plan.folded_bn = list(folded_bn)
    adapter = for_family(structure.family)
    if adapter is not None:
        plan.attention_family = structure.family
        for block in structure.blocks:
            site = block.attention
            if site is None:  # attention removed by pruning
                continue
            path = adapter.target(site)
            set_module(module, path, adapter.replace(get_module(module, path), site, config.abits))
            plan.attention.append(path)
    plan.ends = end_layers(structure, module) if config.keep_ends_8bit else []
    for name, m in list(module.named_modules()):
        if type(m) is nn.Linear or type(m) is nn.Conv2d:
            wide = name in plan.ends
            wbits, abits = (8, 8) if wide else (config.wbits, config.abits)
            if config.layer_bits and name in config.layer_bits:  # a mixed-precision allocation (mixed.py)
                wbits, abits = config.layer_bits[name]
            cls = QuantLinear if isinstance(m, nn.Linear) else QuantConv2d
            set_module(module, name, cls.from_float(m, name, abits, wbits))
    mlp_inputs = {b.mlp.fc2: b.mlp.activation for b in structure.blocks}
    for name, layer in weighted_layers(module).items():
        if mlp_inputs.get(name) in ("gelu", "silu"):
            layer.input_quant.kind = config.gelu_kind
    for core in (m for m in module.modules() if isinstance(m, AttentionCore)):
        core.probs_quant.kind = config.softmax_kind
    if not weighted_layers(module):
        raise VitcError("the model has no quantizable layer (no Linear or Conv2d)",
                        "quantize a model built from Linear/Conv2d layers")
    return plan


# ---------------------------------------------------------------- calibration helpers

def _batches(x: torch.Tensor, size: int = CALIB_BATCH):
    for i in range(0, x.shape[0], size):
        yield x[i:i + size]


@torch.no_grad()
def _run_all(module: nn.Module, x: torch.Tensor, progress=None, task=None) -> None:
    for chunk in _batches(x):
        module(chunk)
        if progress is not None and task is not None:
            progress.advance(task, chunk.shape[0])


def check_images(x: torch.Tensor, backbone: Backbone, calibrator: str) -> None:
    size = backbone.preprocess.input_size
    if x.dim() != 4 or x.shape[1] != 3:
        raise VitcError(f"calibration images have shape {tuple(x.shape)}, expected (N, 3, {size}, {size})",
                        "pass RGB images (3 channels) preprocessed for this model")
    if tuple(x.shape[-2:]) != (size, size):
        raise VitcError(f"calibration images are {x.shape[-2]}x{x.shape[-1]} but the model takes {size}x{size}",
                        "preprocess them with the model's preprocessing (backbone.preprocess)")
    if not torch.isfinite(x).all():
        raise VitcError("the calibration images contain NaN or Inf values", "check the image preprocessing")
    obs.check_count(calibrator, x.shape[0])


def norm_sites(module: nn.Module, structure) -> list[tuple[str, nn.LayerNorm, list[str]]]:
    """(LayerNorm path, module, consuming Linear paths) for each block's two LayerNorms."""
    sites = []
    for block in structure.blocks:
        att = block.attention
        pairs = [(block.norm2, [block.mlp.fc1])]
        if att is not None:
            pairs.append((block.norm1, [att.qkv] if att.fused else [att.q, att.k, att.v]))
        for norm, consumers in pairs:
            m = get_module(module, norm) if norm else None
            if isinstance(m, nn.LayerNorm) and m.elementwise_affine and all(
                    isinstance(get_module(module, c), nn.Linear) for c in consumers):
                sites.append((norm, m, consumers))
    return sites


@torch.no_grad()
def reparameterise_norms(module: nn.Module, structure, config: QuantConfig, x: torch.Tensor) -> list[str]:
    """SmoothQuant (optional) then RepQ-ViT on each block's two LayerNorms, from a pass over ``x``."""
    sites = norm_sites(module, structure)
    observers = {norm: obs.Observer(norm, channel_axis=-1) for norm, _, _ in sites}
    hooks = [m.register_forward_hook(lambda mod, inp, out, o=observers[norm]: o.update(out)) for norm, m, _ in sites]
    try:
        _run_all(module, x)
    finally:
        for h in hooks:
            h.remove()
    ranges = {norm: (o.channel_min, o.channel_max) for norm, o in observers.items()}
    return list(fold_norm_factors(module, sites, config, ranges))


@torch.no_grad()
def fold_norm_factors(module: nn.Module, sites, config: QuantConfig,
                      ranges: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fold each norm's ``(X + t) / r`` from its per-channel output range; returns {norm: (r, t)}."""
    factors = {}
    for norm, m, consumers in sites:
        lo, hi = ranges[norm]
        linears = [get_module(module, c) for c in consumers]
        wmax = torch.stack([l.weight.detach().abs().amax(0) for l in linears]).amax(0)
        r, t = reparam.norm_factors(lo, hi, wmax, config.abits, config.smooth_alpha, config.ln_reparam)
        new_w, new_b, new_consumers = reparam.fold_channel_affine(
            m.weight.detach(), m.bias.detach(), [(l.weight.detach(), None if l.bias is None else l.bias.detach()) for l in linears], r, t)
        m.weight.copy_(new_w)
        m.bias.copy_(new_b)
        for l, (w, b) in zip(linears, new_consumers):
            l.weight.copy_(w)
            if l.bias is None:
                l.bias = nn.Parameter(b)
            else:
                l.bias.copy_(b)
        factors[norm] = (r, t)
    return factors


def _remap_observer(o: obs.Observer, r: torch.Tensor, t: torch.Tensor) -> None:
    """Statistics of ``(X + t) / r`` from those of ``X`` (``r`` > 0, so extremes stay extremes)."""
    o.channel_min, o.channel_max = (o.channel_min + t) / r, (o.channel_max + t) / r
    o.channel_sum = (o.channel_sum + o.channel_count * t.double()) / r.double()
    o.min, o.max = o.channel_min.min().item(), o.channel_max.max().item()


def _calibrate_uniform(q: ActQuant, method: str, config: QuantConfig, scheme: str | None = None) -> list[tuple[float, bool, torch.Tensor, torch.Tensor]]:
    """Candidates (expected error, symmetric, scale, zero) for a uniform activation quantizer."""
    hist = q.observer.histogram()
    scheme = scheme or config.scheme_kind
    options = [True, False] if scheme == "per-layer" else [scheme == "symmetric"]
    out = []
    for symmetric in options:
        lo, hi = obs.calibrate(hist, method, q.bits, symmetric, config.percentile)
        err = obs.expected_error(hist, torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64),
                                 q.bits, symmetric).item()
        scale, zero = Q.uniform_qparams(lo, hi, q.bits, symmetric)
        out.append((err, symmetric, scale, zero))
    return sorted(out, key=lambda c: c[0])


def _calibrate_twin(q: ActQuant, method: str, config: QuantConfig) -> float:
    """Set the twin-uniform scales; return the expected squared error on the histogram."""
    hist = q.observer.histogram()
    neg_min = min(q.observer.min, 0.0)
    c = hist.centers
    if method == "mse":
        best, best_err = None, math.inf
        for hi in torch.linspace(0.2, 1.0, 60).tolist():
            neg, pos = Q.twin_scales(neg_min, hi * max(q.observer.max, 1e-8), q.bits)
            err = ((Q.fake_quant_twin(c, neg, pos, q.bits) - c) ** 2 * hist.counts).sum().item()
            if err < best_err:
                best, best_err = (neg, pos), err
        neg, pos = best
    else:
        _, hi = obs.calibrate(hist, method, q.bits, False, config.percentile)
        neg, pos = Q.twin_scales(neg_min, hi, q.bits)
    q.twin = torch.tensor([neg, pos])
    return ((Q.fake_quant_twin(c, neg, pos, q.bits) - c) ** 2 * hist.counts).sum().item() / hist.counts.sum().clamp_min(1).item()


@torch.no_grad()
def choose_layer_schemes(module: nn.Module, x: torch.Tensor, candidates: dict[str, list],
                         groups: list[list[str]] | None = None) -> dict[str, str]:
    """Pick each layer's input grid by the reconstruction error of the layer's output on ``x``.

    Layers in one of ``groups`` read the same tensor (an attention's q/k/v): they get one grid,
    chosen by their summed error, so the exported graph quantizes that tensor once.
    """
    layers = weighted_layers(module)
    errors = {name: [0.0] * len(c) for name, c in candidates.items()}

    def hook(name):
        def pre(mod, args):
            inp = args[0]
            ref = mod._conv_forward(inp, mod.weight, mod.bias) if isinstance(mod, nn.Conv2d) else nn.functional.linear(inp, mod.weight, mod.bias)
            for i, (symmetric, per_channel, scale, zero) in enumerate(candidates[name]):
                qmin, qmax = Q.int_range(mod.input_quant.bits, symmetric)
                xq = Q.fake_quant(inp, scale, zero, qmin, qmax, mod.input_quant.channel_axis if per_channel else None) if per_channel \
                    else Q.fake_quant(inp, scale.reshape(-1)[0], zero.reshape(-1)[0], qmin, qmax)
                out = mod._conv_forward(xq, mod.weight, mod.bias) if isinstance(mod, nn.Conv2d) else nn.functional.linear(xq, mod.weight, mod.bias)
                errors[name][i] += (out - ref).pow(2).sum().item()
        return pre

    hooks = [layers[name].register_forward_pre_hook(hook(name)) for name in candidates]
    try:
        module(x)
    finally:
        for h in hooks:
            h.remove()
    group_of = {name: [n for n in g if n in candidates] for g in (groups or []) for name in g if name in candidates}
    chosen = {}
    for name, cands in candidates.items():
        members = group_of.get(name, [name])
        if any(len(candidates[m]) != len(cands) for m in members):
            members = [name]
        best = min(range(len(cands)), key=lambda i: sum(errors[m][i] for m in members))
        symmetric, per_channel, scale, zero = cands[best]
        layers[name].input_quant.set_uniform(scale, zero, symmetric, per_channel)
        chosen[name] = f"{'symmetric' if symmetric else 'asymmetric'}/{'channel' if per_channel else 'tensor'}"
    return chosen


@torch.no_grad()
def layer_sqnr(reference: nn.Module, quantized: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """SQNR (dB) of each quantized layer's output in the quantized model against the float model."""
    outs: dict[str, dict[str, torch.Tensor]] = {"ref": {}, "q": {}}

    def grab(store, name):
        return lambda mod, inp, out: store.__setitem__(name, out.detach())

    hooks = []
    for key, model in (("ref", reference), ("q", quantized)):
        for name, m in model.named_modules():
            if isinstance(m, (QuantLinear, QuantConv2d)):
                hooks.append(m.register_forward_hook(grab(outs[key], name)))
    try:
        reference(x)
        quantized(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: Q.sqnr_db(outs["ref"][name], outs["q"][name]) for name in outs["q"] if name in outs["ref"]}


# ---------------------------------------------------------------- the pass

def calibration_tensor(data, backbone: Backbone, convert_rgb: bool = False) -> torch.Tensor:
    """Calibration images as one preprocessed tensor, from a tensor, an ImageSource or a --data spec."""
    if data is None:
        raise VitcError("quantization needs calibration images", "pass calibration data (e.g. --calib-data bundled:calib)")
    if isinstance(data, torch.Tensor):
        return data.float()
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import ImageSource, open_source

    source = data if isinstance(data, ImageSource) else open_source(str(data))
    return load_tensors(source, backbone.preprocess, convert_rgb)[0]


def module_path_reach(module: nn.Module, structure) -> tuple[set[str], list[str]]:
    """(paths of the layers the module path swaps, paths of the attentions its adapter reroutes)."""
    adapter = for_family(structure.family)
    attention = [adapter.target(b.attention) for b in structure.blocks if b.attention is not None] if adapter else []
    layers = {n for n, m in module.named_modules() if type(m) in (nn.Linear, nn.Conv2d, QuantLinear, QuantConv2d)}
    return layers, attention


# families whose module path is complete (every Linear/Conv2d swapped, attention through an adapter):
# "auto" keeps it there, so the zoo's results and exports are exactly what they were
MODULE_PATH_FAMILIES = ("hf-vit", "hf-deit", "hf-mobilevit", "hf-resnet")


def choose_sites(backbone: Backbone, config: QuantConfig, x: torch.Tensor):
    """("graph" | "modules", audit plan of the module path or None): see ``QuantConfig.sites``.

    "auto": the module path for the families it was written for (merged or pruned ones
    included); the graph path everywhere else (a merged DINOv2 too), even where the
    module path would cover every op. Measured on zoo:dinov2s-c10 (a real DINOv2 ViT-S, 32
    calibration images; 96 test images for the module path, 192 for the graph path), the module path covers 100% of the FLOPs but its symmetric
    int8 grids for the post-GELU inputs and the attention probabilities give logits at cosine
    0.870 with FP32 (77% top-1 agreement); the graph path, with per-activation grids, the
    probabilities x V rule and range widening, 0.9968 (96%).

    Mixed precision and block reconstruction run on either path (the graph path maps a
    mixed-precision table onto its sites by module name, ``torch_graph.apply_layer_bits``;
    ``graph_reconstruct`` cuts the captured graph into blocks), so neither changes the choice."""
    from . import torch_graph

    if config.sites == "graph":
        return "graph", None
    module = backbone.require_module("quantization")
    known = config.sites == "modules" or backbone.structure.family in MODULE_PATH_FAMILIES
    if not known:
        return "graph", None
    try:
        layers, attention = module_path_reach(module, backbone.structure)
        audit = torch_graph.audit_module_path(module, x[:2], layers, attention)
    except VitcError:  # the module path still runs; its coverage is unknown (the CLI says so)
        return "modules", None
    return "modules", audit


def apply(backbone: Backbone, config: QuantConfig | None = None, data=None, progress=None,
          reconstruct_staging=None, say=print) -> Backbone:
    """Quantize ``backbone`` (simulation) with ``config``, calibrating on ``data``.

    ``reconstruct_staging``: folder for the per-unit checkpoints of ``config.reconstruct_iters``
    (a rerun with the same settings resumes there); ``say`` prints the time estimate.

    Sites come from the captured graph or from module swaps (``config.sites``); either way the
    record carries the ``QuantPlan`` coverage (``record["coverage"]``)."""
    config = (config or QuantConfig()).validate()
    if config.group_size is not None or config.abits == 16:  # weight-only: no activations to calibrate
        from .weight_only import apply_weight_only

        # calibration images are optional here: they make the group scales activation-aware
        return apply_weight_only(backbone, config, None if data is None else calibration_tensor(data, backbone))
    module = backbone.require_module("quantization")
    structure = backbone.structure
    x = calibration_tensor(data, backbone)
    check_images(x, backbone, config.calibrator)
    if config.reconstruct_iters:
        from .reconstruct import check_count as check_reconstruct_count

        check_reconstruct_count(x.shape[0])
    path, audit = choose_sites(backbone, config, x)
    if path == "graph":
        from .torch_graph import apply_graph

        return apply_graph(backbone, config, x, progress, reconstruct_staging, say)
    for flag, asked, what in (("--mlp-rotation", config.mlp_rotation, "rotation"),
                              ("--norm-rotation", config.norm_rotation, "rotation"),
                              ("--value-reparam", config.value_reparam, "value reparameterisation")):
        if asked == "on":
            raise VitcError(f"{flag} on applies to the graph path; the module path (the zoo families' adapters) has no "
                            f"{what}", f"pass --sites graph, or drop {flag}")
    if config.key_centering == "on":
        say("note: --key-centering on applies to the graph path; the module path (the zoo families' adapters) leaves "
            "the keys as they are (pass --sites graph to centre them)")
    out = _apply_modules(backbone, config, x, progress, reconstruct_staging, say)
    record = out.transforms[-1]
    record["sites"] = "modules"
    if audit is not None:
        _audit_bits(audit, out.module, config)
        record["quant_plan"] = audit.to_dict()
        record["coverage"] = audit.coverage()
    else:
        record["coverage"] = None
    return out


def _audit_bits(audit, module: nn.Module, config: QuantConfig) -> None:
    """The bit widths the module path really gave each audited site."""
    layers = weighted_layers(module)
    for site in audit.sites:
        layer = layers.get(site.module or "")
        wb, ab = (layer.wbits, layer.input_quant.bits) if layer is not None else (None, config.abits)
        if site.weight is not None and wb is not None:
            site.weight.bits = wb
        for q in site.inputs:
            q.bits = ab


def _apply_modules(backbone: Backbone, config: QuantConfig, x: torch.Tensor, progress=None,
                   reconstruct_staging=None, say=print) -> Backbone:
    module = backbone.require_module("quantization")
    structure = backbone.structure
    start = time.perf_counter()
    out = backbone.copy()
    module = out.module.eval()
    task = progress.add_task("calibrating", total=2 * x.shape[0]) if progress is not None else None

    plan = install(module, structure, config)
    quantizers = act_quantizers(module)
    layer_inputs = {id(l.input_quant) for l in weighted_layers(module).values()}
    for name, q in quantizers.items():
        # per-channel statistics feed bias correction, per-channel grids and the norm
        # reparameterisation: layer inputs only
        q.observer = obs.Observer(q.name or name, channel_axis=q.channel_axis if id(q) in layer_inputs else None)
    set_mode(module, "observe")
    _run_all(module, x, progress, task)
    reparam_norms = []
    if config.ln_reparam or config.smooth_alpha:
        # The range pass saw every norm's output as its consumers' input: reparameterise from
        # those statistics and remap them, instead of another pass over the images.
        sites = norm_sites(module, structure)
        first_input = {norm: get_module(module, consumers[0]).input_quant.observer for norm, _, consumers in sites}
        ranges = {norm: (o.channel_min, o.channel_max) for norm, o in first_input.items()}
        for norm, (r, t) in fold_norm_factors(module, sites, config, ranges).items():
            consumers = next(c for n, _, c in sites if n == norm)
            for c in consumers:
                _remap_observer(get_module(module, c).input_quant.observer, r, t)
            reparam_norms.append(norm)
    for q in quantizers.values():
        q.observer.start_histogram()
    _run_all(module, x, progress, task)
    set_mode(module, "off")
    reference = copy.deepcopy(module)  # the float model after the exact rewrites, for SQNR

    bridge_layers = {b.conv for b in structure.bridges} | {b.into for b in structure.bridges}
    layers = weighted_layers(module)
    input_of = {id(l.input_quant): n for n, l in layers.items()}
    per_channel_ok = config.granularity == "auto" and config.abits < 8 and structure.kind in ("cnn", "hybrid")
    matmul_operands = {id(getattr(core, f"{k}_quant")) for core in module.modules() if isinstance(core, AttentionCore)
                       for k in ("q", "k", "v")}
    candidates: dict[str, list] = {}
    for name, q in quantizers.items():
        if q.kind in ("log2", "logsqrt2"):
            continue
        if q.kind == "adalog":
            q.set_adaptive_log(LOG_MASS_LOSS_MAX if config.softmax == "auto" else None)
            continue
        layer = input_of.get(id(q))
        if q.kind == "twin":
            twin_error = _calibrate_twin(q, config.calibrator, config)
            uniform = _calibrate_uniform(q, config.calibrator, config, "asymmetric")[0]
            # "auto" keeps whichever grid fits this layer better: with 3 bits a side (W4A4) a
            # plain asymmetric grid often beats the twin one
            if config.gelu == "twin" or twin_error <= uniform[0]:
                continue
            q.set_uniform(uniform[2], uniform[3], False, False)
            continue
        method = "mse" if layer in bridge_layers else config.calibrator
        # q, k and v on signed grids with zero point 0: integer matmul kernels (OpenVINO's fused
        # attention) take no zero point on these operands
        ranked = _calibrate_uniform(q, method, config, "symmetric" if id(q) in matmul_operands else None)
        _, symmetric, scale, zero = ranked[0]
        q.set_uniform(scale, zero, symmetric, False)
        if layer is None:
            continue
        cands = [(s, False, sc, z) for _, s, sc, z in ranked]
        if (per_channel_ok and isinstance(layers[layer], QuantConv2d) and q.bits < 8) or (layer in bridge_layers and config.abits < 8):
            for symmetric in ([True, False] if config.scheme_kind == "per-layer" else [config.scheme_kind == "symmetric"]):
                lo, hi = q.observer.channel_min, q.observer.channel_max
                sc, z = Q.uniform_qparams(lo, hi, q.bits, symmetric)
                cands.append((symmetric, True, sc, z))
        if len(cands) > 1:
            candidates[layer] = cands
    sample = x[:CHOICE_IMAGES]
    shared_input = [[b.attention.q, b.attention.k, b.attention.v] for b in structure.blocks
                    if b.attention is not None and not b.attention.fused]
    schemes = choose_layer_schemes(module, sample, candidates, shared_input) if candidates else {}

    for name, layer in layers.items():
        original = layer.quantize_weight(config.weight_search)
        mean = layer.input_quant.observer.channel_mean if layer.input_quant.observer else None
        if config.bias_correction and mean is not None and mean.numel() == original.shape[1] * (
                layer.groups if isinstance(layer, nn.Conv2d) else 1):
            with torch.no_grad():
                b = reparam.corrected_bias(original, layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), mean)
                if layer.bias is None:
                    layer.bias = nn.Parameter(b)
                else:
                    layer.bias.copy_(b)
    for q in quantizers.values():
        q.observer = None
    set_mode(module, "quant")
    widening = (widen_module_ranges(module, structure, reference, x[:range_search.search_images(config.range_objective)],
                                    progress, config.range_objective)
                if config.range_search_in("modules") else None)
    reconstruction = None
    if config.reconstruct_iters:  # BRECQ/QDrop block reconstruction (reconstruct.py)
        from . import reconstruct as R

        options = R.ReconstructOptions(iters=config.reconstruct_iters, iters_ramp=config.reconstruct_ramp,
                                        loss=config.reconstruct_loss, affine=config.reconstruct_affine)
        key = R.staging_key(backbone.source_hash or str(backbone.source), config.to_dict(), x, options)
        reconstruction = R.reconstruct(reference, module, structure, x, options, key, reconstruct_staging, progress, say)
    sqnr = layer_sqnr(reference, module, sample)
    seconds = time.perf_counter() - start

    families_note = None if plan.attention_family or not structure.blocks else \
        f"no attention adapter for {structure.family}: attention matmul inputs are not quantized"
    record = {
        "pass": PASS_NAME,
        "config": config.to_dict(),
        "calibration_images": int(x.shape[0]),
        "calibration_s": round(seconds, 3),
        "plan": {"folded_bn": plan.folded_bn, "attention": plan.attention, "ends_8bit": plan.ends,
                 "reparameterised_norms": reparam_norms},
        "layers": layer_specs(module),
        "scheme_choice": schemes,
        "vit_quantizers": vit_quantizer_summary(config, plan, reparam_norms, structure, module),
        "range_widening": widening,
        "sqnr_db": {k: (round(v, 2) if math.isfinite(v) else None) for k, v in sqnr.items()},
    }
    if families_note:
        record["note"] = families_note
    if reconstruction is not None:
        record["reconstruction"] = reconstruction
    if config.layer_bits:
        record["mixed_precision"] = {"layer_bits": config.layer_bits}
    return out.with_module(module, record)


def module_range_groups(module: nn.Module, structure) -> dict[str, list[ActQuant]]:
    """The module path's uniform activation quantizers by ``range_search`` group: fc2 after a
    GELU/SiLU, the linears a LayerNorm feeds, the attention q/k operands, other linears, convs."""
    after_gelu = {b.mlp.fc2 for b in structure.blocks if b.mlp is not None and b.mlp.activation in ("gelu", "silu")}
    after_norm = {c for _, _, consumers in norm_sites(module, structure) for c in consumers}
    groups: dict[str, list[ActQuant]] = {}
    for name, layer in weighted_layers(module).items():
        g = ("conv inputs" if isinstance(layer, QuantConv2d) else "post-gelu linear inputs" if name in after_gelu
             else "post-layernorm linear inputs" if name in after_norm else "plain linear inputs")
        groups.setdefault(g, []).append(layer.input_quant)
    for core in (m for m in module.modules() if isinstance(m, AttentionCore)):
        groups.setdefault("attention logits", []).extend([core.q_quant, core.k_quant])
    return {g: [q for q in qs if q.kind == "uniform"] for g, qs in groups.items() if any(q.kind == "uniform" for q in qs)}


def widen_module_ranges(module: nn.Module, structure, reference: nn.Module, x: torch.Tensor, progress=None,
                        objective: str = "worst") -> dict:
    """``range_search`` on the module path (as ``torch_graph.widen_ranges``): each group's activation
    scales widened by the factor that lowers the model's output error on ``x`` (``objective``: worst image or mean)."""
    groups = module_range_groups(module, structure)
    if not groups:
        return {"groups": {}}
    keys = {g: [id(q) for q in qs] for g, qs in groups.items()}
    quant = {id(q): q for qs in groups.values() for q in qs}
    return range_search.widen(keys, range_search.scale_setter(quant), lambda: range_search.model_outputs(module, x),
                              range_search.model_outputs(reference, x), int(x.shape[0]), progress, objective)


def layer_specs(module: nn.Module) -> dict[str, dict]:
    """The per-layer scheme: every quantizer's kind, bits, symmetry and granularity."""
    specs = {}
    for name, layer in weighted_layers(module).items():
        inp = layer.input_quant.spec()
        if layer.input_quant.per_channel:
            inp["channels"] = int(layer.input_quant.scale.numel())
        specs[name] = {"type": "conv" if isinstance(layer, nn.Conv2d) else "linear", "wbits": layer.wbits,
                       "weight": "symmetric/channel", "input": inp}
    for name, m in module.named_modules():
        if isinstance(m, AttentionCore):
            specs[name] = {"type": "attention", **{k: getattr(m, f"{k}_quant").spec() for k in ("q", "k", "probs", "v")}}
    return specs


def vit_quantizer_summary(config: QuantConfig, plan: Plan, reparam_norms: list[str], structure, module: nn.Module) -> dict:
    if not structure.blocks:
        return {}
    layers = weighted_layers(module)
    kinds = [layers[b.mlp.fc2].input_quant.kind for b in structure.blocks if b.mlp.fc2 in layers]
    post_gelu = ", ".join(f"{k} x{kinds.count(k)}" for k in sorted(set(kinds)))
    # the grids calibration chose (softmax "auto" below 8 bits picks per attention)
    probs = [m.probs_quant.kind for m in module.modules() if isinstance(m, AttentionCore)] if plan.attention else []
    return {
        "post_layernorm": ("smoothquant+" if config.smooth_alpha else "") + ("repq" if config.ln_reparam else "per-tensor")
        + f" ({len(reparam_norms)} norms)",
        "post_softmax": ", ".join(f"{k} x{probs.count(k)}" for k in sorted(set(probs))) if probs else "not quantized (no adapter)",
        "post_gelu": post_gelu,
        "bias_correction": config.bias_correction,
    }


def load_specs(module: nn.Module, specs: dict[str, dict]) -> None:
    """Apply a saved per-layer scheme to freshly installed modules, so a saved state dict loads."""
    layers = weighted_layers(module)
    for name, spec in specs.items():
        if spec["type"] == "attention":
            core = get_module(module, name)
            for k in ("q", "k", "probs", "v"):
                getattr(core, f"{k}_quant").load_spec(spec[k])
        else:
            layers[name].wbits = spec["wbits"]
            layers[name].input_quant.load_spec(spec["input"])
            layers[name].quantized = True


def quant_params(backbone: Backbone) -> dict[str, dict]:
    """Per-layer quantization parameters of a quantized Backbone (the integer-only path builds on these).

    For each Linear/Conv: ``input`` (kind, bits, symmetric, granularity, ``scale``, ``zero_point``,
    and ``twin`` scales for twin-uniform), ``weight_scale`` (per output channel, zero point 0),
    ``weight_codes`` (int32) and ``wbits``; for each attention: the ``q``, ``k``, ``probs`` and
    ``v`` quantizers in the same form.
    """
    module = backbone.require_module("reading quantization parameters")

    def act(q: ActQuant) -> dict:
        d = q.spec()
        if q.kind == "uniform":
            d.update(scale=q.scale.clone(), zero_point=q.zero_point.clone())
        elif q.kind == "twin":
            d.update(twin=q.twin.clone())
        return d

    params = {}
    for name, layer in weighted_layers(module).items():
        params[name] = {"input": act(layer.input_quant), "wbits": layer.wbits, "weight_scale": layer.weight_scale.clone(),
                        "weight_codes": layer.weight_codes()}
    for name, m in module.named_modules():
        if isinstance(m, AttentionCore):
            params[name] = {k: act(getattr(m, f"{k}_quant")) for k in ("q", "k", "probs", "v")}
    if not params:
        raise VitcError(f"{backbone.source} is not quantized", "quantize it first (vitc quantize)")
    return params
