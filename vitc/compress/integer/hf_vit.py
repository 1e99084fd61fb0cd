"""The ViT family adapter: read a (transformers) ViT's float parameters into ``FloatViT``.

Everything family-specific lives here: where the CLS token and the position embedding are,
and which structures have no integer version yet. The structure (``backbone.structure``)
gives the paths of the patch embedding, blocks, norms, LayerScale and classifier.

Two things are folded away rather than given integer kernels of their own: LayerScale (a
per-channel scale on a residual branch, DINOv2/CaiT) goes into the rows of the branch's last
projection, and a linear probe's feature standardisation goes into the affine of the
LayerNorm each probe part is read through (``reference.FloatHeadPart``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from vitc.errors import VitcError

from . import kernels as K
from .reference import FloatBlock, FloatConv, FloatHeadPart, FloatViT

SUPPORTED_ACTIVATIONS = ("gelu", "silu", "relu")
NO_INTEGER = "quantize without --integer-only (W8A8 keeps float non-linearities)"


def _get(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path)


def _linear(module: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    m = _get(module, path)
    if not isinstance(m, nn.Linear):
        raise VitcError(f"integer-only: layer {path} is a {type(m).__name__}, which has no integer version",
                        NO_INTEGER)
    bias = m.bias if m.bias is not None else torch.zeros(m.out_features)
    return m.weight.detach().float().clone(), bias.detach().float().clone()


def _norm(module: nn.Module, path: str | None, what: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    if path is None:
        raise VitcError(f"integer-only: the model has no {what}, which the integer ViT expects", NO_INTEGER)
    m = _get(module, path)
    if not isinstance(m, nn.LayerNorm):
        raise VitcError(f"integer-only: layer {path} is a {type(m).__name__}, which has no integer version "
                        "(only LayerNorm is supported)", NO_INTEGER)
    d = m.normalized_shape[0]
    w = m.weight if m.weight is not None else torch.ones(d)
    b = m.bias if m.bias is not None else torch.zeros(d)
    return w.detach().float().clone(), b.detach().float().clone(), float(m.eps)


def _embeddings(module: nn.Module, patch_path: str) -> nn.Module:
    parts = patch_path.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        m = _get(module, ".".join(parts[:cut])) if cut else module
        if hasattr(m, "position_embeddings") and hasattr(m, "cls_token"):
            return m
    raise VitcError(f"integer-only: no CLS token and position embedding found around {patch_path}", NO_INTEGER)


def read_vit(backbone) -> FloatViT:
    """The float parameters of a ViT Backbone, or a one-line error naming what has no integer version."""
    module = backbone.require_module("integer-only conversion")
    s = backbone.structure
    stem: list[FloatConv] = []
    conv = None
    if s.conv_stages:
        stem, conv, conv_path = _conv_stem(module, s)
    if s.kind not in ("vit", "hybrid") or not s.blocks or s.patch_embed is None:
        raise VitcError(f"integer-only: {backbone.source} is not a ViT (kind {s.kind}, family {s.family})",
                        NO_INTEGER)
    if s.classifier is None:
        raise VitcError(f"integer-only: {backbone.source} has no classifier head (the integer ViT ends in a Linear on "
                        "the CLS token or a linear probe; a dense head such as a conv decoder has no integer version)",
                        NO_INTEGER)
    tokens = s.transformer_stages[0].tokens
    if tokens.dist_index is not None or tokens.cls_index != 0:
        raise VitcError(f"integer-only: {backbone.source} has a distillation token, which the integer ViT "
                        "does not carry", NO_INTEGER)
    if conv is None:
        conv, conv_path = _get(module, s.patch_embed), s.patch_embed
    if not isinstance(conv, nn.Conv2d) or conv.stride != conv.kernel_size or conv.padding not in ((0, 0), "valid") \
            or conv.groups != 1:
        raise VitcError(f"integer-only: patch embedding {conv_path} is not a Conv2d with stride = kernel",
                        NO_INTEGER)
    emb = _embeddings(module, s.patch_embed)
    blocks = []
    for blk in s.blocks:
        a, m = blk.attention, blk.mlp
        if a.fused:
            raise VitcError(f"integer-only: attention {a.path} has a fused qkv projection, not supported yet",
                            NO_INTEGER)
        if m.activation not in SUPPORTED_ACTIVATIONS:
            raise VitcError(f"integer-only: activation '{m.activation}' after {m.fc1} has no integer version "
                            f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})", NO_INTEGER)
        act = _activation_module(module, m.fc1)
        blocks.append(FloatBlock(
            name=blk.path, heads=a.num_heads, head_dim=a.head_dim,
            norm1=_norm(module, blk.norm1, f"norm before {a.path}"),
            q=_linear(module, a.q), k=_linear(module, a.k), v=_linear(module, a.v),
            o=_scaled(_linear(module, a.out_proj), _layer_scale(module, blk.ls1, conv.out_channels)),
            norm2=_norm(module, blk.norm2, f"norm before {m.fc1}"),
            fc1=_linear(module, m.fc1),
            fc2=_scaled(_linear(module, m.fc2), _layer_scale(module, blk.ls2, conv.out_channels)),
            activation=m.activation, act_fn=act,
            paths={"q": a.q, "k": a.k, "v": a.v, "o": a.out_proj, "fc1": m.fc1, "fc2": m.fc2,
                   "norm1": blk.norm1, "norm2": blk.norm2}))
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
    final_norm = _norm(module, s.final_norm, "final norm")
    head = _probe_head(module, s.classifier, final_norm, conv.out_channels, len(blocks))
    return FloatViT(
        patch_size=conv.kernel_size[0], patch_weight=conv.weight.detach().float().clone(),
        patch_bias=bias.detach().float().clone(),
        cls=emb.cls_token.detach().float().reshape(1, -1).clone(),
        pos=emb.position_embeddings.detach().float().reshape(-1, conv.out_channels).clone(),
        blocks=blocks, final_norm=final_norm, classifier=_linear(module, s.classifier),
        paths={"patch": conv_path, "final_norm": s.final_norm, "classifier": s.classifier}, stem=stem, head=head)


def _layer_scale(module: nn.Module, path: str | None, dim: int) -> torch.Tensor | None:
    """A LayerScale's per-channel vector (its one 1-D parameter of the residual width), or None where the
    block has none. ``check_reference`` then confirms that the module does compute ``x * vector``."""
    if path is None:
        return None
    try:
        m = _get(module, path)
    except AttributeError:
        return None
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return None
    vectors = [t for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)) if t.ndim == 1]
    if len(vectors) != 1 or vectors[0].numel() != dim or any(True for _ in m.children()):
        raise VitcError(f"integer-only: LayerScale {path} ({type(m).__name__}) is not a per-channel scale of "
                        f"width {dim}", NO_INTEGER)
    return vectors[0].detach().float().clone()


def _scaled(lin: tuple[torch.Tensor, torch.Tensor], scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a LayerScale into the projection before it: ``(x W^T + b) * g = x (gW)^T + g b``."""
    if scale is None:
        return lin
    return lin[0] * scale[:, None], lin[1] * scale


