"""The 12-point sweep of benchmarks/sweep_pareto.py on a real two-node Ray cluster, as issue 21 asks.

    python benchmarks/ray_cluster.py [--eval-size 500] [--targets onnx] [--json out.json]

* a head (127.0.0.2) and a second node (127.0.0.3), each a separate ``ray start`` process with
  one CPU, token authentication on; the head advertises ``device:loop-head`` (latency is timed
  there), the second ``device:loop-worker``;
* three runs of the same 12-point grid (merge r {off, 4, 8} x MLP pruning 50% {off, on} x W8A8
  {off, on} on zoo:vit-c10), each ``vitc sweep`` as its own process: locally with ``--jobs 2``
  (the same two workers the cluster has), on the cluster, and on the cluster with the second
  node's raylet killed once it is compressing a point and at least ``--kill-after`` points are
  stored;
* per run: wall time, points, whether each point's top-1, top-5, weights sha256 and every
  exported file's sha256 equal the local run's, which node compressed each point and which
  timed it, and the retried points (``vitc sweep``'s own report).

Accuracy is on a class-stratified ``--eval-size`` subset of the CIFAR-10 test archive (256 by
default, not the 2,000 of sweep_pareto.py) with 32 calibration images (not 128): the machine is
shared by several jobs on 2 cores. Each artifact is timed briefly
(``--bench-seconds``): latency is not what this compares. The wall
times are single runs one after another, not interleaved; the load average is printed with them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep_pareto import DATA, SPACE  # noqa: E402  the 12-point space of the docs' figures

HEAD, SECOND = "127.0.0.2", "127.0.0.3"


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]


def compare(run: list[dict], local: list[dict]) -> dict:
    """Points present (each how many times) and equal to the local run's, field by field."""
    ref = {r["id"]: r for r in local if r["kind"] == "eval"}
    ref_errors = {r["id"]: r["error"].split(" failed ", 1)[-1] for r in local if r["kind"] == "error"}
    evals = [r for r in run if r["kind"] == "eval"]
    errors = {r["id"]: r["error"].split(" failed ", 1)[-1] for r in run if r["kind"] == "error"}
    counts: dict = {}
    for r in evals + [r for r in run if r["kind"] == "error"]:  # a point is an eval or an error record, once
        counts[r["id"]] = counts.get(r["id"], 0) + 1
    same = {f: sum(1 for r in evals if r["id"] in ref and r[f] == ref[r["id"]][f]) for f in ("top1", "top5", "weights_sha256")}
    same["artifact_files"] = sum(1 for r in evals if r["id"] in ref and
                                 all(a.get("files") == ref[r["id"]]["artifacts"][t].get("files") for t, a in r["artifacts"].items()))
    lat_counts: dict = {}
    for r in run:
        if r["kind"] == "latency":
            lat_counts[(r["id"], r["target"], r["batch"])] = lat_counts.get((r["id"], r["target"], r["batch"]), 0) + 1
    return {"points": len(counts), "expected": len(ref) + len(ref_errors), "evaluated": len(evals), "errors": errors,
            "same_errors": errors == ref_errors,
            "each_exactly_once": sorted(counts) == sorted([*ref, *ref_errors]) and set(counts.values()) == {1},
            "latency_rows_each_once": set(lat_counts.values()) <= {1}, "latency_rows": len(lat_counts), "same": same,
            "compressed_on": sorted({r["node"]["ip"] for r in evals if r.get("node")}),
            "compress_per_node": {ip: sum(1 for r in evals if r.get("node", {}).get("ip") == ip) for ip in (HEAD, SECOND)},
            "timed_on": sorted({r["node"]["ip"] for r in run if r["kind"] == "latency" and r.get("node")})}


