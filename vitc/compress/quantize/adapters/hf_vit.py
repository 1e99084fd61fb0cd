"""transformers ViT/DeiT: the attention module holds q/k/v/o projections and calls an attention
function; this adapter swaps it for one that runs the same math through ``AttentionCore``."""
from __future__ import annotations

import torch.nn as nn

from vitc.models.structure import AttentionSite

from ..modules import AttentionCore


class QuantViTAttention(nn.Module):
    def __init__(self, attn: nn.Module, site: AttentionSite, bits: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.head_dim = site.head_dim
        self.scaling = site.head_dim ** -0.5
        self.core = AttentionCore(site.path, bits)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        context = self.core(q, k, v, self.scaling).transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return self.o_proj(context), None


def target(site: AttentionSite) -> str:
    """Path of the module this adapter replaces."""
    return site.path


def replace(attn: nn.Module, site: AttentionSite, bits: int) -> nn.Module:
    return QuantViTAttention(attn, site, bits)
