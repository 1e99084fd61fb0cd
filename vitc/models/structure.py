"""Structure discovery: where a backbone's transformer blocks, conv stages and bridges are.

Passes never match class names. They ask ``backbone.structure`` and get module paths
(relative to ``backbone.module``) plus the few numbers they need (heads, head dim, token
layout). One adapter per model family (``vitc/models/adapters/``) fills this in.

Vocabulary:

* ``AttentionSite``: one self-attention: separate ``q``/``k``/``v`` Linears or a fused
  ``qkv`` Linear, the output projection, heads and head dim.
* ``MLPSite``: the two Linears (or 1x1 convs) of a feed-forward block and its activation.
* ``TransformerBlock``: attention + MLP + their norms (pre-norm residual blocks).
* ``TokenLayout``: how many prefix tokens (CLS, distillation) precede the patch tokens and
  the patch grid. ``unstructured`` says whether the tokens may be merged or dropped freely
  (a plain ViT); MobileViT's unfolded patches must keep the grid, so they are not.
* ``TransformerStage``: consecutive blocks that share one token layout.
* ``ConvStage``: convolutions (with their BatchNorms) between two resolution changes.
* ``Bridge``: a conv stage feeding a transformer stage (the conv-to-attention hand-over
  that hybrid PTQ treats with care).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class AttentionSite:
    path: str
    num_heads: int
    head_dim: int
    out_proj: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # fused projection (timm), used instead of q/k/v

    @property
    def fused(self) -> bool:
        return self.qkv is not None

    @property
    def embed_dim(self) -> int:
        return self.num_heads * self.head_dim


@dataclass
class MLPSite:
    fc1: str
    fc2: str
    hidden: int
    activation: str  # e.g. "gelu", "silu"


@dataclass
class TransformerBlock:
    path: str
    attention: AttentionSite | None  # None where structured pruning removed the attention sublayer
    mlp: MLPSite
    norm1: str | None  # before attention
    norm2: str | None  # before the MLP
    ls1: str | None = None  # LayerScale on the attention branch (DINOv2, CaiT), where the family has one
    ls2: str | None = None  # LayerScale on the MLP branch


@dataclass
class TokenLayout:
    dim: int
    num_patches: int
    grid: tuple[int, int] | None
    cls_index: int | None = None
    dist_index: int | None = None
    unstructured: bool = True

    @property
    def num_prefix(self) -> int:
        return int(self.cls_index is not None) + int(self.dist_index is not None)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches


@dataclass
class TransformerStage:
    path: str
    blocks: list[TransformerBlock]
    tokens: TokenLayout
    kind: str = "transformer"


@dataclass
class ConvStage:
    path: str
    convs: list[str]
    norms: list[str]  # BatchNorms, in the order of the convs they follow
    out_channels: int
    kind: str = "conv"


@dataclass
class Bridge:
    conv: str  # last conv before the hand-over
    stage: str  # path of the transformer stage it feeds
    into: str  # first Linear/conv of the transformer side


@dataclass
class Structure:
    family: str  # adapter name, e.g. "hf-vit"
    kind: str  # "vit" | "hybrid" | "cnn" | "unknown"
    stages: list[TransformerStage | ConvStage] = field(default_factory=list)
    bridges: list[Bridge] = field(default_factory=list)
    classifier: str | None = None
    patch_embed: str | None = None
    final_norm: str | None = None

    @property
    def transformer_stages(self) -> list[TransformerStage]:
        return [s for s in self.stages if isinstance(s, TransformerStage)]

    @property
    def conv_stages(self) -> list[ConvStage]:
        return [s for s in self.stages if isinstance(s, ConvStage)]

    @property
    def blocks(self) -> list[TransformerBlock]:
        return [b for s in self.transformer_stages for b in s.blocks]

    def to_dict(self) -> dict:
        return asdict(self)


def kind_of(stages: list) -> str:
    has_t = any(isinstance(s, TransformerStage) for s in stages)
    has_c = any(isinstance(s, ConvStage) for s in stages)
    return "hybrid" if has_t and has_c else "vit" if has_t else "cnn" if has_c else "unknown"
