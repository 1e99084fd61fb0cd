"""Output tuning (``vitc quantize --reconstruct --output-steps N``) measured on a model that was already
reconstructed and saved: the saved model against the same model after ``graph_reconstruct.tune_output``
(every activation step size learned together against the FP32 model's output on the calibration images),
both against FP32 on the same class-stratified test images in one pass. Paired, so the difference between
the two quantized models comes with its own standard error.

    python benchmarks/output_tuning.py --model W6A6 --steps 200 --test-size 3000 --threads 1 \\
        --out benchmarks/results_output_tuning_2026-12-07_dinov2s_c10_w6a6.json [--save W6A6-tuned]

The calibration images are picked as ``vitc quantize`` picks them (``--calib-data``, ``--calib-size``,
seed 0), so with the command's own calibration flags the tuned model is the one ``--output-steps`` makes
(tune_output is the same function; only its starting point is read from disk here).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"

from saved_vs_fp32 import paired_drop  # noqa: E402  (one definition of the paired standard error)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a graph-path folder written by vitc quantize -o")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=None, help="Adam on the log step sizes (default: ReconstructOptions.output_lr)")
    ap.add_argument("--calib-data", default=str(CIFAR / "train.tar.gz"))
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--data", default=str(CIFAR / "test.tar.gz"))
    ap.add_argument("--test-size", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", type=Path, default=None, help="also save the tuned model to this folder")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from vitc.calibration.data import DataSpec, iter_batches, label_map, load_tensors
    from vitc.calibration.sources import open_source
    from vitc.commands.common import set_threads
    from vitc.compress.quantize import graph_reconstruct as GR
    from vitc.compress.quantize import reconstruct as R
    from vitc.compress.quantize.saved import load_base, load_quantized, save_quantized

    set_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    saved = load_quantized(args.model)
    meta = json.loads((Path(args.model) / "vitc_quant.json").read_text())
    if meta.get("sites") != "graph":
        sys.exit(f"{args.model} was quantized on the module path; output tuning runs on graph-path models")
    base = load_base(meta)
    x = load_tensors(DataSpec(args.calib_data, None, args.calib_size, 0).open(), base.preprocess)[0]
    with torch.no_grad():
        targets = [torch.cat([base(x[i:i + 32]) for i in range(0, x.shape[0], 32)])]
    tuned = copy.deepcopy(saved)
    options = R.ReconstructOptions() if args.lr is None else R.ReconstructOptions(output_lr=args.lr)
    record = GR.tune_output(tuned.module, tuned.module.graph_module, x, targets, args.steps, options)
    record["lr"] = options.output_lr
    print(f"output tuning: {args.steps} steps, {record['grids']} grids, calibration-image output MSE "
          f"{record['mse_before']:.4g} -> {record['learned_mse']:.4g} ({record['seconds']:.0f} s)"
          + (" (kept the saved grids)" if record["kept_calibration"] else ""), flush=True)
    if args.save:
        tuned.transforms[-1].setdefault("reconstruction", {})["output_tuning"] = record
        save_quantized(tuned, args.save)

    test = open_source(args.data).select(args.test_size, seed=0)
    mapping = label_map(test, base.labels)
    ok = {"fp32": [], "saved": [], "tuned": []}
    agree = {"saved": [], "tuned": []}
    kl = {"saved": [], "tuned": []}
    start = time.perf_counter()
    for xb, y in iter_batches(test, saved.preprocess, args.batch_size):
        if mapping is not None:
            y = torch.from_numpy(mapping[y.numpy()])
        with torch.no_grad():
            logits = {"fp32": base(xb), "saved": saved(xb)}
            logits["tuned"] = logits["saved"] if record["kept_calibration"] else tuned(xb)  # kept: the same model
        lr = torch.log_softmax(logits["fp32"].double(), 1)
        for name, out in logits.items():
            ok[name].append(out.argmax(1) == y)
            if name != "fp32":
                agree[name].append(out.argmax(1) == logits["fp32"].argmax(1))
                lq = torch.log_softmax(out.double(), 1)
                kl[name].append((lr.exp() * (lr - lq)).sum(1))
        print(f"\r{sum(len(a) for a in ok['fp32'])}/{len(test)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ok = {k: torch.cat(v) for k, v in ok.items()}
    rows = []
    for name in ("saved", "tuned"):
        drop, se = paired_drop(ok["fp32"], ok[name])
        rows.append({"model": name, "top1": float(ok[name].double().mean()), "drop_pt": drop, "drop_se_pt": se,
                     "top1_agreement": float(torch.cat(agree[name]).double().mean()), "mean_kl": float(torch.cat(kl[name]).mean())})
    gain, gain_se = paired_drop(ok["saved"], ok["tuned"])  # saved minus tuned: > 0 means tuning lost accuracy
    result = {"started": started, "model": args.model, "base": meta["base"]["spec"], "steps": args.steps,
              "calibration": {"data": args.calib_data, "images": int(x.shape[0])}, "tuning": record,
              "test": {"data": args.data, "images": int(ok["fp32"].numel())}, "fp32_top1": float(ok["fp32"].double().mean()),
              "rows": rows, "tuned_minus_saved_pt": -gain, "tuned_minus_saved_se_pt": gain_se,
              "eval_s": round(time.perf_counter() - start, 1), "threads": args.threads}
    print(f"FP32 {100 * result['fp32_top1']:.2f}% on {result['test']['images']} images of {args.data}")
    print("| model | top-1 | drop (pt, paired SE) | agreement with FP32 | KL |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {100 * r['top1']:.2f}% | {r['drop_pt']:.2f} +- {r['drop_se_pt']:.2f} | "
              f"{100 * r['top1_agreement']:.2f}% | {r['mean_kl']:.4f} |")
    print(f"tuned minus saved: {-gain:+.2f} +- {gain_se:.2f} pt")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
