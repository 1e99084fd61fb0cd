"""2:4 semi-structured masks, as pure functions on 2-D weights (rows = outputs, cols = inputs).

Groups of four are consecutive input columns, as NVIDIA's sparse tensor cores (cuSPARSELt,
CUTLASS, TensorRT) read them along the reduction dimension. Conv weights are laid out as
(out, kh, kw, in) first (``conv_to_2d``) so a group is four input channels at one kernel tap.

* magnitude: keep the two largest |w| of each group;
* Wanda (Sun et al. 2023): keep the two largest |w| x ||x_col||_2;
* SparseGPT (Frantar & Alistarh 2023): choose by w^2 / [H^-1]_jj^2 and compensate the
  removed weights with the OBS update of the not-yet-pruned columns, H = X^T X.
"""
from __future__ import annotations

import torch

from vitc.compress.hessian import inverse_cholesky

N, M = 2, 4


def nm_mask(scores: torch.Tensor, n: int = N, m: int = M) -> torch.Tensor:
    """Boolean keep-mask with the ``n`` highest scores of every ``m`` consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} columns are not a multiple of {m}")
    groups = scores.float().reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def violations(weight2d: torch.Tensor, n: int = N, m: int = M) -> int:
    """Number of groups of ``m`` consecutive columns holding more than ``n`` non-zeros."""
    rows, cols = weight2d.shape
    if cols % m:
        return rows * ((cols + m - 1) // m)
    nonzero = (weight2d != 0).reshape(rows, cols // m, m).sum(-1)
    return int((nonzero > n).sum())


def conv_to_2d(weight: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) -> (out, kh * kw * in): consecutive columns are input channels at one tap."""
    if weight.dim() == 2:
        return weight
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def conv_from_2d(w2d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 2:
        return w2d
    out, cin, kh, kw = like.shape
    return w2d.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()


def magnitude_mask(w2d: torch.Tensor) -> torch.Tensor:
    return nm_mask(w2d.abs())


def wanda_mask(w2d: torch.Tensor, col_sq_norms: torch.Tensor) -> torch.Tensor:
    """``col_sq_norms``: sum over calibration rows of x_col^2 (the diagonal of X^T X)."""
    return nm_mask(w2d.abs() * col_sq_norms.sqrt()[None, :])


def sparsegpt(w2d: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 weights and keep-mask by SparseGPT: OBS mask selection with lazy batched updates.

    ``hessian`` is X^T X over the calibration inputs (cols x cols), in the column order of ``w2d``.
    """
    w, hinv = inverse_cholesky(w2d, hessian, damp)
    rows, cols = w.shape
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % M == 0:
                saliency = w1[:, i:i + M] ** 2 / torch.diag(hinv1)[i:i + M].reshape(1, -1) ** 2
                drop = saliency.topk(M - N, dim=1, largest=False).indices
                keep1[:, i:i + M].scatter_(1, drop, False)
            col = w1[:, i]
            d = hinv1[i, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i1:i2] = q1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.to(w2d.dtype), keep
