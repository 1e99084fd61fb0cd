"""How steady is this machine's clock? One session timed continuously, in windows.

    python benchmarks/machine_drift.py [--model zoo:vit-c10] [--runtime onnxruntime] [--seconds 120] [--calls 500]

Exports the model to ONNX (FP32), opens one session (1 thread, batch 1) and times windows of
``--calls`` calls back to back through vitc's harness for ``--seconds``. Prints the spread of
the window medians, and how long the machine stays in its fast or slow half (split at the
midpoint of the 10th and 90th percentiles). A steady machine shows one narrow state; the
project's 2-core VM showed two states 60% apart lasting ~20 s each, which is why the p50
interval is drift-aware and sweeps time their artifacts in interleaved rounds (docs/bench.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:vit-c10")
    ap.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "openvino"))
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--calls", type=int, default=500, help="calls per window")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from vitc.bench.harness import build_pool, timed_calls
    from vitc.bench.runner import load_images
    from vitc.export.onnx import write_onnx
    from vitc.export.pipeline import ExportOptions
    from vitc.models.intake import load_model
    from vitc.runtimes import open_session

    backbone = load_model(args.model)
    path = Path(tempfile.mkdtemp(prefix="vitc-drift-")) / "model.onnx"
    write_onnx(backbone, path, ExportOptions("fp32"), None)
    session = open_session(str(path), runtime=args.runtime, threads=1)
    pool = build_pool(load_images(None, backbone.preprocess, 16), 1)
    timed_calls(session, pool, 200)  # warm-up
    medians, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        medians.append(float(np.median(timed_calls(session, pool, args.calls))) / 1e6)
    m = np.array(medians)
    window_s = args.seconds / len(m)
    p10, p90 = np.percentile(m, [10, 90])
    fast = m < (p10 + p90) / 2
    runs, cur = [], 1
    for a, b in zip(fast[:-1], fast[1:]):
        if a == b:
            cur += 1
        else:
            runs.append(cur)
            cur = 1
    runs.append(cur)
    result = {"model": args.model, "runtime": args.runtime, "windows": len(m), "window_s": window_s,
              "window_median_ms": {"min": float(m.min()), "p10": float(p10), "p50": float(np.median(m)), "p90": float(p90),
                                   "max": float(m.max())},
              "p90_over_p10": float(p90 / p10), "fast_share": float(fast.mean()), "state_changes": len(runs) - 1,
              "median_state_s": float(np.median(runs) * window_s), "longest_state_s": float(max(runs) * window_s),
              "trace": "".join("F" if f else "s" for f in fast)}
    print(f"{args.model} in {args.runtime}, batch 1, 1 thread: {len(m)} windows of {args.calls} calls ({window_s:.2f} s each) "
          f"over {args.seconds:.0f} s")
    print(f"window medians (ms): min {m.min():.3f}  p10 {p10:.3f}  p50 {np.median(m):.3f}  p90 {p90:.3f}  max {m.max():.3f}  "
          f"(p90/p10 = {p90 / p10:.2f})")
    print(f"fast half {fast.mean():.0%} of the time; {len(runs) - 1} state changes; median state {np.median(runs) * window_s:.1f} s, "
          f"longest {max(runs) * window_s:.1f} s")
    print("trace (F fast, s slow):", result["trace"])
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
