"""Mixed precision (``vitc quantize --bits auto --size-budget 5.0`` or ``--max-drop 0.5``).

1. **Sensitivity** (``sensitivity``): for every quantizable layer and every width, the KL
   divergence of the model's output distribution (softmax of the logits) from the float
   model's when only that layer's weight (or input) is quantized to that width, on a few
   calibration images. Why KL of the output rather than a layer's own SQNR or its Hessian
   trace: it measures what the user sees (the prediction), it weighs a layer by how far its
   error travels (a late or residual-critical layer hurts more than its SQNR says), it needs
   no labels and no second-order backward pass, and one forward per (layer, width) is cheap
   next to calibration. Summing per-layer KLs is HAWQ's / MPTQ-ViT's additive model.
2. **Allocation**: the widths that minimise the summed sensitivity under the budget on the
   parameter-weighted average weight bits (and, with ``act_budget``, on the input-size-weighted
   average activation bits). ``allocate(..., method="greedy")`` is MPTQ-ViT's greedy descent
   (lower the layer with the least sensitivity increase per bit saved until the budget holds,
   then raise the most rewarding layers while they fit); ``method="ilp"`` solves the same
   multiple-choice knapsack exactly with scipy's MILP solver (the default: it is exact for the
   additive model and takes milliseconds at these sizes).
3. The chosen ``{layer: [wbits, abits]}`` goes to ``QuantConfig.layer_bits`` and the usual
   pass calibrates it; the table is printed, saved in the quant record and exported (the QDQ
   export carries weights of any width up to 8 exactly as int8 codes; 4/6-bit activations
   are refused there, by layer name).

The first layer, the classifier and a hybrid's bridge convs stay at 8 bits (``keep_ends_8bit``), so
the smallest reachable average is above the smallest width; an impossible budget says it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from vitc.errors import VitcError

from . import quantizers as Q

WIDTHS = (4, 6, 8)
WEIGHT_ONLY_WIDTHS = (4, 8)  # weight-only: int4 with group scales, int8 per channel (what the runtimes run)
SENSITIVITY_IMAGES = 64


@dataclass
class LayerInfo:
    name: str
    params: int  # weight elements: the cost of a weight bit
    inputs: int  # input elements per image: the cost of an activation bit
    fixed: bool = False  # an end layer pinned at 8 bits


def candidate_layers(module: nn.Module, structure, keep_ends_8bit: bool = True) -> list[LayerInfo]:
    from .ptq import end_layers

    ends = set(end_layers(structure, module)) if keep_ends_8bit else set()
    out = []
    for name, m in module.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out.append(LayerInfo(name, m.weight.numel(), 0, fixed=name in ends))
    return out


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _act_grid(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-tensor grid of ``x`` with the clipping of least squared error (a quick search)."""
    lo, hi = x.min(), x.max()
    best, best_err = None, math.inf
    for r in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5):
        scale, zero = Q.uniform_qparams(lo * r, hi * r, bits, False)
        qmin, qmax = Q.int_range(bits, False)
        err = (Q.fake_quant(x, scale, zero, qmin, qmax) - x).pow(2).sum().item()
        if err < best_err:
            best, best_err = (scale, zero), err
    return best


@torch.no_grad()
def sensitivity(module: nn.Module, layers: list[LayerInfo], x: torch.Tensor, widths=WIDTHS,
                activations: bool = False, progress=None, weight_quant=None) -> dict[str, dict[str, dict[int, float]]]:
    """{layer: {"w": {bits: KL}, "a": {bits: KL}}}: output KL with one layer quantized, the rest float.
    ``weight_quant(w, bits)``: the weight's grid (default: per output channel, searched clipping)."""
    quant = weight_quant or (lambda w, bits: Q.fake_quant_weight(w, Q.weight_qparams(w, bits, search=True), bits))
    module = module.eval()
    ref = module(x)
    free = [l for l in layers if not l.fixed]
    task = progress.add_task("sensitivity", total=len(free)) if progress is not None else None
    inputs: dict[str, torch.Tensor] = {}
    if activations:
        hooks = [module.get_submodule(l.name).register_forward_pre_hook(
            lambda m, a, n=l.name: inputs.__setitem__(n, a[0].detach())) for l in free]
        try:
            module(x)
        finally:
            for h in hooks:
                h.remove()
    table = {}
    for info in free:
        layer = module.get_submodule(info.name)
        w = layer.weight.detach().clone()
        row = {"w": {}, "a": {}}
        for bits in widths:
            layer.weight.copy_(quant(w, bits))
            row["w"][bits] = _kl(ref, module(x))
            layer.weight.copy_(w)
        if activations:
            info.inputs = inputs[info.name][0].numel()
            for bits in widths:
                scale, zero = _act_grid(inputs[info.name], bits)
                qmin, qmax = Q.int_range(bits, False)
                h = layer.register_forward_pre_hook(
                    lambda m, a, s=scale, z=zero, lo=qmin, hi=qmax: (Q.fake_quant(a[0], s, z, lo, hi),))
                try:
                    row["a"][bits] = _kl(ref, module(x))
                finally:
                    h.remove()
        table[info.name] = row
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    return table


