"""transformers MobileViT: BatchNorm conv stages (MobileNetV2 blocks) feeding MobileViT blocks.

A MobileViT block unfolds its feature map into patches and runs attention across patches
for each pixel position inside a patch, then folds the map back; its tokens keep the grid,
so ``TokenLayout.unstructured`` is False (token merging cannot drop them).
"""
from __future__ import annotations

import torch.nn as nn

from vitc.models.structure import (AttentionSite, Bridge, ConvStage, MLPSite, Structure, TokenLayout,
                                   TransformerBlock, TransformerStage)

from ._util import activation_name, convs_and_norms, need


def matches(model: nn.Module) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return isinstance(model, transformers.MobileViTModel) or isinstance(getattr(model, "mobilevit", None), transformers.MobileViTModel)


def discover(model: nn.Module, prefix: str = "") -> Structure:
    import transformers

    base = model if isinstance(model, transformers.MobileViTModel) else model.mobilevit
    p = prefix + ("" if base is model else "mobilevit.")
    cfg = base.config
    stages: list = []
    bridges: list[Bridge] = []
    convs, norms = convs_and_norms(base.conv_stem, p + "conv_stem.")
    stages.append(ConvStage(p + "conv_stem", convs, norms, base.conv_stem.convolution.out_channels))
    size = cfg.image_size // 2
    for i, layer in enumerate(base.encoder.layer):
        lp = f"{p}encoder.layer.{i}"
        if isinstance(layer, transformers.models.mobilevit.modeling_mobilevit.MobileViTLayer):
            # local conv part (downsampling + conv_kxk + conv_1x1) is a conv stage feeding the transformer
            conv_names, norm_names = [], []
            for sub in ("downsampling_layer", "conv_kxk", "conv_1x1"):
                m = getattr(layer, sub, None)
                if m is not None:
                    c, n = convs_and_norms(m, f"{lp}.{sub}.")
                    conv_names += c
                    norm_names += n
            if layer.downsampling_layer is not None:
                size //= 2
            stages.append(ConvStage(f"{lp}.local", conv_names, norm_names, layer.conv_1x1.convolution.out_channels))
            blocks = []
            for j, t in enumerate(layer.transformer.layer):
                tp = f"{lp}.transformer.layer.{j}."
                sa = getattr(t.attention, "attention", None)  # None when pruning removed the sublayer
                site = None if sa is None else AttentionSite(
                    path=tp + "attention", num_heads=sa.num_attention_heads, head_dim=sa.attention_head_size,
                    q=tp + "attention.attention.query", k=tp + "attention.attention.key",
                    v=tp + "attention.attention.value", out_proj=tp + "attention.output.dense")
                blocks.append(TransformerBlock(
                    path=tp.rstrip("."),
                    attention=site,
                    mlp=MLPSite(fc1=tp + "intermediate.dense", fc2=tp + "output.dense",
                                hidden=t.intermediate.dense.out_features,
                                activation=activation_name(t.intermediate.intermediate_act_fn)),
                    norm1=tp + "layernorm_before", norm2=tp + "layernorm_after"))
            ph = layer.patch_height
            grid = (max(1, size // ph), max(1, size // layer.patch_width))
            tokens = TokenLayout(dim=layer.conv_1x1.convolution.out_channels, num_patches=grid[0] * grid[1],
                                 grid=grid, unstructured=False)
            stages.append(TransformerStage(f"{lp}.transformer", blocks, tokens))
            bridges.append(Bridge(conv=conv_names[-1], stage=f"{lp}.transformer",
                                  into=blocks[0].attention.q if blocks[0].attention else f"{lp}.transformer.layer.0.intermediate.dense"))
            c, n = convs_and_norms(layer.conv_projection, f"{lp}.conv_projection.")
            c2, n2 = convs_and_norms(layer.fusion, f"{lp}.fusion.")
            stages.append(ConvStage(f"{lp}.fuse", c + c2, n + n2, layer.fusion.convolution.out_channels))
        else:
            c, n = convs_and_norms(layer, f"{lp}.")
            strides = [m.stride[0] for m in layer.modules() if isinstance(m, nn.Conv2d)]
            if any(s == 2 for s in strides):
                size //= 2
            out_ch = [m for m in layer.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
            stages.append(ConvStage(lp, c, n, out_ch))
    c, n = convs_and_norms(base.conv_1x1_exp, p + "conv_1x1_exp.")
    stages.append(ConvStage(p + "conv_1x1_exp", c, n, base.conv_1x1_exp.convolution.out_channels))
    classifier = "classifier" if isinstance(getattr(model, "classifier", None), nn.Linear) else None
    return Structure(family="hf-mobilevit", kind="hybrid", stages=stages, bridges=bridges,
                     classifier=(prefix + classifier) if classifier else None, patch_embed=None)
