"""Fallback for models of no known family (user modules, torch.export/TorchScript graphs).

It reports each Conv2d run between resolution changes as a conv stage and the last Linear
as the classifier; it finds no transformer blocks, so passes that need them refuse such a
model with a message that says so.
"""
from __future__ import annotations

import torch.nn as nn

from vitc.models.structure import ConvStage, Structure, kind_of


def discover(model: nn.Module, prefix: str = "") -> Structure:
    stages: list = []
    current: list[str] = []
    norms: list[str] = []
    out_ch = 0
    last_linear = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if current and max(m.stride) > 1:
                stages.append(ConvStage(prefix + f"stage{len(stages)}", current, norms, out_ch))
                current, norms = [], []
            current.append(prefix + name)
            out_ch = m.out_channels
        elif isinstance(m, nn.BatchNorm2d):
            norms.append(prefix + name)
        elif isinstance(m, nn.Linear):
            last_linear = prefix + name
    if current:
        stages.append(ConvStage(prefix + f"stage{len(stages)}", current, norms, out_ch))
    return Structure(family="generic", kind=kind_of(stages), stages=stages, classifier=last_linear)
