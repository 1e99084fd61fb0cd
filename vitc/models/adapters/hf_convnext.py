"""transformers ConvNeXt: a CNN whose blocks are depthwise conv + LayerNorm + pointwise Linears."""
from __future__ import annotations

import torch.nn as nn

from vitc.models.structure import ConvStage, Structure

from ._util import convs_and_norms


def matches(model: nn.Module) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return isinstance(model, transformers.ConvNextModel) or isinstance(getattr(model, "convnext", None), transformers.ConvNextModel)


def discover(model: nn.Module, prefix: str = "") -> Structure:
    import transformers

    base = model if isinstance(model, transformers.ConvNextModel) else model.convnext
    p = prefix + ("" if base is model else "convnext.")
    stages = []
    c, n = convs_and_norms(base.embeddings, p + "embeddings.")
    stages.append(ConvStage(p + "embeddings", c, n, base.embeddings.patch_embeddings.out_channels))
    for i, st in enumerate(base.encoder.stages):
        sp = f"{p}encoder.stages.{i}."
        convs = [sp + name for name, m in st.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        norms = [sp + name for name, m in st.named_modules() if "LayerNorm" in type(m).__name__ or isinstance(m, nn.BatchNorm2d)]
        out = [m for m in st.modules() if isinstance(m, nn.Linear)][-1].out_features
        stages.append(ConvStage(sp.rstrip("."), convs, norms, out))
    classifier = "classifier" if isinstance(getattr(model, "classifier", None), nn.Linear) else None
    return Structure(family="hf-convnext", kind="cnn", stages=stages,
                     classifier=(prefix + classifier) if classifier else None,
                     final_norm=p + "layernorm")
