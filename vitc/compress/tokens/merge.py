"""Token reduction as pure functions on tensors.

Every method looks at one block's patch tokens and returns a ``Reduction``: a linear map over
the token axis, ``t -> W t`` with ``W`` of shape (kept, tokens), applied with *sum*
semantics. Applied to the token sizes it gives the new sizes (mass is preserved: every
column of ``W`` sums to one); applied to ``weight * x`` and divided by ``W weight`` it gives
the weighted average of the tokens that went into each output. This is Token Transforming's
view (every reducer is a token matrix): ToMe's matrix is 0/1, EViT-style pruning's has one
attention-weighted row, Token Transforming's is many-to-many.

``prefix`` tokens (CLS, distillation) lead the sequence ``apply`` takes and pass through
untouched; ``metric`` and ``scores`` cover the patch tokens only. Shapes are static for a
given ``r`` (no data-dependent sizes) and the graph is gathers, small one-hot matmuls and
TopK, so it exports to ONNX/OpenVINO as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Reduction:
    """``apply(t)`` maps (B, prefix + N, C) to (B, prefix + N - r, C) with sum semantics;
    ``weight`` (B, prefix + N, 1) or None says how tokens are weighted when averaged (None: by size)."""

    apply: Callable[[torch.Tensor], torch.Tensor]
    weight: torch.Tensor | None = None


def _flat(idx: torch.Tensor, offset: int, tokens: int) -> torch.Tensor:
    """Indices (B, K) into rows of a (B * tokens, C) view: one Gather per use, no (B, K, C) index."""
    batch = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * tokens
    return idx + (batch + offset)


def _rows(t: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return t.flatten(0, 1)[flat]


def _one_hot(idx: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., k) indices -> (..., k, n) one-hot, built from a comparison so that it exports everywhere."""
    return (idx.unsqueeze(-1) == torch.arange(n, device=idx.device)).to(dtype)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def bipartite_soft_matching(metric: torch.Tensor, r: int, prefix: int = 0) -> Reduction:
    """ToMe: split patch tokens alternately into sets A and B, join each A token to its most
    similar B token (cosine similarity of ``metric``), and merge the ``r`` most similar pairs.

    Output order: the prefix, the A tokens that stay, then all B tokens (merged ones included).
    """
    n = metric.shape[1]
    if not 0 <= r <= n // 2:
        raise ValueError(f"r={r} is out of range for {n} tokens (at most {n // 2})")
    metric = _normalize(metric)
    a, b = metric[:, ::2], metric[:, 1::2]
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    order = torch.topk(node_max, a.shape[1], dim=-1).indices  # most similar first
    src_idx, unm_idx = order[:, :r], order[:, r:]
    tokens = prefix + n
    unm = _flat(2 * unm_idx, prefix, tokens)
    src = _flat(2 * src_idx, prefix, tokens)
    into_b = _one_hot(node_idx.gather(1, src_idx), b.shape[1], metric.dtype).transpose(1, 2)  # (B, |B|, r)

    def apply(t: torch.Tensor) -> torch.Tensor:
        merged_b = t[:, prefix + 1::2] + into_b @ _rows(t, src)
        return torch.cat(([t[:, :prefix]] if prefix else []) + [_rows(t, unm), merged_b], dim=1)

    return Reduction(apply)


def attentive_pruning(scores: torch.Tensor, r: int, prefix: int = 0) -> Reduction:
    """EViT-style: keep the ``N - r - 1`` patch tokens the CLS token attends to most and fuse
    the rest into one token, weighted by that attention."""
    n = scores.shape[1]
    if not 0 <= r <= n - 2:
        raise ValueError(f"r={r} is out of range for {n} tokens (at most {n - 2})")
    order = torch.topk(scores, n, dim=-1).indices
    tokens = prefix + n
    keep = _flat(order[:, : n - r - 1], prefix, tokens)
    dropped = _one_hot(order[:, n - r - 1:] + prefix, tokens, scores.dtype).sum(1, keepdim=True)  # (B, 1, tokens)
    weight = torch.cat([scores.new_ones(scores.shape[0], prefix), scores], dim=1) if prefix else scores

    def apply(t: torch.Tensor) -> torch.Tensor:
        return torch.cat(([t[:, :prefix]] if prefix else []) + [_rows(t, keep), dropped @ t], dim=1)

    return Reduction(apply, weight=weight.unsqueeze(-1))


def token_transforming(metric: torch.Tensor, scores: torch.Tensor, r: int, k: int = 4,
                       temperature: float = 0.1, prefix: int = 0) -> Reduction:
    """Token Transforming (many-to-many): keep the ``N - r`` most attended patch tokens as
    targets and spread each of the ``r`` others over its ``k`` most similar targets (cosine
    similarity of ``metric``) with softmax(similarity / temperature) weights."""
    n = scores.shape[1]
    if not 0 <= r <= n - 1:
        raise ValueError(f"r={r} is out of range for {n} tokens (at most {n - 1})")
    m = n - r
    order = torch.topk(scores, n, dim=-1).indices
    metric = _normalize(metric)
    own = _flat(order, 0, n)
    sorted_metric = _rows(metric, own)
    sim = sorted_metric[:, m:] @ sorted_metric[:, :m].transpose(-1, -2)  # (B, r, m): sources x targets
    top, idx = torch.topk(sim, min(k, m), dim=-1)
    w = torch.softmax(top / temperature, dim=-1)
    spread = (_one_hot(idx, m, sim.dtype) * w.unsqueeze(-1)).sum(2).transpose(1, 2)  # (B, m, r)
    tokens = prefix + n
    tgt, src = _flat(order[:, :m], prefix, tokens), _flat(order[:, m:], prefix, tokens)

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = _rows(t, tgt) + spread @ _rows(t, src)
        return torch.cat([t[:, :prefix], out], dim=1) if prefix else out

    return Reduction(apply)


def reduce_tokens(reduction: Reduction, x: torch.Tensor, size: torch.Tensor,
                  extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Weighted average of the features, summed sizes (and summed ``extra`` channels, e.g. the
    source map the visualisation tracks)."""
    weight = size if reduction.weight is None else reduction.weight
    total = reduction.apply(weight)
    new_size = total if reduction.weight is None else reduction.apply(size)
    return reduction.apply(x * weight) / total, new_size, reduction.apply(extra) if extra is not None else None
