"""Weight-only quantization (``vitc quantize --wbits 4 --abits 16 --group-size 64``).

Activations stay float; each Linear's weight is stored as int4 or int8 codes with one
symmetric scale per group of ``group_size`` consecutive input channels (per output channel),
the clipping of each group searched for the least squared error. ``--weight-scheme asymmetric``
gives the int4 groups a zero point each (uint4 codes 0..15, ``group_qparams_asymmetric``): a
group whose weights lean to one side uses all 16 levels on its own range. Convolutions (the patch
embedding, conv stems) and the classifier get int8 per-output-channel weights, as NNCF's
``compress_weights`` keeps its "backup" layers in 8 bits: they are small and sensitive.

With calibration images the grouped Linears are rounded by GPTQ (Frantar et al., 2023): columns
are quantized one at a time, in order of decreasing input energy, and each column's rounding error
is spread over the columns not yet quantized through the inverse of the layer's input Hessian
X^T X, so the layer's output error, not each weight's, is what rounding minimises. The group
scales are fixed first (the activation-weighted search below, on the original weights), so the
stored codes and scales stay exactly what the runtimes' int4 formats hold. Written here rather
than taken from a library: NNCF's GPTQ runs on OpenVINO models only and optimum's/AutoGPTQ's on
language models; this one runs on any torch Linear that ``layer_plan`` groups, and shares the
Hessian algebra of SparseGPT (``sparsity/masks.py``); the rounding itself is ``gptq.py``.

The simulation is the float model with every weight on its grid (``WeightOnlyLinear`` /
``WeightOnlyConv2d`` keep the scales as buffers), so it runs plain float kernels and the
saved folder, the ONNX graph and the OpenVINO IR all hold the same integers.

Export (``export_onnx``): the float graph at opset 21, where DequantizeLinear takes int4 and
blocked scales (``block_size``), with each MatMul weight replaced by
``DequantizeLinear(int4/int8 codes, scales, axis=0, block_size=g) -> MatMul``. ONNX Runtime's
``DQMatMulToMatMulNBits`` fusion turns the int4 ones into ``MatMulNBits`` kernels; OpenVINO's
ONNX frontend keeps them as i4/i8 constants with a decompression subgraph, which its CPU
plugin runs as compressed-weight FullyConnected layers (``ir_weight_types`` reads the IR).
Asymmetric groups go out as ``DequantizeLinear(uint4 codes, scales, uint4 zero points, ...)``:
ORT fuses them into ``MatMulNBits`` with zero points, OpenVINO keeps u4 constants.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vitc.backbone import Backbone
from vitc.errors import VitcError

from . import quantizers as Q
from .gptq import HessianTaps, gptq_groups, prefix_token_layouts, refit_group_scales

FORMAT = "vitc-woq/1"
WBITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP = 64
OPSET = 21  # int4 tensors and blocked DequantizeLinear


def validate_config(config):
    if config.wbits not in WBITS:
        raise VitcError(f"weight-only quantization (--abits 16) takes --wbits 4 or 8, not {config.wbits}",
                        "pass --wbits 4 or --wbits 8")
    if config.group_size is None:
        config.group_size = DEFAULT_GROUP
    if config.group_size not in GROUP_SIZES:
        raise VitcError(f"--group-size {config.group_size} is not supported",
                        f"use one of {', '.join(map(str, GROUP_SIZES))}")
    if config.weight_scheme not in ("symmetric", "asymmetric"):
        raise VitcError(f"--weight-scheme {config.weight_scheme} is not supported", "use symmetric or asymmetric")
    if config.weight_rounding not in ("gptq", "nearest"):
        raise VitcError(f"weight rounding '{config.weight_rounding}' is not supported", "use gptq or nearest")
    if config.reconstruct_iters:
        raise VitcError("--reconstruct applies to weight-and-activation quantization, not to --abits 16",
                        "drop --reconstruct (weight-only rounding is GPTQ's), or quantize activations too (--abits 8)")
    for name, bits in (config.layer_bits or {}).items():  # a weight-only mixed-precision allocation (mixed.py)
        if len(bits) != 2 or bits[0] not in WBITS or bits[1] != 16:
            raise VitcError(f"layer '{name}' has bit widths {bits} in a weight-only table",
                            "use [4, 16] or [8, 16] (weight bits, float activations)")
    return config


def group_range(bits: int) -> tuple[int, int]:
    """Integer limits of group codes. Below 8 bits, every level of the signed type (-8..7 at 4 bits):
    ONNX's INT4, OpenVINO's i4 and ORT's MatMulNBits (zero point 8) hold all 16, NNCF's INT4_SYM uses
    them, and the restricted -7..7 grid of per-channel weights would leave one unused. Measured with
    GPTQ, same calibration images: zoo:dinov2s-c10 int4 g64, output KL against FP32 on 500 CIFAR-10
    test images 0.0181 -> 0.0174 (``benchmarks/lowbit.py`` has the 2,000-image figures); zoo:vit-c10
    int4 g32, logit MSE on 64 images -36%. At 8 bits the extra level is 0.4% of the range and the
    restricted grid stays (the int8 figures stand)."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if bits < 8 else Q.int_range(bits, True, restricted=True)


