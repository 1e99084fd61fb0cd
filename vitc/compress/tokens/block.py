"""A pre-norm transformer block that reduces its tokens between attention and MLP.

It adopts the children of the block it replaces under their own names, so parameter paths
(and ``backbone.structure``) stay what they were and later passes (quantization) find the
same Linears. The adapter says which child is which (``BlockParts``).

The model's own loop over its blocks passes one tensor, so the first block runs them all,
carrying token sizes as a separate (B, N, 1) tensor, and the later blocks return what they
get. The forward keeps no Python state. The visualisation passes extra channels (the source
map) that are summed like the sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from vitc.errors import VitcError

from .merge import attentive_pruning, bipartite_soft_matching, reduce_tokens, token_transforming


@dataclass(frozen=True)
class BlockParts:
    """Paths of a block's parts, relative to the block."""

    fc1: str
    act: str
    fc2: str
    norm2: str | None = None
    norm1: str | None = None
    out_proj: str | None = None  # None with q/k/v/qkv: the attention sublayer was removed
    attention: str | None = None  # the attention module, where quantization installs its core
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    # optional extras of some families (timm): identity when absent
    q_norm: str | None = None
    k_norm: str | None = None
    attn_norm: str | None = None
    mlp_norm: str | None = None
    ls1: str | None = None
    ls2: str | None = None


@dataclass(frozen=True)
class BlockPlan:
    method: str
    r: int
    sizes_vary: bool  # an earlier block reduced tokens, so proportional attention matters
    tokens: int  # tokens entering the block (prefix included): static for a schedule
    prop_attn: bool = True
    k: int = 4
    temperature: float = 0.1


