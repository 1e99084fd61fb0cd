"""Small helpers shared by the adapters."""
from __future__ import annotations

import torch.nn as nn


def child(module: nn.Module, *candidates: str) -> tuple[str, nn.Module] | None:
    """The first dotted attribute path among ``candidates`` that exists on ``module``.

    transformers renames submodules between major versions (``query`` became ``q_proj`` in
    v5); listing both keeps an adapter working across them.
    """
    for cand in candidates:
        obj = module
        for part in cand.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module):
            return cand, obj
    return None


def need(module: nn.Module, where: str, *candidates: str) -> tuple[str, nn.Module]:
    found = child(module, *candidates)
    if found is None:
        raise LookupError(f"{where}: none of {candidates} found")
    return found


def activation_name(act: nn.Module | None) -> str:
    if act is None:
        return "none"
    name = type(act).__name__.lower()
    for key in ("gelu", "silu", "swish", "relu", "hardswish", "tanh"):
        if key in name:
            return "silu" if key == "swish" else key
    return name


def convs_and_norms(module: nn.Module, prefix: str) -> tuple[list[str], list[str]]:
    convs, norms = [], []
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            convs.append(prefix + name)
        elif isinstance(m, nn.BatchNorm2d):
            norms.append(prefix + name)
    return convs, norms
