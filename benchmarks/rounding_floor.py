"""How far a quantized model's simulation moves under float-rounding-sized changes (parity's
rounding floor, vitc/export/parity.py), against how far each runtime's artifact is from it.

    python benchmarks/rounding_floor.py --model zoo:dinov2s-c10 --bits 8 --test-size 300 \
        --out benchmarks/results_rounding_floor_2026-12-06_dinov2s_c10_w8a8.json

One table: the simulation with 2-ulp (and larger) jitter at every activation quantizer's input,
several seeds; the Q/DQ ONNX on ONNX Runtime with graph optimizations off (the graph computed
literally) and all on, with and without the fused float attention vitc writes for ONNX Runtime;
OpenVINO at f32 and bf16 hints. Then the quantizers whose jitter alone moves the logits most.
Accuracy figures only; run it on a quiet machine or not, it times nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lowbit import CIFAR, predict  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:dinov2s-c10")
    p.add_argument("--bits", default="8", help="W and A bits, e.g. 8 or 4x8")
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--per-quantizer", type=int, default=100, help="images for the per-quantizer sensitivity (0: skip)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import onnxruntime as ort
    import openvino as ov

    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.compress.quantize.modules import act_quantizers
    from vitc.export.parity import FLOOR_JITTER, RoundingJitter
    from vitc.export.qdq import export_graph_qdq_onnx
    from vitc.export.qdq_speed import SpeedConfig
    from vitc.models.intake import load_model

    torch.set_num_threads(args.threads)
    wbits, abits = (int(b) for b in (args.bits.split("x") if "x" in args.bits else (args.bits, args.bits)))
    backbone = load_model(args.model)
    calib, _ = load_tensors(open_source(CIFAR / "train.tar.gz").select(args.calib_size, seed=0), backbone.preprocess)
    x, _ = load_tensors(open_source(CIFAR / "test.tar.gz").select(args.test_size, seed=0), backbone.preprocess)
    q = apply(backbone, QuantConfig(wbits=wbits, abits=abits), calib, say=lambda m: None)
    sim = predict(q, x)
    spread = float(sim.std())
    rows = []

    def row(what, out):
        r = {"what": what, "top1_agreement_with_simulation": float((out.argmax(-1) == sim.argmax(-1)).mean()),
             "mean_rel_logit_error": float(np.abs(out - sim).mean() / spread),
             "max_rel_logit_error": float(np.abs(out - sim).max() / spread)}
        rows.append(r)
        print(f"{what:62s} agreement {100 * r['top1_agreement_with_simulation']:6.2f}%  mean {r['mean_rel_logit_error']:.4f}  "
              f"max {r['max_rel_logit_error']:.3f}", flush=True)

    print(f"{args.model} W{wbits}A{abits}: {len(calib)} calibration, {len(x)} test images; errors in units of the "
          f"simulation's logit spread ({spread:.3f})", flush=True)
    row("FP32 model (for scale: the quantization itself)", predict(backbone, x))
    for jitter in (FLOOR_JITTER, 2.0 ** -20, 2.0 ** -16):
        for seed in (0, 1, 2):
            with RoundingJitter(q.module, seed, relative=jitter):
                row(f"simulation, jitter {jitter:.1e} relative, seed {seed}", predict(q, x))
    tmp = Path(tempfile.mkdtemp(prefix="vitc-floor-"))

    def ort_run(path, level):
        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        so.intra_op_num_threads = args.threads
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return predict(lambda t: s.run(None, {s.get_inputs()[0].name: t.numpy()})[0], x)

    forms = {"as vitc export writes it for ONNX Runtime (fused float attention)": SpeedConfig.for_runtime("onnxruntime"),
             "plain Q/DQ graph": SpeedConfig()}
    for label, speed in forms.items():
        path = tmp / f"{len(rows)}.onnx"
        export_graph_qdq_onnx(q, path, speed=speed, split_shared_inputs=True)
        for level in ("ORT_DISABLE_ALL", "ORT_ENABLE_ALL"):
            row(f"ONNX Runtime {level}, {label}", ort_run(path, level))
    path = tmp / "ov.onnx"
    export_graph_qdq_onnx(q, path, split_shared_inputs=False)
    core = ov.Core()
    for hint in ("f32", "bf16"):
        c = core.compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": args.threads})
        row(f"OpenVINO, INFERENCE_PRECISION_HINT={hint}", predict(lambda t: c(t.numpy())[0], x))
    def write(sensitivity):
        if args.out:
            args.out.write_text(json.dumps({"model": args.model, "bits": f"W{wbits}A{abits}", "calib_size": len(calib),
                                            "test_size": len(x), "logit_spread": spread, "rows": rows,
                                            "per_quantizer": sensitivity}, indent=1))

    sensitivity = []
    write(sensitivity)  # the table is kept even if the per-quantizer pass is cut short
    if args.per_quantizer:
        xs, ref = x[:args.per_quantizer], sim[:args.per_quantizer]
        for name, quantizer in act_quantizers(q.module).items():
            j = RoundingJitter(q.module, 0)
            j.quantizers = [quantizer]
            with j:
                out = predict(q, xs)
            sensitivity.append({"quantizer": name, "mean_rel_logit_error": float(np.abs(out - ref).mean() / spread)})
        sensitivity.sort(key=lambda r: -r["mean_rel_logit_error"])
        total = sum(r["mean_rel_logit_error"] for r in sensitivity)
        print(f"jitter at one quantizer at a time ({len(xs)} images): sum over {len(sensitivity)} quantizers {total:.4f}; largest:")
        for r in sensitivity[:8]:
            print(f"  {r['quantizer']:60s} {r['mean_rel_logit_error']:.4f}")
    write(sensitivity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
