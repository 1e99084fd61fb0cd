"""Calibrate a float ViT and turn it into an ``IntViT`` (training-free).

Two steps with a plain boundary between them, so activation ranges from another calibrator
(the W8A8 pass) can replace ours: ``calibrate(float_vit, batches) -> {tap: range}`` and
``build(float_vit, ranges, ...) -> IntViT``. A range is the absolute value mapped to the
largest integer (symmetric quantization: ``scale = range / (2**(bits-1) - 1)``).
"""
from __future__ import annotations

import math
import torch

from vitc.errors import VitcError

from . import kernels as K
from .program import IntActivation, IntBlock, IntConv, IntHeadPart, IntLinear, IntNorm, IntViT, Requant, ResidualAdd
from .reference import FloatViT, Linear, Norm

INT32_MAX = 2**31 - 1
INT64_SAFE = 2**60  # the ONNX graph adds a 2**61 offset before its unsigned shifts
MAX_NORM_WIDTH = 16000  # LayerNorm rows the ONNX graph's lifted division covers
RESIDUAL_TAPS = ("embed", "residual1", "residual2")

ACT_INPUT_TAP = "fc1"  # the MLP activation's input: a table index, never a matmul operand
UNIT_SIGMOID_MIN = -0.2784645427610738  # min over u of u * sigmoid(u) (at u = -1.2785)


def is_residual(tap: str) -> bool:
    return tap.rsplit(".", 1)[-1] in RESIDUAL_TAPS


def is_act_input(tap: str) -> bool:
    return tap.rsplit(".", 1)[-1] == ACT_INPUT_TAP


EXACT_FLOOR = {"gelu": -0.16997120747, "silu": UNIT_SIGMOID_MIN, "relu": 0.0}  # min of the float functions


def activation_slope(kind: str, gelu: str, in_range: float) -> float | None:
    """The sigmoid slope of the integer MLP activation kernel; None where the table holds the model's
    own function (``gelu="exact"``) or the activation is a ReLU."""
    if gelu == "exact" or kind == "relu":
        return None
    if kind == "silu":
        return 1.0
    return K.lambda_for_range(-in_range, in_range) if gelu == "lambda" else 1.702


def activation_floor(kind: str, slope: float | None) -> float:
    """The smallest output of the MLP activation: ``x * sigmoid(slope x)`` bottoms out at
    ``UNIT_SIGMOID_MIN / slope``; the exact functions (slope None) at ``EXACT_FLOOR``; ReLU at 0."""
    if kind == "relu":
        return 0.0
    return EXACT_FLOOR[kind] if slope is None else UNIT_SIGMOID_MIN / slope


def activation_grid(hi: float, floor: float, bits: int) -> tuple[float, int]:
    """The MLP activation's output grid: unsigned codes 0..2**bits-1 over [floor, hi] with a zero
    point, ``(scale, zero_point)``. The output of GELU/SiLU is almost all >= 0 (>= -0.28), so a
    symmetric grid would spend half its codes on values that never occur; with the zero point
    folded into fc2's bias the matmul is unchanged."""
    levels = 2 ** bits - 1
    scale = max(hi - floor, 1e-8) / levels
    return scale, int(round(-floor / scale))


