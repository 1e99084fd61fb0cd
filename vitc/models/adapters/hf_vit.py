"""transformers ViT and DeiT (with or without the distillation token)."""
from __future__ import annotations

import torch.nn as nn

from vitc.models.structure import (AttentionSite, Bridge, ConvStage, MLPSite, Structure, TokenLayout, TransformerBlock,
                                   TransformerStage)

from ._util import activation_name, child, convs_and_norms, need


def _families():
    import transformers

    return (transformers.ViTModel, transformers.DeiTModel)


def _base(model: nn.Module) -> tuple[str, nn.Module] | None:
    try:
        families = _families()
    except ImportError:
        return None
    if isinstance(model, families):
        return "", model
    for name in ("vit", "deit"):
        sub = getattr(model, name, None)
        if isinstance(sub, families):
            return name + ".", sub
    return None


def _removed(attn: nn.Module) -> bool:
    from vitc.models.wrappers import DroppedAttention

    return isinstance(attn, DroppedAttention)


def matches(model: nn.Module) -> bool:
    return _base(model) is not None


def discover(model: nn.Module, prefix: str = "") -> Structure:
    import transformers

    base_prefix, base = _base(model)  # type: ignore[misc]
    p = prefix + base_prefix
    cfg = base.config
    layers_name, layers = need(base, "ViT encoder", "layers", "encoder.layer")
    blocks = []
    for i, layer in enumerate(layers):
        lp = f"{p}{layers_name}.{i}."
        attn_name, attn = need(layer, "ViT layer", "attention")
        fc1_name, fc1 = need(layer, "ViT layer", "mlp.fc1", "intermediate.dense")
        fc2 = need(layer, "ViT layer", "mlp.fc2", "output.dense")[0]
        act = child(layer, "mlp.activation_fn", "intermediate.intermediate_act_fn")
        site = None
        if not _removed(attn):
            q, q_mod = need(attn, "attention", "q_proj", "attention.query")
            k = need(attn, "attention", "k_proj", "attention.key")[0]
            v = need(attn, "attention", "v_proj", "attention.value")[0]
            o = need(attn, "attention", "o_proj", "output.dense")[0]
            # heads from the layer itself: structured pruning may leave layers with different counts
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            site = AttentionSite(
                path=lp + attn_name, num_heads=q_mod.out_features // head_dim, head_dim=head_dim,
                q=lp + attn_name + "." + q, k=lp + attn_name + "." + k, v=lp + attn_name + "." + v,
                out_proj=lp + attn_name + "." + o,
            )
        blocks.append(
            TransformerBlock(
                path=lp.rstrip("."),
                attention=site,
                mlp=MLPSite(fc1=lp + fc1_name, fc2=lp + fc2, hidden=fc1.out_features, activation=activation_name(act[1] if act else None)),
                norm1=lp + "layernorm_before",
                norm2=lp + "layernorm_after",
            )
        )
    grid = cfg.image_size // cfg.patch_size
    distilled = isinstance(base, transformers.DeiTModel)
    tokens = TokenLayout(dim=cfg.hidden_size, num_patches=grid * grid, grid=(grid, grid), cls_index=0,
                         dist_index=1 if distilled else None, unstructured=True)
    classifier = child(model, "classifier", "cls_classifier")
    patch_embed = p + "embeddings.patch_embeddings.projection"
    stages: list = [TransformerStage(path=f"{p}{layers_name}", blocks=blocks, tokens=tokens)]
    bridges = []
    # A patch projection holding BatchNorm convs is a conv stem (vitc.models.convstem): a hybrid.
    proj = base.embeddings.patch_embeddings.projection
    convs, norms = convs_and_norms(proj, patch_embed + ".")
    if norms:
        stages.insert(0, ConvStage(patch_embed, convs, norms, cfg.hidden_size))
        # the first Linear the stem feeds: block 0's q projection, or its MLP if pruning removed that attention
        first = blocks[0]
        into = (first.attention.q or first.attention.qkv) if first.attention is not None else first.mlp.fc1
        bridges.append(Bridge(conv=convs[-1], stage=stages[1].path, into=into))
    return Structure(
        family="hf-deit" if distilled else "hf-vit",
        kind="hybrid" if norms else "vit",
        stages=stages,
        bridges=bridges,
        classifier=(prefix + classifier[0]) if classifier else None,
        patch_embed=patch_embed,
        final_norm=p + "layernorm",
    )
