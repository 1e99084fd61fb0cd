"""One structure adapter per model family.

An adapter answers two questions about an ``nn.Module``: does it belong to my family
(``matches``, by ``isinstance`` against the family's own classes, never by name matching),
and where are its blocks (``discover`` -> ``Structure``). The registry tries them in order
and falls back to the generic adapter, which finds conv stages and Linears but no
transformer blocks. Adding a family is adding one module here and one line below.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from vitc.models.structure import Structure

from . import generic, hf_convnext, hf_dinov2, hf_mobilevit, hf_resnet, hf_vit, timm_vit

# (name, matches(module) -> bool, discover(module, prefix) -> Structure)
ADAPTERS: list[tuple[str, Callable[[nn.Module], bool], Callable[..., Structure]]] = [
    ("hf-vit", hf_vit.matches, hf_vit.discover),
    ("hf-dinov2", hf_dinov2.matches, hf_dinov2.discover),
    ("hf-mobilevit", hf_mobilevit.matches, hf_mobilevit.discover),
    ("hf-convnext", hf_convnext.matches, hf_convnext.discover),
    ("hf-resnet", hf_resnet.matches, hf_resnet.discover),
    ("timm-vit", timm_vit.matches, timm_vit.discover),
]


def discover(module: nn.Module) -> Structure:
    """Structure of ``module``; paths are relative to it (``backbone.module``)."""
    root, prefix = _unwrap(module)
    for _name, matches, disc in ADAPTERS:
        if matches(root):
            return disc(root, prefix)
    return generic.discover(root, prefix)


def _unwrap(module: nn.Module) -> tuple[nn.Module, str]:
    # vitc wraps transformers classifiers so that forward(x) returns logits; the wrapped model
    # lives at ``.model`` (see vitc.models.intake.LogitsModule).
    from vitc.models.wrappers import LogitsModule

    if isinstance(module, LogitsModule):
        return module.model, "model."
    return module, ""
