"""The layer-Hessian algebra of OBS-style one-shot passes (SparseGPT in ``sparsity/masks.py``,
GPTQ in ``quantize/gptq.py``): both walk a weight's columns and push each column's error onto the
rest through the upper Cholesky factor of the dampened inverse of X^T X."""
from __future__ import annotations

import torch


def inverse_cholesky(w: torch.Tensor, hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``w`` as float with the columns of dead inputs zeroed, upper Cholesky factor of
    (H + damp * mean(diag H) * I)^-1 as float). ``hessian`` is X^T X (cols x cols) in the column
    order of ``w``; a dead input (never nonzero) gets a unit diagonal so H stays invertible."""
    w = w.detach().clone().float()
    h = hessian.detach().clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    return w, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
