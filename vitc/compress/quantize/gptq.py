"""GPTQ rounding (Frantar et al., 2023) onto fixed grids: shared by weight-only quantization
(``weight_only.py``, int4/int8 per group) and the graph path's low-bit weights (``torch_graph.py``,
per output channel, below 8 bits).

Columns are rounded one at a time, in order of decreasing input energy, and each column's
rounding error is spread over the columns not yet rounded through the inverse of the layer's
input Hessian X^T X, so rounding minimises the layer's output error rather than each weight's.
The grids (scales) are chosen before and never changed, so the stored integer codes and scales
stay exactly what the runtimes hold. The Hessian algebra is SparseGPT's (``vitc/compress/hessian.py``).
"""
from __future__ import annotations

import torch

from vitc.compress.hessian import inverse_cholesky

from . import quantizers as Q


def gptq_groups(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, bits: int,
                damp: float = 0.01, block: int = 128, act_order: bool = True,
                qrange: tuple[int, int] | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ rounding of ``w`` (out, in) onto the fixed group grid ``scale`` (out, in/group): the
    dequantized weights, every one on its grid. ``hessian`` is X^T X (in x in) of the layer's
    calibration inputs. ``act_order`` visits the inputs by decreasing Hessian diagonal, so the
    loudest inputs are rounded while the most columns remain to absorb their error; the grid is
    static, so the order changes no scale. ``qrange``: the integer limits (default: the restricted
    symmetric grid of per-channel weights; weight-only groups use every level, ``group_range``).
    ``zero`` (out, in/group): integer zero points of an asymmetric grid, whose ``qrange`` is unsigned."""
    qmin, qmax = qrange or Q.int_range(bits, True, restricted=True)
    cols = w.shape[1]
    s_full = scale.float().repeat_interleave(cols // scale.shape[1], dim=1)
    z_full = zero.float().repeat_interleave(cols // zero.shape[1], dim=1) if zero is not None else torch.zeros_like(s_full)
    perm = torch.argsort(torch.diag(hessian), descending=True) if act_order else torch.arange(cols)
    w, hinv = inverse_cholesky(w[:, perm], hessian[perm][:, perm], damp)
    s_full, z_full = s_full[:, perm], z_full[:, perm]
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col, s, z = w1[:, i], s_full[:, i1 + i], z_full[:, i1 + i]
            qc = (torch.clamp(torch.round(col / s) + z, qmin, qmax) - z) * s
            q[:, i1 + i] = qc
            e = (col - qc) / hinv1[i, i]
            w1[:, i:] -= e[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(perm)]


def refit_group_scales(w: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor,
                       damp: float = 0.01, rows: int = 64) -> torch.Tensor:
    """Group scales (out, groups) refit to the codes GPTQ chose: with each weight's integer code
    c (``q`` / ``scale``, zero point subtracted) kept, the row's group scales s minimise that row's
    output error (w - C s)^T H (w - C s) against the float ``w``, a least-squares problem of
    ``groups`` unknowns per row: (C^T H C) s = C^T H w.

    GPTQ fixes the grid before rounding and then pushes each column's error onto later columns, so
    the rounded row is no longer the one the clipping search scaled; its best scales differ by a few
    percent. Codes, zero points and the storage format stay as they are (NNCF's "scale estimation"
    refits scales too, by an iterative per-group search). A scale the solve leaves non-positive or
    non-finite, or of a group whose codes are all 0, keeps its old value. Measured on
    zoo:dinov2s-c10, int4 g64, 2,000 test images: output KL against FP32 0.0175 -> 0.0162."""
    out, cols = w.shape
    groups = scale.shape[1]
    g = cols // groups
    h = hessian.double().clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)  # GPTQ's own damping
    codes = torch.round(q.double() / scale.double().repeat_interleave(g, dim=1)).reshape(out, groups, g)
    h_by_group = h.reshape(groups, g, cols)
    new = scale.detach().clone().float()
    for r in range(0, out, rows):  # (rows, cols, groups) products: bounded memory on wide layers
        c = codes[r:r + rows]
        hc = torch.einsum("Gki,oGk->oiG", h_by_group, c)                      # H C
        a = torch.einsum("oGk,oGkH->oGH", c, hc.reshape(-1, groups, g, groups))  # C^T H C
        b = torch.einsum("oGk,oGk->oG", c, (w[r:r + rows].double() @ h).reshape(-1, groups, g))  # C^T H w
        ridge = 1e-9 * a.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)  # an all-zero group's row stays solvable
        sol = torch.linalg.solve(a + ridge[:, None, None] * torch.eye(groups, dtype=a.dtype), b.unsqueeze(-1)).squeeze(-1)
        ok = (sol > 0) & torch.isfinite(sol) & (c.abs().sum(-1) > 0)
        new[r:r + rows] = torch.where(ok, sol.float(), new[r:r + rows])
    return new


def prefix_token_layouts(structure) -> dict[int, int]:
    """{token count: prefix tokens} of the stages of ``structure`` whose prefix tokens (CLS,
    distillation) come first (empty: none): the inputs ``HessianTaps`` weights by token, and those
    whose prefix tokens get an activation grid of their own (``torch_graph.prefix_split_quantizers``)."""
    return {st.tokens.num_tokens: st.tokens.num_prefix for st in getattr(structure, "stages", None) or []
            if getattr(st, "tokens", None) is not None and st.tokens.num_prefix and st.tokens.cls_index in (0, None)}


class HessianTaps:
    """Second moments of the last axis of tensors seen by forward hooks, per key: X^T X (float64,
    accumulated from float32 products), or with ``full=False`` only its diagonal.

    Token weighting (``prefix_weight`` > 0): in a ViT whose head reads the CLS token, that token is
    one row in 257 of X^T X, yet half of what the classifier sees (CLS + patch mean) and, after
    the last attention, all the CLS half of it depends on. GPTQ then spends its error
    compensation on the patch rows. With ``prefix_weight`` w the moment is E_all[x x^T] +
    w E_prefix[x x^T]: w = 1 gives the prefix tokens as much weight as all tokens together.
    Measured on zoo:dinov2s-c10, weight-only int4 g64, 2,000 test images (benchmarks/gptq_token_weight.py):
    output KL against FP32 0.0352 -> 0.0185, top-1 agreement 91.95 -> 93.50% (w = 3 was worse than 1 on 500).
    ``taps.hook(module, key)`` reads the module's output, ``on="input"`` its first input."""

    def __init__(self, full: bool = True, prefix_layouts: dict[int, int] | None = None, prefix_weight: float = 0.0):
        self.full = full
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.handles = []
        # token-weighted moments (``prefix_token_layouts``): {tokens: prefix tokens first} of the
        # (batch, tokens, channels) inputs whose prefix rows also count separately, ``prefix_weight`` times
        self.prefix_layouts = (prefix_layouts or {}) if prefix_weight else {}
        self.prefix_weight = prefix_weight
        self.prefix_sums: dict[str, torch.Tensor] = {}
        self.prefix_rows: dict[str, int] = {}

    def _accumulate(self, sums: dict, rows: dict, key: str, a: torch.Tensor) -> None:
        m = (a.T @ a).double() if self.full else a.pow(2).sum(0).double()
        sums[key] = sums[key] + m if key in sums else m
        rows[key] = rows.get(key, 0) + a.shape[0]

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().float()
        self._accumulate(self.sums, self.rows, key, x.reshape(-1, x.shape[-1]))
        prefix = self.prefix_layouts.get(x.shape[1]) if x.dim() == 3 else None
        if prefix:
            self._accumulate(self.prefix_sums, self.prefix_rows, key, x[:, :prefix].reshape(-1, x.shape[-1]))

    def hook(self, module: torch.nn.Module, key: str, on: str = "output") -> None:
        if on == "input":
            self.handles.append(module.register_forward_pre_hook(lambda mod, args: self.add(key, args[0])))
        else:
            self.handles.append(module.register_forward_hook(lambda mod, args, out: self.add(key, out)))

    def means(self) -> dict[str, torch.Tensor]:
        """E[x x^T] (or E[x_i^2]) per key, float32; with prefix weighting, plus ``prefix_weight`` times
        that moment over the prefix tokens alone."""
        out = {}
        for k, v in self.sums.items():
            m = v / self.rows[k]
            if k in self.prefix_sums:
                m = m + self.prefix_weight * self.prefix_sums[k] / self.prefix_rows[k]
            out[k] = m.float()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
