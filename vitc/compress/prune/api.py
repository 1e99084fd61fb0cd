"""Structured pruning: ``PruneConfig`` and ``apply(backbone, config, data) -> Backbone``.

Order of work: attention sublayers are removed first (by how little they turn the residual
stream), then every remaining channel group (heads, MLP hidden channels, conv channels) is
scored once on the dense model and shrunk to its kept count. Kept counts come from explicit
ratios, or for a ``flops``/``params`` target from one of two allocations:

* ``uniform``: one keep ratio shared by all unit kinds in ``units``, found by bisection on the
  measured FLOPs or parameters of the pruned model (uniform widths keep the model loadable by
  plain transformers and its kernels regular);
* ``global``: every unit of every searched group ranked together by its Taylor score per
  FLOP (or parameter) it costs, and the best-ranked kept, the cut found by bisection on the
  measured size (Molchanov et al. 2019's global ranking; Taylor scores of one loss are on
  one scale across layers, magnitude and activation scores are not). Blocks end up with
  different widths, still rounded to ``round_to`` and never below one head.

Every ratio is the fraction *kept*: ``flops=0.7`` keeps 70% of the FLOPs, ``heads=0.75``
keeps 3 of 4 heads per block.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn

from vitc.errors import VitcError

from . import generic, scoring
from .adapters import conv_groups, drop_attention, sync_config
from .importance import METHODS, keep_indices
from .units import KINDS, ChannelGroup, keep_channels, transformer_groups


ALLOCATIONS = ("uniform", "global")
GROUP_METHODS = ("auto", "adapter", "graph")


@dataclass
class PruneConfig:
    importance: str = "taylor"  # magnitude | activation | taylor
    flops: float | None = None  # fraction of FLOPs to keep
    params: float | None = None  # fraction of parameters to keep
    heads: float | None = None  # fraction of heads kept in every attention
    mlp: float | None = None  # fraction of MLP hidden channels kept
    conv: float | None = None  # fraction of prunable conv channels kept
    drop_attention: int = 0  # attention sublayers to remove entirely
    units: list[str] = field(default_factory=lambda: list(KINDS))  # kinds a --flops/--params target may shrink
    round_to: int = 8  # kept MLP/conv channel counts are multiples of this
    allocation: str = "uniform"  # uniform | global: how a --flops/--params target is shared between groups
    batch_size: int = 32  # calibration batch for activation/Taylor scores
    method: str = "auto"  # where groups come from: adapter (family knowledge), graph (any model), auto (adapter, else graph)

    def validate(self) -> None:
        for name in ("flops", "params", "heads", "mlp", "conv"):
            v = getattr(self, name)
            if v is not None and not 0 < v < 1:
                flag = f"--{name}"
                raise VitcError(f"{flag} {v} is outside (0, 1)", f"pass the fraction to keep, e.g. {flag} 0.7")
        if self.flops is not None and self.params is not None:
            raise VitcError("--flops and --params were both given", "pass one target")
        if self.importance not in METHODS:
            raise VitcError(f"unknown importance '{self.importance}'", f"use one of: {', '.join(METHODS)}")
        bad = [u for u in self.units if u not in KINDS]
        if bad:
            raise VitcError(f"unknown unit kind '{bad[0]}'", f"use some of: {', '.join(KINDS)}")
        if self.allocation not in ALLOCATIONS:
            raise VitcError(f"unknown allocation '{self.allocation}'", f"use one of: {', '.join(ALLOCATIONS)}")
        if self.allocation == "global" and self.importance != "taylor":
            raise VitcError(f"--allocation global ranks units across layers, which {self.importance} scores do not allow",
                            "use --importance taylor with --allocation global")
        if self.method not in GROUP_METHODS:
            raise VitcError(f"unknown group method '{self.method}'", f"use one of: {', '.join(GROUP_METHODS)}")
        if self.round_to < 1:
            raise VitcError(f"--round-to {self.round_to} is not positive", "pass 1 for no rounding, 8 for tensor-core friendly widths")
        if self.drop_attention < 0:
            raise VitcError(f"--drop-attention {self.drop_attention} is negative", "pass how many attention sublayers to remove")
        if not (self.flops or self.params or self.heads or self.mlp or self.conv or self.drop_attention):
            raise VitcError("nothing to prune", "pass --flops, --params, --heads, --mlp, --conv or --drop-attention")


def kept_count(units: int, ratio: float, unit_size: int, round_to: int) -> int:
    """Units kept out of ``units`` at ``ratio``: heads round to the nearest count (possibly 0),
    channels to a multiple of ``round_to`` (never below one multiple, or one channel)."""
    if unit_size > 1:
        return round(units * ratio)
    if round_to <= 1 or units <= round_to:
        return max(1, round(units * ratio))
    return min(units, max(round_to, round(units * ratio / round_to) * round_to))


def images_of(data, backbone) -> torch.Tensor | None:
    """Calibration images as one preprocessed tensor, from a tensor or an ImageSource (as recipes pass them)."""
    if data is None or isinstance(data, torch.Tensor):
        return data
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import ImageSource

    if isinstance(data, ImageSource):
        return load_tensors(data, backbone.preprocess)[0]
    raise TypeError(f"calibration data must be a tensor or an ImageSource, not {type(data).__name__}")


def apply(backbone, config: PruneConfig, data=None):
    """A pruned copy of ``backbone``; ``data``: calibration images (a preprocessed tensor or an ImageSource)."""
    config.validate()
    backbone.require_module("pruning")
    data = images_of(data, backbone)
    needs_data = config.importance != "magnitude" or config.drop_attention
    if needs_data and (data is None or len(data) == 0):
        raise VitcError(f"{config.importance if config.importance != 'magnitude' else 'attention removal'} needs calibration images",
                        "pass --data (or use --importance magnitude without --drop-attention)")
    dense_flops, dense_params = backbone.flops(), backbone.parameters_count()
    out = backbone.copy()
    root = out.module
    structure = backbone.structure  # paths are identical in the copy

    dropped = _drop_attention(root, structure, config, data) if config.drop_attention else []
    groups, graph = [], None
    if config.method != "graph":
        try:
            groups = transformer_groups(structure, set(dropped)) + conv_groups(root, structure)
        except VitcError:
            if config.method == "adapter":
                raise
    if config.method == "adapter" and not groups:
        raise VitcError(f"{backbone.source} has no prunable units that a family adapter knows ({structure.family})",
                        "use --method graph (or auto) to find channel groups from the model's graph")
    if config.method == "graph" or not groups:
        if dropped:
            raise VitcError("--drop-attention needs a family adapter", "drop --drop-attention, or prune a ViT/DeiT/MobileViT")
        groups, graph = generic.find_groups(root, backbone.example_input(2))
        groups = generic.runnable(root, groups, graph, backbone.example_input(1))
    if not groups and (config.flops or config.params or config.heads or config.mlp or config.conv):
        reasons = generic.coverage(graph, [], []) if graph is not None else {"left_alone": []}
        top = reasons["left_alone"][0]["reason"] if reasons["left_alone"] else "no conv/linear layers"
        raise VitcError(f"{backbone.source} has no channel group that can shrink (e.g. {top})",
                        "see vitc prune --out for every op and why it was left alone")
    explicit = {"heads": config.heads, "mlp": config.mlp, "conv": config.conv}
    for kind, ratio in explicit.items():
        if ratio is not None and not any(g.kind == kind for g in groups):
            raise VitcError(f"--{kind} was given but {backbone.source} has no {kind} units", f"drop --{kind}")
    searched = [k for k in config.units if explicit[k] is None and any(g.kind == k for g in groups)]
    target = config.flops if config.flops is not None else config.params
    if target is not None and not searched:
        raise VitcError("a --flops/--params target needs a unit kind to shrink", "add heads, mlp or conv to --units, or drop the explicit ratios")

    def counts_at(r: float | None) -> dict[str, int]:
        counts = {}
        for g in groups:
            ratio = explicit[g.kind] if explicit[g.kind] is not None else (r if g.kind in searched else None)
            if ratio is None:
                continue
            n = kept_count(g.units(root), ratio, g.unit_size, config.round_to)
            if n == 0 and explicit[g.kind] is None:
                n = 1  # a searched target never empties an attention; only --drop-attention removes one
            elif n == 0:
                raise VitcError(f"keeping {ratio:.0%} of the heads would remove every head of {g.block}",
                                "keep more heads (a larger --heads or --flops), or remove whole sublayers with --drop-attention")
            counts[g.name] = n
        return counts

    scores = {}
    global_rank = None
    if target is not None:
        measure = (lambda b: b.flops() / dense_flops) if config.flops is not None else (lambda b: b.parameters_count() / dense_params)
        if config.flops is not None and graph is not None:
            measure = lambda b: generic.relative_flops(graph, b.module)  # noqa: E731  (the same ops, from shapes)
        if config.allocation == "global":
            ratio = None
            fixed = counts_at(None)  # explicit ratios of the kinds not searched
            ranked = [g for g in groups if g.kind in searched]
            scores = _score(root, groups, config.importance, data, config.batch_size)
            unit_cost = _unit_costs(out, ranked, measure)
            counts, global_rank = _search_global(out, groups, ranked, fixed, scores, unit_cost, measure, target, config.round_to)
        else:
            ratio = _search_ratio(out, groups, counts_at, measure, target)
            counts = counts_at(ratio)
    else:
        ratio = None
        counts = counts_at(None)

    shrinking = [g for g in groups if g.name in counts and counts[g.name] < g.units(root)]
    if shrinking and not scores:
        scores = _score(root, shrinking, config.importance, data, config.batch_size)
    plan = {}
    for g in groups:
        if g.name in counts and counts[g.name] < g.units(root):
            _keep(root, g, keep_indices(scores[g.name], counts[g.name]))
        plan[g.name] = g.units(root) * g.unit_size
    from vitc.models.adapters import discover

    if graph is not None:
        heads = {a: {"heads": g.units(root), "head_dim": g.unit_size} for g in groups if g.kind == "heads" for a in g.attention if a}
        root.__dict__.pop(generic.KEPT, None)
        synced = False
        _check_runs(backbone, root)
        cover = generic.coverage(graph, [g for g in groups if g.name in counts and counts[g.name] < g.size // g.unit_size],
                                 list(KINDS))
    else:
        synced = sync_config(root, discover(root))
        cover = _adapter_coverage(backbone, root, groups, counts)
        # head counts travel with a saved state (a family whose forward reads them needs them back)
        heads = {g.attention: {"heads": g.units(root), "head_dim": g.unit_size} for g in groups if g.kind == "heads" and g.attention}
    pruned = replace(out, module=root)
    record = {
        "pass": "prune", "config": asdict(config), "groups_from": "graph" if graph is not None else "adapter",
        "plan": {"channels": plan, "dropped_attention": dropped, "config_describes_all_layers": synced, "heads": heads},
        "keep_ratio": ratio, "global_rank_kept": global_rank, "flops": pruned.flops(), "flops_dense": dense_flops,
        "params": pruned.parameters_count(), "params_dense": dense_params, "coverage": cover,
    }
    return out.with_module(root, record)


def _keep(root: nn.Module, g, unit_keep) -> None:
    if isinstance(g, generic.GraphGroup):
        g.keep(root, unit_keep)
    else:
        keep_channels(root, g, unit_keep)


def _score(root: nn.Module, groups: list, method: str, data, batch: int) -> dict:
    graph_groups = [g for g in groups if isinstance(g, generic.GraphGroup)]
    family = [g for g in groups if not isinstance(g, generic.GraphGroup)]
    scores = scoring.score_groups(root, family, method, data, batch) if family else {}
    if graph_groups:
        scores.update(generic.score(root, graph_groups, method, data, batch))
    return scores


def _check_runs(backbone, root: nn.Module) -> None:
    """The pruned model still runs and keeps its output shape (a forward that reads a width from
    somewhere vitc did not slice fails here, not later)."""
    x = backbone.example_input(2)
    with torch.no_grad():
        dense_shape = tuple(backbone.module.eval()(x).shape)
        try:
            shape = tuple(root.eval()(x).shape)
        except Exception as exc:
            if any(isinstance(m, torch.fx.GraphModule) for m in root.modules()):
                fix = ("a torch.export program bakes layer widths (conv groups, reshape sizes) into its graph; "
                       "prune the model from its Python code (pkg.module:factory --weights), or use vitc sparsify")
            else:
                fix = "its forward reads a width vitc cannot change; prune fewer unit kinds (--units mlp,conv)"
            raise VitcError(f"the pruned model no longer runs ({type(exc).__name__}: {str(exc).splitlines()[0][:140]})", fix) from exc
    if shape != dense_shape:
        raise VitcError(f"pruning changed the output shape {dense_shape} -> {shape}", "prune fewer unit kinds (--units)")


def _adapter_coverage(backbone, root: nn.Module, groups: list, counts: dict) -> dict:
    """Coverage of a family-adapter prune, counted on the layers the groups name (per-op FLOPs by hooks)."""
    from .surgery import get_module

    def layers(g):
        return list(g.producers) + list(g.consumers) + list(g.depthwise)

    touched = {p for g in groups if g.name in counts for p in layers(g)}
    # a layer of a group that was not pruned: its unit kind was left out of the plan (--units, or no ratio for it)
    kind_of = {p: g.kind for g in groups if g.name not in counts for p in layers(g)}
    flops = layer_flops(backbone)

    def reason(name: str) -> str:
        if name in kind_of:
            return f"its {kind_of[name]} units were not in the pruning plan (--units / --{kind_of[name]})"
        return "outside the blocks the family adapter prunes"

    done = {k: v for k, v in flops.items() if k in touched}
    total = sum(flops.values())
    return {"ops_pruned": len(done), "ops_total": len(flops), "flops_pruned": sum(done.values()), "flops_total": total,
            "flops_share": sum(done.values()) / total if total else 0.0, "capture": "family adapter",
            "left_alone": sorted(({"name": k, "op": "linear" if isinstance(get_module(backbone.module, k), nn.Linear) else "conv",
                                   "flops": v, "reason": reason(k)}
                                  for k, v in flops.items() if k not in touched), key=lambda d: -d["flops"])}


@torch.no_grad()
def layer_flops(backbone) -> dict[str, int]:
    """FLOPs per image of every Linear/Conv2d (subclasses included) of the backbone, measured by hooks."""
    module = backbone.module
    out: dict[str, int] = {}
    handles = []
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            def hook(mod, args, y, name=name):
                k = mod.in_features if isinstance(mod, nn.Linear) else (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
                out[name] = out.get(name, 0) + 2 * y.numel() * k
            handles.append(m.register_forward_hook(hook))
    try:
        module.eval()(backbone.example_input(1))
    finally:
        for h in handles:
            h.remove()
    return out


def _drop_attention(root: nn.Module, structure, config: PruneConfig, data: torch.Tensor) -> list[str]:
    present = [b.attention.path for b in structure.blocks if b.attention is not None]
    if config.drop_attention >= len(present):
        raise VitcError(f"--drop-attention {config.drop_attention} would remove every attention sublayer ({len(present)})",
                        f"pass at most {len(present) - 1}")
    turns = scoring.attention_turns(root, structure, data, config.batch_size)
    order = sorted(present, key=lambda p: turns[p])
    dropped = sorted(order[: config.drop_attention], key=present.index)
    for path in dropped:
        drop_attention(root, path, structure)
    return dropped


def _search_ratio(backbone, groups: list[ChannelGroup], counts_at, measure, target: float) -> float:
    """The largest shared keep ratio whose pruned model meets ``target`` (cost of shapes only)."""
    def cost(r: float) -> float:
        trial = backbone.copy()
        for g in groups:
            n = counts_at(r).get(g.name)
            if n is not None and n < g.units(trial.module):
                _keep(trial.module, g, torch.arange(n))
        return measure(trial)

    lo, hi = 1e-3, 1.0
    floor = cost(lo)
    if floor > target:
        raise VitcError(f"the target {target:.2f} is out of reach: the smallest model these units allow keeps {floor:.2f}",
                        "raise the target, add unit kinds (--units), or remove attention sublayers (--drop-attention)")
    for _ in range(14):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
    return lo


def _shrunk_cost(backbone, groups: list[ChannelGroup], counts: dict[str, int], measure) -> float:
    """``measure`` of a copy with every group cut to its count (which channels go does not change the size)."""
    trial = backbone.copy()
    for g in groups:
        n = counts.get(g.name)
        if n is not None and n < g.units(trial.module):
            _keep(trial.module, g, torch.arange(n))
    return measure(trial)


def _unit_costs(backbone, groups: list[ChannelGroup], measure) -> dict[str, float]:
    """What one unit of each group costs, as a fraction of the dense size: measured by halving the group."""
    full = measure(backbone)
    costs = {}
    for g in groups:
        n = g.units(backbone.module)
        half = max(1, n // 2) if n > 1 else n
        removed = n - half
        costs[g.name] = (full - _shrunk_cost(backbone, [g], {g.name: half}, measure)) / removed if removed else 1.0
    return costs


def global_counts(scores: dict[str, torch.Tensor], unit_cost: dict[str, float], unit_size: dict[str, int], kept: int,
                  round_to: int) -> dict[str, int]:
    """Kept units per group when the ``kept`` best units by score per cost, over all groups, stay.

    Heads (``unit_size`` > 1) keep at least one; channel counts round to the nearest multiple of
    ``round_to`` (at least one multiple, at most all).
    """
    names = list(scores)
    value = torch.cat([scores[n].float() / max(unit_cost[n], 1e-12) for n in names])
    owner = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    best = owner[torch.argsort(value, descending=True, stable=True)[:kept]]
    counts = {}
    for i, n in enumerate(names):
        units, c = scores[n].numel(), int((best == i).sum())
        if unit_size[n] > 1:
            counts[n] = max(1, c)
        elif round_to <= 1 or units <= round_to:
            counts[n] = max(1, c)
        else:
            counts[n] = min(units, max(round_to, round(c / round_to) * round_to))
    return counts


def _search_global(backbone, groups: list[ChannelGroup], ranked: list[ChannelGroup], fixed: dict[str, int], scores,
                   unit_cost, measure, target: float, round_to: int) -> tuple[dict[str, int], int]:
    """The largest number of globally ranked units whose pruned model meets ``target``: the counts and that number.

    ``groups``: every group (those in ``fixed`` keep their explicit counts); ``ranked``: the searched ones.
    """
    ranked_scores = {g.name: scores[g.name] for g in ranked}
    sizes = {g.name: g.unit_size for g in ranked}

    def counts(k: int) -> dict[str, int]:
        return {**fixed, **global_counts(ranked_scores, unit_cost, sizes, k, round_to)}

    def cost(k: int) -> float:
        return _shrunk_cost(backbone, groups, counts(k), measure)

    lo, hi = 0, sum(s.numel() for s in ranked_scores.values())
    floor = cost(lo)
    if floor > target:
        raise VitcError(f"the target {target:.2f} is out of reach: the smallest model these units allow keeps {floor:.2f}",
                        "raise the target, add unit kinds (--units), or remove attention sublayers (--drop-attention)")
    if cost(hi) <= target:
        return counts(hi), hi
    while hi - lo > 1:  # cost(lo) <= target < cost(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= target else (lo, mid)
    return counts(lo), lo
