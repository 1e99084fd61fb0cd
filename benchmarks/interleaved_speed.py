"""Throughput of several models against the first, in one runtime, from interleaved rounds.

Each model is exported (FP32 ONNX; OpenVINO with the f32 hint), then every round times each model once
on the same random batch, in turn; the speedup is the median over rounds of the per-round ratio
(the machine's speed drifts 50-60% over tens of seconds, benchmarks/machine_drift.py, so only ratios
from the same round mean anything).

    python benchmarks/interleaved_speed.py --models zoo:dinov2s-c10,pruned/mlp,pruned/heads-mlp --runtime onnxruntime \\
        --batch 32 --threads 2 --rounds 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated --model specs; the first is the reference")
    ap.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "openvino"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="runs per model per round (the round's time is their median)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from vitc.export import export_artifact
    from vitc.models.intake import load_model
    from vitc.runtimes import open_session

    specs = args.models.split(",")
    work = Path(tempfile.mkdtemp(prefix="vitc-speed-"))
    sessions, flops, side = {}, {}, None
    for i, spec in enumerate(specs):
        backbone = load_model(spec)
        side = side or backbone.preprocess.input_size
        flops[spec] = backbone.flops()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = export_artifact(backbone, "onnx" if args.runtime == "onnxruntime" else "openvino", work / f"m{i}",
                                   check=False, force=True).path
        sessions[spec] = open_session(path, runtime=args.runtime, threads=args.threads)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, side, side)).astype(np.float32)
    for s in sessions.values():  # warm-up
        s.run(x)
    times = {spec: [] for spec in specs}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for r in range(args.rounds):
        for spec, s in sessions.items():
            runs = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                s.run(x)
                runs.append(time.perf_counter() - t)
            times[spec].append(statistics.median(runs))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{1e3 * times[s][-1]:.0f} ms" for s in specs), flush=True)
    ref = specs[0]
    rows = []
    print(f"{args.runtime}, batch {args.batch}, {args.threads} thread(s), {args.rounds} interleaved rounds, {started}")
    print(f"{'model':44s} {'FLOPs/img':>10s} {'FLOPs ratio':>12s} {'median ms':>10s} {'speedup':>8s}")
    for spec in specs:
        ratio = statistics.median(a / b for a, b in zip(times[ref], times[spec]))
        rows.append({"model": spec, "flops": flops[spec], "median_s": statistics.median(times[spec]),
                     "speedup_vs_first": ratio, "round_s": times[spec]})
        print(f"{spec[-44:]:44s} {flops[spec] / 1e9:9.2f}G {flops[ref] / flops[spec]:11.2f}x "
              f"{1e3 * statistics.median(times[spec]):9.0f} {ratio:7.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "started": started, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
