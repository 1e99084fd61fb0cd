"""The float ViT the integer model is built from, with named taps where activations are quantized.

``FloatViT.forward`` reproduces the source model's arithmetic (checked against it in the
tests) and calls ``tap(name, tensor)`` at every point the integer model requantizes; the
calibration observes those tensors, and the tap names are the keys of the activation-scale
dict that ``build`` takes (so scales from another calibrator, e.g. the W8A8 pass, can be fed
in by name).

Tap names: ``input``; ``stem.j`` after each conv of a hybrid's conv stem (after its ReLU: unsigned);
``embed``; per block ``i``: ``i.norm1``, ``i.q``, ``i.k``, ``i.v``,
``i.probs`` (fixed grid 1/(2**prob_bits - 1), not calibrated), ``i.context``, ``i.residual1``, ``i.norm2``, ``i.fc1``, ``i.act``, ``i.residual2``; then
``final_norm`` (CLS token only); or, for a model with a multi-block probe head (``FloatViT.head``),
``features`` (the concatenated, standardised probe input) in its place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

Linear = tuple[torch.Tensor, torch.Tensor]  # weight (out, in), bias (out,)
Norm = tuple[torch.Tensor, torch.Tensor, float]  # weight, bias, eps


@dataclass
class FloatBlock:
    name: str
    heads: int
    head_dim: int
    norm1: Norm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    norm2: Norm
    fc1: Linear
    fc2: Linear
    activation: str
    act_fn: Callable | None = None
    paths: dict = field(default_factory=dict)


@dataclass
class FloatConv:
    """One conv of a hybrid's conv stem, its BatchNorm folded in, followed by ``activation``."""

    name: str
    weight: torch.Tensor  # (out, in, k, k)
    bias: torch.Tensor
    stride: int
    padding: int
    activation: str  # "relu" | "identity"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)
        return F.relu(y) if self.activation == "relu" else y


@dataclass
class FloatHeadPart:
    """One part of a linear-probe head that reads several blocks (DINOv2 linear evaluation): the CLS
    token (``pool="cls"``) or the mean of the patch tokens (``"mean"``) of block ``block``'s output
    (0-based), through a LayerNorm whose affine already carries the probe's per-feature
    standardisation (``(LN(x) - mean) / std`` is again a LayerNorm, with ``g / std`` and
    ``(b - mean) / std``), so the integer model needs no float op for it."""

    block: int
    pool: str  # "cls" | "mean"
    norm: Norm

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        w, bias, eps = self.norm
        if self.pool == "cls":
            return F.layer_norm(h[:, 0], w.shape, w, bias, eps)
        return F.layer_norm(h[:, 1:], w.shape, w, bias, eps).mean(dim=1)


@dataclass
class FloatViT:
    patch_size: int
    patch_weight: torch.Tensor  # (dim, C, p, p)
    patch_bias: torch.Tensor
    cls: torch.Tensor  # (1, dim)
    pos: torch.Tensor  # (1 + patches, dim)
    blocks: list[FloatBlock]
    final_norm: Norm
    classifier: Linear
    paths: dict = field(default_factory=dict)
    stem: list[FloatConv] = field(default_factory=list)  # a hybrid's convs before the patch projection
    head: list[FloatHeadPart] = field(default_factory=list)  # a multi-block probe head; empty: final norm on CLS

    def linears(self) -> dict[str, Linear]:
        """Every weight matrix, keyed by its layer path."""
        out = {self.paths["patch"]: (self.patch_weight.flatten(1), self.patch_bias)}
        for b in self.blocks:
            for key in ("q", "k", "v", "o", "fc1", "fc2"):
                out[b.paths[key]] = getattr(b, key)
        out[self.paths["classifier"]] = self.classifier
        return out

    def forward(self, x: torch.Tensor, tap: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        tap = tap or (lambda name, t: t)
        x = tap("input", x)
        for j, conv in enumerate(self.stem):
            x = tap(f"stem.{j}", conv(x))
        h = F.conv2d(x, self.patch_weight, self.patch_bias, stride=self.patch_size).flatten(2).transpose(1, 2)
        h = tap("embed", h + self.pos[1:])
        h = torch.cat([(self.cls + self.pos[:1]).expand(x.shape[0], 1, -1), h], dim=1)
        read = {part.block for part in self.head}
        outputs = {}
        for i, b in enumerate(self.blocks):
            h = block_forward(b, h, lambda name, t, i=i: tap(f"{i}.{name}", t))
            if i in read:
                outputs[i] = h
        if self.head:
            features = tap("features", torch.cat([part(outputs[part.block]) for part in self.head], dim=-1))
            return F.linear(features, *self.classifier)
        w, bias, eps = self.final_norm
        cls = tap("final_norm", F.layer_norm(h[:, 0], w.shape, w, bias, eps))
        return F.linear(cls, *self.classifier)


def activation(b: FloatBlock, x: torch.Tensor) -> torch.Tensor:
    if b.act_fn is not None:
        return b.act_fn(x)
    return {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}[b.activation](x)


def block_forward(b: FloatBlock, h: torch.Tensor, tap: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    n, t, d = h.shape
    w, bias, eps = b.norm1
    x = tap("norm1", F.layer_norm(h, w.shape, w, bias, eps))

    def heads(name: str, lin: Linear) -> torch.Tensor:
        return tap(name, F.linear(x, *lin)).reshape(n, t, b.heads, b.head_dim).transpose(1, 2)

    q, k, v = heads("q", b.q), heads("k", b.k), heads("v", b.v)
    probs = tap("probs", torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(b.head_dim), dim=-1))
    ctx = tap("context", (probs @ v).transpose(1, 2).reshape(n, t, d))
    h = tap("residual1", h + F.linear(ctx, *b.o))
    w, bias, eps = b.norm2
    x = tap("norm2", F.layer_norm(h, w.shape, w, bias, eps))
    a = tap("act", activation(b, tap("fc1", F.linear(x, *b.fc1))))
    return tap("residual2", h + F.linear(a, *b.fc2))
