"""Pruning groups of any model from its graph (``graph.py``), their surgery, scores and coverage.

A ``GraphGroup`` behaves like a family adapter's ``ChannelGroup`` for the pass (``units``,
``unit_size``, ``kind``, ``name``, ``keep``), so the allocations (uniform, global) and the
importance scores work on both. Surgery slices parameters in place and then refreshes the
width attributes of the layers it touched (``out_channels``, ``groups`` of a depthwise conv,
``in_features``, ``num_features``, ``normalized_shape``, an attention's head count), so a
subclassed layer keeps its class and forward.

Which units are kept is remembered on the module (``_vitc_kept``, a plain attribute that
``copy.deepcopy`` carries), because a channel axis may hold several groups one after the
other (a concatenation, a fused qkv) and each group's slice must find its current offset.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import importance as imp
from .graph import Graph, analyse
from .units import set_head_count

KEPT = "_vitc_kept"


@dataclass
class GraphGroup:
    name: str
    kind: str  # heads | mlp | conv
    space: int
    size: int  # channels
    unit_size: int
    members: list  # (fqn, axis, offset, n)
    axes: dict  # (fqn, axis) -> [(space, offset, n, unit)] every piece on that axis (shared between groups)
    attention: list = field(default_factory=list)
    producers: list = field(default_factory=list)
    consumers: list = field(default_factory=list)
    gate: tuple | None = None  # (module path, "in"|"out", channel dim)
    block: str | None = None

    def units(self, root: nn.Module) -> int:
        kept = root.__dict__.get(KEPT, {}).get(self.space)
        return len(kept) if kept is not None else self.size // self.unit_size

    def channels(self, root: nn.Module) -> int:
        return self.units(root) * self.unit_size

    def keep(self, root: nn.Module, unit_keep: torch.Tensor) -> None:
        state = root.__dict__.setdefault(KEPT, {})
        unit_keep = torch.as_tensor(unit_keep, dtype=torch.long)
        touched = set()
        for (fqn, axis), pieces in self.axes.items():
            if not any(p[0] == self.space for p in pieces):
                continue
            idx, off = [], 0
            for sp, _o, n, unit in pieces:
                cur = state.get(sp)
                cur_n = len(cur) * unit if cur is not None else n
                if sp == self.space:
                    local = (unit_keep[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)
                    idx.append(off + local)
                else:
                    idx.append(off + torch.arange(cur_n))
                off += cur_n
            _slice_tensor(root, fqn, axis, torch.cat(idx))
            touched.add(fqn.rsplit(".", 1)[0] if "." in fqn else "")
        cur = state.get(self.space, torch.arange(self.size // self.unit_size))
        state[self.space] = cur[unit_keep]
        for path in touched:
            refresh(root.get_submodule(path))
        for path in dict.fromkeys(self.attention):
            if path:
                set_head_count(root.get_submodule(path), len(unit_keep), self.unit_size)


def _slice_tensor(root: nn.Module, fqn: str, axis: int, idx: torch.Tensor) -> None:
    path, _, name = fqn.rpartition(".")
    mod = root.get_submodule(path) if path else root
    if name in mod._parameters:
        old = mod._parameters[name]
        mod._parameters[name] = nn.Parameter(old.detach().index_select(axis, idx.to(old.device)).clone(),
                                             requires_grad=old.requires_grad)
    else:
        old = mod._buffers[name]
        mod._buffers[name] = old.index_select(axis, idx.to(old.device)).clone()


def refresh(m: nn.Module) -> None:
    """Width attributes of a layer from its (sliced) tensors."""
    if isinstance(m, nn.modules.conv._ConvNd):
        w = m.weight
        if m.groups > 1 and m.groups == m.in_channels == m.out_channels:  # depthwise stays depthwise
            m.groups = m.in_channels = m.out_channels = w.shape[0]
        else:
            m.out_channels, m.in_channels = w.shape[0], w.shape[1] * m.groups
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        t = m.weight if m.weight is not None else m.running_mean
        m.num_features = t.shape[0]
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
        m.normalized_shape = (m.weight.shape[0],)


def _kind(g: Graph, root_space, modules: dict) -> str:
    sp = g.spaces[root_space]
    if sp.attention and sp.unit > 1:
        return "heads"
    if sp.producers and all(isinstance(modules.get(p), nn.Linear) for p in sp.producers):
        return "mlp"
    return "conv"


def find_groups(root: nn.Module, example: torch.Tensor) -> tuple[list[GraphGroup], Graph]:
    """Prunable groups of ``root`` (paths relative to it), and the analysed graph (for coverage)."""
    g, _params = analyse(root, example)
    modules = dict(root.named_modules())
    roots = {g.find(i) for i in range(len(g.spaces))}
    axes: dict = {}
    for r in roots:
        for fqn, axis, off, n in g.spaces[r].members:
            axes.setdefault((fqn, axis), set()).add((r, off, n, g.spaces[r].unit))
    axes = {k: sorted(v, key=lambda p: p[1]) for k, v in axes.items()}
    groups = []
    for r in sorted(roots):
        sp = g.spaces[r]
        if sp.blocked or not sp.producers or not sp.members or sp.size % sp.unit:
            continue
        name = sp.producers[0] if sum(1 for x in groups if x.name == sp.producers[0]) == 0 else f"{sp.producers[0]}#{r}"
        gate = next((x for x in sp.gates if x[0] in modules), None)
        groups.append(GraphGroup(name=name, kind=_kind(g, r, modules), space=r, size=sp.size, unit_size=sp.unit,
                                 members=list(dict.fromkeys(sp.members)), axes={k: v for k, v in axes.items() if any(p[0] == r for p in v)},
                                 attention=list(dict.fromkeys(sp.attention)), producers=list(dict.fromkeys(sp.producers)),
                                 consumers=list(dict.fromkeys(sp.consumers)), gate=gate, block=sp.producers[0]))
    return groups, g


def runnable(root: nn.Module, groups: list[GraphGroup], g: Graph, example: torch.Tensor) -> list[GraphGroup]:
    """The groups whose removal of one unit leaves a model that still runs with the same output shape.

    The graph shows which tensors share a channel axis, but not the widths a forward reads from
    elsewhere: ``nn.MultiheadAttention`` checks its input against ``embed_dim``, a hand-written
    attention may reshape with ``x.shape[-1] // self.heads``, Swin adds a per-head bias indexed
    from a table. Torch-Pruning lists such modules by hand; vitc tries each group on a copy
    instead (all at once first, one by one only if that fails) and blocks, with the error as
    the reason, the ones that break the forward, so they appear in the coverage as left alone.
    """
    import copy

    def trial(chosen: list[GraphGroup]) -> str | None:
        m = copy.deepcopy(root)
        try:
            for x in chosen:
                if x.units(m) > 1:
                    x.keep(m, torch.arange(x.units(m) - 1))
            with torch.no_grad():
                y = m.eval()(example)
        except Exception as exc:  # any error of the user's forward means: this width is read elsewhere
            return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:120]}"
        return None if _shapes(y) == _shapes(dense) else "changes the model's output shape"

    if any(isinstance(m, torch.fx.GraphModule) for m in root.modules()):
        return groups  # a torch.export program: the pass's own check explains why it cannot shrink
    with torch.no_grad():
        dense = root.eval()(example)
    if not groups or trial(groups) is None:
        return groups
    kept = []
    for x in groups:
        why = trial([x])
        if why is None:
            kept.append(x)
        else:
            g.block(x.space, f"pruning it breaks the model's forward ({why})")
    return kept


def _shapes(out) -> list:
    return [tuple(t.shape) for t in _output_tensors(out)]


def coverage(g: Graph, groups: list[GraphGroup], kinds: list[str]) -> dict:
    """Share of the model's conv/matmul FLOPs in ops that a pruned group shrinks; each op left alone with why."""
    live = {x.space for x in groups if x.kind in kinds}
    done, left = [], []
    for op in g.ops:
        rs = {g.find(x) for s in op.spaces for x in g.split.get(g.find(s), [s])}
        if rs & live:
            done.append(op)
        else:
            reasons = [g.spaces[r].blocked for r in rs if g.spaces[r].blocked]
            why = reasons[0] if reasons else ("no prunable channels on either side" if rs else "neither side carries layer channels")
            if rs and not reasons:
                why = "its channels belong to unit kinds not pruned (--units)"
            left.append({"name": op.module or op.name, "op": op.op, "flops": op.flops, "reason": why})
    total = sum(o.flops for o in g.ops)
    covered = sum(o.flops for o in done)
    return {"ops_pruned": len(done), "ops_total": len(g.ops), "flops_pruned": covered, "flops_total": total,
            "flops_share": covered / total if total else 0.0, "capture": "torch.export (non-strict)",
            "left_alone": sorted(left, key=lambda d: -d["flops"])}


