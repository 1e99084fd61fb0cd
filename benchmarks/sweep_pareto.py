"""A Pareto sweep on the reference ViT, as issue 9 asks for its figures.

    python benchmarks/sweep_pareto.py [--eval-size 2000] [--targets onnx,openvino] [--jobs 2]
        [--out-dir DIR] [--ray-compare] [--json out.json]

* a 12-point grid on zoo:vit-c10: token merging r in {off, 4, 8} x MLP pruning (Taylor, keep
  50%) on/off x W8A8 on/off, no recovery steps; accuracy on a class-stratified subset of the
  CIFAR-10 test archive (``--eval-size``, 2,000 by default: said in the output), latency at
  batch 1, one thread, by the sweep's one measuring worker after every compression job is done
  (4 s of timed calls per artifact, in 20 interleaved rounds over all artifacts);
* the table, the front per target, and whether the front holds a combined point faster than the
  best single-technique point within a 1-point top-1 budget (or that none exists);
* the latency of each target's fastest front point as the sweep measured it (every artifact timed
  in interleaved rounds) against a standalone ``vitc bench`` of the same file run right after the
  sweep for ``--standalone-seconds`` (60 s), with both confidence intervals (``--check all``: every
  artifact);
* with ``--ray-compare``: the same sweep on a local Ray cluster (its latencies timed briefly, as
  only its accuracies are compared) and the accuracies point for point.

The machine this runs on may be shared: the script prints the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "test.tar.gz"
SPACE = {
    "base": {
        "calibration": {"data": "bundled:calib", "size": 128, "seed": 0},
        "passes": [{"prune": {"importance": "taylor"}}, {"quantize": {}}],
        "export": {"parity_data": "bundled:eval", "parity_size": 64},
        "bench": {"batch": [1], "threads": 1, "min_time_s": 4.0, "max_time_s": 8.0},
    },
    "params": {"merge.r": [None, 4, 8], "prune.mlp": [None, 0.5], "quantize.bits": [None, 8]},
    "strategy": "grid",
}


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def standalone_bench(artifact: Path, bench: dict, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "vitc.cli", "bench", "--model", str(artifact), "--batch", "1", "--threads",
               str(bench["threads"]), "--min-time", str(seconds), "--max-time", str(seconds), "--out", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        doc = json.loads(out.read_text())
    p50 = doc["results"][0]["stats"]["p50"]
    return {"command": " ".join(["vitc", *cmd[3:-2]]), "p50_ms": 1000 * p50["value"], "ci_ms": [1000 * p50["lo"], 1000 * p50["hi"]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:vit-c10")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--targets", default="onnx,openvino")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=None, help="results folder (default: a temporary one); resumes if it exists")
    ap.add_argument("--ray-compare", action="store_true", help="repeat on a local Ray cluster and compare accuracies")
    ap.add_argument("--budget", type=float, default=0.01, help="top-1 budget of the single-technique point (fraction)")
    ap.add_argument("--measure-only", action="store_true",
                    help="time and report the points --out-dir already holds (an interrupted run); the rest stay pending")
    ap.add_argument("--check", choices=("all", "fastest"), default="fastest",
                    help="standalone vitc bench of every timed artifact (all) or of each target's fastest front point")
    ap.add_argument("--standalone-seconds", type=float, default=60.0,
                    help="length of each standalone vitc bench run (the sweep spreads each artifact's timing over its whole "
                         "measuring period, minutes; a standalone run must span as many of the machine's speed states)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from vitc.commands.sweep import print_summary
    from vitc.recipes.schema import Source
    from vitc.sweep import parse_space, run_sweep, summarize

    targets = [t for t in args.targets.split(",") if t]
    tmp = tempfile.mkdtemp(prefix="vitc-sweep-bench-")
    out_dir = args.out_dir or Path(tmp) / "local"
    space = parse_space(json.loads(json.dumps(SPACE)), Source("benchmarks/sweep_pareto.py:SPACE"))
    print(f"{args.model}: {len(space.grid())} points; top-1 on a class-stratified subset of {args.eval_size} of the 10,000 "
          f"CIFAR-10 test images ({args.data}); targets {', '.join(targets)}; load average before: {load()}", flush=True)
    t0 = time.perf_counter()
    run_sweep(args.model, space, targets, args.data, out_dir, eval_size=args.eval_size, jobs=args.jobs,
              log=lambda t: print(t, flush=True), measure_only=args.measure_only)
    sweep_s = time.perf_counter() - t0
    summary = summarize(out_dir, top1_budget=args.budget)
    print_summary(summary)
    if args.measure_only:
        print(f"PARTIAL: {len(summary['points'])} of {len(space.grid())} points (--measure-only on an interrupted sweep)")
    print(f"sweep wall time: {sweep_s:.0f} s ({sweep_s / 60:.1f} min; 20 min asked); load average after: {load()}")

    report: dict = {"model": args.model, "eval_size": args.eval_size, "data": args.data, "targets": targets,
                    "sweep_s": sweep_s, "summary": summary, "out_dir": str(out_dir)}
    # standalone vitc bench of the artifacts the sweep timed (every point and target, or each
    # target's fastest front point), right after the sweep, one at a time on the same machine
    from vitc.sweep.store import load_results

    evals = {r["id"]: r for r in load_results(out_dir)[1] if r["kind"] == "eval"}
    checks = []
    if args.check == "fastest":
        pairs = [(summary["fronts"][t]["front_2d"][0], t) for t in targets]
    else:
        pairs = [(r["id"], t) for r in summary["points"] for t in targets if r["latency"].get(t)]
    for point, target in pairs:
        row = next(r for r in summary["points"] if r["id"] == point)
        alone = standalone_bench(out_dir / evals[point]["artifacts"][target]["path"], summary["settings"]["bench"],
                                 args.standalone_seconds)
        swept = row["latency"][target]
        inside = alone["ci_ms"][0] <= swept["p50_ms"] <= alone["ci_ms"][1]
        overlap = max(alone["ci_ms"][0], swept["ci_ms"][0]) <= min(alone["ci_ms"][1], swept["ci_ms"][1])
        checks.append({"point": point, "target": target, "sweep": swept, "standalone": alone,
                       "sweep_p50_inside_standalone_ci": inside, "cis_overlap": overlap,
                       "difference_pct": 100 * (swept["p50_ms"] / alone["p50_ms"] - 1)})
        print(f"latency of {point} ({target}): sweep {swept['p50_ms']:.3f} ms [{swept['ci_ms'][0]:.3f}, {swept['ci_ms'][1]:.3f}], "
              f"standalone {alone['p50_ms']:.3f} ms [{alone['ci_ms'][0]:.3f}, {alone['ci_ms'][1]:.3f}] "
              f"({checks[-1]['difference_pct']:+.1f}%): sweep p50 inside the standalone CI: {inside}; CIs overlap: {overlap}", flush=True)
    diffs = sorted(abs(c["difference_pct"]) for c in checks)
    print(f"sweep vs standalone `{checks[0]['standalone']['command']}` (and the same for each artifact): "
          f"{sum(c['cis_overlap'] for c in checks)}/{len(checks)} with overlapping 95% CIs, "
          f"{sum(c['sweep_p50_inside_standalone_ci'] for c in checks)}/{len(checks)} with the sweep's p50 inside the standalone CI; "
          f"|difference| median {statistics.median(diffs):.1f}%, max {diffs[-1]:.1f}%; load average after: {load()}")
    report["bench_check"] = checks

    if args.ray_compare:
        ray_space = json.loads(json.dumps(SPACE))
        ray_space["base"]["bench"].update(min_time_s=0.2, max_time_s=0.5)  # only accuracies are compared
        t1 = time.perf_counter()
        run_sweep(args.model, parse_space(ray_space, Source("ray space")), targets, args.data, Path(tmp) / "ray",
                  eval_size=args.eval_size, jobs=args.jobs, ray="local", log=lambda t: print(t, flush=True))
        ray_s = time.perf_counter() - t1
        ray_rows = {tuple(sorted((k, str(v)) for k, v in r["params"].items())): r for r in summarize(Path(tmp) / "ray")["points"]}
        same = []
        for r in summary["points"]:
            other = ray_rows.get(tuple(sorted((k, str(v)) for k, v in r["params"].items())))
            same.append(other is not None and other["top1"] == r["top1"] and other["top5"] == r["top5"])
        print(f"Ray (local cluster, {args.jobs} CPUs): {sum(same)}/{len(same)} points with the same top-1 and top-5 as the "
              f"local sweep ({ray_s:.0f} s)")
        report["ray"] = {"same_accuracy": sum(same), "points": len(same), "seconds": ray_s}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
