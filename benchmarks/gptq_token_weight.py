"""Weight-only int4 with GPTQ at several CLS-token weights of its Hessians (``weight_only.PREFIX_WEIGHT``).

    python benchmarks/gptq_token_weight.py --model zoo:dinov2s-c10 --weights 0,1,3 --test-size 500 --threads 1

GPTQ's Hessian X^T X counts every token alike; a ViT whose head reads the CLS token (with the patch
mean) depends on that one row in 257 for half its input. ``HessianTaps`` adds ``w`` times the prefix
tokens' own moment; this prints, per ``w``, the top-1 drop, the agreement with FP32 and the output
KL against FP32 on the same class-stratified CIFAR-10 test images (128 stratified training images for
calibration, seed 0). Weight 0 is plain GPTQ (block by block).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lowbit import output_kl, predict  # the other low-bit benchmarks' helpers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:dinov2s-c10")
    p.add_argument("--weights", default="0,1,3", help="CLS weights to compare (comma-separated)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.compress.quantize import weight_only as WO
    from vitc.models.intake import load_model

    backbone = load_model(args.model)
    calib, _ = load_tensors(open_source(CIFAR / "train.tar.gz").select(args.calib_size, seed=0), backbone.preprocess)
    x, y = load_tensors(open_source(CIFAR / "test.tar.gz").select(args.test_size, seed=0), backbone.preprocess)
    y = y.numpy()

    fp = predict(backbone, x)
    fp_top1 = float((fp.argmax(-1) == y).mean())
    print(f"{args.model}: FP32 top-1 {100 * fp_top1:.2f}% on {len(x)} images, {len(calib)} calibration images", flush=True)
    rows = []
    for w in [float(v) for v in args.weights.split(",")]:
        WO.PREFIX_WEIGHT = w
        t = time.perf_counter()
        q = apply(backbone, QuantConfig(wbits=4, abits=16, group_size=args.group_size), calib)
        seconds = time.perf_counter() - t
        lo = predict(q, x)
        top1 = float((lo.argmax(-1) == y).mean())
        r = {"prefix_weight": w, "top1": top1, "drop_pt": 100 * (fp_top1 - top1),
             "agreement_with_fp32": float((lo.argmax(-1) == fp.argmax(-1)).mean()),
             "kl_vs_fp32": output_kl(fp, lo), "seconds": round(seconds, 1),
             "recorded": q.transforms[-1]["weight_only"]["hessian_prefix_weight"]}
        rows.append(r)
        print(f"  W4A16 g{args.group_size} GPTQ, CLS weight {w:g}: top-1 {100 * top1:.2f}%  drop {r['drop_pt']:+.2f} pt  "
              f"agree {100 * r['agreement_with_fp32']:.2f}%  KL {r['kl_vs_fp32']:.5f}  ({seconds:.0f} s)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "test_images": len(x), "fp32_top1": fp_top1, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
