"""Importance of prunable units, as pure functions on tensors.

Every prunable unit is a set of channels that one or more layers produce and one or more
layers consume (an attention head is ``head_dim`` channels of q/k/v consumed by the output
projection; an MLP unit is one hidden channel; a conv unit one channel between two convs).
Scores are per channel and summed over a unit's channels (``per_unit``).

* magnitude: the L2 norm of every weight the channel owns (its rows in the producers, its
  BatchNorm scale, its columns in the consumers);
* activation: mean |input| of the channel at the consumer times the norm of the consumer's
  column for it (the structured form of Wanda's |W| x ||X||);
* taylor: first-order Taylor expansion of a distillation loss with respect to a gate on the
  unit (Molchanov et al. 2019): per image, (sum over positions of grad x activation)^2.
* attention sublayers: 1 - cos(X, X + Attn(X)) averaged over tokens ("What Matters in
  Transformers? Not All Attention is Needed", He et al. 2024); a sublayer whose output
  barely turns the residual stream is the first to go.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("magnitude", "activation", "taylor")


def owned_weight_norm(producers: list[torch.Tensor], consumers: list[torch.Tensor], scales: list[torch.Tensor] = ()) -> torch.Tensor:
    """L2 norm per channel of the producers' output rows, consumers' input columns and per-channel scales."""
    total = None
    for w in producers:
        sq = w.detach().float().reshape(w.shape[0], -1).pow(2).sum(1)
        total = sq if total is None else total + sq
    for w in consumers:
        sq = w.detach().float().transpose(0, 1).reshape(w.shape[1], -1).pow(2).sum(1)
        total = sq if total is None else total + sq
    for s in scales:
        sq = s.detach().float().pow(2)
        total = sq if total is None else total + sq
    return total.sqrt()


def column_norms(consumer_weight: torch.Tensor) -> torch.Tensor:
    """Norm of each input channel's weights in a consumer (Linear (out, in) or conv (out, in, kh, kw))."""
    w = consumer_weight.detach().float()
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)


def channel_abs_mean(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Mean |x| per channel over every other axis."""
    x = x.detach().float().abs().movedim(channel_dim, -1)
    return x.reshape(-1, x.shape[-1]).mean(0)


def gate_gradients(x: torch.Tensor, grad: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """d loss / d gate for a per-channel gate on ``x``, per image: sum over positions of grad * x -> (N, C)."""
    prod = (x.detach().float() * grad.detach().float()).movedim(channel_dim, -1)
    return prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1)


def taylor_from_gates(gate_grads: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Per-channel Taylor scores from (N, C) gate gradients: a unit's gate is the sum of its channels'."""
    n, c = gate_grads.shape
    per_unit = gate_grads.reshape(n, c // unit_size, unit_size).sum(-1).pow(2).sum(0)
    # spread back to channels so that per_unit() sums to the unit's score
    return (per_unit / unit_size).repeat_interleave(unit_size)


def per_unit(channel_scores: torch.Tensor, unit_size: int) -> torch.Tensor:
    return channel_scores.reshape(-1, unit_size).sum(1)


def keep_indices(unit_scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` highest-scored units, in their original order."""
    n_keep = max(0, min(int(n_keep), unit_scores.numel()))
    top = torch.topk(unit_scores.float(), n_keep, largest=True, sorted=False).indices
    return top.sort().values


def residual_turn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity between a sublayer's input X and its residual output Y = X + f(X)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    y = y.detach().float().reshape(-1, y.shape[-1])
    return 1.0 - F.cosine_similarity(x, y, dim=-1).mean()
