"""Family adapters: which child of a block is which, per model family, and who is refused.

The generic ``ReducingBlock`` needs the relative paths of a block's parts; structure
discovery gives most of them (norms, q/k/v or qkv, out proj, fc1/fc2) and the adapter adds
what it does not (the activation module, timm's optional norms and LayerScale).
"""
from __future__ import annotations

from vitc.errors import VitcError
from vitc.models.structure import Structure, TransformerBlock, TransformerStage

from ..block import BlockParts
from . import hf_vit, timm_vit

PARTS = {"hf-vit": hf_vit.parts, "hf-deit": hf_vit.parts, "hf-dinov2": hf_vit.parts, "timm-vit": timm_vit.parts}


def mergeable_stage(structure: Structure, source: str) -> TransformerStage:
    """The one transformer stage whose tokens may be merged, or a one-line refusal."""
    stages = structure.transformer_stages
    if structure.kind == "cnn" or (not stages and structure.conv_stages):
        raise VitcError(f"{source} is a CNN ({structure.family}); token merging needs attention over a set of tokens",
                        "merge a ViT/DeiT (transformers or timm); for CNNs use channel pruning or quantization")
    if not stages:
        raise VitcError(f"{source} has no attention blocks that vitc can find ({structure.family})",
                        "merge a ViT/DeiT from transformers (hf:) or timm (timm:)")
    grid_bound = [s for s in stages if not s.tokens.unstructured]
    if grid_bound:
        raise VitcError(f"{source} ({structure.family}) runs attention over unfolded patches that must fold back into the feature map grid, so tokens cannot be merged",
                        "token merging supports plain ViT/DeiT backbones; quantize this hybrid instead")
    if structure.family not in PARTS:
        raise VitcError(f"token merging does not know the {structure.family} family yet",
                        f"supported: {', '.join(sorted(PARTS))}")
    if len(stages) != 1:
        raise VitcError(f"{source} has {len(stages)} transformer stages; token merging supports one", "merge a plain ViT/DeiT")
    return stages[0]


def block_parts(module, structure: Structure, block: TransformerBlock) -> BlockParts:
    """The parts of ``block``; a block whose attention is gone (structured pruning) gets
    MLP parts only, and one whose attention exposes no key projection is refused."""
    a = block.attention
    if a is not None and not (a.qkv or (a.q and a.k and a.v)):
        raise VitcError(f"the attention at {a.path} exposes no query/key/value projections vitc can find, so its keys cannot be matched",
                        "merge a ViT/DeiT from transformers (hf:) or timm (timm:) whose attention uses q/k/v or qkv Linears")
    try:
        return PARTS[structure.family](module, block)
    except (LookupError, AttributeError) as exc:
        raise VitcError(f"cannot find the parts of block {block.path} for token merging ({exc})",
                        "report the model; merging supports the block layouts of transformers and timm ViT/DeiT") from None


def blocks_with_attention(stage: TransformerStage) -> list[int]:
    return [i for i, b in enumerate(stage.blocks) if b.attention is not None]


def relative(path: str | None, block: TransformerBlock) -> str | None:
    if path is None:
        return None
    prefix = block.path + "."
    if not path.startswith(prefix):
        raise LookupError(f"{path} is not inside block {block.path}")
    return path[len(prefix):]
