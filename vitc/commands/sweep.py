"""``vitc sweep``: search recipe parameters for the fastest models at each accuracy.

JSON (``--out``): ``settings``, ``points`` (per point: ``id``, ``params``, ``passes``, ``top1``,
``top5``, ``flops``, ``latency`` and ``size`` per target, ``parity``), ``fronts`` per target
(``front``: top-1/latency/size, ``front_2d``: top-1/latency), ``single_technique`` (does the
front beat the best single-technique point), ``errors``; on Ray also ``nodes`` (records per node)
and ``retried`` (points whose task was lost with its node and was submitted again: stage,
attempts, each loss with Ray's error).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import DataOpt, OutOpt, SeedOpt, allowed_cpus, console, pct, positive, progress


def sweep_cmd(
    model: str = typer.Option(..., "--model", "-m", help="model spec (zoo:, hf:, ...)"),
    space: Path = typer.Option(..., "--space", help="space YAML: base recipe, params with values, strategy"),
    data: DataOpt = "bundled:eval",
    targets: str = typer.Option("onnx", "--targets", "-t", help="comma list of export targets to time: onnx, openvino, tensorrt, coreml"),
    out_dir: Path = typer.Option(..., "--out-dir", help="results folder (resumes when it holds the same sweep)"),
    eval_size: Optional[int] = typer.Option(None, "--eval-size", help="evaluate each point on a deterministic subset of this many images"),
    seed: SeedOpt = 0,
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="compression jobs in parallel (default: the CPUs this process may use)"),
    ray: Optional[str] = typer.Option(None, "--ray", help="run on a Ray cluster: host:port, ray://host:port, auto, or local (starts one here)"),
    device: Optional[str] = typer.Option(None, "--device", help="device tag latency is measured on (Ray resource device:<tag>); default this machine's, e.g. cpu-x86"),
    measure_only: bool = typer.Option(False, "--measure-only", help="time and summarise the points an interrupted sweep already compressed; the rest stay pending"),
    out: OutOpt = None,
) -> None:
    """Compress, evaluate and time every point of a search space; keep the Pareto front of accuracy vs latency and size."""
    from vitc.artifacts import write_json
    from vitc.sweep import load_space, run_sweep

    positive(jobs, "--jobs")
    positive(eval_size, "--eval-size")
    sp = load_space(space)
    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    with progress() as prog:
        summary = run_sweep(model, sp, target_list, data, out_dir, eval_size=eval_size, seed=seed,
                            jobs=jobs or allowed_cpus(), ray=ray, device=device, progress=prog,
                            log=lambda t: console.print(f"[dim]{t}[/dim]"), measure_only=measure_only)
    print_summary(summary)
    console.print(f"results in {out_dir}/results.jsonl; report with: vitc report {out_dir} --out report.html")
    if out:
        write_json(out, summary)


def print_summary(summary: dict) -> None:
    targets = summary["settings"]["targets"]
    table = Table(title=f"sweep: {summary['settings']['model']} ({len(summary['points'])} points)")
    for col in ("point", "passes", "params", "top-1", "MFLOPs"):
        table.add_column(col)
    for t in targets:
        table.add_column(f"{t} ms (p50)")
        table.add_column(f"{t} MiB")
    fronts = {t: set(summary["fronts"][t]["front_2d"]) for t in targets}
    for row in sorted(summary["points"], key=lambda r: -(r["top1"] or 0)):
        cells = [row["id"], "+".join(row["passes"]) or "none", ", ".join(f"{k}={v}" for k, v in row["params"].items()),
                 pct(row["top1"]), f"{row['flops'] / 1e6:.1f}" if row["flops"] else "-"]
        for t in targets:
            lat = row["latency"].get(t)
            star = " *" if row["id"] in fronts[t] else ""
            cells.append(f"{lat['p50_ms']:.3f}{star}" if lat else "-")
            cells.append(f"{row['size'][t] / 2**20:.2f}" if row["size"].get(t) else "-")
        table.add_row(*cells)
    console.print(table)
    console.print("* on the accuracy/latency Pareto front of that target")
    for t in targets:
        console.print(f"{t}: front {', '.join(summary['fronts'][t]['front_2d']) or '-'}; beats the best single technique: "
                      f"{summary['single_technique'][t]['answer']}", highlight=False)
    for e in summary["errors"]:
        console.print(f"[yellow]point {e['id']} ({e['params']}) failed: {e['error']}[/yellow]")
    print_cluster(summary)


def print_cluster(summary: dict) -> None:
    """Where a Ray sweep ran (records per node) and which points were retried after their task was lost."""
    nodes = summary.get("nodes") or {}
    if nodes:
        console.print("ran on: " + "; ".join(f"{n} ({c['compress']} compress, {c['latency']} latency)"
                                             for n, c in sorted(nodes.items())), highlight=False)
    retried = summary.get("retried") or []
    if not retried:
        return
    table = Table(title=f"retried: {len(retried)} (their task was lost and submitted again)")
    for col in ("point", "params", "stage", "attempts", "lost on", "Ray's error"):
        table.add_column(col)
    for r in retried:
        last = r["lost"][-1]
        table.add_row(r["id"], ", ".join(f"{k}={v}" for k, v in (r["params"] or {}).items()), r["stage"], str(r["attempts"]),
                      ", ".join(sorted({x.get("node") or "?" for x in r["lost"]})), f"{last['error']}: {last['detail'][:80]}")
    console.print(table)
