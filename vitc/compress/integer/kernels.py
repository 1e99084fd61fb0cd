"""Integer kernels: pure functions on integer tensors, after I-BERT, I-ViT and I-Segmenter.

Every function takes and returns integer tensors (int64 for arithmetic, int8/uint8/int32 for
storage) and never touches a float tensor: the float scales they stand for are turned into
integer constants (dyadic multipliers ``m / 2**s``, fixed-point polynomial coefficients)
when the model is converted, by the ``*_constants`` helpers below, which are the only
functions here that take Python floats.

Rounding conventions are part of the contract, because the ONNX export must reproduce
them bit for bit: right shifts round half up (``floor((x + 2**(s-1)) / 2**s)``), and
integer divisions of non-negative numbers floor. ``vitc.export.integer_onnx`` emits the
same arithmetic with ONNX Runtime's truncating ``Div``.

Maximum errors stated in the docstrings are checked in ``tests/test_integer_kernels.py``.
"""
from __future__ import annotations

import math

import torch

LOG2E = 1.4426950408889634
EXP_FRAC_BITS = 16  # fixed-point fraction bits of the exp2 argument and result
# 2**-f ~= 1 + c1*f + c2*f**2 on [0, 1), minimax fit (max abs error 1.25e-3)
EXP2_POLY = (0.99875778, -0.66951553, 0.17199996)
SIGMOID_BITS = 15  # fraction bits of the integer sigmoid in ShiftGELU / SiLU / hardswish
ISQRT_STEPS = 6  # Newton steps after the power-of-two initial guess; enough for n < 2**62


# ---------------------------------------------------------------- dyadic arithmetic

def dyadic(scale: float | list[float] | torch.Tensor, multiplier_bits: int = 24) -> tuple[torch.Tensor, int]:
    """Approximate a positive real scale (or a vector of them) as ``m / 2**shift``.

    One shift serves the whole vector, chosen so the largest multiplier has
    ``multiplier_bits`` bits; smaller channels keep fewer bits but their relative error
    stays below ``2**-(multiplier_bits - 1 - log2(max/min))``.
    """
    t = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
    if not bool((t > 0).all()) or not bool(torch.isfinite(t).all()):
        raise ValueError("dyadic scales must be positive and finite")
    top = float(t.max())
    shift = max(0, min(60, multiplier_bits - 1 - math.floor(math.log2(top))))
    m = torch.round(t * 2.0 ** shift).to(torch.int64).clamp_min(1)
    return (m if m.numel() > 1 else m.reshape(())), shift


def rshift_round(x: torch.Tensor, shift: int) -> torch.Tensor:
    """``floor((x + 2**(shift-1)) / 2**shift)``: division by a power of two, rounding half up."""
    if shift <= 0:
        return x
    return (x + (1 << (shift - 1))) >> shift


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, shift: int, lo: int, hi: int) -> torch.Tensor:
    """Dyadic requantization (I-BERT): ``clamp(round(acc * m / 2**shift), lo, hi)`` as int64.

    ``multiplier`` is a scalar or a per-channel vector over the last dimension.
    """
    return rshift_round(acc.to(torch.int64) * multiplier, shift).clamp(lo, hi)


def aligned_add(a: torch.Tensor, a_multiplier: torch.Tensor, a_shift: int, b: torch.Tensor, b_multiplier: torch.Tensor,
                b_shift: int, lo: int, hi: int) -> torch.Tensor:
    """Residual addition of two integer tensors with different scales.

    Each operand is brought to the output scale by its own dyadic multiplier before the
    add, so ``a*sa + b*sb ~= out*so`` within one output step (each operand rounds once).
    """
    return (rshift_round(a.to(torch.int64) * a_multiplier, a_shift)
            + rshift_round(b.to(torch.int64) * b_multiplier, b_shift)).clamp(lo, hi)


