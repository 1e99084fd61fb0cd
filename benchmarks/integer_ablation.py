"""What each choice of the integer-only conversion buys on one model, measured on the integer graph itself.

    python benchmarks/integer_ablation.py --model zoo:dinov2s-c10 --calib-size 128 --test-size 300 --threads 2 \
        --out benchmarks/results_integer_ablation_2026-12-06_dinov2s_c10.json

Rows, each a full conversion (``vitc.compress.integer.apply``) exported to the integer ONNX graph and run
in ONNX Runtime on the same class-stratified test images (calibration images from the training archive):
the session-8 design (lambda-ShiftGELU on an 8-bit input, attention probabilities on 1/255, no norm
equalisation), then one change at a time, cumulatively, to the current defaults; under the calibrators
``minmax``, ``percentile`` (99.99) and ``mse``. Columns: top-1, drop against FP32 (PyTorch) on the same
images, top-1 agreement with FP32, and the relative logit error ``||z_int - z_fp32|| / ||z_fp32||``.
The MLP activation's unsigned output grid (a zero point folded into fc2's bias) has no switch and is in
every row.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"

STEPS = [
    ("session-8 design: lambda-ShiftGELU, 8-bit GELU input, probs 1/255, no equalisation",
     dict(gelu="lambda", act_input_bits=8, prob_bits=8, ln_reparam=False)),
    ("+ LayerNorm outputs equalised (RepQ-ViT, centred)", dict(gelu="lambda", act_input_bits=8, prob_bits=8, ln_reparam=True)),
    ("+ 16-bit GELU input (65,536-entry table)", dict(gelu="lambda", act_input_bits=16, prob_bits=8, ln_reparam=True)),
    ("+ exact GELU table", dict(gelu="exact", act_input_bits=16, prob_bits=8, ln_reparam=True)),
    ("+ 14-bit attention probabilities (defaults)", dict(gelu="exact", act_input_bits=16, prob_bits=14, ln_reparam=True)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:dinov2s-c10")
    ap.add_argument("--train-data", default=str(CIFAR / "train.tar.gz"))
    ap.add_argument("--eval-data", default=str(CIFAR / "test.tar.gz"))
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--test-size", type=int, default=300)
    ap.add_argument("--calibrations", default="minmax,percentile,mse")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import onnxruntime as ort
    from rich.console import Console
    from rich.table import Table

    from vitc.calibration.data import label_map, load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress import integer
    from vitc.export.integer_onnx import export
    from vitc.models.intake import load_model

    backbone = load_model(args.model)
    calib_x, _ = load_tensors(open_source(args.train_data).select(args.calib_size, seed=1), backbone.preprocess)
    test = open_source(args.eval_data).select(args.test_size, seed=0)
    x, y = load_tensors(test, backbone.preprocess)
    mapping = label_map(test, backbone.labels)
    if mapping is not None:
        y = torch.from_numpy(mapping[y.numpy()])
    with torch.no_grad():
        ref = torch.cat([backbone(b) for b in x.split(50)])
    fp32_top1 = float((ref.argmax(1) == y).float().mean())
    rows = []
    work = Path(tempfile.mkdtemp(prefix="vitc-int-ablation-"))
    for calib in args.calibrations.split(","):
        for name, kw in STEPS:
            t0 = time.perf_counter()
            conv = integer.apply(backbone, integer.IntegerConfig(calib_size=args.calib_size, calibration=calib, **kw),
                                 data=calib_x)
            convert_s = time.perf_counter() - t0
            path = export(conv, work / "int.onnx", force=True)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            got = torch.from_numpy(np.concatenate([s.run(None, {"pixel_values": b.numpy()})[0] for b in x.split(50)]))
            top1 = float((got.argmax(1) == y).float().mean())
            row = {"calibration": calib, "variant": name, "config": kw, "images": len(y), "top1": top1,
                   "fp32_top1": fp32_top1, "drop_pt": 100 * (fp32_top1 - top1),
                   "agreement": float((got.argmax(1) == ref.argmax(1)).float().mean()),
                   "rel_logit_error": float((got - ref).norm() / ref.norm()), "convert_s": convert_s}
            rows.append(row)
            print(f"{calib:10s} {name[:60]:60s} top-1 {100 * top1:.1f}% agreement {100 * row['agreement']:.1f}% "
                  f"error {row['rel_logit_error']:.4f}", file=sys.stderr, flush=True)
            if args.out:
                args.out.write_text(json.dumps({"model": args.model, "calib_images": len(calib_x), "rows": rows,
                                                "threads": args.threads}, indent=1))
    t = Table(title=f"integer-only ablation: {args.model}, {len(y)} stratified test images, {len(calib_x)} calibration "
                    f"images, FP32 {100 * fp32_top1:.1f}%, integer graph in ONNX Runtime")
    for c in ("calibration", "variant", "top-1", "drop (pt)", "agreement", "logit error"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["calibration"], r["variant"], f"{100 * r['top1']:.1f}%", f"{r['drop_pt']:.1f}",
                  f"{100 * r['agreement']:.1f}%", f"{r['rel_logit_error']:.4f}")
    Console(width=200).print(t)


if __name__ == "__main__":
    main()