# ---------------------------------------------------------------- allocation

def average_bits(choice: dict[str, int], costs: dict[str, int]) -> float:
    total = sum(costs.values())
    return sum(choice[n] * costs[n] for n in costs) / total if total else 0.0


def reachable(costs: dict[str, int], fixed: set[str], widths=WIDTHS) -> tuple[float, float]:
    lo = {n: (8 if n in fixed else min(widths)) for n in costs}
    hi = {n: (8 if n in fixed else max(widths)) for n in costs}
    return average_bits(lo, costs), average_bits(hi, costs)


def check_budget(budget: float, costs: dict[str, int], fixed: set[str], what: str = "--size-budget",
                 widths=WIDTHS) -> None:
    lo, _ = reachable(costs, fixed, widths)
    if budget + 1e-9 < lo:
        ends = f" (with {len(fixed)} end layers kept at 8 bits)" if fixed else ""
        raise VitcError(f"{what} {budget:g} cannot be met: the smallest reachable average is {lo:.2f} bits{ends}",
                        f"pass {what} {math.ceil(lo * 100) / 100:.2f} or more")


def allocate(sens: dict[str, dict[int, float]], costs: dict[str, int], budget: float, fixed: set[str] = frozenset(),
             widths=WIDTHS, method: str = "ilp") -> dict[str, int]:
    """Widths per layer minimising the summed sensitivity with the cost-weighted average width <= ``budget``.

    ``sens[layer][bits]``: sensitivity of each free layer; ``costs[layer]``: elements per bit
    (every layer, fixed ones included, counts in the average); ``fixed`` layers stay at 8."""
    check_budget(budget, costs, fixed, widths=widths)
    if method not in ("ilp", "greedy"):
        raise VitcError(f"allocation method '{method}' is not supported", "use ilp or greedy")
    free = [n for n in costs if n not in fixed]
    total = sum(costs.values())
    limit = budget * total - 8 * sum(costs[n] for n in fixed)  # bit-elements left for the free layers
    if method == "ilp":
        chosen = _ilp(sens, costs, free, limit, widths)
        if chosen is not None:
            return {**{n: 8 for n in fixed}, **chosen}
    return {**{n: 8 for n in fixed}, **_greedy(sens, costs, free, limit, widths)}


def _greedy(sens, costs, free, limit, widths) -> dict[str, int]:
    """MPTQ-ViT's greedy: descend from the widest until the budget holds, then climb back where it fits."""
    order = sorted(widths)
    choice = {n: order[-1] for n in free}
    used = lambda: sum(choice[n] * costs[n] for n in free)
    while used() > limit + 1e-6:
        best, best_rate = None, math.inf
        for n in free:
            i = order.index(choice[n])
            if i == 0:
                continue
            lower = order[i - 1]
            rate = (sens[n][lower] - sens[n][choice[n]]) / ((choice[n] - lower) * costs[n])
            if rate < best_rate:
                best, best_rate = (n, lower), rate
        if best is None:
            break
        choice[best[0]] = best[1]
    while True:  # fill: the step up with the largest sensitivity drop per bit that still fits
        room = limit - used()
        best, best_rate = None, 0.0
        for n in free:
            i = order.index(choice[n])
            if i == len(order) - 1:
                continue
            higher = order[i + 1]
            extra = (higher - choice[n]) * costs[n]
            if extra > room + 1e-6:
                continue
            rate = (sens[n][choice[n]] - sens[n][higher]) / extra
            if rate > best_rate:
                best, best_rate = (n, higher), rate
        if best is None:
            return choice
        choice[best[0]] = best[1]


