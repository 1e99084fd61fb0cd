"""transformers MobileViT: the self-attention module (parent of query/key/value) returns the
context before the output projection; this adapter swaps it for ``AttentionCore`` math."""
from __future__ import annotations

import torch.nn as nn

from vitc.models.structure import AttentionSite

from ..modules import AttentionCore


class QuantMobileViTSelfAttention(nn.Module):
    def __init__(self, attn: nn.Module, site: AttentionSite, bits: int):
        super().__init__()
        self.query, self.key, self.value = attn.query, attn.key, attn.value
        self.head_dim = site.head_dim
        # structure discovery reads these, so a quantized model is discovered like the float one
        self.num_attention_heads, self.attention_head_size = site.num_heads, site.head_dim
        self.scaling = site.head_dim ** -0.5
        self.core = AttentionCore(site.path, bits)

    def forward(self, hidden_states):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        return self.core(q, k, v, self.scaling).transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)


def target(site: AttentionSite) -> str:
    return site.q.rsplit(".", 1)[0]


def replace(attn: nn.Module, site: AttentionSite, bits: int) -> nn.Module:
    return QuantMobileViTSelfAttention(attn, site, bits)
