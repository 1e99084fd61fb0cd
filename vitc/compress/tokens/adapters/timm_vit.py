"""timm's VisionTransformer blocks: fused qkv, optional q/k norms, LayerScale and MLP norm."""
from __future__ import annotations

import torch.nn as nn

from vitc.models.structure import TransformerBlock

from ..block import BlockParts


def parts(module, block: TransformerBlock) -> BlockParts:
    from . import relative

    layer = module.get_submodule(block.path)

    def present(path: str) -> str | None:
        try:
            m = layer.get_submodule(path)
        except AttributeError:
            return None
        return None if isinstance(m, nn.Identity) else path

    a = block.attention
    mlp = dict(norm1=relative(block.norm1, block), norm2=relative(block.norm2, block), act="mlp.act",
               fc1=relative(block.mlp.fc1, block), fc2=relative(block.mlp.fc2, block),
               mlp_norm=present("mlp.norm"), ls2=present("ls2"))
    if a is None:  # removed by structured pruning: the block is its MLP
        return BlockParts(**mlp)
    return BlockParts(**mlp, attention=relative(a.path, block), qkv=relative(a.qkv, block), out_proj=relative(a.out_proj, block),
                      q_norm=present("attn.q_norm"), k_norm=present("attn.k_norm"), attn_norm=present("attn.norm"),
                      ls1=present("ls1"))