def _ilp(sens, costs, free, limit, widths) -> dict[str, int] | None:
    try:
        import numpy as np
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        return None
    k = len(widths)
    n = len(free)
    c = np.array([sens[name][b] for name in free for b in widths], dtype=np.float64)
    # one width per layer
    pick = np.zeros((n, n * k))
    for i in range(n):
        pick[i, i * k:(i + 1) * k] = 1
    size = np.array([[b * costs[name] for name in free for b in widths]], dtype=np.float64)
    cons = [LinearConstraint(pick, 1, 1), LinearConstraint(size, -np.inf, limit + 1e-6)]
    res = milp(c, constraints=cons, integrality=np.ones(n * k), bounds=Bounds(0, 1))
    if not res.success:
        return None
    x = res.x.reshape(n, k)
    return {name: widths[int(np.argmax(x[i]))] for i, name in enumerate(free)}


def table_rows(layer_bits: dict[str, list[int]], sens: dict, costs: dict[str, int]) -> list[dict]:
    rows = []
    for name, (wb, ab) in layer_bits.items():
        s = sens.get(name, {})
        rows.append({"layer": name, "params": costs.get(name, 0), "wbits": wb, "abits": ab,
                     "kl_w4": s.get("w", {}).get(4), "kl_w6": s.get("w", {}).get(6), "kl_w8": s.get("w", {}).get(8)})
    return rows


# ---------------------------------------------------------------- the driver

def plan_mixed(backbone, x: torch.Tensor, size_budget: float | None = None, act_budget: float | None = None,
               abits: int = 8, method: str = "ilp", keep_ends_8bit: bool = True, progress=None,
               group_size: int | None = None, sensitivity_table: dict | None = None, asymmetric: bool = False) -> dict:
    """Sensitivity and allocation for ``backbone`` on calibration images ``x``: returns
    ``{"layer_bits": {layer: [w, a]}, "sensitivity": ..., "average_wbits", "average_abits", ...}``.

    Weight-only (``abits`` 16, ``group_size``): each layer int4 with group scales or int8 per
    channel (``WEIGHT_ONLY_WIDTHS``), measured on those grids (``weight_only.fake_quant``); layers
    that cannot take group scales stay at 8 (``weight_only.groupable``); ``asymmetric``: the int4
    groups measured on the zero-point grids ``--weight-scheme asymmetric`` installs.

    ``sensitivity_table``: a previous plan's ``"sensitivity"`` for the same model, images and grids
    (another budget without measuring again)."""
    module = backbone.require_module("mixed precision")
    layers = candidate_layers(module, backbone.structure, keep_ends_8bit)
    widths, weight_quant = WIDTHS, None
    if abits == 16:
        from . import weight_only as WO

        if act_budget is not None:
            raise VitcError("--act-budget allocates activation widths; weight-only (--abits 16) has none",
                            "drop --act-budget, or quantize activations (--abits 8)")
        group = group_size or WO.DEFAULT_GROUP
        widths, weight_quant = WEIGHT_ONLY_WIDTHS, (lambda w, bits: WO.fake_quant(w, bits, group, asymmetric))
        for l in layers:
            l.fixed = l.fixed or not WO.groupable(l.name, module.get_submodule(l.name), backbone.structure, group)
    costs = {l.name: l.params for l in layers}
    fixed = {l.name for l in layers if l.fixed}
    if size_budget is not None:
        check_budget(size_budget, costs, fixed, widths=widths)
    if sensitivity_table is not None:
        sens = {n: {k: {int(b): v for b, v in d.items()} for k, d in row.items()} for n, row in sensitivity_table.items()}
    else:
        sens = sensitivity(module, layers, x[:SENSITIVITY_IMAGES], widths, activations=act_budget is not None,
                           progress=progress, weight_quant=weight_quant)
    wbits = allocate({n: s["w"] for n, s in sens.items()}, costs, size_budget if size_budget is not None else 8.0,
                     fixed, widths=widths, method=method)
    if act_budget is not None:
        acosts = {l.name: max(1, l.inputs) for l in layers}
        a_bits = allocate({n: s["a"] for n, s in sens.items()}, acosts, act_budget, fixed, method=method)
    else:
        acosts = {l.name: 1 for l in layers}
        a_bits = {n: (8 if n in fixed and abits != 16 else abits) for n in costs}  # weight-only: float everywhere
    layer_bits = {n: [wbits[n], a_bits[n]] for n in costs}
    return {"layer_bits": layer_bits, "sensitivity": {n: {k: {str(b): v for b, v in d.items()} for k, d in s.items()}
                                                      for n, s in sens.items()},
            "metric": "KL(fp32 || one layer quantized) of the output distribution", "method": method,
            "size_budget": size_budget, "act_budget": act_budget,
            "average_wbits": round(average_bits(wbits, costs), 4),
            "average_abits": round(average_bits(a_bits, acosts), 4) if act_budget is not None else abits,
            "rows": table_rows(layer_bits, sens, costs), "greedy_path": None}


