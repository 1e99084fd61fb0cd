"""Prunable units of a backbone and the surgery that removes them.

A ``ChannelGroup`` is one internal channel dimension: the layers that produce it, the
BatchNorms and depthwise convs that act on it channel by channel, and the layers that
consume it. Removing channels of a group keeps every shape consistent, and because groups
never touch a residual stream, the rest of the model is unchanged. Heads and MLP groups come
from ``backbone.structure`` for every family; conv groups come from the family adapters
(``adapters.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .surgery import get_module, head_channels, set_module, slice_batchnorm, slice_conv, slice_linear

KINDS = ("heads", "mlp", "conv")


@dataclass
class ChannelGroup:
    name: str  # stable id: the path of the first producer (plans refer to groups by it)
    kind: str  # "heads" | "mlp" | "conv"
    producers: list[str]
    consumers: list[str]
    unit_size: int = 1  # channels per unit: head_dim for heads, 1 otherwise
    norms: list[str] = field(default_factory=list)  # BatchNorms on this dimension
    depthwise: list[str] = field(default_factory=list)  # depthwise convs on this dimension
    attention: str | None = None  # heads: the attention module whose head-count attributes follow
    block: str | None = None  # the transformer block or conv layer it belongs to

    def channels(self, root: nn.Module) -> int:
        layer = get_module(root, self.producers[0])
        return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels

    def units(self, root: nn.Module) -> int:
        return self.channels(root) // self.unit_size


def transformer_groups(structure, dropped: set[str] = frozenset()) -> list[ChannelGroup]:
    groups = []
    for block in structure.blocks:
        att = block.attention
        if att is not None and att.path not in dropped:
            if att.fused:
                from vitc.errors import VitcError

                raise VitcError(f"{att.path} uses a fused qkv projection, which head pruning does not handle yet",
                                "prune the MLP only (--heads 1 --units mlp) or use a model with separate q/k/v")
            groups.append(ChannelGroup(att.q, "heads", [att.q, att.k, att.v], [att.out_proj], att.head_dim,
                                       attention=att.path, block=block.path))
        groups.append(ChannelGroup(block.mlp.fc1, "mlp", [block.mlp.fc1], [block.mlp.fc2], block=block.path))
    return groups


def keep_channels(root: nn.Module, group: ChannelGroup, unit_keep: torch.Tensor) -> None:
    """Shrink every layer of ``group`` to the kept units (indices into the group's units)."""
    keep = head_channels(unit_keep, group.unit_size) if group.unit_size > 1 else torch.as_tensor(unit_keep, dtype=torch.long)
    for path in group.producers:
        layer = get_module(root, path)
        set_module(root, path, slice_linear(layer, out_keep=keep) if isinstance(layer, nn.Linear) else slice_conv(layer, out_keep=keep))
    for path in group.norms:
        set_module(root, path, slice_batchnorm(get_module(root, path), keep))
    for path in group.depthwise:
        set_module(root, path, slice_conv(get_module(root, path), out_keep=keep))
    for path in group.consumers:
        layer = get_module(root, path)
        set_module(root, path, slice_linear(layer, in_keep=keep) if isinstance(layer, nn.Linear) else slice_conv(layer, in_keep=keep))
    if group.kind == "heads":
        set_head_count(get_module(root, group.attention), len(unit_keep), group.unit_size)


def set_head_count(attention: nn.Module, heads: int, head_dim: int) -> None:
    """Keep an attention module's own head bookkeeping in step with its projections.

    transformers attentions read these attributes in forward (ViT v5 reshapes with
    ``head_dim`` and -1 heads; MobileViT also uses ``all_head_size``); the config is shared by
    all layers and may no longer describe a single one.
    """
    for m in attention.modules():
        if hasattr(m, "num_attention_heads"):
            m.num_attention_heads = heads
        if hasattr(m, "num_heads") and isinstance(getattr(m, "num_heads"), int):
            m.num_heads = heads
        if hasattr(m, "all_head_size"):
            m.all_head_size = heads * head_dim