def _probe_head(module: nn.Module, classifier: str, final_norm, dim: int, depth: int) -> list[FloatHeadPart]:
    """The parts of a multi-block linear probe (``vitc.models.real.Dinov2Probe``: a ``layout`` of CLS and
    patch-mean reads, 1-based blocks, each through the final norm, and a ``feature_norm`` standardisation),
    found on the classifier's owner; [] for the usual final-norm-on-CLS head."""
    owner_path = classifier.rsplit(".", 1)[0] if "." in classifier else ""
    owner = _get(module, owner_path) if owner_path else module
    layout = getattr(owner, "layout", None)
    if layout is None or not hasattr(layout, "cls_blocks") or not hasattr(layout, "mean_blocks"):
        return []
    reads = [("cls", b) for b in layout.cls_blocks] + [("mean", b) for b in layout.mean_blocks]
    width = len(reads) * dim
    standardise = getattr(owner, "feature_norm", None)
    mean = getattr(standardise, "mean", torch.zeros(width)).detach().double()
    std = getattr(standardise, "std", torch.ones(width)).detach().double()
    if mean.numel() != width or std.numel() != width or not bool((std > 0).all()):
        raise VitcError(f"integer-only: the probe head of {owner_path or 'the model'} has a standardisation that does "
                        f"not match its {len(reads)} reads of width {dim}", NO_INTEGER)
    g, b, eps = final_norm
    parts = []
    for j, (pool, block) in enumerate(reads):
        if not 1 <= block <= depth:
            raise VitcError(f"integer-only: the probe head reads block {block}, but the model has {depth}", NO_INTEGER)
        m, sd = mean[j * dim:(j + 1) * dim], std[j * dim:(j + 1) * dim]
        parts.append(FloatHeadPart(block - 1, pool, ((g.double() / sd).float(), ((b.double() - m) / sd).float(), eps)))
    return parts