def floor_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Floor division of int64 tensors (b > 0)."""
    return torch.div(a, b, rounding_mode="floor")


# ---------------------------------------------------------------- exp2, softmax, sigmoid, GELU

def exp2_constants() -> tuple[int, int, int]:
    one = 1 << EXP_FRAC_BITS
    return tuple(int(round(c * one)) for c in EXP2_POLY)  # type: ignore[return-value]


def shift_exp2(neg: torch.Tensor) -> torch.Tensor:
    """``2**(-neg / 2**16) * 2**16`` for int64 ``neg >= 0`` (I-ViT's ShiftExp, with a quadratic fraction).

    The integer part of the exponent becomes a right shift; the fraction ``f`` in [0, 1) is
    a quadratic polynomial in fixed point (I-ViT uses ``1 - f/2``; the quadratic of I-BERT's
    i-exp cuts the error from 6% to 0.13%). Every intermediate is non-negative, so the ONNX
    graph runs it in uint64 without offsets. Max abs error: 1.3e-3 of 1.0.
    """
    c0, c1, c2 = exp2_constants()
    whole = neg >> EXP_FRAC_BITS
    frac = neg - (whole << EXP_FRAC_BITS)
    poly = c0 - ((-c1 * frac) >> EXP_FRAC_BITS) + ((((c2 * frac) >> EXP_FRAC_BITS) * frac) >> EXP_FRAC_BITS)
    return poly >> whole.clamp_max(62)


def log2_multiplier(scale: float, factor: float = 1.0) -> tuple[torch.Tensor, int]:
    """Dyadic multiplier taking an integer of scale ``scale`` to the exp2 argument of ``factor * x``."""
    return dyadic(scale * factor * LOG2E * (1 << EXP_FRAC_BITS))


def shiftmax(x: torch.Tensor, multiplier: torch.Tensor, shift: int, levels: int = 255) -> torch.Tensor:
    """Softmax over the last dimension of integer logits, as integers in [0, levels] (scale 1/levels).

    ``multiplier / 2**shift`` (from ``log2_multiplier(scale)``) maps the logits' integer
    units to the fixed-point base-2 exponent, so ``e**(x*s) = 2**(x*s*log2 e)`` is a shift
    plus a small polynomial (``shift_exp2``), and the normalisation is one integer division
    (I-ViT's Shiftmax). Max abs error against float softmax: 3 / 255 in probability.
    """
    below_max = x.amax(-1, keepdim=True).to(torch.int64) - x.to(torch.int64)
    e = shift_exp2(rshift_round(below_max * multiplier, shift))
    total = e.sum(-1, keepdim=True)
    return floor_div(e * levels + (total >> 1), total)


EXP_TABLE_MAX = 1 << 22  # longest exponential table Shiftmax is given; beyond it the arithmetic runs


def shiftmax_table(multiplier: torch.Tensor, shift: int) -> torch.Tensor | None:
    """Shiftmax's exponential for every logit gap ``d = max - x``: ``shift_exp2(rshift_round(d * m, shift))``.

    The gap is a non-negative integer and the value is 0 once the exponent has 16 whole
    bits (``shift_exp2``'s polynomial is below ``2**16``), so ``table[min(d, len - 1)]`` *is*
    the kernel, not an approximation of it: one lookup instead of a dozen int64 ops per
    attention score. None when the table would pass ``EXP_TABLE_MAX`` entries (tiny scales).
    """
    m = int(multiplier)
    last = -(-(16 << (EXP_FRAC_BITS + shift)) // m)  # the first gap whose exponent has 16 whole bits
    if last + 1 > EXP_TABLE_MAX:
        return None
    table = shift_exp2(rshift_round(torch.arange(last + 1, dtype=torch.int64) * m, shift))
    assert int(table[-1]) == 0
    return table


def shiftmax_lut(x: torch.Tensor, table: torch.Tensor, levels: int = 255) -> torch.Tensor:
    """``shiftmax`` with its exponential looked up in ``shiftmax_table``: the same integers, bit for bit."""
    below = (x.amax(-1, keepdim=True) - x).clamp_max(table.numel() - 1)
    e = table[below.to(torch.int64)]
    total = e.sum(-1, keepdim=True)
    return floor_div(e * levels + (total >> 1), total)


def shift_sigmoid(x: torch.Tensor, multiplier: torch.Tensor, shift: int) -> torch.Tensor:
    """``sigmoid(lambda * x * s)`` as an integer with ``SIGMOID_BITS`` fraction bits.

    ``multiplier / 2**shift`` comes from ``log2_multiplier(s, lambda)``. As in I-ViT's
    ShiftGELU, ``sigmoid(t) = e**(t - m) / (e**(t - m) + e**(-m))`` with ``m = max(t, 0)``,
    so both exponents are <= 0 and go through ``shift_exp2`` (as ``relu(-t)`` and ``relu(t)``). Max abs error: 1e-3.
    """
    z = rshift_round(x.to(torch.int64) * multiplier, shift)
    e1 = shift_exp2((-z).clamp_min(0))
    e0 = shift_exp2(z.clamp_min(0))
    den = e1 + e0
    return floor_div((e1 << SIGMOID_BITS) + (den >> 1), den)


def shift_gelu(x: torch.Tensor, multiplier: torch.Tensor, shift: int) -> torch.Tensor:
    """I-ViT's ShiftGELU: ``x * sigmoid(1.702 x)`` in integers.

    Returns ``x * sigmoid`` with scale ``s * 2**-SIGMOID_BITS`` (requantize it next).
    Constants: ``log2_multiplier(s, 1.702)``. Max abs error against exact GELU over
    x in [-8, 8]: 0.021 (the 1.702-sigmoid form itself is within 0.020 of GELU).
    """
    return x.to(torch.int64) * shift_sigmoid(x, multiplier, shift)


def lambda_for_range(lo: float, hi: float, points: int = 4001) -> float:
    """The sigmoid slope ``lambda`` of ``x * sigmoid(lambda x)`` that best fits GELU on [lo, hi].

    lambda-ShiftGELU (I-Segmenter) tunes the slope of ShiftGELU to the layer's actual,
    long-tailed input range instead of the fixed 1.702 fitted around zero; we pick it by a
    least-max-error search over the calibrated range. (Our reading of the paper: its exact
    formula was not available offline.)
    """
    x = torch.linspace(lo, hi, points, dtype=torch.float64)
    exact = torch.nn.functional.gelu(x)
    best, best_err = 1.702, float("inf")
    for lam in torch.linspace(1.55, 1.85, 61, dtype=torch.float64).tolist():
        err = float((x * torch.sigmoid(lam * x) - exact).abs().max())
        if err < best_err:
            best, best_err = lam, err
    return best


def lambda_shift_gelu(x: torch.Tensor, multiplier: torch.Tensor, shift: int) -> torch.Tensor:
    """lambda-ShiftGELU: ShiftGELU with a calibrated sigmoid slope (``lambda_for_range``).

    Same arithmetic as ``shift_gelu``; only the constants differ (``log2_multiplier(s,
    lambda)``). Max abs error against exact GELU over x in [-8, 8] with the fitted lambda: 0.020.
    """
    return shift_gelu(x, multiplier, shift)


def int_silu(x: torch.Tensor, multiplier: torch.Tensor, shift: int) -> torch.Tensor:
    """SiLU ``x * sigmoid(x)`` (constants ``log2_multiplier(s, 1.0)``); scale ``s * 2**-SIGMOID_BITS``.

    Max abs error against float SiLU over x in [-8, 8]: 0.01.
    """
    return x.to(torch.int64) * shift_sigmoid(x, multiplier, shift)


def hardswish_constant(scale: float) -> int:
    """3 in the input's integer units, for ``int_hardswish``."""
    return int(round(3.0 / scale))


def int_hardswish(x: torch.Tensor, three: int) -> torch.Tensor:
    """hardswish ``x * relu6(x + 3) / 6``: exact integer arithmetic, no approximation.

    ``three`` is 3 in input units (``round(3/s)``). Returns ``x * clamp(x + 3, 0, 6)`` with
    scale ``s * s / 6``; the 1/6 and ``s`` fold into the next requantization. Max abs error:
    only the rounding of 3/s (0 when 3/s is an integer), i.e. <= s/2 * 1 in the gate.
    """
    x = x.to(torch.int64)
    return x * (x + three).clamp(0, 2 * three)


# ---------------------------------------------------------------- LayerNorm

def isqrt(n: torch.Tensor) -> torch.Tensor:
    """Integer square root ``floor(sqrt(n))`` of int64 ``n`` in [0, 2**62) (1 for n = 0).

    I-BERT's Newton iteration, made fixed-length for a static graph: a power-of-two
    initial guess from the bit length (``2**b >= sqrt(n)``), then ``ISQRT_STEPS`` steps of
    ``x <- min(x, (x + n // x) // 2)``, which decreases monotonically to the floor root
    and stays there. Exact (error 0) over the whole range.
    """
    n = n.to(torch.int64)
    powers4 = torch.tensor([1 << (2 * i) for i in range(31)], dtype=torch.int64)
    bits = (n.unsqueeze(-1) >= powers4).sum(-1)
    x = torch.ones_like(n) << bits
    for _ in range(ISQRT_STEPS):
        y = (x + n // x) >> 1
        x = torch.minimum(x, y).clamp_min(1)
    return x


NORM_FRAC_BITS = 12  # fraction bits of the normalised value (x - mean) / std


def layernorm_pre_shift(input_bits: int, dim: int) -> int:
    """The largest pre-shift that keeps ``sum((x - mean) << p)**2`` below 2**61 for ``input_bits``-bit inputs."""
    return max(0, min(16, (61 - 2 * input_bits - math.ceil(math.log2(dim))) // 2))


def int_layernorm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, pre_shift: int) -> torch.Tensor:
    """I-ViT's integer LayerNorm over the last dimension (integer mean, variance and sqrt).

    ``x`` is any integer tensor; it is shifted up by ``pre_shift`` bits (``layernorm_pre_shift``)
    before the mean and variance, so neither the integer mean nor ``isqrt`` loses precision
    for low-bit inputs. Returns ``((x - mean) / std * 2**12) * gamma + beta`` where
    ``gamma``/``beta`` are int64 with ``gamma = round(g * 2**k)`` and
    ``beta = round(b * 2**(12 + k))``: the result has scale ``2**-(12 + k)`` (requantize it
    next). The epsilon is dropped (I-ViT): it is far below one integer unit of the
    variance. Max abs error of the normalised value against float LayerNorm of the same
    integers, for 8- and 16-bit inputs: 2.5e-4 (the 2**-12 step).
    """
    x = x.to(torch.int64)
    dim = x.shape[-1]
    x = x << pre_shift
    mean = floor_div(x.sum(-1, keepdim=True) + dim // 2, torch.tensor(dim))
    c = x - mean
    var = floor_div((c * c).sum(-1, keepdim=True), torch.tensor(dim))
    std = isqrt(var).clamp_min(1)
    norm = floor_div((c << NORM_FRAC_BITS) + (std >> 1), std)
    return norm * gamma + beta


# ---------------------------------------------------------------- convolutions

def fold_batchnorm(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                   gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it (float, at conversion time)."""
    inv = gamma / torch.sqrt(var + eps)
    w = weight * inv.reshape(-1, *([1] * (weight.dim() - 1)))
    b = (bias if bias is not None else torch.zeros_like(mean)) * inv + beta - mean * inv
    return w, b


def int_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int = 1, padding: int = 0,
               groups: int = 1) -> torch.Tensor:
    """Integer convolution (NCHW int8 input, OIHW int8 weight, int32 bias) -> int32 accumulator.

    Weight and bias come from a BatchNorm-folded float conv (``fold_batchnorm``) quantized
    per output channel; the accumulator is exact (integer im2col and matmul), so the only
    error is the quantization of the operands. Padding is with zeros (symmetric quantization
    has zero point 0).
    """
    n, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    xp = torch.nn.functional.pad(x.to(torch.int32), (padding, padding, padding, padding))
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    cols = torch.stack([xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                        for i in range(kh) for j in range(kw)], dim=2)  # N, Cin, kh*kw, oh, ow
    cols = cols.reshape(n, groups, cin_g * kh * kw, oh * ow)
    wg = weight.to(torch.int32).reshape(groups, cout // groups, cin_g * kh * kw)
    out = torch.matmul(wg.unsqueeze(0), cols)  # N, G, Cout/G, oh*ow
    return out.reshape(n, cout, oh, ow) + bias.to(torch.int32).reshape(1, -1, 1, 1)
