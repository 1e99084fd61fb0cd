"""Function-preserving reparameterisations, as pure functions on weights.

* ``fold_bn``: a BatchNorm after a conv folded into the conv's weight and bias.
* ``fold_channel_affine``: rewrite a LayerNorm's output ``X`` as ``(X + t) / r`` per channel,
  absorbing the change into the LayerNorm affine and the consuming Linears, so the float
  function is unchanged. Two choices of ``(r, t)``:

  - ``repq_factors`` (RepQ-ViT): ``r`` and ``t`` turn per-channel asymmetric quantization
    parameters into one per-tensor scale and zero point (``centred_factors``: the same for a
    symmetric per-tensor grid);
  - ``smooth_factors`` (SmoothQuant with MPTQ-ViT's bias term): centre each channel, then move
    part of its range into the weights (``alpha`` of the difficulty).
* ``corrected_bias``: bias correction, the expected output shift of quantized weights
  (``(W - W_q) E[x]``) added back.
"""
from __future__ import annotations

import torch


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn_mean: torch.Tensor, bn_var: torch.Tensor,
            bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None, eps: float,
            out_axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``out_axis``: the weight's output-channel axis (1 for a transposed conv's (I, O, ...) kernel)."""
    gamma = bn_weight if bn_weight is not None else torch.ones_like(bn_mean)
    beta = bn_bias if bn_bias is not None else torch.zeros_like(bn_mean)
    factor = gamma / torch.sqrt(bn_var + eps)
    b = bias if bias is not None else torch.zeros_like(bn_mean)
    shape = [1] * weight.dim()
    shape[out_axis] = -1
    return weight * factor.reshape(shape), (b - bn_mean) * factor + beta


def repq_factors(ch_lo: torch.Tensor, ch_hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT: per-channel asymmetric (scale s, zero z) -> per-tensor (mean s, mean z).

    Returns ``(r, t)`` with ``r = s / mean(s)`` and ``t = s * (z - round(mean(z)))``.
    """
    levels = 2 ** bits - 1
    lo, hi = ch_lo.clamp_max(0.0).double(), ch_hi.clamp_min(0.0).double()
    s = ((hi - lo) / levels).clamp_min(1e-8)
    z = torch.round(-lo / s)
    r = s / s.mean()
    t = s * (z - torch.round(z.mean()))
    return r.float(), t.float()


def centred_factors(ch_lo: torch.Tensor, ch_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RepQ-ViT for a symmetric grid (the integer-only model's): centre each channel (``t = -centre``)
    and bring its half-range to the mean half-range (``r = half / mean(half)``), so one symmetric
    per-tensor grid fits every channel."""
    centre = (ch_lo + ch_hi) / 2
    half = ((ch_hi - ch_lo) / 2).clamp_min(1e-5)
    return half / half.mean(), -centre


def smooth_factors(ch_lo: torch.Tensor, ch_hi: torch.Tensor, weight_absmax: torch.Tensor,
                   alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SmoothQuant with a per-channel shift (MPTQ-ViT): ``t = -centre``, ``r = amax^a / wmax^(1-a)``."""
    centre = (ch_lo + ch_hi) / 2
    amax = ((ch_hi - ch_lo) / 2).clamp_min(1e-5)
    r = amax.pow(alpha) / weight_absmax.clamp_min(1e-5).pow(1 - alpha)
    return r.clamp_min(1e-5), -centre


def fold_channel_affine(norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                        consumers: list[tuple[torch.Tensor, torch.Tensor | None]], r: torch.Tensor, t: torch.Tensor):
    """New (norm weight, norm bias, [(W, b), ...]) such that the norm emits ``(X + t) / r`` and each
    consumer ``W x + b`` computes what it computed on ``X``."""
    new_nw = norm_weight / r
    new_nb = (norm_bias + t) / r
    out = []
    for w, b in consumers:
        bias = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        out.append((w * r[None, :], bias - w @ t))
    return new_nw, new_nb, out


def corrected_bias(w_float: torch.Tensor, w_quant: torch.Tensor, bias: torch.Tensor | None,
                   input_mean: torch.Tensor) -> torch.Tensor:
    """``b + (W - W_q) E[x]``; for convs ``E[x]`` is per input channel, summed over the kernel window."""
    delta = (w_float - w_quant)
    if delta.dim() == 4:
        if delta.shape[1] != input_mean.numel():  # grouped conv: each group sees its own channels
            groups = input_mean.numel() // delta.shape[1]
            per_out = input_mean.reshape(groups, -1).repeat_interleave(delta.shape[0] // groups, 0)
            shift = (delta.sum((2, 3)) * per_out).sum(1)
        else:
            shift = delta.sum((2, 3)) @ input_mean
    else:
        shift = delta @ input_mean
    b = bias if bias is not None else torch.zeros(w_float.shape[0], dtype=w_float.dtype)
    return b + shift


def norm_factors(ch_lo: torch.Tensor, ch_hi: torch.Tensor, weight_absmax: torch.Tensor, abits: int,
                 smooth_alpha: float | None, repq: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(r, t)`` a norm's output is rewritten with: SmoothQuant (when ``smooth_alpha``) then
    RepQ-ViT (when ``repq``), composed into one ``(X + t) / r``, from the output's per-channel range."""
    r, t = torch.ones_like(ch_lo), torch.zeros_like(ch_lo)
    lo, hi = ch_lo, ch_hi
    if smooth_alpha is not None:
        r, t = smooth_factors(lo, hi, weight_absmax, smooth_alpha)
        lo, hi = (lo + t) / r, (hi + t) / r
    if repq:
        r2, t2 = repq_factors(lo, hi, abits)
        t, r = t + t2 * r, r * r2  # (X + t)/r then (. + t2)/r2
    return r, t