class ReducingBlock(nn.Module):
    def __init__(self, block: nn.Module, parts: BlockParts, plan: BlockPlan, num_heads: int, head_dim: int,
                 num_prefix: int, cls_index: int | None):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, p in block.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.parts = parts
        self.plan = plan
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dim = num_heads * head_dim
        self.num_prefix = num_prefix
        self.cls_index = cls_index
        # keys averaged over heads as one (C, head_dim) matmul on the projection output: in
        # ONNX Runtime a ReduceMean over the head axis costs about twice as much
        head_mean = torch.eye(head_dim).repeat(num_heads, 1) / num_heads
        self.register_buffer("head_mean", head_mean, persistent=False)

    def _part(self, path: str | None):
        return self.get_submodule(path) if path else None

    def _maybe(self, path: str | None, t: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(path)(t) if path else t

    def drive(self, chain: list["ReducingBlock"]) -> None:
        """Make this (the first) block run ``chain`` (every reducing block, itself first); the
        others pass their input through. The tuple is a plain attribute, not a submodule, so
        parameter paths stay where they were; ``deepcopy`` keeps it pointing at the copies."""
        self._chain = tuple(chain)

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The model's own loop calls every block with one tensor; token sizes would need a
        # side channel through it, so the first block runs all of them with sizes as a
        # separate tensor and the later blocks see the finished tokens and return them.
        # (Extra arguments, the transformers attention mask, are None for ViT classifiers.)
        chain = getattr(self, "_chain", None)
        if not chain:
            return hidden
        # sizes from the tensor itself rather than from its shape: no shape ops in the graph
        x, size, extra = hidden, hidden[..., :1] * 0 + 1, None
        for blk in chain:
            x, size, extra = blk.forward_tokens(x, size, extra)
        return x

    @property
    def has_attention(self) -> bool:
        p = self.parts
        return bool(p.out_proj and (p.qkv or (p.q and p.k and p.v)))

    def forward_tokens(self, x: torch.Tensor, size: torch.Tensor, extra: torch.Tensor | None = None):
        """One block on tokens ``x`` (B, N, C) with sizes (B, N, 1) and summed ``extra`` channels."""
        if self.has_attention:
            attn_out, metric, probs = self._attention(self._maybe(self.parts.norm1, x), size)
            x = x + self._maybe(self.parts.ls1, attn_out)
        else:  # attention removed by structured pruning: it added nothing to the residual
            metric = probs = None
        if self.plan.r > 0:
            x, size, extra = self._reduce(x, size, extra, metric, probs)
        y = self.get_submodule(self.parts.fc1)(self._maybe(self.parts.norm2, x))
        y = self._maybe(self.parts.mlp_norm, self.get_submodule(self.parts.act)(y))
        x = x + self._maybe(self.parts.ls2, self.get_submodule(self.parts.fc2)(y))
        return x, size, extra

    def _attention(self, x: torch.Tensor, size: torch.Tensor):
        """Attention output, the keys averaged over heads (B, N, head_dim) when this block
        merges by similarity, and the attention probabilities."""
        # the token count is a constant of the schedule and the batch axis is -1, so the
        # exported reshapes take constant shapes instead of computing them
        n, heads, d = self.plan.tokens, self.num_heads, self.head_dim
        want_metric = self.plan.r > 0 and self.plan.method in ("tome", "transform")
        metric = None
        if self.parts.qkv:
            fused = self.get_submodule(self.parts.qkv)(x)
            qkv = fused.reshape(-1, n, 3, heads, d).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            if want_metric and not self.parts.k_norm:
                metric = fused[..., heads * d: 2 * heads * d] @ self.head_mean
        else:
            q_lin, k_lin, v_lin = (self.get_submodule(p)(x) for p in (self.parts.q, self.parts.k, self.parts.v))
            q, k, v = (t.reshape(-1, n, heads, d).transpose(1, 2) for t in (q_lin, k_lin, v_lin))
            if want_metric and not self.parts.k_norm:
                metric = k_lin @ self.head_mean
        q, k = self._maybe(self.parts.q_norm, q), self._maybe(self.parts.k_norm, k)
        if want_metric and metric is None:  # per-head key norm: average the normed keys
            metric = k.mean(1)
        # a token that stands for s patches gets the attention of s copies of itself
        bias = size.log().transpose(1, 2).unsqueeze(1) if self.plan.prop_attn and self.plan.sizes_vary else None
        core = self._quant_core()
        if core is not None:
            # quantized (vitc quantize): the same math with its four matmul inputs quantized
            q, k_in, v = core.q_quant(q), core.k_quant(k), core.v_quant(v)
        else:
            k_in = k
        # (q k^T) * scale, as transformers writes it: runtimes fuse the scale into the matmul
        logits = (q @ k_in.transpose(-1, -2)) * d ** -0.5
        probs = (logits if bias is None else logits + bias).softmax(dim=-1)
        out = (core.probs_quant(probs) if core is not None else probs) @ v
        out = out.transpose(1, 2).reshape(-1, n, heads * d)
        out = self._maybe(self.parts.attn_norm, out)
        return self.get_submodule(self.parts.out_proj)(out), metric, probs

    def _quant_core(self):
        # vitc.compress.quantize swaps the attention module for one whose ``core`` holds the
        # quantizers of q, k, softmax and v; merging must route its own attention through them.
        attn = self._part(self.parts.attention)
        core = getattr(attn, "core", None) if attn is not None else None
        return core if all(hasattr(core, n) for n in ("q_quant", "k_quant", "probs_quant", "v_quant")) else None

    def _reduce(self, x, size, extra, metric, probs):
        p = self.num_prefix
        plan = self.plan
        if probs is None or (plan.method in ("tome", "transform") and metric is None):
            # the pass refuses such plans; this guards blocks built by hand
            raise VitcError(f"{plan.method} needs this block's attention keys and probabilities, and the block has no attention",
                            "set r=0 for blocks without attention")
        if plan.method == "tome":
            reduction = bipartite_soft_matching(metric[:, p:], plan.r, p)
        elif plan.method == "transform":
            reduction = token_transforming(metric[:, p:], plan.r, plan.k, plan.temperature, p)
        else:
            if self.cls_index is not None:
                scores = probs[:, :, self.cls_index, p:].mean(1)
            else:  # no CLS token: how much attention each token receives
                scores = probs.mean(1).mean(1)[:, p:]
            reduction = attentive_pruning(scores, plan.r, p)
        return reduce_tokens(reduction, x, size, extra)
