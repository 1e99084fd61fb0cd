"""Token reduction as pure functions on tensors.

Every method looks at one block's patch tokens and returns a ``Reduction``: a linear map over
the token axis (Token Transforming's view: every reducer is a token matrix ``W`` of shape
(kept, tokens); ToMe's is 0/1, EViT-style pruning's has one attention-weighted row, Token
Transforming's is many-to-many). ``W`` is stored in the shape that is cheap to run in an
exported graph rather than as a dense (kept, tokens) matrix: each output row has one *base*
token (its own, taken whole) plus a mix of a few *extra* tokens (ToMe's merged A tokens,
pruning's fused tokens, Token Transforming's spread tokens):

    W t = gather(t, base) + spread @ gather(t, extra)

so applying it costs two row gathers and one (kept x extra) matmul, with ``extra`` about
``r`` tokens, instead of a (kept x tokens) matmul. ``spread`` carries mass: every extra
token's column sums to one, so sizes are preserved. Features are weighted averages (by size,
or by ``Reduction.weight``), with the weights folded into per-row coefficients computed on
(B, kept, extra)-sized tensors, never on (B, tokens, C) ones.

``prefix`` tokens (CLS, distillation) lead the sequence and pass through untouched; ``metric``
and ``scores`` cover the patch tokens only. Shapes are static for a given ``r`` and the graph
is gathers, one small batched matmul, comparisons (one-hot) and TopK, so it exports to
ONNX/OpenVINO as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Reduction:
    """Tokens (B, prefix + N, .) -> (B, prefix + N - r, .).

    ``base`` (B, out): the token each output row starts from (prefix rows included);
    ``extra`` (B, e): tokens mixed into some rows; ``spread`` (B or 1, out, e): how much of
    each extra token's mass goes to each row (columns sum to one); ``weight`` (B, prefix + N, 1)
    or None: how tokens are weighted when averaged (None: by size). ``base`` and ``extra``
    index rows of the (B * tokens, .) view of a token tensor (batch offsets included), so
    every use is one Gather."""

    base: torch.Tensor
    extra: torch.Tensor
    spread: torch.Tensor
    weight: torch.Tensor | None = None

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """``W t`` with sum semantics (sizes, source maps)."""
        return _rows(t, self.base) + self.spread @ _rows(t, self.extra)

    def average(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Each output row's ``weight``-weighted average of the tokens ``W`` puts in it."""
        wb, we = _rows(weight, self.base), _rows(weight, self.extra)  # (B, out, 1), (B, e, 1)
        mix = self.spread * we.transpose(1, 2)
        total = wb + mix.sum(-1, keepdim=True)
        # coefficients on the small (B, out, e) side, so x itself sees two gathers, one
        # multiply-add and one small matmul
        return _rows(x, self.base) * (wb / total) + (mix / total) @ _rows(x, self.extra)