def group_scales(w: torch.Tensor, bits: int, group: int, search: bool = True,
                 importance: torch.Tensor | None = None, candidates: int = 64) -> torch.Tensor:
    """Symmetric scales of ``w`` (out, in), one per (output channel, group of ``group`` inputs): (out, in/group).

    With ``search``, each group's clipping is the shrinking of its max |w| with the least squared
    error; with ``importance`` (in,), the mean square of each input channel on calibration images,
    that error is weighted by it: ``sum_i E[x_i^2] (w_i - q_i)^2`` is the expected squared error
    of the layer's output that the group's rounding causes (the diagonal of GPTQ's Hessian), so a
    group clips the weights of quiet inputs rather than those of the loud ones, as AWQ argues."""
    qmin, qmax = group_range(bits)
    g = _groups(w, group)
    amax = g.abs().amax(-1).clamp_min(1e-8)  # (out, groups)
    return _search_grid(g, lambda ratio: (amax * ratio / qmax, torch.zeros_like(amax)), qmin, qmax,
                        search, importance, candidates)[0]


def asymmetric_range(bits: int) -> tuple[int, int]:
    """Integer limits of asymmetric group codes: the unsigned type (0..15 at 4 bits, ONNX's UINT4,
    OpenVINO's u4, MatMulNBits' codes with a zero point per block)."""
    return 0, 2 ** bits - 1


