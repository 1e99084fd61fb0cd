"""Schedules: how many tokens each block removes, and whether that fits the token count."""
from __future__ import annotations

from vitc.errors import VitcError

METHODS = ("tome", "prune", "transform")
SCHEDULES = ("constant", "decreasing")


def max_r(method: str, tokens: int) -> int:
    """The most tokens one block may remove from ``tokens`` patch tokens."""
    if method == "prune":
        return max(tokens - 2, 0)  # at least one kept token beside the fused one
    return tokens // 2  # tome and transform remove tokens of the A half only


def per_layer(r: int | list[int], depth: int, schedule: str = "constant", layers: list[int] | None = None) -> list[int]:
    """Tokens removed by each of ``depth`` blocks.

    ``constant``: ``r`` in every chosen block. ``decreasing``: linear from ``2r`` in the first
    chosen block down to 0 after the last, so the total matches the constant schedule while
    early blocks, where tokens are most redundant, remove more.
    """
    if isinstance(r, (list, tuple)):
        if len(r) != depth:
            raise VitcError(f"the r list has {len(r)} entries but the model has {depth} blocks", f"give {depth} values, one per block")
        if any(int(v) < 0 for v in r):
            raise VitcError("r values must be 0 or more", "pass non-negative per-block values")
        return [int(v) for v in r]
    if r < 0:
        raise VitcError(f"r={r} is negative", "pass --r 0 or more")
    chosen = list(range(depth)) if layers is None else sorted(set(layers))
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad:
        raise VitcError(f"--layers {bad[0]} is not a block of this model (blocks 0..{depth - 1})", f"pick layers between 0 and {depth - 1}")
    out = [0] * depth
    if schedule == "constant":
        for i in chosen:
            out[i] = r
    elif schedule == "decreasing":
        m = len(chosen)
        for j, i in enumerate(chosen):
            out[i] = round(2 * r * (m - j) / (m + 1))
    else:
        raise VitcError(f"unknown schedule '{schedule}'", f"use one of: {', '.join(SCHEDULES)}")
    return out


def token_counts(rs: list[int], patches: int) -> list[int]:
    """Patch tokens entering each block, then after the last one."""
    counts = [patches]
    for r in rs:
        counts.append(counts[-1] - r)
    return counts


def fits(method: str, rs: list[int], patches: int) -> bool:
    counts = token_counts(rs, patches)
    return all(r <= max_r(method, n) for r, n in zip(rs, counts))


def largest_r(method: str, depth: int, patches: int, schedule: str = "constant", layers: list[int] | None = None) -> int:
    """The largest single ``r`` whose schedule fits the token count."""
    best = 0
    for r in range(1, patches + 1):
        if fits(method, per_layer(r, depth, schedule, layers), patches):
            best = r
        else:
            break
    return best


def check(method: str, r: int | list[int], depth: int, patches: int, schedule: str = "constant",
          layers: list[int] | None = None) -> list[int]:
    """Per-block removals, or a VitcError naming the largest valid value."""
    if method not in METHODS:
        raise VitcError(f"unknown merge method '{method}'", f"use one of: {', '.join(METHODS)}")
    rs = per_layer(r, depth, schedule, layers)
    if fits(method, rs, patches):
        return rs
    if isinstance(r, (list, tuple)):
        counts = token_counts(rs, patches)
        i = next(i for i, (v, n) in enumerate(zip(rs, counts)) if v > max_r(method, n))
        raise VitcError(f"r={rs[i]} at block {i} is too large: {counts[i]} patch tokens reach it and {method} can remove at most {max_r(method, counts[i])}",
                        "lower that entry")
    best = largest_r(method, depth, patches, schedule, layers)
    raise VitcError(f"r={r} is too large for {patches} patch tokens over {depth} blocks ({schedule} schedule, {method})",
                    f"the largest valid value is {best}")
