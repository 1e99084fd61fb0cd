"""Per-family pruning knowledge: which conv channels can go, how attention is removed, and how
the transformers config is kept truthful.

Conv channel groups sit inside residual blocks (between the first and last conv of a ResNet
block, the expanded channels of a MobileNetV2 inverted residual, the local kxk -> 1x1 pair of
a MobileViT block), so the residual streams and every stage's output width stay as they were.
Families are told apart by ``structure.family`` and the family's own classes (``isinstance``).
"""
from __future__ import annotations

import torch.nn as nn

from .surgery import DroppedAttention, get_module, set_module
from .units import ChannelGroup


def conv_groups(root: nn.Module, structure) -> list[ChannelGroup]:
    if structure.family == "hf-resnet":
        return _resnet_groups(root, structure)
    if structure.family == "hf-mobilevit":
        return _mobilevit_groups(root, structure)
    return []


def _conv_layer_group(seq_paths: list[str], root: nn.Module, block: str) -> list[ChannelGroup]:
    """Groups between consecutive (conv, BatchNorm) layers of a residual branch."""
    groups = []
    for a, b in zip(seq_paths, seq_paths[1:]):
        la = get_module(root, a)
        if la.convolution.groups != 1:
            continue
        groups.append(ChannelGroup(f"{a}.convolution", "conv", [f"{a}.convolution"], [f"{b}.convolution"],
                                   norms=[f"{a}.normalization"] if la.normalization is not None else [], block=block))
    return groups


def _resnet_groups(root: nn.Module, structure) -> list[ChannelGroup]:
    from transformers.models.resnet.modeling_resnet import ResNetBasicLayer, ResNetBottleNeckLayer

    groups = []
    for stage in structure.conv_stages:
        stage_mod = get_module(root, stage.path)
        for name, m in stage_mod.named_modules():
            if isinstance(m, (ResNetBasicLayer, ResNetBottleNeckLayer)):
                base = f"{stage.path}.{name}"
                groups += _conv_layer_group([f"{base}.layer.{i}" for i in range(len(m.layer))], root, base)
    return groups


def _mobilevit_groups(root: nn.Module, structure) -> list[ChannelGroup]:
    from transformers.models.mobilevit.modeling_mobilevit import MobileViTInvertedResidual, MobileViTLayer

    groups, seen = [], set()
    for stage in structure.conv_stages:
        # a MobileViT block's conv stages are named "<layer>.local" and "<layer>.fuse"; their modules live on <layer>
        path = stage.path.rsplit(".", 1)[0] if stage.path.endswith((".local", ".fuse")) else stage.path
        for name, m in get_module(root, path).named_modules():
            base = f"{path}.{name}" if name else path
            if base in seen:
                continue
            if isinstance(m, MobileViTInvertedResidual):
                seen.add(base)
                groups.append(ChannelGroup(
                    f"{base}.expand_1x1.convolution", "conv", [f"{base}.expand_1x1.convolution"], [f"{base}.reduce_1x1.convolution"],
                    norms=[f"{base}.expand_1x1.normalization", f"{base}.conv_3x3.normalization"],
                    depthwise=[f"{base}.conv_3x3.convolution"], block=base))
            elif isinstance(m, MobileViTLayer):
                seen.add(base)
                groups += _conv_layer_group([f"{base}.conv_kxk", f"{base}.conv_1x1"], root, base)
    return groups


def drop_attention(root: nn.Module, attention_path: str, structure) -> None:
    """Replace an attention sublayer by one that adds nothing to the residual stream."""
    # transformers ViT/DeiT attentions return (output, weights); MobileViT's returns the output
    returns_tuple = structure.family in ("hf-vit", "hf-deit", "hf-dinov2")
    set_module(root, attention_path, DroppedAttention(returns_tuple))


def sync_config(root: nn.Module, structure) -> bool:
    """Write uniform pruned sizes into the transformers config; True when the config describes every layer.

    ``save_pretrained`` then writes a folder any transformers install loads; otherwise the
    pruning plan beside it (``persist.py``) is what rebuilds the model.
    """
    if structure.family not in ("hf-vit", "hf-deit"):
        return False
    blocks = structure.blocks
    if any(b.attention is None for b in blocks):
        return False
    heads = {b.attention.num_heads for b in blocks}
    hidden = {b.mlp.hidden for b in blocks}
    if len(heads) != 1 or len(hidden) != 1:
        return False
    cfg = _config_of(root)
    head_dim = blocks[0].attention.head_dim
    cfg.num_attention_heads = heads.pop()
    cfg.head_dim = head_dim  # ViT v5 reads config.head_dim before hidden_size // heads
    cfg.intermediate_size = hidden.pop()
    return True


def _config_of(root: nn.Module):
    model = getattr(root, "model", root)
    return model.config