def sweep(args, space: Path, out: Path, env: dict, extra: list[str], cluster=None, kill_after: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "vitc.cli", "sweep", "--model", args.model, "--space", str(space), "--data", args.data,
           "--eval-size", str(args.eval_size), "--targets", args.targets, "--out-dir", str(out), "--out", str(out) + ".json",
           *extra]
    t0 = time.perf_counter()
    log = open(str(out) + ".log", "w")
    proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, text=True)
    killed = None
    try:
        if kill_after is not None:
            while proc.poll() is None:
                done = len([r for r in records(out) if r["kind"] == "eval"]) if (out / "results.jsonl").exists() else 0
                if done >= kill_after and cluster.task_running_on(1, "compress_job_remote"):
                    time.sleep(1.0)  # well inside the task (a point takes several seconds)
                    pid = cluster.kill_raylet(1)
                    killed = {"raylet_pid": pid, "at_s": round(time.perf_counter() - t0, 1), "points_stored_before": done}
                    print(f"  killed the second node's raylet (pid {pid}) at {killed['at_s']} s, {done} points stored", flush=True)
                    break
                time.sleep(0.2)
        proc.wait(timeout=args.timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    wall = time.perf_counter() - t0
    text = Path(str(out) + ".log").read_text()
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({proc.returncode}): {' '.join(cmd)}\n{text[-3000:]}")
    summary = json.loads(Path(str(out) + ".json").read_text())
    return {"command": " ".join(["vitc", *cmd[3:]]), "wall_s": wall, "summary": summary, "killed": killed,
            "printout_tail": "\n".join(line for line in text.splitlines() if not line.startswith(("[", " ")))[-4000:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:vit-c10")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--calibration-size", type=int, default=32, help="calibration images (sweep_pareto.py: 128)")
    ap.add_argument("--parity-size", type=int, default=64, help="parity images per export (as sweep_pareto.py: with "
                    "fewer, one disagreement fails the 98%% int8 parity gate and the W8A8 point becomes an error record)")
    ap.add_argument("--targets", default="onnx")
    ap.add_argument("--bench-seconds", type=float, default=0.5, help="timed calls per artifact (min_time_s)")
    ap.add_argument("--kill-after", type=int, default=4, help="points stored before the second node is killed")
    ap.add_argument("--timeout", type=float, default=1500)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from vitc.sweep.cluster import LocalCluster, NodeSpec

    space = json.loads(json.dumps(SPACE))
    space["base"]["bench"].update(min_time_s=args.bench_seconds, max_time_s=2 * args.bench_seconds)
    space["base"]["calibration"]["size"] = args.calibration_size
    space["base"]["export"]["parity_size"] = args.parity_size
    tmp = Path(tempfile.mkdtemp(prefix="vitc-ray-bench-"))
    space_path = tmp / "space.json"
    space_path.write_text(json.dumps(space))  # YAML is a superset of JSON
    points = 1
    for values in space["params"].values():
        points *= len(values)
    print(f"{args.model}: {points} points (benchmarks/sweep_pareto.py's grid); top-1 on a class-stratified subset of "
          f"{args.eval_size} CIFAR-10 test images ({args.data}), {args.calibration_size} calibration and {args.parity_size} parity images; targets {args.targets}, {args.bench_seconds:g} s timed per "
          f"artifact; load average before: {load()}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(ROOT), capture_output=True, text=True).stdout.strip()
    report: dict = {"commit": commit, "model": args.model, "points": points, "eval_size": args.eval_size, "targets": args.targets,
                    "data": args.data, "space": space}

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    base_env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), COLUMNS="200")
    local = sweep(args, space_path, tmp / "local", base_env, ["--jobs", "2"])
    local_recs = records(tmp / "local")
    n_eval = len([r for r in local_recs if r["kind"] == "eval"])
    print(f"local (process pool of 2): {local['wall_s']:.0f} s; {n_eval} points evaluated, "
          f"{len([r for r in local_recs if r['kind'] == 'error'])} error records; load average {load()}", flush=True)
    report["local"] = {k: v for k, v in local.items() if k != "summary"} | {"retried": local["summary"].get("retried")}

    root = tmp / "cluster"
    with LocalCluster([NodeSpec(HEAD, 1, {"device:loop-head": 1}), NodeSpec(SECOND, 1, {"device:loop-worker": 1})],
                      root=root, extra_env={"PYTHONPATH": str(ROOT)}) as cluster:
        nodes = cluster.node_info()
        print(f"cluster at {cluster.address}: " + "; ".join(f"{n['ip']} ({'head, ' if n['head'] else ''}CPU "
                                                            f"{n['resources'].get('CPU'):g}, "
                                                            f"{', '.join(k for k in n['resources'] if k.startswith('device:'))})"
                                                            for n in nodes), flush=True)
        report["cluster"] = {"address": cluster.address, "nodes": nodes, "auth": "token (RAY_AUTH_MODE=token on every node)"}
        # the driver is given the token the documented way: RAY_AUTH_TOKEN (RAY_AUTH_MODE left to vitc)
        driver_env = {**base_env, "RAY_AUTH_TOKEN": cluster.token}
        ray_args = ["--ray", cluster.address, "--device", "loop-head"]
        for name, kill in (("ray", None), ("ray_node_killed", args.kill_after)):
            run = sweep(args, space_path, tmp / name, driver_env, ray_args, cluster=cluster, kill_after=kill)
            cmp = compare(records(tmp / name), local_recs)
            retried = run["summary"]["retried"]
            report[name] = {k: v for k, v in run.items() if k != "summary"} | {"compare": cmp, "retried": retried,
                                                                                "nodes": run["summary"]["nodes"]}
            print(f"{name}: {run['wall_s']:.0f} s ({run['wall_s'] / local['wall_s']:.2f}x the local run); "
                  f"{cmp['points']} of {cmp['expected']} points, each exactly once: {cmp['each_exactly_once']} "
                  f"({cmp['evaluated']} evaluated, {len(cmp['errors'])} error records, the same as locally: {cmp['same_errors']}); "
                  f"same top-1 {cmp['same']['top1']}/{cmp['evaluated']}, top-5 {cmp['same']['top5']}, weights sha256 "
                  f"{cmp['same']['weights_sha256']}, artifact files sha256 {cmp['same']['artifact_files']}; compressed on "
                  f"{cmp['compress_per_node']}, timed on {cmp['timed_on']}; load average {load()}", flush=True)
            for r in retried:
                print(f"  retried: {r['id']} ({', '.join(f'{k}={v}' for k, v in (r['params'] or {}).items())}) {r['stage']}, "
                      f"{r['attempts']} attempts; lost: " + "; ".join(f"{x['error']} on {x.get('node') or '?'}" for x in r["lost"]),
                      flush=True)
            if kill is not None and not retried:
                print("  NO point was retried: the kill did not hit a task in flight", flush=True)
    print(f"load average after: {load()}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