def descending_budgets(costs: dict[str, int], fixed: set[str], step: float = 0.25) -> list[float]:
    lo, hi = reachable(costs, fixed)
    out, b = [], hi
    while b >= lo - 1e-9:
        out.append(round(b, 4))
        b -= step
    if out[-1] > lo + 1e-6:
        out.append(round(lo + 1e-6, 6))
    return out


def search_max_drop(backbone, x: torch.Tensor, y: torch.Tensor | None, max_drop: float, quantize, abits: int = 8,
                    method: str = "ilp", progress=None, say=print) -> tuple[dict, object]:
    """The smallest average weight width whose quantized model drops at most ``max_drop`` points on
    the calibration proxy (top-1 against the calibration labels when they exist, else agreement with
    FP32), by bisection over budgets. ``quantize(layer_bits) -> Backbone``."""
    if max_drop < 0:
        raise VitcError(f"--max-drop {max_drop} is negative", "pass a drop in points, e.g. --max-drop 0.5")
    module = backbone.require_module("mixed precision")
    layers = candidate_layers(module, backbone.structure)
    costs = {l.name: l.params for l in layers}
    fixed = {l.name for l in layers if l.fixed}
    sens = sensitivity(module, layers, x[:SENSITIVITY_IMAGES], progress=progress)
    wsens = {n: s["w"] for n, s in sens.items()}
    with torch.no_grad():
        ref = torch.cat([backbone(x[i:i + 128]) for i in range(0, len(x), 128)]).argmax(-1)
    labels = y if y is not None and (y >= 0).all() else ref
    base = (ref == labels).float().mean().item()

    def drop_of(q) -> float:
        with torch.no_grad():
            pred = torch.cat([q(x[i:i + 128]) for i in range(0, len(x), 128)]).argmax(-1)
        return 100 * (base - (pred == labels).float().mean().item())

    budgets = descending_budgets(costs, fixed)
    tried = []
    lo, hi = 0, len(budgets) - 1  # budgets[lo] (the widest) is assumed to pass
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        wbits = allocate(wsens, costs, budgets[mid], fixed, method=method)
        layer_bits = {n: [wbits[n], 8 if n in fixed else abits] for n in costs}
        q = quantize(layer_bits)
        d = drop_of(q)
        tried.append({"budget": budgets[mid], "average_wbits": round(average_bits(wbits, costs), 4), "proxy_drop": round(d / 100, 5)})  # a fraction, as every accuracy in JSON (docs/json.md); d is in points
        say(f"  budget {budgets[mid]:.2f} bits: proxy drop {d:+.2f} pt")
        if d <= max_drop:
            best = (budgets[mid], layer_bits, q, wbits)
            lo = mid + 1
        else:
            hi = mid - 1
    if best is None:
        layer_bits = {n: [8, 8 if n in fixed else abits] for n in costs}
        best = (8.0, layer_bits, quantize(layer_bits), {n: 8 for n in costs})
    budget, layer_bits, q, wbits = best
    info = {"layer_bits": layer_bits, "sensitivity": {n: {k: {str(b): v for b, v in d.items()} for k, d in s.items()}
                                                      for n, s in sens.items()},
            "metric": "KL(fp32 || one layer quantized) of the output distribution", "method": method,
            "max_drop": max_drop, "proxy": "top-1 on the calibration labels" if y is not None else "top-1 agreement with FP32",
            "size_budget": budget, "average_wbits": round(average_bits(wbits, costs), 4), "average_abits": abits,
            "search": tried, "rows": table_rows(layer_bits, sens, costs)}
    return info, q
