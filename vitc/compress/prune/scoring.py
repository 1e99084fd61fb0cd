"""Run the model on calibration images to score channel groups and attention sublayers.

The arithmetic lives in ``importance.py``; this module only places hooks and feeds batches.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import importance as imp
from .surgery import get_module
from .units import ChannelGroup


def _channel_dim(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


def _batches(images: torch.Tensor, batch: int):
    for i in range(0, len(images), batch):
        yield images[i:i + batch]


def magnitude(root: nn.Module, group: ChannelGroup) -> torch.Tensor:
    producers = [get_module(root, p).weight for p in group.producers + group.depthwise]
    consumers = [get_module(root, c).weight for c in group.consumers]
    scales = [get_module(root, n).weight for n in group.norms if get_module(root, n).weight is not None]
    return imp.per_unit(imp.owned_weight_norm(producers, consumers, scales), group.unit_size)


@torch.no_grad()
def activation(root: nn.Module, groups: list[ChannelGroup], images: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for g in groups:
        consumer = get_module(root, g.consumers[0])

        def hook(mod, args, g=g, dim=_channel_dim(consumer)):
            m = imp.channel_abs_mean(args[0], dim)
            sums[g.name] = sums.get(g.name, 0) + m

        handles.append(consumer.register_forward_pre_hook(hook))
    try:
        root.eval()
        for x in _batches(images, batch):
            root(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for g in groups:
        col = sum(imp.column_norms(get_module(root, c).weight) for c in g.consumers)
        out[g.name] = imp.per_unit(sums[g.name] * col, g.unit_size)
    return out


def taylor(root: nn.Module, groups: list[ChannelGroup], images: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Gate-Taylor scores under hard distillation: cross-entropy against the dense model's top-1.

    (The soft KL to the dense model has zero gradient at the dense weights, so it cannot rank
    anything before pruning starts; its hard-label form can.)
    """
    acts: dict[str, torch.Tensor] = {}
    scores: dict[str, torch.Tensor] = {}
    handles = []
    for g in groups:
        consumer = get_module(root, g.consumers[0])

        def hook(mod, args, g=g):
            x = args[0]
            if x.requires_grad:
                x.retain_grad()
                acts[g.name] = x

        handles.append(consumer.register_forward_pre_hook(hook))
    was_training = root.training
    root.eval()
    params = [p for p in root.parameters()]
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        for x in _batches(images, batch):
            acts.clear()
            logits = root(x)
            loss = F.cross_entropy(logits, logits.detach().argmax(-1), reduction="sum")
            loss.backward()
            for g in groups:
                a = acts[g.name]
                gates = imp.gate_gradients(a, a.grad, _channel_dim(get_module(root, g.consumers[0])))
                s = imp.per_unit(imp.taylor_from_gates(gates, g.unit_size), g.unit_size)
                scores[g.name] = scores.get(g.name, 0) + s
            root.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(params, saved):
            p.requires_grad_(r)
        root.train(was_training)
    return scores


def score_groups(root: nn.Module, groups: list[ChannelGroup], method: str, images: torch.Tensor | None, batch: int) -> dict[str, torch.Tensor]:
    if method == "magnitude":
        return {g.name: magnitude(root, g) for g in groups}
    if method == "activation":
        return activation(root, groups, images, batch)
    return taylor(root, groups, images, batch)


@torch.no_grad()
def attention_turns(root: nn.Module, structure, images: torch.Tensor, batch: int) -> dict[str, float]:
    """Per attention sublayer (by path): 1 - cos(X, X + Attn(LN(X))) over calibration tokens."""
    turns: dict[str, list[float]] = {}
    handles = []
    for block in structure.blocks:
        if block.attention is None:
            continue
        store: dict[str, torch.Tensor] = {}
        norm = get_module(root, block.norm1)
        out = get_module(root, block.attention.out_proj)

        def grab_x(mod, args, store=store):
            store["x"] = args[0]

        def grab_delta(mod, args, output, store=store, path=block.attention.path):
            x = store.pop("x")
            turns.setdefault(path, []).append(float(imp.residual_turn(x, x + output.reshape(x.shape))))

        handles += [norm.register_forward_pre_hook(grab_x), out.register_forward_hook(grab_delta)]
    try:
        root.eval()
        for x in _batches(images, batch):
            root(x)
    finally:
        for h in handles:
            h.remove()
    return {k: sum(v) / len(v) for k, v in turns.items()}
