"""W6A6 on the graph path: CLS grids at 6 or 8 bits (``--prefix-bits``) against the range search's settings.

    python benchmarks/range_search_prefix.py --model zoo:dinov2s-c10 --test-size 300 --threads 1 \
        --runs 0:off:std:16,8:off:std:16,0:on:std:16,8:on:std:16,8:keep:std:16,0:on:ext:16,8:keep:ext:16,8:keep:ext:32

Each run is ``prefix_bits:search:widenings:images[:objective]``: search ``off`` (calibrated grids as they are),
``on`` (``range_search.widen`` as shipped: every grid of a group scaled by the group's factor) or
``keep`` (on, but an 8-bit prefix grid keeps its calibrated scale and only the patch grid is
widened); widenings ``std`` (``range_search.WIDENINGS``) or ``ext`` (those plus 2.0 and 2.5);
``images``: the search's calibration images (``range_search.SEARCH_IMAGES``, 16 as shipped);
``objective``: ``worst`` (``--range-search on``: the worst image's output error) or ``mean``
(``--range-search mean``: the mean over the search images).
Printed per run: top-1 drop, agreement with FP32 and output KL against FP32 on the same
class-stratified CIFAR-10 test images, and the factors the search chose.
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


def keep_prefix_setter(quantizers):
    """``range_search.scale_setter`` that leaves a wider prefix grid (``prefix_bits`` > ``bits``) as calibrated."""
    base = {k: q.scale.clone() for k, q in quantizers.items()}

    def set_scales(factors):
        for k, q in quantizers.items():
            f = factors.get(k, 1.0)
            if q.prefix_tokens and (q.prefix_bits or q.bits) > q.bits and base[k].numel() == 2:
                q.scale = base[k] * torch.tensor([1.0, f])
            else:
                q.scale = base[k] * f
    return set_scales


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:dinov2s-c10")
    p.add_argument("--runs", default="0:on:std:16,8:on:std:16,8:keep:std:16")
    p.add_argument("--bits", default="6x6", help="WxA")
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import vitc
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.quantize import range_search as RS
    from vitc.models.intake import load_model

    wbits, abits = (int(v) for v in args.bits.split("x"))
    backbone = load_model(args.model)
    calib, _ = load_tensors(open_source(CIFAR / "train.tar.gz").select(args.calib_size, seed=0), backbone.preprocess)
    x, y = load_tensors(open_source(CIFAR / "test.tar.gz").select(args.test_size, seed=0), backbone.preprocess)
    y = y.numpy()

    fp = predict(backbone, x)
    fp_top1 = float((fp.argmax(-1) == y).mean())
    print(f"{args.model}: FP32 top-1 {100 * fp_top1:.2f}% on {len(x)} images; W{wbits}A{abits}", flush=True)
    shipped = (RS.scale_setter, RS.WIDENINGS, RS.SEARCH_IMAGES, RS.MEAN_SEARCH_IMAGES)
    rows = []
    for run in args.runs.split(","):
        prefix_bits, search, widenings, images, *objective = run.split(":")
        mean = objective == ["mean"]
        RS.scale_setter = keep_prefix_setter if search == "keep" else shipped[0]
        RS.WIDENINGS = shipped[1] + ((2.0, 2.5) if widenings == "ext" else ())
        RS.SEARCH_IMAGES = RS.MEAN_SEARCH_IMAGES = int(images)
        t = time.perf_counter()
        try:
            q = vitc.quantize(backbone, calib, wbits=wbits, abits=abits, prefix_bits=int(prefix_bits),
                              range_search="off" if search == "off" else "mean" if mean else "on")
        finally:
            RS.scale_setter, RS.WIDENINGS, RS.SEARCH_IMAGES, RS.MEAN_SEARCH_IMAGES = shipped
        lo = predict(q, x)
        top1 = float((lo.argmax(-1) == y).mean())
        r = {"run": run, "top1": top1, "drop_pt": 100 * (fp_top1 - top1),
             "agreement_with_fp32": float((lo.argmax(-1) == fp.argmax(-1)).mean()),
             "kl_vs_fp32": output_kl(fp, lo),
             "seconds": round(time.perf_counter() - t, 1), "range_widening": q.transforms[-1].get("range_widening")}
        rows.append(r)
        print(f"  {run:16s} drop {r['drop_pt']:+.2f} pt  agree {100 * r['agreement_with_fp32']:.2f}%  KL {r['kl_vs_fp32']:.5f}"
              f"  widening {(r['range_widening'] or {}).get('groups')}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "bits": args.bits, "test_images": len(x), "fp32_top1": fp_top1,
                                        "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
