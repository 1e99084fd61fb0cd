"""A BatchNorm convolutional stem that replaces a ViT's patch projection (a hybrid backbone).

Following Xiao et al., "Early Convolutions Help Transformers See Better" (2021): 3x3
conv-BN-ReLU layers (stride 1, then stride 2 until the patch stride is reached) and a 1x1
conv to the embedding width. It produces the same token grid as the patchify conv it
replaces, so transformers' ViT runs unchanged on top of it: conv stages feeding attention
blocks, with tokens that stay an unstructured set.
"""
from __future__ import annotations

import math

import torch.nn as nn


class ConvStem(nn.Sequential):
    def __init__(self, in_channels: int, widths: list[int], out_channels: int, stride: int):
        n_down = int(math.log2(stride))
        if 2**n_down != stride or len(widths) < n_down:
            raise ValueError(f"a stem of {len(widths)} convs cannot reach stride {stride}")
        layers: list[nn.Module] = []
        c = in_channels
        first_down = len(widths) - n_down
        for i, w in enumerate(widths):
            s = 2 if i >= first_down else 1
            layers += [nn.Conv2d(c, w, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        layers.append(nn.Conv2d(c, out_channels, 1))
        super().__init__(*layers)

    @property
    def weight(self):
        # transformers' ViTModel reads ``projection.weight.dtype`` to cast its input
        return self[0].weight
