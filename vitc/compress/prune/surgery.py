"""Shape surgery: keep a subset of a layer's output or input channels.

Pure functions on modules: they take a layer and the indices to keep and return a new,
smaller layer with the same dtype and device. BatchNorm keeps the running statistics of the
kept channels, so a pruned conv stage computes exactly what the dense one computed on those
channels. Family adapters (``adapters.py``) decide which layers share a channel dimension.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=True)


def slice_linear(layer: nn.Linear, out_keep: torch.Tensor | None = None, in_keep: torch.Tensor | None = None) -> nn.Linear:
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if out_keep is not None:
        w = w[out_keep]
        b = b[out_keep] if b is not None else None
    if in_keep is not None:
        w = w[:, in_keep]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight = _param(w)
    if b is not None:
        new.bias = _param(b)
    return new


def slice_conv(conv: nn.Conv2d, out_keep: torch.Tensor | None = None, in_keep: torch.Tensor | None = None) -> nn.Conv2d:
    """Keep output and/or input channels; a depthwise conv (groups == channels) keeps both together."""
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if conv.groups > 1 and not depthwise:
        raise ValueError(f"cannot slice a grouped conv with {conv.groups} groups that is not depthwise")
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else None
    if depthwise:
        keep = out_keep if out_keep is not None else in_keep
        if keep is not None:
            w, b = w[keep], (b[keep] if b is not None else None)
        channels = w.shape[0]
        in_ch, out_ch, groups = channels, channels, channels
    else:
        if out_keep is not None:
            w, b = w[out_keep], (b[out_keep] if b is not None else None)
        if in_keep is not None:
            w = w[:, in_keep]
        in_ch, out_ch, groups = w.shape[1], w.shape[0], 1
    new = nn.Conv2d(in_ch, out_ch, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups,
                    bias=b is not None, padding_mode=conv.padding_mode, device=w.device, dtype=w.dtype)
    new.weight = _param(w)
    if b is not None:
        new.bias = _param(b)
    return new


def slice_batchnorm(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                         device=bn.weight.device if bn.weight is not None else None)
    if bn.affine:
        new.weight = _param(bn.weight.detach()[keep])
        new.bias = _param(bn.bias.detach()[keep])
    if bn.track_running_stats:
        new.running_mean.copy_(bn.running_mean[keep])
        new.running_var.copy_(bn.running_var[keep])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel indices of the kept heads in a (heads * head_dim) projection."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


# lives in models/ so that structure discovery can recognise a removed sublayer without importing compress/
from vitc.models.wrappers import DroppedAttention  # noqa: E402,F401
