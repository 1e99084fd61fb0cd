"""transformers ViT, DeiT and Dinov2 (v5 names; v4 names where discovery reports them; Dinov2's
LayerScale from the structure's ``ls1``/``ls2``)."""
from __future__ import annotations

from vitc.models.adapters._util import child
from vitc.models.structure import TransformerBlock

from ..block import BlockParts


def parts(module, block: TransformerBlock) -> BlockParts:
    from . import relative

    layer = module.get_submodule(block.path)
    act = child(layer, "mlp.activation_fn", "intermediate.intermediate_act_fn")
    if act is None:
        raise LookupError(f"{block.path}: no activation module found")
    a = block.attention
    mlp = dict(norm1=relative(block.norm1, block), norm2=relative(block.norm2, block), act=act[0],
               fc1=relative(block.mlp.fc1, block), fc2=relative(block.mlp.fc2, block),
               ls1=relative(block.ls1, block), ls2=relative(block.ls2, block))
    if a is None:  # removed by structured pruning: the block is its MLP
        return BlockParts(**mlp)
    return BlockParts(**mlp, attention=relative(a.path, block), q=relative(a.q, block), k=relative(a.k, block),
                      v=relative(a.v, block), out_proj=relative(a.out_proj, block))