def relative_flops(g: Graph, root: nn.Module) -> float:
    """Conv/matmul FLOPs of ``root`` as pruned so far over the dense model's, from the graph's shapes.

    Each op's FLOPs scale with the kept share of its input and output channels (a depthwise
    conv's and an attention's with their one channel axis), which is what a FLOP counter would
    measure on those ops, without running the model (the allocation searches ask often).
    """
    kept = root.__dict__.get(KEPT, {})

    def share(s: int) -> float:
        r = g.find(s)
        parts = g.split.get(r)
        if parts:
            return sum(share(p) for p in parts) / len(parts)
        sp = g.spaces[r]
        k = kept.get(r)
        return len(k) / (sp.size // sp.unit) if k is not None else 1.0

    dense = pruned = 0.0
    for op in g.ops:
        f = float(op.flops)
        for pieces in op.scales:
            total = sum(n for _, n in pieces)
            if total:
                f *= sum(n * share(s) for s, n in pieces) / total
        dense += op.flops
        pruned += f
    return pruned / dense if dense else 1.0


# ---------------------------------------------------------------- scores

def magnitude(root: nn.Module, group: GraphGroup) -> torch.Tensor:
    total = torch.zeros(group.size)
    for fqn, axis, off, n in group.members:
        t = _tensor(root, fqn)
        if t.dim() == 1 and not fqn.endswith("weight"):
            continue  # biases and running statistics say nothing of importance
        total += t.detach().float().narrow(axis, off, n).movedim(axis, 0).reshape(n, -1).pow(2).sum(1)
    return imp.per_unit(total.sqrt(), group.unit_size)


def _tensor(root: nn.Module, fqn: str) -> torch.Tensor:
    path, _, name = fqn.rpartition(".")
    mod = root.get_submodule(path) if path else root
    return getattr(mod, name)


def _hook(root: nn.Module, group: GraphGroup, fn):
    path, where, _dim = group.gate
    mod = root.get_submodule(path)
    if where == "in":
        return mod.register_forward_pre_hook(lambda m, args: fn(args[0]))
    return mod.register_forward_hook(lambda m, args, out: fn(out))


def _dim(group: GraphGroup, x: torch.Tensor) -> int:
    return group.gate[2] % x.dim()


def _output_tensors(out) -> list[torch.Tensor]:
    """Every float tensor a model returns (a tensor, a tuple/list, a dict or a transformers output)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict) or hasattr(out, "values") and callable(out.values):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _output_tensors(o)]
    return []


def _loss(out) -> torch.Tensor:
    """The Taylor objective over every output (a detector's boxes as well as its class logits: a
    head that only one output reads would otherwise get no gradient)."""
    total = 0
    for t in _output_tensors(out):
        if t.dim() == 2:  # logits: hard distillation against the dense model's top-1
            total = total + F.cross_entropy(t, t.detach().argmax(-1), reduction="sum")
        else:  # dense outputs: first-order change of the output energy
            total = total + t.float().pow(2).sum()
    return total


def score(root: nn.Module, groups: list[GraphGroup], method: str, images: torch.Tensor | None, batch: int) -> dict:
    gated = [g for g in groups if g.gate is not None] if method != "magnitude" else []
    scores = {g.name: magnitude(root, g) for g in groups if g not in gated}
    if not gated:
        return scores
    acts: dict[str, torch.Tensor] = {}
    sums: dict[str, torch.Tensor] = {}
    handles = []
    taylor = method == "taylor"
    for g in gated:
        def grab(x, g=g):
            if not isinstance(x, torch.Tensor):
                return
            if taylor and x.requires_grad:
                x.retain_grad()
                acts[g.name] = x
            elif not taylor:
                acts[g.name] = x.detach()
        handles.append(_hook(root, g, grab))
    was = root.training
    root.eval()
    params = list(root.parameters())
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(taylor)
        for i in range(0, len(images), batch):
            acts.clear()
            with torch.set_grad_enabled(taylor):
                out = root(images[i:i + batch])
                if taylor:
                    _loss(out).backward()
            for g in gated:
                a = acts.get(g.name)
                if a is None:
                    continue
                d = _dim(g, a)
                if taylor and a.grad is None:  # reaches no output: pruning it changes nothing
                    s = torch.zeros(a.shape[d])
                elif taylor:
                    s = imp.taylor_from_gates(imp.gate_gradients(a, a.grad, d), g.unit_size)
                else:
                    s = imp.channel_abs_mean(a, d) * len(a)
                sums[g.name] = sums.get(g.name, 0) + s
            root.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(params, saved):
            p.requires_grad_(r)
        root.train(was)
    for g in gated:
        s = sums.get(g.name)
        if s is None or s.numel() != g.size:
            scores[g.name] = magnitude(root, g)
        else:
            scores[g.name] = imp.per_unit(s, g.unit_size)
    return scores

