"""timm's VisionTransformer family (ViT, DeiT, DeiT-distilled): fused qkv Linear, prefix tokens."""
from __future__ import annotations

import sys

import torch.nn as nn

from vitc.models.structure import AttentionSite, MLPSite, Structure, TokenLayout, TransformerBlock, TransformerStage

from ._util import activation_name


def matches(model: nn.Module) -> bool:
    # Only consult timm when it is already imported: a model can only be a timm model then,
    # and importing timm here would cost time (and fails on machines without torchvision ops).
    timm_vit = sys.modules.get("timm.models.vision_transformer")
    return timm_vit is not None and isinstance(model, timm_vit.VisionTransformer)


def discover(model: nn.Module, prefix: str = "") -> Structure:
    blocks = []
    for i, blk in enumerate(model.blocks):
        bp = f"{prefix}blocks.{i}."
        attn = blk.attn
        heads = attn.num_heads
        dim = attn.qkv.in_features
        blocks.append(TransformerBlock(
            path=bp.rstrip("."),
            attention=AttentionSite(path=bp + "attn", num_heads=heads, head_dim=dim // heads,
                                    qkv=bp + "attn.qkv", out_proj=bp + "attn.proj"),
            mlp=MLPSite(fc1=bp + "mlp.fc1", fc2=bp + "mlp.fc2", hidden=blk.mlp.fc1.out_features,
                        activation=activation_name(blk.mlp.act)),
            norm1=bp + "norm1", norm2=bp + "norm2"))
    grid = tuple(model.patch_embed.grid_size)
    n_prefix = getattr(model, "num_prefix_tokens", 1)
    has_cls = getattr(model, "cls_token", None) is not None
    dist = getattr(model, "dist_token", None) is not None
    tokens = TokenLayout(dim=model.embed_dim, num_patches=grid[0] * grid[1], grid=grid,
                         cls_index=0 if has_cls else None, dist_index=1 if dist else None, unstructured=True)
    assert tokens.num_prefix == n_prefix or n_prefix > tokens.num_prefix  # register tokens count as prefix too
    return Structure(family="timm-vit", kind="vit",
                     stages=[TransformerStage(prefix + "blocks", blocks, tokens)],
                     classifier=prefix + "head", patch_embed=prefix + "patch_embed.proj", final_norm=prefix + "norm")
