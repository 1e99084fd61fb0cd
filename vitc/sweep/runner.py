"""Run a sweep: pick points (grid, random, or successive halving), compress and evaluate them
in parallel, then time every artifact on the device's one measuring worker, storing each
result as it arrives; finally the table of points and the Pareto fronts.

Successive halving ("halving"): every grid point is compressed and scored on a small image
subset (the cheap accuracy proxy); the best 1/eta by Pareto rank on (proxy top-1, FLOPs,
weight bytes) go on to a rung with eta times the images, and the survivors of the last proxy
rung get the full evaluation, their exports and latency.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from vitc.errors import VitcError

from . import pareto
from .space import Space, point_id, point_recipe, sample_points
from .store import Store

DEFAULT_BENCH = {"batch": [1], "threads": 1, "min_samples": 50, "min_time_s": 1.0, "max_time_s": 3.0, "target_rel_ci": 0.01}
PROXY_OBJECTIVES = [("top1", 1), ("flops", -1), ("weights_bytes", -1)]


def bench_settings(space: Space) -> dict:
    from vitc.recipes.schema import SECTION_TYPES, Source, _check_fields

    given = space.base.get("bench") or {}
    _check_fields(given, SECTION_TYPES["bench"], Source(space.origin), ("base", "bench"), "bench")
    return {**DEFAULT_BENCH, **given}


def _job(space, point, model, targets, data, eval_size, seed, store: Store | None, kind: str, rung=None) -> dict:
    doc = point_recipe(space, point, model)
    pid = point_id(doc)
    doc.setdefault("export", {})
    doc["export"] = {**doc["export"], "targets": list(targets) if kind == "eval" else []}
    doc["evaluate"] = {**(doc.get("evaluate") or {}), "data": data, "size": eval_size, "seed": seed}
    doc.pop("bench", None)  # latency is the measuring worker's job, not the compressor's
    return {"id": pid, "params": point, "recipe": doc, "kind": kind, "rung": rung,
            "point_dir": str(store.point_dir(pid)) if kind == "eval" and store is not None else None}


def run_sweep(model: str, space: Space, targets: list[str], data: str, out_dir: Path | str, eval_size: int | None = None,
              seed: int = 0, jobs: int = 2, ray: str | None = None, device: str | None = None, progress=None,
              log=None, measure_only: bool = False) -> dict:
    """Run (or resume) a sweep into ``out_dir``; returns the summary (points, fronts).

    ``measure_only``: time the points of an interrupted sweep that are already compressed and
    summarise them; the others stay pending for a later run without it."""
    from vitc.recipes.runner import require_runtimes
    from vitc.recipes.schema import EXPORT_TARGETS

    from .executors import LocalExecutor, RayExecutor, inspect_cluster, local_device

    log = log or (lambda text: None)
    if not targets:
        raise VitcError("a sweep needs at least one target to time", "pass --targets onnx,openvino")
    for t in targets:
        if t not in EXPORT_TARGETS:
            raise VitcError(f"unknown target '{t}'", f"use some of: {', '.join(EXPORT_TARGETS)}")
    device = device or local_device()
    if ray is None:
        require_runtimes(targets, "timed")
    bench = bench_settings(space)
    store = Store(out_dir)
    settings = {"model": model, "space_sha256": space.digest(), "space": space.to_dict(), "targets": list(targets),
                "device": device, "data": data, "eval_size": eval_size, "seed": seed, "bench": bench}
    if ray is not None:
        # the head answers, takes this token, runs this Ray and Python, and a node has the device:
        # each checked (one line when not) before anything is written or any task runs
        inspect_cluster(ray, device)
    elif device != local_device():
        LocalExecutor(jobs, device)  # refuses before anything is written
    store.check(settings)  # refuses another sweep's folder before a cluster is joined or anything written
    executor = RayExecutor(ray, jobs, device, log=log, inspected=True) if ray is not None else LocalExecutor(jobs, device)
    try:
        if store.open(settings):
            log(f"resuming the sweep in {out_dir}")
        t0 = time.perf_counter()
        if measure_only:
            finals = [{"id": r["id"]} for r in store.records() if r["kind"] == "eval"]
            log(f"measuring the {len(finals)} points already compressed; the others stay pending")
        else:
            finals = _select(space, model, targets, data, eval_size, seed, store, executor, progress, log)
            _compress_all(finals, store, executor, progress, "compressing and evaluating")
        _measure_all(finals, store, executor, targets, bench, data, device, progress)
        log(f"sweep done in {time.perf_counter() - t0:.0f} s")
    finally:
        executor.close()
    return summarize(store.folder)


def _compress_all(jobs: list[dict], store: Store, executor, progress, label: str) -> list[dict]:
    """Run the jobs not yet recorded; append each record as it arrives; return all records of ``jobs``."""
    have = {(r["id"], r.get("rung"), r["kind"] if r["kind"] != "error" else r.get("for")): r for r in store.records()}
    todo, seen = [], set()
    for j in jobs:
        key = (j["id"], j["rung"], j["kind"])
        if key not in have and key not in seen:
            todo.append(j)
            seen.add(key)
    task = progress.add_task(label, total=len(todo)) if progress is not None and todo else None
    for rec in executor.compress(todo):
        if rec["kind"] == "error":
            rec["for"] = next(j["kind"] for j in todo if j["id"] == rec["id"] and j["rung"] == rec.get("rung"))
        key = (rec["id"], rec.get("rung"), rec["kind"] if rec["kind"] != "error" else rec["for"])
        if key in have:  # never store a point twice, whatever an executor hands back
            continue
        have[key] = rec
        if rec["kind"] == "eval":
            for a in rec["artifacts"].values():
                a["path"] = str(Path("points") / rec["id"] / a["path"])
        store.append(rec)
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)
    have = {(r["id"], r.get("rung"), r["kind"] if r["kind"] != "error" else r.get("for")): r for r in store.records()}
    return [have[(j["id"], j["rung"], j["kind"])] for j in jobs if (j["id"], j["rung"], j["kind"]) in have]


def _select(space, model, targets, data, eval_size, seed, store, executor, progress, log) -> list[dict]:
    """The final jobs: every sampled point (grid, random), or the survivors of halving."""
    points = sample_points(space)
    if space.strategy != "halving":
        return _unique([_job(space, p, model, targets, data, eval_size, seed, store, "eval") for p in points])
    h = space.halving
    proxy_rungs = max(0, h["rungs"] - 1)
    for rung in range(proxy_rungs):
        images = h["min_images"] * h["eta"] ** rung
        if eval_size is not None and images >= eval_size:
            break
        jobs = _unique([_job(space, p, model, targets, data, images, seed, store, "proxy", rung) for p in points])
        records = [r for r in _compress_all(jobs, store, executor, progress, f"halving rung {rung + 1}: {images} images")
                   if r["kind"] == "proxy"]
        for r in records:
            r["weights_bytes"] = _weights_bytes(r)
        keep = max(1, math.ceil(len(records) / h["eta"]))
        kept = {r["id"] for r in pareto.keep_best(records, PROXY_OBJECTIVES, keep)}
        log(f"halving rung {rung + 1}: {len(records)} points on {images} images, {len(kept)} go on")
        points = [j["params"] for j in jobs if j["id"] in kept]
    return _unique([_job(space, p, model, targets, data, eval_size, seed, store, "eval") for p in points])


def _weights_bytes(record: dict) -> float:
    """Bytes the weights take at the bits the recipe gives them (a proxy of the deployed size)."""
    bits = 32
    for p in record["recipe"]["passes"]:
        if "quantize" in p:
            bits = p["quantize"]["wbits"]
        elif "integer" in p:
            bits = p["integer"]["weight_bits"]
    return record["params_count"] * bits / 8


def _unique(jobs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for j in jobs:
        if j["id"] not in seen:
            seen.add(j["id"])
            out.append(j)
    return out


def _measure_all(jobs, store: Store, executor, targets, bench, data, device, progress) -> None:
    records = store.records()
    evals = {r["id"]: r for r in records if r["kind"] == "eval"}
    measured = {(r["id"], r["target"]) for r in records if r["kind"] == "latency"}
    todo = [(evals[j["id"]], t) for j in jobs if j["id"] in evals for t in targets if (j["id"], t) not in measured]
    task = progress.add_task(f"timing on {device} (one measuring worker)", total=len(todo)) if progress is not None and todo else None
    items = []
    for rec, target in todo:
        art = rec["artifacts"][target]
        items.append(({"target": target, "bench": bench, "data": data}, store.point_dir(rec["id"]),
                      str(Path(art["path"]).relative_to(Path("points") / rec["id"]))))
    if todo and hasattr(executor, "measure_many"):
        # interleaved rounds: every artifact meets the same machine states (results stored once all are timed)
        results = executor.measure_many(items)
    else:
        results = (executor.measure(*item) for item in items)
    for (rec, target), rows in zip(todo, results):
        for row in rows:
            store.append({"kind": "latency", "id": rec["id"], "device": device, "executor": executor.name, **row})
        if task is not None:
            progress.advance(task)
    if task is not None:
        progress.remove_task(task)


# ------------------------------------------------------------------------------ summary

def points_table(records: list[dict], targets: list[str], batch: int | None = None) -> list[dict]:
    """One row per evaluated point: accuracy, size, and per target its latency at ``batch`` (the first timed)."""
    evals = {}
    for r in records:
        if r["kind"] == "eval":
            evals[r["id"]] = r
    lat: dict = {}
    for r in records:
        if r["kind"] == "latency" and (batch is None or r["batch"] == batch):
            lat.setdefault((r["id"], r["target"]), r)
    rows = []
    for pid, r in evals.items():
        row = {"id": pid, "params": r["params"], "passes": r["passes"], "top1": r["top1"], "top5": r["top5"],
               "images": r["images"], "flops": r["flops"], "params_count": r["params_count"], "latency": {}, "size": {},
               "parity": {}}
        for t in targets:
            a = r["artifacts"].get(t, {})
            row["size"][t] = a.get("size_bytes")
            row["parity"][t] = a.get("parity")
            m = lat.get((pid, t))
            if m is not None:
                row["latency"][t] = {"p50_ms": m["p50_ms"], "ci_ms": m["ci_ms"], "batch": m["batch"], "cv": m["cv"]}
        rows.append(row)
    return rows


def fronts(rows: list[dict], targets: list[str]) -> dict:
    """Per target: the front of (top-1, latency, size), and the 2-D front of (top-1, latency)."""
    out = {}
    for t in targets:
        flat = [{"id": r["id"], "passes": r["passes"], "top1": r["top1"],
                 "latency_ms": (r["latency"].get(t) or {}).get("p50_ms"), "size_bytes": r["size"].get(t)} for r in rows]
        f3 = pareto.front(flat, [("top1", 1), ("latency_ms", -1), ("size_bytes", -1)])
        f2 = pareto.front(flat, [("top1", 1), ("latency_ms", -1)])
        out[t] = {"front": sorted(p["id"] for p in f3), "front_2d": [p["id"] for p in sorted(f2, key=lambda p: p["latency_ms"])],
                  "points": flat}
    return out


def summarize(folder: Path | str, top1_budget: float | None = 0.01) -> dict:
    from .store import load_results

    settings, records = load_results(folder)
    targets = settings["targets"]
    rows = points_table(records, targets)
    f = fronts(rows, targets)
    verdict = {}
    for t in targets:
        pts = f[t]["points"]
        front_pts = [p for p in pts if p["id"] in set(f[t]["front_2d"])]
        verdict[t] = pareto.beats_single_technique(pts, front_pts, top1_budget)
    errors = [{"id": r["id"], "params": r["params"], "error": r["error"]} for r in records if r["kind"] == "error"]
    return {"settings": settings, "points": rows, "fronts": {t: {k: v for k, v in f[t].items() if k != "points"} for t in targets},
            "single_technique": verdict, "errors": errors,
            "proxy": [r for r in records if r["kind"] == "proxy"],
            "retried": retried(records), "nodes": nodes_used(records)}


def retried(records: list[dict]) -> list[dict]:
    """The points whose task was lost and submitted again (a Ray node that went away), per stage."""
    params = {r["id"]: r.get("params") for r in records if "params" in r}
    out = []
    for r in records:
        if r.get("retried"):
            given_up = r["kind"] == "error" and r["error"].startswith("its task was lost")
            stage = {"latency": f"latency ({r.get('target')}, batch {r.get('batch')})", "proxy": f"proxy rung {r.get('rung')}"}.get(
                r["kind"], "compress (given up)" if given_up else "compress and evaluate")
            out.append({"id": r["id"], "params": params.get(r["id"]), "stage": stage,
                        "attempts": len(r["retried"]) + (0 if given_up else 1), "lost": r["retried"]})
    return out


def nodes_used(records: list[dict]) -> dict:
    """Per Ray node (by address and id): how many compress/evaluate and latency records it produced."""
    out: dict = {}
    for r in records:
        node = r.get("node")
        if not node:
            continue
        entry = out.setdefault(f"{node['ip']} {node['id'][:8]}", {"compress": 0, "latency": 0})
        entry["latency" if r["kind"] == "latency" else "compress"] += 1
    return out
