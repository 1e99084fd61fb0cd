"""Where OpenVINO spends the time of a token-merged ViT: per-op-type time (OpenVINO's own performance
counters) of the original and the ToMe-merged model, FP32 (``INFERENCE_PRECISION_HINT=f32``).

    python benchmarks/merge_ov_profile.py --model zoo:dinov2s-c10 --r 16 --batch 8 --threads 1

Counters are summed over ``--runs`` inferences of one random batch after two warm-ups; read the
ratios (the machine's speed drifts), not the milliseconds.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np


def profile(path: Path, x: np.ndarray, threads: int, runs: int, static: bool) -> collections.Counter:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    if static:
        model.reshape({model.inputs[0]: list(x.shape)})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": "YES",
                                                 "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    for _ in range(2):
        request.infer({0: x})
    total: collections.Counter = collections.Counter()
    for _ in range(runs):
        request.infer({0: x})
        for info in request.get_profiling_info():
            total[f"{info.node_type} ({info.exec_type})"] += info.real_time.total_seconds() * 1e3 / runs
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:dinov2s-c10")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--static", action="store_true", help="reshape both models to the batch first (static shapes)")
    ap.add_argument("--top", type=int, default=16)
    args = ap.parse_args(argv)

    import vitc
    from vitc.export import export_artifact
    from vitc.models.intake import load_model

    base = load_model(args.model)
    merged = vitc.merge(base, r=args.r)
    work = Path(tempfile.mkdtemp(prefix="vitc-merge-ov-"))
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in (("original", base), (f"ToMe r={args.r}", merged)):
            paths[name] = export_artifact(model, "onnx", work / f"{len(paths)}.onnx", check=False, force=True).path
    side = base.preprocess.input_size
    x = np.random.default_rng(0).standard_normal((args.batch, 3, side, side)).astype(np.float32)
    times = {name: profile(p, x, args.threads, args.runs, args.static) for name, p in paths.items()}
    (a, ta), (b, tb) = times.items()
    print(f"{args.model}, batch {args.batch}, {args.threads} thread(s), {'static' if args.static else 'dynamic'} batch, "
          f"OpenVINO f32, mean of {args.runs} runs")
    print(f"{'op (kernel)':48s} {a:>12s} {b:>12s}")
    for key in sorted(set(ta) | set(tb), key=lambda k: -max(ta[k], tb[k]))[:args.top]:
        print(f"{key[:48]:48s} {ta[key]:10.1f}ms {tb[key]:10.1f}ms")
    sa, sb = sum(ta.values()), sum(tb.values())
    fa = sum(v for k, v in ta.items() if k.startswith("FullyConnected"))
    fb = sum(v for k, v in tb.items() if k.startswith("FullyConnected"))
    new = sum(v for k, v in tb.items() if ta[k] == 0)
    print(f"total {sa:.1f} -> {sb:.1f} ms ({sa / sb:.2f}x); FullyConnected {fa:.1f} -> {fb:.1f} ms ({fa / fb:.2f}x); "
          f"op kinds only the merged model runs: {new:.1f} ms ({100 * new / sb:.1f}% of its time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
