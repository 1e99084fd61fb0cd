"""Quantizers as pure functions on tensors.

Uniform quantizers go through ``torch.fake_quantize_per_tensor_affine`` /
``..._per_channel_affine`` so that the ONNX exporter turns them into QuantizeLinear /
DequantizeLinear pairs (real int8 kernels downstream). The ViT-specific quantizers are written
in plain tensor ops, which export as the same arithmetic (exact parity, float kernels):

* ``fake_quant_log2``: post-softmax values in (0, 1] on a power-of-two grid, ``2**-q``, on a
  power-of-sqrt(2) grid (RepQ-ViT's log-sqrt(2)), where most attention probabilities live, or on
  a grid of any step in log2 units, ``2**(-q * step)`` (``adaptive_log_step`` picks it: AdaLog's
  adaptive base);
* ``fake_quant_twin``: PTQ4ViT's twin-uniform quantizer for post-GELU values: a fine grid for the
  small negative part and a coarse grid, a power-of-two multiple of it, for the long positive tail.
"""
from __future__ import annotations

import math

import torch


def int_range(bits: int, symmetric: bool, restricted: bool = False) -> tuple[int, int]:
    """Integer limits: signed for symmetric (``restricted`` drops -2**(b-1) so that the grid is
    symmetric about zero, as weights use), unsigned for asymmetric."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return (-qmax if restricted else -qmax - 1), qmax
    return 0, 2 ** bits - 1


def uniform_qparams(lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int, symmetric: bool,
                    restricted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the grid covering [lo, hi].

    Symmetric grids have zero point 0 (zeros stay exactly zero); asymmetric zero points are
    rounded and clamped into the unsigned range, so they never overflow their integer type.
    """
    lo = torch.as_tensor(lo, dtype=torch.float32).clamp_max(0.0)
    hi = torch.as_tensor(hi, dtype=torch.float32).clamp_min(0.0)
    qmin, qmax = int_range(bits, symmetric, restricted)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
        scale = scale.clamp_min(1e-8)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-8)
    zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
               axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` on a uniform grid, per tensor (``axis`` None) or per channel."""
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale.float(), zero.to(torch.int32), axis % x.dim(), qmin, qmax)


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                 axis: int | None = None) -> torch.Tensor:
    """The integer codes of ``x`` (int32), for saving and exporting."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis % x.dim()] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return torch.clamp(torch.round(x / scale) + zero, qmin, qmax).to(torch.int32)


def fake_quant_log2(x: torch.Tensor, bits: int, sqrt2: bool = False, step: float | None = None) -> torch.Tensor:
    """Post-softmax log quantizer: ``q = round(-log2(x) / step)``, ``x' = 2**(-q * step)``; ``step`` is
    1 (log2), 1/2 (``sqrt2``: log-sqrt(2)) or any positive value (the adaptive grid).

    Values whose code would exceed ``2**bits - 1`` become 0: the grid reserves its last
    level for "negligible", as PTQ4ViT and RepQ-ViT do.
    """
    step = step if step is not None else (0.5 if sqrt2 else 1.0)
    levels = 2 ** bits - 1
    q = torch.round(-torch.log2(x.clamp_min(1e-30)) / step).clamp_min(0)
    out = torch.exp2(-q * step).masked_fill(q >= levels, 0.0)
    if x.requires_grad:
        # straight-through gradient, as the uniform fake-quant has: round() alone passes none, which
        # left block reconstruction no gradient into q/k projections behind a log-quantized softmax
        return x + (out - x).detach()
    return out


# candidate steps (log2 units per code) of the adaptive log grid: from finer than log-sqrt(2) to
# coarser than log2
LOG_STEPS = tuple(round(0.25 + 0.05 * i, 2) for i in range(26))


def log_mass_lost(values: torch.Tensor, bits: int, step: float) -> float:
    """The share of the probability mass (the sum of ``values``) that a log grid of ``step`` rounds to 0."""
    x = values.float().reshape(-1)
    zeroed = torch.round(-torch.log2(x.clamp_min(1e-30)) / step) >= 2 ** bits - 1
    return float(x[zeroed].sum() / x.sum().clamp_min(1e-30))


def adaptive_log_step(values: torch.Tensor, bits: int, steps=LOG_STEPS) -> tuple[float, dict[float, float]]:
    """The log grid's step that loses the least probability mass, ``mean |x - x'|`` over ``values``
    (a sample of the attention probabilities), with the errors of every candidate.

    Why mass (L1) and not squared error: probabilities multiply V, and a probability rounded to 0
    or halved moves the output by its share of V however small it is; squared error weighs only the
    few large probabilities. On zoo:dinov2s-c10 (257 tokens, 10 blocks, 4 bits, 8 images) the mass
    error picked the step that minimised the relative error of ``P @ V`` itself in 6 of 10 blocks and
    came within 10% of that error in the other 4, where squared error picked steps 3.6-28x worse. With 257 tokens the
    probabilities sit near 1/257 = 2**-8, below log-sqrt(2)'s last 4-bit level (2**-7): that grid
    rounds 19-32% of each block's probability mass to 0 (relative ``P @ V`` error 0.06-0.19 per block,
    against 0.002-0.010 here).
    """
    x = values.float().reshape(-1)
    errors = {s: float((fake_quant_log2(x, bits, step=s) - x).abs().mean()) for s in steps}
    return min(errors, key=errors.get), errors


def twin_scales(neg_min: float, pos_max: float, bits: int) -> tuple[float, float]:
    """Scales of the twin-uniform grid: the negative grid just covers ``neg_min``; the positive
    grid covers ``pos_max`` with a scale that is a power-of-two multiple of the negative one."""
    half = 2 ** (bits - 1) - 1
    neg = max(abs(neg_min), 1e-8) / half
    pos = max(pos_max, 1e-8) / half
    ratio = max(0, math.ceil(math.log2(pos / neg)))
    return neg, neg * 2.0 ** ratio


def fake_quant_twin(x: torch.Tensor, neg_scale: float, pos_scale: float, bits: int) -> torch.Tensor:
    """Twin-uniform quantize-dequantize: one sign bit picks the grid, ``bits - 1`` bits the level."""
    half = 2 ** (bits - 1) - 1
    neg = torch.clamp(torch.round(x / neg_scale), -half, 0) * neg_scale
    pos = torch.clamp(torch.round(x / pos_scale), 0, half) * pos_scale
    return torch.where(x < 0, neg, pos)


def weight_qparams(w: torch.Tensor, bits: int, search: bool = True, candidates: int = 64) -> torch.Tensor:
    """Per-output-channel symmetric scales (zero point 0) of a weight, axis 0.

    With ``search``, each channel's clipping range is the shrinking of its max |w| with the
    least squared error (all channels and candidates evaluated at once).
    """
    qmin, qmax = int_range(bits, True, restricted=True)
    flat = w.detach().reshape(w.shape[0], -1).float()
    amax = flat.abs().amax(1).clamp_min(1e-8)
    if not search:
        return amax / qmax
    ratios = torch.linspace(0.5, 1.0, candidates)
    scales = (amax[:, None] * ratios[None, :] / qmax)  # (C, R)
    # chunk the candidates so that a large layer does not build a C x K x R tensor at once
    best_err = torch.full((flat.shape[0],), math.inf)
    best = amax / qmax
    for r in range(0, candidates, 16):
        s = scales[:, r:r + 16, None]  # (C, r, 1)
        q = torch.clamp(torch.round(flat[:, None, :] / s), qmin, qmax) * s
        err = ((q - flat[:, None, :]) ** 2).sum(-1)
        e, i = err.min(1)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best = torch.where(better, s[torch.arange(s.shape[0]), i, 0], best)
    return best


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = int_range(bits, True, restricted=True)
    return fake_quant(w, scale, torch.zeros_like(scale, dtype=torch.int32), qmin, qmax, axis=0)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    noise = (reference.double() - approx.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)