def _rows(t: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    return t.flatten(0, 1)[flat]


def _offsets(like: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, 1) row offsets ``b * tokens`` of the (B * tokens, .) view. They come from a
    cumulative sum over the batch axis rather than from the tensor's shape, so the exported
    graph computes no shapes (the batch axis is its only dynamic one)."""
    ones = like[:, :1] * 0 + 1
    return (torch.cumsum(ones, 0) - 1) * tokens


def _one_hot(idx: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., k) indices -> (..., k, n) one-hot, built from a comparison so that it exports everywhere."""
    return (idx.unsqueeze(-1) == torch.arange(n, device=idx.device)).to(dtype)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _with_prefix(rows: torch.Tensor, prefix: int) -> torch.Tensor:
    """Patch-token indices -> token indices, with the prefix tokens leading."""
    rows = rows + prefix
    if not prefix:
        return rows
    return torch.cat([rows[:, :1] * 0 + torch.arange(prefix, device=rows.device), rows], dim=1)


def _ranked(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values along the last axis and their indices, ties to the lower index.

    ``torch.topk`` orders equal values its own way and ONNX's TopK by index, so an exported merged
    model picked other tokens wherever two scores were exactly equal, and CIFAR images upsampled
    to 224 px are full of identical patches: 68 of 200 images of zoo:dinov2s-c10 (ToMe r=4) left
    the FP32 parity bound. A stable sort would be the ONNX order, but the TorchScript exporter has
    no stable Sort; so the ranking key subtracts index x 2^-20 of the row's largest magnitude (8
    ulps of it): the same IEEE ops in torch and in the exported graph (a max is exact in any
    order), so both rank the same, and only scores that close are reordered, by index."""
    step = x.abs().amax(-1, keepdim=True) * 2.0 ** -20
    key = x - torch.arange(x.shape[-1], dtype=x.dtype, device=x.device) * step
    indices = torch.topk(key, k, dim=-1).indices
    return x.gather(-1, indices), indices


def _bipartite_ranking(metric: torch.Tensor, r: int):
    """ToMe's choice of what to remove, on unit-norm ``metric``: split patch tokens alternately
    into A and B and rank each A token by its best cosine similarity to a B token. Returns
    patch-token indices of the ``r`` removed A tokens, the kept A tokens (most similar first,
    ToMe's output order) and every B token, and each A token's most similar B token (index in B)."""
    n = int(metric.shape[1])  # static under tracing: the token count is fixed for a schedule
    a, b = metric[:, ::2], metric[:, 1::2]
    na, nb = (n + 1) // 2, n // 2
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    order = _ranked(node_max, na)[1]  # most similar first
    b_rows = node_idx[:, :1] * 0 + (2 * torch.arange(nb, device=metric.device) + 1)
    return 2 * order[:, :r], 2 * order[:, r:], b_rows, node_idx


def bipartite_soft_matching(metric: torch.Tensor, r: int, prefix: int = 0) -> Reduction:
    """ToMe (Bolya et al., 2023): split patch tokens alternately into sets A and B, join each
    A token to its most similar B token (cosine similarity of ``metric``), and merge the ``r``
    most similar pairs.

    Output order: the prefix, the A tokens that stay (most similar first, as ToMe orders
    them), then all B tokens (merged ones included).
    """
    n = int(metric.shape[1])  # static under tracing: the token count is fixed for a schedule
    if not 0 <= r <= n // 2:
        raise ValueError(f"r={r} is out of range for {n} tokens (at most {n // 2})")
    metric = _normalize(metric)
    src, kept_a, b_rows, node_idx = _bipartite_ranking(metric, r)
    off = _offsets(src, prefix + n)
    base = _with_prefix(torch.cat([kept_a, b_rows], dim=1), prefix) + off
    # output row of each merged A token's B partner; as a one-hot over the output rows
    dest = node_idx.gather(1, src // 2) + (prefix + (n + 1) // 2 - r)
    spread = _one_hot(dest, prefix + n - r, metric.dtype).transpose(1, 2)  # (B, out, r)
    return Reduction(base, src + prefix + off, spread)


def attentive_pruning(scores: torch.Tensor, r: int, prefix: int = 0) -> Reduction:
    """EViT-style (Liang et al., 2022): keep the ``N - r - 1`` patch tokens the CLS token
    attends to most and fuse the rest into one token, weighted by that attention."""
    n = int(scores.shape[1])
    if not 0 <= r <= n - 2:
        raise ValueError(f"r={r} is out of range for {n} tokens (at most {n - 2})")
    order = _ranked(scores, n)[1]
    keep = n - r - 1
    off = _offsets(order, prefix + n)
    # the fused row starts from the most attended dropped token; the other r are mixed in
    base = _with_prefix(order[:, : keep + 1], prefix) + off
    spread = scores.new_tensor([[0.0] * r] * (prefix + keep) + [[1.0] * r]).unsqueeze(0)  # the same for every image
    # a weight that underflowed to 0 would make a kept row 0/0
    weight = scores.clamp_min(1e-12)
    weight = torch.cat([weight[:, :prefix] * 0 + 1, weight], dim=1) if prefix else weight
    return Reduction(base, order[:, keep + 1:] + prefix + off, spread, weight=weight.unsqueeze(-1))


def token_transforming(metric: torch.Tensor, r: int, k: int = 4, temperature: float = 0.1,
                       prefix: int = 0) -> Reduction:
    """Token Transforming (Zeng, Yu, Kong and Tang, "Token Transforming: A Unified and
    Training-Free Token Compression Framework for Vision Transformer Acceleration", arXiv
    2506.05709, 2025): token reduction as one many-to-many token matrix (kept x tokens)
    that keeps more information than exclusive pruning (a token goes to one place or
    nowhere) or merging (one-to-one).

    What this follows: the paper's framing (abstract and introduction; its method section
    and code were not reachable from our machines), with the matrix built as follows, our
    reading: the ``r`` patch tokens to remove are the most redundant ones, chosen by ToMe's
    bipartite ranking; every other token is a target; each removed token is spread over its
    ``k`` most similar targets (cosine similarity of ``metric``, the attention keys) with
    softmax(similarity / temperature) weights, so every column of the matrix sums to one (mass
    is preserved); rows are then normalised by token sizes into weighted averages. ``k=1``
    is hard nearest-target merging (ToMe with any kept token as a partner, not only B ones).

    A first reading kept the tokens the CLS token attends to most as targets (as in
    attention-based pruning); on the reference ViT it lost 2.6 points of top-1 at r=8 where
    ToMe lost 0.7, since background tokens were averaged into the object's tokens.
    """
    n = int(metric.shape[1])
    if not 0 <= r <= n // 2:
        raise ValueError(f"r={r} is out of range for {n} tokens (at most {n // 2})")
    metric = _normalize(metric)
    src, kept_a, b_rows, _ = _bipartite_ranking(metric, r)
    tgt = torch.cat([kept_a, b_rows], dim=1)
    m = n - r
    own = _offsets(tgt, n)
    sim = _rows(metric, src + own) @ _rows(metric, tgt + own).transpose(-1, -2)  # (B, r, m): sources x targets
    top, idx = _ranked(sim, min(k, m))
    w = torch.softmax(top / temperature, dim=-1)
    # (B, out, r): output row prefix + j receives w of each source whose j-th most similar target it is
    spread = (_one_hot(idx + prefix, prefix + m, sim.dtype) * w.unsqueeze(-1)).sum(2).transpose(1, 2)
    off = _offsets(tgt, prefix + n)
    return Reduction(_with_prefix(tgt, prefix) + off, src + prefix + off, spread)


def reduce_tokens(reduction: Reduction, x: torch.Tensor, size: torch.Tensor,
                  extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Weighted average of the features, summed sizes (and summed ``extra`` channels, e.g. the
    source map the visualisation tracks)."""
    weight = size if reduction.weight is None else reduction.weight
    return (reduction.average(x, weight), reduction.apply(size),
            reduction.apply(extra) if extra is not None else None)
