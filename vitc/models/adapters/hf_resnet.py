"""transformers ResNet (the zoo CNN)."""
from __future__ import annotations

import torch.nn as nn

from vitc.models.structure import ConvStage, Structure

from ._util import convs_and_norms


def matches(model: nn.Module) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return isinstance(model, transformers.ResNetModel) or isinstance(getattr(model, "resnet", None), transformers.ResNetModel)


def discover(model: nn.Module, prefix: str = "") -> Structure:
    import transformers

    base = model if isinstance(model, transformers.ResNetModel) else model.resnet
    p = prefix + ("" if base is model else "resnet.")
    c, n = convs_and_norms(base.embedder, p + "embedder.")
    stages = [ConvStage(p + "embedder", c, n, base.embedder.embedder.convolution.out_channels)]
    for i, st in enumerate(base.encoder.stages):
        c, n = convs_and_norms(st, f"{p}encoder.stages.{i}.")
        out = [m for m in st.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        stages.append(ConvStage(f"{p}encoder.stages.{i}", c, n, out))
    head = getattr(model, "classifier", None)
    classifier = None
    if isinstance(head, nn.Sequential):
        idx = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)]
        classifier = f"classifier.{idx[-1]}" if idx else None
    return Structure(family="hf-resnet", kind="cnn", stages=stages, classifier=(prefix + classifier) if classifier else None)