def equalize_norms(model: FloatViT, batches: list[torch.Tensor]) -> tuple[FloatViT, list[str]]:
    """RepQ-ViT on every LayerNorm that feeds Linears (``norm1`` -> q/k/v, ``norm2`` -> fc1), for a
    symmetric grid (``reparam.centred_factors``): from each norm output's per-channel range on the
    calibration batches, rewrite the norm to emit centred, equal-range channels and fold the
    inverse into the consumers' weight columns and biases. The float function is unchanged (up to
    rounding); a per-tensor int8 grid then no longer spends its codes on a few wide channels
    (DINOv2's norm outputs reach 20-80 in a few channels and +-3 elsewhere). Returns the rewritten
    model and the names of the norms rewritten."""
    from dataclasses import replace

    from vitc.compress.quantize import reparam

    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def tap(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith((".norm1", ".norm2")):
            rows = t.reshape(-1, t.shape[-1]).double()
            lo[name] = torch.minimum(lo[name], rows.amin(0)) if name in lo else rows.amin(0)
            hi[name] = torch.maximum(hi[name], rows.amax(0)) if name in hi else rows.amax(0)
        return t

    with torch.no_grad():
        for x in batches:
            model.forward(x.float(), tap)
    blocks, done = [], []
    for i, b in enumerate(model.blocks):
        nb = replace(b)
        for norm, consumers in (("norm1", ("q", "k", "v")), ("norm2", ("fc1",))):
            r, t = reparam.centred_factors(lo[f"{i}.{norm}"], hi[f"{i}.{norm}"])
            g, beta, eps = getattr(b, norm)
            ng, nbeta, new = reparam.fold_channel_affine(
                g.double(), beta.double(), [tuple(v.double() for v in getattr(b, c)) for c in consumers], r, t)
            setattr(nb, norm, (ng.float(), nbeta.float(), eps))
            for c, (w, bias) in zip(consumers, new):
                setattr(nb, c, (w.float(), bias.float()))
            done.append(b.paths.get(norm, f"{b.name}.{norm}"))
        blocks.append(nb)
    return replace(model, blocks=blocks), done


def is_unsigned(tap: str) -> bool:
    """Stem taps follow a ReLU: quantized on [0, 2**bits - 1] (``build`` refuses a stem conv without one)."""
    return tap.startswith("stem.")


@torch.no_grad()
def calibrate(model: FloatViT, batches: list[torch.Tensor], method: str = "percentile", percentile: float = 99.99,
              act_bits: int = 8, act_input_bits: int = 8) -> dict[str, float]:
    """Symmetric activation ranges per tap, with the project's observers and calibrators.

    Two passes over the batches (extremes, then histograms). The input and the residual
    stream are always taken by min-max: the input is bounded, and the residual stream is
    quantized wide and must not clip; so is the MLP activation's input when it is wider than
    8 bits (``act_input_bits``). Other taps use ``method`` (minmax, percentile, mse,
    entropy) at ``act_bits``.
    """
    from vitc.calibration import observers as O

    obs: dict[str, O.Observer] = {}

    def tap(name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in obs:
            obs[name] = O.Observer(name)
        obs[name].update(t)
        return t

    for x in batches:
        model.forward(x.float(), tap)
    for o in obs.values():
        o.start_histogram()
    for x in batches:
        model.forward(x.float(), tap)
    out = {}
    for name, o in obs.items():
        how = "minmax" if name == "input" or is_residual(name) or (is_act_input(name) and act_input_bits > 8) \
            else method
        lo, hi = O.calibrate(o.histogram(), how, act_bits, True, percentile)
        out[name] = max(abs(lo), abs(hi), 1e-8)
    return out


class _Builder:
    def __init__(self, ranges: dict[str, float], weight_bits: int, act_bits: int, residual_bits: int, gelu: str,
                 act_input_bits: int = 8):
        self.ranges, self.gelu = ranges, gelu
        self.wq = 2 ** (weight_bits - 1) - 1
        self.aq = 2 ** (act_bits - 1) - 1
        self.rq = 2 ** (residual_bits - 1) - 1
        self.iq = 2 ** (act_input_bits - 1) - 1
        self.act_bits, self.weight_bits, self.residual_bits = act_bits, weight_bits, residual_bits
        self.act_input_bits = act_input_bits

    def scale(self, tap: str) -> float:
        if tap not in self.ranges:
            raise VitcError(f"no activation range for '{tap}'", "calibrate again, or pass a range for every tap")
        top = self.rq if is_residual(tap) else 2 * self.aq + 1 if is_unsigned(tap) else \
            self.iq if is_act_input(tap) else self.aq
        return self.ranges[tap] / top

    def act_range(self) -> tuple[int, int]:
        return -self.aq - 1, self.aq

    def res_range(self) -> tuple[int, int]:
        return -self.rq - 1, self.rq

    def linear(self, name: str, lin: Linear, in_scale: float, in_max: int | None = None) -> tuple[IntLinear, torch.Tensor]:
        """Per-output-channel symmetric weights; int32 bias at the accumulator scale; checks the accumulator.

        ``in_max``: the largest input magnitude (128 for int8, 255 for a ReLU's uint8).
        """
        in_max = in_max or self.aq + 1
        w, b = lin[0].double(), lin[1].double()
        sw = (w.abs().amax(1) / self.wq).clamp_min(1e-12)
        wq = torch.round(w / sw[:, None]).clamp(-self.wq - 1, self.wq).to(torch.int8)
        acc_scale = in_scale * sw
        bq = torch.round(b / acc_scale)
        worst = float(bq.abs().max()) + w.shape[1] * in_max * (self.wq + 1)
        if worst > INT32_MAX:
            raise VitcError(f"integer-only: the int32 accumulator of layer {name} can overflow at W{self.weight_bits}"
                            f"A{self.act_bits} (bound {worst:.3g} > 2**31 - 1: its bias is large against its "
                            "input and weight scales)", "calibrate with more representative data (wider input "
                            "range), or keep this model in W8A8 without --integer-only")
        return IntLinear(name, wq, bq.to(torch.int32)), acc_scale

    def requant(self, name: str, ratio, lo: int, hi: int, acc_bound: float) -> Requant:
        m, s = K.dyadic(ratio)
        if acc_bound * float(m.max()) >= INT64_SAFE:
            raise VitcError(f"integer-only: requantizing the output of layer {name} overflows int64 "
                            f"(multiplier {int(m.max())} >> {s})", "widen the activation range of that layer or keep W8A8")
        return Requant(m, s, lo, hi)

    def norm(self, name: str, norm: Norm, in_bits: int, out_tap: str, tokens: int = 0) -> tuple[IntNorm, int]:
        """The integer LayerNorm and its requantization to ``out_tap``'s grid; with ``tokens`` > 0, of the
        sum of that many rows' outputs (a patch-token mean: ``IntHeadPart``), and the shift that keeps that
        sum's product with the multiplier inside int64 (else 0)."""
        g, b, _ = (t.double() if isinstance(t, torch.Tensor) else t for t in norm)
        top = float(g.abs().max()) or 1.0
        k = max(0, min(30, 15 - math.ceil(math.log2(top))))
        gq = torch.round(g * 2.0 ** k).to(torch.int64)
        bq = torch.round(b * 2.0 ** (K.NORM_FRAC_BITS + k)).to(torch.int64)
        out_scale = self.scale(out_tap)
        dim = g.numel()
        if dim > MAX_NORM_WIDTH:
            raise VitcError(f"integer-only: LayerNorm {name} is {dim} wide, above the {MAX_NORM_WIDTH} the integer "
                            "LayerNorm supports", "keep this model in W8A8 without --integer-only")
        bound = (2 ** K.NORM_FRAC_BITS) * math.sqrt(dim) * float(gq.abs().max()) + float(bq.abs().max())
        ratio, sum_shift = 2.0 ** -(K.NORM_FRAC_BITS + k) / out_scale, 0
        if tokens:
            bound *= tokens
            # the 24-bit multiplier times the summed rows must stay below 2**60 (INT64_SAFE)
            sum_shift = max(0, math.ceil(math.log2(bound)) + 24 - 59)
            ratio, bound = ratio * 2.0 ** sum_shift / tokens, bound / 2.0 ** sum_shift + 1
        out = self.requant(name, ratio, *self.act_range(), bound)
        return IntNorm(name, gq, bq, K.layernorm_pre_shift(in_bits, dim), out), sum_shift

    def residual_add(self, name: str, a_scale: float, b_scale: torch.Tensor, b_bound: float, out_tap: str) -> ResidualAdd:
        so = self.scale(out_tap)
        a = self.requant(name, a_scale / so, 0, 0, self.rq + 1)
        b = self.requant(name, b_scale / so, 0, 0, b_bound)
        return ResidualAdd(a, b, *self.res_range())


def _acc_bound(lin: IntLinear, in_max: int) -> float:
    w = lin.weight.to(torch.int64).abs().sum(1)
    return float((w * in_max + lin.bias.to(torch.int64).abs()).max())


def build(model: FloatViT, ranges: dict[str, float], weight_bits: int = 8, act_bits: int = 8,
          residual_bits: int = 16, gelu: str = "lambda", act_input_bits: int = 8, prob_bits: int = 8) -> IntViT:
    """The integer ViT of ``model`` at the given widths, from per-tap activation ranges.

    ``act_input_bits``: the width of the MLP activation's input (fc1's requantized output), which
    only indexes the activation's table (2**bits entries), so it may be wider than ``act_bits``;
    ``prob_bits``: the attention probabilities' grid (above 8 bits they enter the probs x V matmul as
    two uint8 digits)."""
    prob_levels = 2 ** prob_bits - 1
    B = _Builder(ranges, weight_bits, act_bits, residual_bits, gelu, act_input_bits)
    s_in = B.scale("input")
    paths = model.paths
    stem, s_in_patch, in_max = [], s_in, B.aq + 1
    for j, conv in enumerate(model.stem):
        if conv.activation != "relu":
            raise VitcError(f"integer-only: conv {conv.name} of the stem has no ReLU after it; the integer stem "
                            "quantizes conv outputs as unsigned", "quantize without --integer-only")
        lin, acc = B.linear(conv.name, (_nhwc_kernel(conv.weight), conv.bias), s_in_patch, in_max)
        s_out = B.scale(f"stem.{j}")
        out = B.requant(conv.name, acc / s_out, 0, 2 * B.aq + 1, _acc_bound(lin, in_max))
        stem.append(IntConv(conv.name, lin.weight, lin.bias, conv.weight.shape[-1], conv.stride, conv.padding, out))
        s_in_patch, in_max = s_out, 2 * B.aq + 1
    patch_w = _nhwc_kernel(model.patch_weight) if model.stem else model.patch_weight.flatten(1)
    patch, patch_acc = B.linear(paths["patch"], (patch_w, model.patch_bias), s_in_patch, in_max)
    prefix_f = (model.cls + model.pos[:1]).double()
    ranges = dict(ranges)
    ranges["embed"] = max(ranges.get("embed", 0.0), float(prefix_f.abs().max()))
    B.ranges = ranges
    s_h = B.scale("embed")
    embed = B.residual_add(paths["patch"], s_h, patch_acc, _acc_bound(patch, in_max), "embed")
    pos = torch.round(model.pos[1:].double() / s_h).clamp(-B.rq - 1, B.rq).to(torch.int64)
    prefix = torch.round(prefix_f / s_h).clamp(-B.rq - 1, B.rq).to(torch.int64)
    lo, hi = B.act_range()
    blocks = []
    for i, fb in enumerate(model.blocks):
        t = lambda name, i=i: f"{i}.{name}"  # noqa: E731
        p = fb.paths
        norm1 = B.norm(p["norm1"], fb.norm1, residual_bits, t("norm1"))[0]
        s_x = B.scale(t("norm1"))
        lins, outs = {}, {}
        for key in ("q", "k", "v"):
            lins[key], acc = B.linear(p[key], getattr(fb, key), s_x)
            outs[key] = B.requant(p[key], acc / B.scale(t(key)), lo, hi, _acc_bound(lins[key], B.aq + 1))
        sm_mult, sm_shift = K.log2_multiplier(B.scale(t("q")) * B.scale(t("k")) / math.sqrt(fb.head_dim))
        s_ctx = B.scale(t("context"))
        ctx_out = B.requant(f"{fb.name} attention", B.scale(t("v")) / prob_levels / s_ctx, lo, hi,
                            float(model.pos.shape[0] * prob_levels * (B.aq + 1)))
        o, o_acc = B.linear(p["o"], fb.o, s_ctx)
        add1 = B.residual_add(p["o"], s_h, o_acc, _acc_bound(o, B.aq + 1), t("residual1"))
        s_h = B.scale(t("residual1"))
        norm2 = B.norm(p["norm2"], fb.norm2, residual_bits, t("norm2"))[0]
        fc1, fc1_acc = B.linear(p["fc1"], fb.fc1, B.scale(t("norm2")))
        s_f = B.scale(t("fc1"))
        fc1_out = B.requant(p["fc1"], fc1_acc / s_f, -B.iq - 1, B.iq, _acc_bound(fc1, B.aq + 1))
        act, s_a = _activation(B, fb, s_f, ranges[t("act")], ranges[t("fc1")], p["fc1"])
        levels = 2 ** act_bits - 1
        fc2, fc2_acc = B.linear(p["fc2"], fb.fc2, s_a, levels)
        if act.zero_point:  # unsigned codes u = c + z: fold -z * colsum(W) into the bias
            fc2.bias = (fc2.bias.to(torch.int64) - act.zero_point * fc2.weight.to(torch.int64).sum(1)).to(torch.int32)
        add2 = B.residual_add(p["fc2"], s_h, fc2_acc, _acc_bound(fc2, levels), t("residual2"))
        s_h = B.scale(t("residual2"))
        blocks.append(IntBlock(fb.name, fb.heads, fb.head_dim, norm1, lins["q"], lins["k"], lins["v"], outs["q"],
                               outs["k"], outs["v"], sm_mult, sm_shift, ctx_out, o, add1, norm2, fc1, fc1_out, act,
                               fc2, add2, K.shiftmax_table(sm_mult, sm_shift), prob_levels))
    head = []
    for part in model.head:
        norm, shift = B.norm(paths["final_norm"], part.norm, residual_bits, "features",
                             tokens=model.pos.shape[0] - 1 if part.pool == "mean" else 0)
        head.append(IntHeadPart(part.block, part.pool, norm, shift))
    # with a probe head the final norm on CLS is not computed: its tap was never observed
    final = None if head else B.norm(paths["final_norm"], model.final_norm, residual_bits, "final_norm")[0]
    cls, cls_acc = B.linear(paths["classifier"], model.classifier, B.scale("features" if head else "final_norm"))
    grid = int(round(model.pos[1:].shape[0] ** 0.5))
    side = grid * model.patch_size * math.prod(c.stride for c in model.stem)
    in_ch = model.stem[0].weight.shape[1] if model.stem else model.patch_weight.shape[1]
    return IntViT(input_scale=torch.tensor(s_in, dtype=torch.float32), patch_size=model.patch_size, patch=patch,
                  embed_add=embed, pos=pos, prefix=prefix, blocks=blocks, final_norm=final, classifier=cls,
                  logit_scale=cls_acc.float(), residual_bits=residual_bits,
                  meta={"weight_bits": weight_bits, "act_bits": act_bits, "residual_bits": residual_bits,
                        "act_input_bits": act_input_bits, "prob_bits": prob_bits, "gelu": gelu, "ranges": ranges},
                  stem=stem, image_size=side, in_channels=in_ch, head=head)


def _nhwc_kernel(w: torch.Tensor) -> torch.Tensor:
    """(out, in, k, k) -> (out, k*k*in) in (ky, kx, in) order, the order of ``im2col_nhwc``."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _activation(B: _Builder, block, s_in: float, out_range: float, in_range: float,
                name: str) -> tuple[IntActivation, float]:
    """The MLP activation on ``B.act_input_bits``-bit inputs, with unsigned outputs (``activation_grid``);
    returns it and its output scale.

    ``gelu="exact"``: the table holds the block's own activation (erf GELU, SiLU, ...) evaluated offline
    in float64 on every input integer and rounded to the output grid: at run time it is the same
    ``Gather`` as the integer kernels' table, so the model stays integer-only, without ShiftGELU's
    approximation error (on zoo:dinov2s-c10, replacing lambda-ShiftGELU by it took the integer graph's
    logit error from 0.215 to 0.177 of the logits' norm: ``benchmarks/results_integer_ablation_*``)."""
    from .reference import activation

    kind = block.activation
    lam = activation_slope(kind, B.gelu, in_range)
    s_out, zero = activation_grid(out_range, activation_floor(kind, lam), B.act_bits)
    lo, hi = -zero, 2 ** B.act_bits - 1 - zero
    top = B.iq + 1
    if lam is None and (kind != "relu" or B.gelu == "exact"):
        half = 1 << (B.act_input_bits - 1)
        x = torch.arange(-half, half, dtype=torch.float64) * s_in
        with torch.no_grad():
            y = activation(block, x).double()
        codes = torch.round(y / s_out).clamp(lo, hi).to(torch.int64) + zero
        return IntActivation("exact", torch.tensor(1), 0, None, B.act_input_bits, zero, codes), s_out
    if kind == "relu":
        act = IntActivation("relu", torch.tensor(1), 0, B.requant(name, s_in / s_out, lo, hi, top), B.act_input_bits, zero)
        return act, s_out
    m, s = K.log2_multiplier(s_in, lam)
    bound = top * 2.0 ** K.SIGMOID_BITS
    out = B.requant(name, s_in * 2.0 ** -K.SIGMOID_BITS / s_out, lo, hi, bound)
    return IntActivation("silu" if kind == "silu" else "gelu", m, s, out, B.act_input_bits, zero), s_out
