"""Which patches a merged model joined: the source map, and a picture of it."""
from __future__ import annotations

from pathlib import Path

import torch

from vitc.errors import VitcError


class _Stop(Exception):
    pass


@torch.no_grad()
def token_groups(merged, images: torch.Tensor) -> torch.Tensor:
    """(B, patches) index of the output token each patch ended in (for Token Transforming's
    soft spread: the token that received most of it), in the last block's token order."""
    from .adapters import mergeable_stage
    from .block import ReducingBlock

    module = merged.require_module("drawing merges")
    stage = mergeable_stage(merged.structure, merged.source)
    blocks = [module.get_submodule(b.path) for b in stage.blocks]
    if not all(isinstance(b, ReducingBlock) for b in blocks):
        raise VitcError(f"{merged.source} is not token-merged", "apply the merge pass first")
    captured = {}

    def grab(_mod, args, kwargs=None):
        captured["x"] = args[0]
        raise _Stop

    hook = blocks[0].register_forward_pre_hook(grab)
    try:
        module(images)
    except _Stop:
        pass
    finally:
        hook.remove()
    x = captured["x"]
    b, n, _ = x.shape
    prefix = stage.tokens.num_prefix
    patches = n - prefix
    source = torch.zeros(b, n, patches, dtype=x.dtype)
    source[:, prefix:] = torch.eye(patches, dtype=x.dtype)
    size = x.new_ones(b, n, 1)
    for blk in blocks:
        x, size, source = blk.forward_tokens(x, size, source)
    return source[:, prefix:].argmax(dim=1)  # (B, patches): the output token holding most of each patch


def draw(merged, images: torch.Tensor, path: Path, title: str = "") -> Path:
    """Each image beside its merged view: every patch painted with the mean colour of the
    patches that share its final token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from vitc.artifacts import atomic_path

    groups = token_groups(merged, images)
    stage = merged.structure.transformer_stages[0]
    gh, gw = stage.tokens.grid
    pre = merged.preprocess
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    rgb = (images * std + mean).clamp(0, 1)
    b, _, h, w = rgb.shape
    ph, pw = h // gh, w // gw
    patches = rgb[:, :, : gh * ph, : gw * pw].reshape(b, 3, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, 3, ph, pw)
    colour = patches.mean(dim=(3, 4))  # (B, P, 3)
    fig, axes = plt.subplots(b, 2, figsize=(4, 2 * b), squeeze=False)
    for i in range(b):
        g = groups[i]
        onehot = (g.unsqueeze(0) == torch.arange(int(g.max()) + 1).unsqueeze(1)).float()  # (T, P)
        mean_c = (onehot @ colour[i]) / onehot.sum(1, keepdim=True).clamp(min=1)
        painted = mean_c[g].reshape(gh, gw, 3)
        axes[i][0].imshow(rgb[i].permute(1, 2, 0).numpy())
        axes[i][1].imshow(painted.numpy(), interpolation="nearest")
        axes[i][1].set_title(f"{int(torch.unique(g).numel())} tokens", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