STEM_OPS = "Conv2d, BatchNorm2d, ReLU"


def _conv_stem(module: nn.Module, s) -> tuple[list[FloatConv], nn.Conv2d, str]:
    """A hybrid's conv stem (the conv stage that replaces the patch projection) as BN-folded convs.

    The stage's convs and BatchNorms come from the structure; its leaf modules are read in
    registration order (a chain: conv, its BatchNorm, its activation), and ``apply`` checks
    the float reference against the model, so a stem that is not such a chain is caught.
    The last conv is the patch projection proper (stride = kernel) and stays the token matmul.
    """
    stage = s.conv_stages[0]
    if len(s.conv_stages) != 1 or stage.path != s.patch_embed or not stage.convs:
        first = stage.convs[0] if stage.convs else stage.path
        raise VitcError(f"integer-only: layer {first} (BatchNorm conv stage of a {s.kind} model) has no integer "
                        "version in the integer executor (only a conv stem in place of the patch projection is "
                        "converted)", NO_INTEGER)
    convs, norms = set(stage.convs), set(stage.norms)
    chain: list[dict] = []
    root = _get(module, stage.path)
    for name, m in root.named_modules():
        if not name or any(True for _ in m.children()):
            continue
        path = f"{stage.path}.{name}"
        if path in convs:
            if not isinstance(m, nn.Conv2d):
                raise VitcError(f"integer-only: layer {path} is a {type(m).__name__}, which has no integer version "
                                f"(stem ops: {STEM_OPS})", NO_INTEGER)
            chain.append({"path": path, "conv": m, "bn": None, "act": None})
        elif path in norms and isinstance(m, nn.BatchNorm2d) and chain and chain[-1]["act"] is None \
                and chain[-1]["bn"] is None:
            chain[-1]["bn"] = m
        elif isinstance(m, nn.ReLU) and chain and chain[-1]["act"] is None:
            chain[-1]["act"] = "relu"
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            continue
        else:
            act = m.__class__.__name__.lower()
            raise VitcError(f"integer-only: layer {path} ({type(m).__name__}) of the conv stem has no integer "
                            f"version in the stem (stem ops: {STEM_OPS}, each BatchNorm right after its conv"
                            f"{'; ' + act + ' is supported only in the MLP' if act in ('silu', 'gelu') else ''})",
                            NO_INTEGER)
    last = chain.pop()
    if last["bn"] is not None or last["act"] is not None:
        raise VitcError(f"integer-only: the last conv of the stem, {last['path']}, is followed by a BatchNorm or an "
                        "activation; the integer ViT needs a plain patch projection there", NO_INTEGER)
    stem = []
    for c in chain:
        m = c["conv"]
        k, st, pad = m.kernel_size, m.stride, m.padding
        if m.groups != 1 or m.dilation != (1, 1) or k[0] != k[1] or st[0] != st[1] or isinstance(pad, str) \
                or pad[0] != pad[1] or m.padding_mode != "zeros":
            raise VitcError(f"integer-only: conv {c['path']} has groups, dilation, a non-square kernel or stride, or "
                            "non-zero padding, which the integer stem does not cover", NO_INTEGER)
        w = m.weight.detach().double()
        b = m.bias.detach().double() if m.bias is not None else torch.zeros(m.out_channels, dtype=torch.float64)
        if c["bn"] is not None:
            bn = c["bn"]
            w, b = K.fold_batchnorm(w, b, bn.running_mean.double(), bn.running_var.double(),
                                    bn.weight.detach().double(), bn.bias.detach().double(), bn.eps)
        stem.append(FloatConv(c["path"], w.float(), b.float(), st[0], pad[0], c["act"] or "identity"))
    return stem, last["conv"], last["path"]


def _activation_module(module: nn.Module, fc1_path: str):
    """The MLP's own activation module (the sibling of fc1), so the float reference matches it exactly."""
    parent_path = fc1_path.rsplit(".", 1)[0]
    parent = _get(module, parent_path)
    for name in ("activation_fn", "intermediate_act_fn", "act", "activation"):
        fn = getattr(parent, name, None)
        if callable(fn):
            return fn
    return None