def group_qparams_asymmetric(w: torch.Tensor, bits: int, group: int, search: bool = True,
                             importance: torch.Tensor | None = None, candidates: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group grids of ``w`` (out, in): scales and zero points, each (out, in/group), the
    zero points integers in ``asymmetric_range``. Each group's [min, max], widened to hold 0 (the
    formats' zero points lie in 0..15, so 0 is always on the grid), shrinks toward 0 by the ratio
    with the least (``importance``-weighted, as in ``group_scales``) squared error. The int4 grid
    then spends its 16 levels on the group's own range, where the symmetric grid leaves the side a
    group does not reach unused."""
    qmin, qmax = asymmetric_range(bits)
    g = _groups(w, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)

    def grid(ratio):
        s = ((hi - lo) * ratio / qmax).clamp_min(1e-8)
        return s, torch.clamp(torch.round(-lo * ratio / s), qmin, qmax)

    return _search_grid(g, grid, qmin, qmax, search, importance, candidates)


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """``w`` (out, in) as (out, in/group, group)."""
    out, inp = w.shape
    if inp % group:
        raise ValueError(f"{inp} input channels do not split into groups of {group}")
    return w.detach().float().reshape(out, inp // group, group)


def _search_grid(g: torch.Tensor, grid, qmin: int, qmax: int, search: bool, importance: torch.Tensor | None,
                 candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping search both group grids share: ``grid(ratio)`` gives (scales, zero points) of the
    groups ``g`` (out, groups, group) shrunk by ``ratio``; each group keeps the ratio in [0.5, 1] with
    the least ``importance``-weighted squared error (ratio 1 without ``search``)."""
    best_s, best_z = grid(1.0)
    if not search:
        return best_s, best_z
    weight = _group_weights(importance, g.shape[1] * g.shape[2], g.shape[2])
    best_err = torch.full_like(best_s, math.inf)
    for ratio in torch.linspace(0.5, 1.0, candidates):
        s, z = grid(ratio)
        q = (torch.clamp(torch.round(g / s[..., None]) + z[..., None], qmin, qmax) - z[..., None]) * s[..., None]
        err = ((q - g) ** 2 * weight).sum(-1)
        better = err < best_err
        best_err, best_s, best_z = torch.where(better, err, best_err), torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def _group_weights(importance: torch.Tensor | None, inp: int, group: int) -> torch.Tensor:
    """Per-weight error weights of the scale searches: each group's input mean squares over their mean."""
    if importance is None:
        return torch.ones(1, inp // group, group)
    weight = importance.float().clamp_min(0).reshape(1, inp // group, group)
    weight = weight / weight.mean(-1, keepdim=True).clamp_min(1e-12)  # per group: a silent group falls back to plain MSE
    return torch.where(torch.isfinite(weight), weight, torch.ones_like(weight))


def group_codes(w: torch.Tensor, scale: torch.Tensor, bits: int, zero: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes in ``group_range`` (symmetric), or uint8 codes in ``asymmetric_range`` with ``zero``."""
    s = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
    if zero is None:
        qmin, qmax = group_range(bits)
        return torch.clamp(torch.round(w / s), qmin, qmax).to(torch.int8)
    qmin, qmax = asymmetric_range(bits)
    z = zero.float().repeat_interleave(w.shape[1] // zero.shape[1], dim=1)
    return torch.clamp(torch.round(w / s) + z, qmin, qmax).to(torch.uint8)


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    rep = codes.shape[1] // scale.shape[1]
    q = codes.float() if zero is None else codes.float() - zero.float().repeat_interleave(rep, dim=1)
    return q * scale.repeat_interleave(rep, dim=1)


def fake_quant(w: torch.Tensor, bits: int, group: int, asymmetric: bool = False) -> torch.Tensor:
    """``w`` on the grid ``layer_plan`` gives a Linear of ``bits``: groups of ``group`` inputs below
    8 bits (nearest rounding, searched scales; zero points with ``asymmetric``), per output channel
    at 8 bits or where the inputs do not split into groups. Mixed precision's sensitivity measures
    each layer on it."""
    if bits < 8 and w.dim() == 2 and w.shape[1] % group == 0:
        if asymmetric:
            scale, zero = group_qparams_asymmetric(w, bits, group)
            return dequantize_groups(group_codes(w, scale, bits, zero), scale, zero)
        scale = group_scales(w, bits, group)
        return dequantize_groups(group_codes(w, scale, bits), scale)
    return Q.fake_quant_weight(w, Q.weight_qparams(w, 8, True), 8)


def swappable(m: nn.Module) -> bool:
    """A Linear or Conv2d, subclasses included (``nn.MultiheadAttention``'s output projection is one),
    that computes what its base class computes, so a weight-only layer can take its place. A
    subclass with its own forward (weight standardisation, LoRA, ...) would compute something else
    after the swap: it stays float and ``left_float`` names it."""
    if isinstance(m, _WeightOnly):
        return False
    if isinstance(m, nn.Linear):
        return type(m).forward is nn.Linear.forward
    if isinstance(m, nn.Conv2d):
        return type(m).forward is nn.Conv2d.forward and type(m)._conv_forward is nn.Conv2d._conv_forward
    return False


def groupable(name: str, m: nn.Module, structure, group: int) -> bool:
    """Whether ``layer_plan`` would give this layer group scales (a Linear other than the classifier
    whose inputs split into groups): the others run at 8 bits per channel whatever is asked."""
    return isinstance(m, nn.Linear) and swappable(m) and name != structure.classifier and m.in_features % group == 0


def left_float(module: nn.Module) -> list[dict]:
    """The weight matrices no weight-only layer holds (parameters of 2 or more dimensions named
    ``weight`` or ``*_weight``, embedding tables aside), each with why: what the pass did not do."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, (_WeightOnly, nn.Embedding, nn.EmbeddingBag)):
            continue
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() >= 2 and (pname == "weight" or pname.endswith("_weight")):
                out.append({"module": name, "type": type(m).__name__, "parameter": pname, "params": p.numel(),
                            "reason": _why_float(m)})
    return out


def _why_float(m: nn.Module) -> str:
    if isinstance(m, nn.MultiheadAttention):
        return "nn.MultiheadAttention's packed q/k/v projection is a raw parameter, not a Linear layer"
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        return f"a {type(m).__name__} with its own forward: a weight-only layer in its place would compute something else"
    return f"{type(m).__name__} has no weight-only version (Linear and Conv2d have)"


def coverage(module: nn.Module) -> dict:
    """Share of the weight-matrix parameters the weight-only layers hold, and the ones left float."""
    held = sum(l.weight.numel() for l in weight_only_layers(module).values())
    left = left_float(module)
    total = held + sum(r["params"] for r in left)
    return {"params_quantized": held, "params_total": total, "share": held / total if total else 1.0, "left_float": left}


# GPTQ rounds on the searched grid, the scales are refit to its codes (``refit_group_scales``), and
# GPTQ rounds again on the refit grid, whose scales are refit once more: GPTQ_REFITS refits in all.
# zoo:dinov2s-c10 int4 g64, 128 calibration / 2,000 test images, output KL against FP32: no refit
# 0.0175, one 0.0162, two 0.0152 (agreement 93.9 -> 94.2 -> 94.8%), three 0.0159 (94.1%): the
# alternation does not converge, and two is the best measured; each GPTQ pass costs ~20 s more there.
GPTQ_REFITS = 2


class _WeightOnly:
    wbits: int
    group_size: int | None  # None: per output channel
    asymmetric: bool  # group zero points (``weight_zero_point``, uint codes)

    def _init_wo(self, wbits: int, group_size: int | None, scale_shape, asymmetric: bool = False) -> None:
        self.wbits, self.group_size, self.asymmetric = wbits, group_size, bool(asymmetric and group_size)
        self.register_buffer("weight_scale", torch.ones(scale_shape))
        if self.asymmetric:
            self.register_buffer("weight_zero_point", torch.zeros(scale_shape, dtype=torch.uint8))

    @property
    def zero(self) -> torch.Tensor | None:
        return self.weight_zero_point if self.asymmetric else None

    def quantize(self, search: bool = True, importance: torch.Tensor | None = None,
                 hessian: torch.Tensor | None = None) -> None:
        """Scales by the (activation-weighted) search; the weights rounded to nearest, or, when the
        input ``hessian`` (X^T X) is given (grouped Linears), by GPTQ, alternating with refits of
        the scales to its codes (``GPTQ_REFITS``)."""
        w = self.weight.detach().float()
        with torch.no_grad():
            if self.group_size:
                if self.asymmetric:
                    self.weight_scale, zero = group_qparams_asymmetric(w, self.wbits, self.group_size, search, importance)
                    self.weight_zero_point = zero.to(torch.uint8)
                    qrange = asymmetric_range(self.wbits)
                else:
                    self.weight_scale, zero = group_scales(w, self.wbits, self.group_size, search, importance), None
                    qrange = group_range(self.wbits)
                if hessian is not None:
                    scale = self.weight_scale
                    q = gptq_groups(w, hessian, scale, self.wbits, qrange=qrange, zero=zero)
                    for step in range(GPTQ_REFITS):
                        refit = refit_group_scales(w, q, hessian, scale)
                        if step < GPTQ_REFITS - 1:  # round again on the refit grid
                            q = gptq_groups(w, hessian, refit, self.wbits, qrange=qrange, zero=zero)
                        else:  # the last refit keeps GPTQ's codes
                            q = dequantize_groups(group_codes(q, scale, self.wbits, zero), refit, zero)
                        scale = refit
                    self.weight_scale = scale
                    self.weight.copy_(q)
                else:
                    self.weight.copy_(dequantize_groups(group_codes(w, self.weight_scale, self.wbits, zero), self.weight_scale, zero))
            else:
                self.weight_scale = Q.weight_qparams(w, self.wbits, search)
                self.weight.copy_(Q.fake_quant_weight(w, self.weight_scale, self.wbits))

    def codes(self) -> torch.Tensor:
        if self.group_size:
            return group_codes(self.weight.detach(), self.weight_scale, self.wbits, self.zero)
        qmin, qmax = Q.int_range(self.wbits, True, restricted=True)
        s = self.weight_scale.reshape(-1, *[1] * (self.weight.dim() - 1))
        return torch.clamp(torch.round(self.weight.detach() / s), qmin, qmax).to(torch.int8)

    def spec(self) -> dict:
        return {"wbits": self.wbits, "group_size": self.group_size, **({"asymmetric": True} if self.asymmetric else {})}


class WeightOnlyLinear(nn.Linear, _WeightOnly):
    @classmethod
    def from_float(cls, m: nn.Linear, wbits: int, group_size: int | None, asymmetric: bool = False) -> "WeightOnlyLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = m.in_features, m.out_features
        new.weight, new.bias = m.weight, m.bias
        new._init_wo(wbits, group_size, (m.out_features, m.in_features // group_size) if group_size else (m.out_features,),
                     asymmetric)
        return new


class WeightOnlyConv2d(nn.Conv2d, _WeightOnly):
    @classmethod
    def from_float(cls, m: nn.Conv2d, wbits: int) -> "WeightOnlyConv2d":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(new, attr, getattr(m, attr))
        new.weight, new.bias = m.weight, m.bias
        new._init_wo(wbits, None, (m.out_channels,))
        return new


def weight_only_layers(module: nn.Module) -> dict[str, _WeightOnly]:
    return {n: m for n, m in module.named_modules() if isinstance(m, (WeightOnlyLinear, WeightOnlyConv2d))}


def layer_plan(module: nn.Module, structure, wbits: int, group: int, layer_bits: dict | None = None,
               asymmetric: bool = False) -> dict[str, dict]:
    """{layer: {"wbits", "group_size"[, "asymmetric"]}}: Linears whose input splits into groups at
    ``wbits`` (with zero points where ``asymmetric`` and below 8 bits); the classifier, convolutions
    and Linears that do not split at int8 per channel (symmetric: what every int8 path runs)."""
    plan = {}
    grid = lambda bits: {"wbits": bits, "group_size": group, **({"asymmetric": True} if asymmetric and bits < 8 else {})}
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and swappable(m):
            grouped = groupable(name, m, structure, group)
            if layer_bits and name in layer_bits:  # mixed precision: 4-bit layers grouped, 8-bit ones per channel
                grouped = grouped and layer_bits[name][0] < 8
                plan[name] = grid(layer_bits[name][0]) if grouped else {"wbits": 8, "group_size": None}
                continue
            plan[name] = grid(wbits) if grouped else {"wbits": 8, "group_size": None}
        elif isinstance(m, nn.Conv2d) and swappable(m):
            plan[name] = {"wbits": 8, "group_size": None}
    return plan


def install(module: nn.Module, plan: dict[str, dict]) -> None:
    for name, spec in plan.items():
        parent, _, attr = name.rpartition(".")
        m = module.get_submodule(name)
        owner = module.get_submodule(parent) if parent else module
        new = WeightOnlyLinear.from_float(m, spec["wbits"], spec["group_size"], spec.get("asymmetric", False)) \
            if isinstance(m, nn.Linear) \
            else WeightOnlyConv2d.from_float(m, spec["wbits"])
        setattr(owner, attr, new)


# images for the input statistics (the scale search's weights, GPTQ's Hessians): quantize's default
# 512. The CLS token's share of a Hessian has one row per image, short of rank for the widest inputs
# (1,536) at 128. zoo:dinov2s-c10 int4 g64, 2,000 test images, output KL against FP32: 128 images
# 0.0152 (agreement 94.8%), 512 images 0.0136 (95.05%)
ACTIVATION_IMAGES = 512
# GPTQ's Hessians weight the prefix (CLS) tokens as much as all tokens together (gptq.HessianTaps)
PREFIX_WEIGHT = 1.0


@torch.no_grad()
def input_mean_squares(module: nn.Module, names: list[str], x: torch.Tensor, batch: int = 64,
                       full: bool = False, prefix_layouts: dict[int, int] | None = None) -> dict[str, torch.Tensor]:
    """{layer: E[x_i^2] per input channel (last axis)} of each named Linear on images ``x``; with
    ``full``, the whole second moment E[x x^T] (in x in), GPTQ's Hessian up to a factor. With
    ``prefix_layouts`` ({tokens: prefix tokens}), the prefix (CLS) tokens' moment is added
    ``PREFIX_WEIGHT`` times (``HessianTaps``' token weighting)."""
    taps = HessianTaps(full, prefix_layouts, PREFIX_WEIGHT if prefix_layouts else 0.0)
    for n in names:
        taps.hook(module.get_submodule(n), n, on="input")
    # GPTQ's sequential steps need only the inputs of one block's layers: the rest of the forward is
    # cut short once each has run, which it may be when the first batch saw each run exactly once
    calls: dict[str, int] = {}
    stop = {"armed": False}

    def seen(name):
        def hook(mod, args, out):
            calls[name] = calls.get(name, 0) + 1
            if stop["armed"] and len(calls) == len(names):
                raise _StopForward

        return hook

    handles = [module.get_submodule(n).register_forward_hook(seen(n)) for n in names]
    try:
        for i in range(0, x.shape[0], batch):
            calls.clear()
            try:
                module(x[i:i + batch])
            except _StopForward:
                pass
            stop["armed"] = len(calls) == len(names) and all(c == 1 for c in calls.values())
    finally:
        taps.remove()
        for h in handles:
            h.remove()
    return taps.means()


class _StopForward(Exception):
    """Raised by ``input_mean_squares``' hooks once every layer it measures has seen its input."""


def block_waves(names: list[str], structure) -> list[list[str]]:
    """``names`` in the order GPTQ rounds them: one step per transformer block or conv stage of
    ``structure`` (its layers' Hessians measured after the earlier steps are rounded, GPTQ's
    sequential mode), then whatever lies in no block; one step when the structure is unknown."""
    paths = []
    for stage in getattr(structure, "stages", None) or []:
        paths += [b.path for b in getattr(stage, "blocks", [])] or [stage.path]
    waves, left = [], list(names)
    for path in paths:
        wave = [n for n in left if n.startswith(path + ".")]
        if wave:
            waves.append(wave)
            left = [n for n in left if n not in wave]
    return waves + ([left] if left else [])


def apply_weight_only(backbone: Backbone, config, x: torch.Tensor | None = None) -> Backbone:
    """Weight-only quantization of ``backbone``. Calibration images ``x`` are optional: with them the
    group scales minimise the activation-weighted error (``group_scales``), without them the plain one."""
    start = time.perf_counter()
    out = backbone.copy()
    module = out.require_module("weight-only quantization").eval()
    from .ptq import fold_batchnorms

    # fold BatchNorms first: the ONNX exporter folds them into the conv weights itself, which
    # would leave the exported weights off their grid (and unmatched by store_compressed_weights)
    folded = fold_batchnorms(module, backbone.structure) if config.fold_bn else []
    asymmetric = config.weight_scheme == "asymmetric"
    plan = layer_plan(module, backbone.structure, config.wbits, config.group_size, config.layer_bits, asymmetric)
    if not plan:
        raise VitcError("the model has no Linear or Conv2d layer to quantize", "quantize a model built from Linear/Conv2d layers")
    if asymmetric and not any(spec.get("asymmetric") for spec in plan.values()):  # e.g. --wbits 8: nothing is int4
        raise VitcError("--weight-scheme asymmetric gives int4 groups zero points; int8 weights stay symmetric",
                        "pass --wbits 4 (or --bits auto --size-budget B), or drop --weight-scheme")
    grouped = [n for n, spec in plan.items() if spec["group_size"]]
    images = x[:ACTIVATION_IMAGES] if x is not None else None
    gptq = config.weight_rounding == "gptq" and images is not None and bool(grouped)
    # GPTQ measures each block's Hessians after the earlier blocks are rounded; nearest rounding
    # takes its activation weights from the float model
    waves = block_waves(grouped, backbone.structure) if gptq else [grouped]
    layouts = prefix_token_layouts(backbone.structure) if gptq else {}
    moments = input_mean_squares(module, grouped, images) if images is not None and grouped and not gptq else {}
    install(module, plan)
    layers = weight_only_layers(module)
    for name in [n for n in layers if n not in grouped]:  # the int8 ends first: later Hessians see their rounding
        layers[name].quantize(config.weight_search)
    unobserved: list[str] = []  # layers whose inputs no hook saw: plain scale search and nearest rounding
    for wave in waves:
        if gptq:
            moments.update(input_mean_squares(module, wave, images, full=True, prefix_layouts=layouts))
        for name in wave:
            if images is not None and name not in moments:  # its forward never ran: its owner reads .weight itself
                unobserved.append(name)                      # (nn.MultiheadAttention's out_proj)
            h = moments.get(name) if gptq else None
            layers[name].quantize(config.weight_search, torch.diag(h) if h is not None else moments.get(name), h)
    record = {"pass": "quantize", "config": config.to_dict(), "calibration_images": 0 if images is None else int(images.shape[0]),
              "calibration_s": round(time.perf_counter() - start, 3),
              "weight_only": {"layers": plan, "wbits": config.wbits, "group_size": config.group_size, "folded_bn": folded,
                              "asymmetric": any(spec.get("asymmetric") for spec in plan.values()),
                              "scale_search": "activation-weighted MSE" if images is not None and grouped else ("MSE" if config.weight_search else "max"),
                              "rounding": ((f"GPTQ, sequential in {len(waves)} steps" if len(waves) > 1 else "GPTQ") + f", scales refit {GPTQ_REFITS} times") if gptq else "nearest",
                              "hessian_prefix_weight": PREFIX_WEIGHT if layouts else 0.0},
              "plan": {"folded_bn": folded, "attention": [], "ends_8bit": [n for n, s in plan.items() if s["group_size"] is None]},
              "layers": {}, "scheme_choice": {}, "vit_quantizers": {}, "sqnr_db": {}}
    record["weight_only"]["coverage"] = coverage(module)
    if unobserved:
        record["weight_only"]["nearest_rounding"] = {
            "layers": unobserved, "why": "the layer's forward never runs (its owner reads the weight directly), so no "
                                         "input statistics: plain scale search, nearest rounding"}
    return out.with_module(module, record)


def is_weight_only(record: dict | None) -> bool:
    return bool(record and record.get("weight_only"))


def model_size(backbone: Backbone) -> int:
    """Bytes: codes at their width, fp32 scales, everything else fp32."""
    module = backbone.require_module("measuring size")
    layers = weight_only_layers(module)
    quantized = {id(l.weight): l for l in layers.values()}
    zero_points = {id(l.weight_zero_point): l for l in layers.values() if l.asymmetric}  # stored at the codes' width
    total = 0.0
    for p in module.parameters():
        l = quantized.get(id(p))
        total += p.numel() * l.wbits / 8 if l else p.numel() * 4
    for b in module.buffers():
        l = zero_points.get(id(b))
        total += b.numel() * l.wbits / 8 if l else b.numel() * 4
    return int(total)


# ---------------------------------------------------------------- save / load

def save(backbone: Backbone, folder: Path, record: dict, force: bool = False, weights: str | Path | None = None) -> Path:
    from safetensors.torch import save_file

    from vitc.artifacts import atomic_path

    from .saved import META_FILE, WEIGHTS_FILE

    module = backbone.require_module("saving")
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    for name, layer in weight_only_layers(module).items():
        state.pop(f"{name}.weight")
        state[f"{name}.weight_codes"] = layer.codes().contiguous()
    meta = {"format": FORMAT, "base": {"spec": backbone.source, "sha256": backbone.source_hash,
                                       "weights": str(Path(weights).resolve()) if weights else None},
            "config": record["config"], "weight_only": record["weight_only"], "transforms": backbone.transforms,
            "preprocess": backbone.preprocess.to_dict(), "labels": backbone.labels}
    with atomic_path(Path(folder), force=force, is_dir=True) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(folder)


def load(folder: Path, meta: dict) -> Backbone:
    from safetensors.torch import load_file

    from vitc.models.intake import file_sha256
    from vitc.models.preprocess import Preprocess

    from .saved import WEIGHTS_FILE, load_base

    base = load_base(meta)
    module = base.copy().require_module("loading a weight-only model")
    # redo the BatchNorm folding structurally (the folded weights and biases come from the state)
    folded = set(meta["weight_only"].get("folded_bn", []))
    before, last = {}, None
    for name, m in module.named_modules():  # each BatchNorm was folded into the conv registered just before it
        if isinstance(m, nn.Conv2d):
            last = m
        elif name in folded:
            before[name] = last
    for path in folded:
        conv = before[path]
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        owner, _, attr = path.rpartition(".")
        setattr(module.get_submodule(owner), attr, nn.Identity())
    install(module, meta["weight_only"]["layers"])
    state = load_file(str(folder / WEIGHTS_FILE))
    for name, layer in weight_only_layers(module).items():
        codes, scale = state.pop(f"{name}.weight_codes", None), state.get(f"{name}.weight_scale")
        if codes is None or scale is None:
            raise VitcError(f"{folder / WEIGHTS_FILE} has no weights for {name}", "save the quantized model again")
        layer.weight_scale = scale
        zero = state.get(f"{name}.weight_zero_point") if layer.asymmetric else None
        if layer.asymmetric and zero is None:
            raise VitcError(f"{folder / WEIGHTS_FILE} has no zero points for {name}", "save the quantized model again")
        state[f"{name}.weight"] = dequantize_groups(codes, scale, zero) if layer.group_size else \
            codes.float() * scale.reshape(-1, *[1] * (codes.dim() - 1))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise VitcError(f"{folder} does not fit its base model {meta['base']['spec']} ({str(exc).splitlines()[0][:160]})",
                        "load it with the base model it was quantized from") from exc
    return Backbone(module=module.eval(), preprocess=Preprocess.from_dict(meta["preprocess"]), labels=meta["labels"],
                    source=str(folder), source_hash=file_sha256(folder / WEIGHTS_FILE), transforms=meta["transforms"],
                    preprocess_origin="config", card=base.card)


# ---------------------------------------------------------------- export

def export_onnx(backbone: Backbone, path, dynamic_batch: bool = True) -> Path:
    """ONNX (opset 21): each quantized weight as int4/int8 codes feeding a (blocked) DequantizeLinear."""
    import warnings

    import onnx
    from onnx import version_converter

    module = copy.deepcopy(backbone.require_module("weight-only export")).eval()
    path = Path(path)
    example = backbone.example_input(2 if dynamic_batch else 1)
    from vitc.backbone import mha_fast_path_off

    with warnings.catch_warnings(), torch.no_grad(), mha_fast_path_off():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17, input_names=["pixel_values"],
                          output_names=["logits"], do_constant_folding=True,
                          dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None)
    model = version_converter.convert_version(onnx.load(str(path)), OPSET)
    replaced = store_compressed_weights(model, module)
    expected = len(weight_only_layers(module))
    if replaced != expected:
        raise VitcError(f"the weight-only export found {replaced} of {expected} quantized weights in the graph",
                        "report the model (its weights are shared or transformed in the exported graph)")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def store_compressed_weights(model, module: nn.Module) -> int:
    """Replace each float weight initializer that is a quantized layer's weight (as stored, or
    transposed for a MatMul) by its codes and a DequantizeLinear. Returns the count."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    layers = weight_only_layers(module)
    by_bytes = {}
    for name, layer in layers.items():
        w = layer.weight.detach().float().numpy()
        by_bytes[(w.shape, w.tobytes())] = (name, False)
        if w.ndim == 2:
            wt = np.ascontiguousarray(w.T)
            by_bytes[(wt.shape, wt.tobytes())] = (name, True)
    inits = {i.name: i for i in graph.initializer}
    new_nodes, new_inits, removed, count = [], [], set(), 0
    for init_name, init in list(inits.items()):
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.float32:
            continue
        hit = by_bytes.get((arr.shape, np.ascontiguousarray(arr).tobytes()))
        if hit is None:
            continue
        name, transposed = hit
        layer = layers[name]
        codes = layer.codes().numpy().astype(np.uint8 if layer.asymmetric else np.int8)
        scale = layer.weight_scale.detach().float().numpy()
        zero = layer.zero.numpy() if layer.asymmetric else None
        attrs = {}
        if layer.group_size:  # (out, in) codes, (out, in/g) scales: blocked along the input axis
            if transposed:  # MatMul B is (in, out): block along axis 0
                codes, scale = codes.T, scale.T
                zero = zero.T if zero is not None else None
                attrs = {"axis": 0, "block_size": layer.group_size}
            else:  # Gemm transB / as stored: block along axis 1
                attrs = {"axis": 1, "block_size": layer.group_size}
        else:
            if transposed:
                codes = codes.T
            attrs = {"axis": 1 if transposed else 0}
        # asymmetric groups: uint4 codes and a uint4 zero point per block (ORT fuses them into MatMulNBits
        # with zero points, OpenVINO keeps u4 constants with a Subtract in its decompression)
        dtype = {(4, False): TensorProto.INT4, (8, False): TensorProto.INT8,
                 (4, True): TensorProto.UINT4, (8, True): TensorProto.UINT8}[(layer.wbits, layer.asymmetric)]
        q_name, s_name = f"{init_name}_q{layer.wbits}", f"{init_name}_scale"
        new_inits.append(helper.make_tensor(q_name, dtype, list(codes.shape), pack_codes(codes, layer.wbits), raw=True))
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(scale.astype(np.float32)), s_name))
        inputs = [q_name, s_name]
        if zero is not None:
            inputs.append(f"{init_name}_zero_point")
            new_inits.append(helper.make_tensor(inputs[-1], dtype, list(zero.shape), pack_codes(zero, layer.wbits), raw=True))
        new_nodes.append(helper.make_node("DequantizeLinear", inputs, [init_name], name=f"{name}/DequantizeLinear", **attrs))
        removed.add(init_name)
        count += 1
    keep = [i for i in graph.initializer if i.name not in removed]
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)  # constants first: topological order holds
    return count


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Raw bytes of an ONNX INT4/UINT4 (two codes a byte, the first in the low nibble) or INT8/UINT8 tensor."""
    flat = np.ascontiguousarray(codes).reshape(-1)
    flat = flat.astype(np.uint8 if flat.dtype == np.uint8 else np.int8)
    if bits == 8:
        return flat.tobytes()
    nib = (flat.astype(np.uint8) & 0x0F)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def ir_weight_types(model) -> dict[str, int]:
    """Element types of the OpenVINO model's constants that feed a Convert (compressed weights), counted."""
    counts: dict[str, int] = {}
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        t = op.get_output_element_type(0).get_type_name()
        users = [i.get_node().get_type_name() for i in op.output(0).get_target_inputs()]
        if "Convert" in users and t in ("i4", "u4", "i8", "u8"):
            counts[t] = counts.get(t, 0) + 1
    return counts


def openvino_checks(record: dict):
    """Runtime check for an OpenVINO session of a weight-only model: the IR it compiled keeps
    int4/int8 weight constants (not decompressed to f32 at conversion)."""
    wanted = ("u" if record["weight_only"].get("asymmetric") else "i") + ("4" if record["weight_only"]["wbits"] == 4 else "8")

    def check(session) -> dict:
        import openvino as ov

        types = ir_weight_types(ov.Core().read_model(str(session.path)))
        out = {"compressed_weight_constants": types, "failures": []}
        if not types.get(wanted):
            out["failures"].append(f"the OpenVINO model holds no {wanted} weight constants: the compression was lost")
        return out

    return check
