"""Pareto fronts over sweep points: pure functions on lists of dicts.

Objectives are (key, sense) pairs, sense +1 to maximise and -1 to minimise, e.g.
``[("top1", 1), ("latency_ms", -1), ("size_bytes", -1)]``. Points missing an objective are
left out of the front they cannot be placed on.
"""
from __future__ import annotations


def dominates(a: dict, b: dict, objectives) -> bool:
    """``a`` is no worse than ``b`` on every objective and better on one."""
    better = False
    for key, sense in objectives:
        x, y = sense * a[key], sense * b[key]
        if x < y:
            return False
        if x > y:
            better = True
    return better


def front(points: list[dict], objectives) -> list[dict]:
    """The non-dominated points (ties on every objective are all kept)."""
    usable = [p for p in points if all(p.get(k) is not None for k, _ in objectives)]
    return [p for p in usable if not any(dominates(q, p, objectives) for q in usable if q is not p)]


def layers(points: list[dict], objectives) -> list[list[dict]]:
    """Non-dominated sorting: the front, then the front of what is left, and so on."""
    rest = [p for p in points if all(p.get(k) is not None for k, _ in objectives)]
    out = []
    while rest:
        f = front(rest, objectives)
        out.append(f)
        ids = {id(p) for p in f}
        rest = [p for p in rest if id(p) not in ids]
    return out


def keep_best(points: list[dict], objectives, count: int) -> list[dict]:
    """The ``count`` best points by front rank; within the last front taken, by the first objective."""
    kept: list[dict] = []
    key, sense = objectives[0]
    for f in layers(points, objectives):
        if len(kept) + len(f) <= count:
            kept.extend(f)
        else:
            kept.extend(sorted(f, key=lambda p: -sense * p[key])[: count - len(kept)])
        if len(kept) >= count:
            break
    return kept


def beats_single_technique(points: list[dict], front_points: list[dict], top1_budget: float | None = None) -> dict:
    """Does the front hold a combined point (two passes or more) faster than the best
    single-technique point at no worse accuracy?

    "Best single-technique point": the fastest point made by exactly one pass whose top-1 is within
    ``top1_budget`` of the uncompressed point (any accuracy when no budget or no baseline).
    """
    base = next((p for p in points if not p["passes"]), None)
    floor = base["top1"] - top1_budget if base is not None and top1_budget is not None else -1.0
    singles = [p for p in points if len(p["passes"]) == 1 and p.get("latency_ms") is not None and p["top1"] >= floor]
    if not singles:
        return {"single": None, "better": None, "answer": "no single-technique point within the budget was measured"}
    single = min(singles, key=lambda p: p["latency_ms"])
    better = [p for p in front_points if len(p["passes"]) >= 2 and p["latency_ms"] < single["latency_ms"]
              and p["top1"] >= single["top1"]]
    best = min(better, key=lambda p: p["latency_ms"]) if better else None
    if best is None:
        answer = (f"no: no combined point on the front is faster than {single['id']} ({'+'.join(single['passes'])}, "
                  f"{single['latency_ms']:.3f} ms, top-1 {100 * single['top1']:.2f}%) at no worse accuracy")
    else:
        answer = (f"yes: {best['id']} ({'+'.join(best['passes']) or 'none'}) runs in {best['latency_ms']:.3f} ms at top-1 "
                  f"{100 * best['top1']:.2f}%, against {single['latency_ms']:.3f} ms / {100 * single['top1']:.2f}% for the best "
                  f"single technique ({'+'.join(single['passes'])})")
    return {"single": single["id"], "better": best["id"] if best else None, "answer": answer,
            "top1_budget": top1_budget, "top1_floor": floor if floor >= 0 else None}
