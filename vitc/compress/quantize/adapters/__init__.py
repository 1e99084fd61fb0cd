"""Family adapters that route self-attention through ``AttentionCore``, so that both attention
matmuls (QK^T and attention x V) get quantized inputs. One small module per family; the pass
picks one by ``structure.family`` (never by class name) and reports families it has none for."""
from __future__ import annotations

from . import hf_mobilevit, hf_vit

# Dinov2's attention holds the same q/k/v/o projections as ViT v5 and is called the same way
ADAPTERS = {"hf-vit": hf_vit, "hf-deit": hf_vit, "hf-dinov2": hf_vit, "hf-mobilevit": hf_mobilevit}


def for_family(family: str):
    return ADAPTERS.get(family)
