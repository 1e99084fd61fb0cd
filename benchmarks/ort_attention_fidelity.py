"""ONNX Runtime's fused float attention against the quantized attention, on one quantized model.

The ONNX Runtime artifact computes the attention core in ONNX Runtime's MultiHeadAttention kernel
(float32) where it passes parity (``vitc.export.qdq_speed.fuse_attention``); the simulation and
the fallback quantize q and k. This prints, side by side on the same W8A8 model and images, the
top-1 and agreement with FP32 of both ONNX Runtime graphs (the fallback is the TensorRT target's
rewrites, which leave the attention as quantized).

    python benchmarks/ort_attention_fidelity.py --model zoo:dinov2s-c10 --calib-size 128 --test-size 2000 \\
        --out benchmarks/results_ort_attention_fidelity_2026-12-05_dinov2s_c10.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize_vs_peers as qvp  # noqa: E402  (CIFAR paths and top-1 helper shared with the W8A8 benchmark)


def main() -> None:
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.export.qdq import export_qdq_onnx
    from vitc.export.qdq_speed import SpeedConfig
    from vitc.models.intake import load_model
    from vitc.runtimes import open_session

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:dinov2s-c10")
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    backbone = load_model(args.model)
    calib, _ = load_tensors(open_source(qvp.CIFAR / "train.tar.gz").select(args.calib_size, seed=0), backbone.preprocess)
    x, y = load_tensors(open_source(qvp.CIFAR / "test.tar.gz").select(args.test_size, seed=0), backbone.preprocess)
    fp_top1, fp_pred = qvp.top1(backbone, x, y)
    q = apply(backbone, QuantConfig(wbits=8, abits=8, calibrator="mse"), calib)  # quantize_vs_peers' W8A8
    rows = {"fp32 (torch)": {"top1": fp_top1, "drop_pt": 0.0, "agreement": 1.0}}
    tmp = Path(tempfile.mkdtemp(prefix="vitc-attn-"))
    graphs = {"ORT, fused float attention (vitc export's first write)": SpeedConfig.for_runtime("onnxruntime"),
              "ORT, quantized attention (the parity fallback)": SpeedConfig.for_runtime("tensorrt")}
    for k, (name, speed) in enumerate(graphs.items()):
        path = export_qdq_onnx(q, tmp / f"g{k}.onnx", speed=speed)
        acc, pred = qvp.top1(open_session(path, runtime="onnxruntime", threads=args.threads), x, y)
        rows[name] = {"top1": acc, "drop_pt": 100 * (fp_top1 - acc), "agreement": float((pred == fp_pred).mean())}
    print(f"{args.model}: W8A8, {args.calib_size} calibration / {len(y)} test images")
    print(f"{'graph':58s} {'top-1':>8s} {'drop pt':>8s} {'agree':>8s}")
    for name, r in rows.items():
        print(f"{name:58s} {100 * r['top1']:7.2f}% {r['drop_pt']:+8.2f} {100 * r['agreement']:7.2f}%")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "calib_size": args.calib_size, "test_images": len(y), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
