"""Throughput of several models against the first, in one runtime, timed interleaved.

Each model is exported (FP32 ONNX; OpenVINO with the f32 hint) and timed by vitc's own harness in
alternating slices (``vitc.bench.harness.measure_interleaved``: every model meets the same machine
states, which drift 50-60% over tens of seconds here, benchmarks/machine_drift.py); the speedup is the
ratio of the p50 latencies.

    python benchmarks/interleaved_speed.py --models zoo:dinov2s-c10,pruned/mlp,pruned/heads-mlp --runtime onnxruntime \\
        --batch 32 --threads 2 --rounds 5 --seconds 60
"""
from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--rounds", type=int, default=5, help="slices per model")
    ap.add_argument("--seconds", type=float, default=60.0, help="measuring time per model, spread over the rounds")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from vitc.bench.harness import HarnessConfig, build_pool, measure_interleaved
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

    images = np.random.default_rng(0).standard_normal((args.batch, 3, side, side)).astype(np.float32)
    pools = {spec: build_pool(images, args.batch) for spec in specs}
    config = HarnessConfig(min_samples=3 * args.rounds, min_time_s=args.seconds)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = measure_interleaved(sessions, pools, args.batch, config, rounds=args.rounds, threads=args.threads)
    p50 = {spec: results[spec]["stats"]["p50"]["value"] for spec in specs}
    ref = specs[0]
    rows = []
    print(f"{args.runtime}, batch {args.batch}, {args.threads} thread(s), {args.rounds} interleaved rounds, {started}")
    print(f"{'model':44s} {'FLOPs/img':>10s} {'FLOPs ratio':>12s} {'p50 ms':>9s} {'calls':>6s} {'speedup':>8s}")
    for spec in specs:
        steady = results[spec]["phases"]["steady"]
        rows.append({"model": spec, "flops": flops[spec], "p50_s": p50[spec], "calls": steady["calls"],
                     "speedup_vs_first": p50[ref] / p50[spec], "warnings": results[spec]["warnings"]})
        print(f"{spec[-44:]:44s} {flops[spec] / 1e9:9.2f}G {flops[ref] / flops[spec]:11.2f}x "
              f"{1e3 * p50[spec]:8.0f} {steady['calls']:6d} {p50[ref] / p50[spec]:7.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "started": started, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
