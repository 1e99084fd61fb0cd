"""A saved quantized model (``vitc quantize -o FOLDER``) against the float model it was made from, on more
images than the run that made it evaluated: top-1 of both on the same class-stratified test images, the
drop with its paired standard error, top-1 agreement, and the mean KL(FP32 || quantized) of the softmax.

    python benchmarks/saved_vs_fp32.py --model quantized/dinov2s-c10-mixed5-recon --test-size 2000 --threads 2 \
        --out benchmarks/results_saved_vs_fp32_2026-12-06_dinov2s_c10_mixed5_recon.json

The quantized model runs as its PyTorch simulation (what its exports are held to by ``vitc export``'s parity),
or with ``--runtime onnxruntime|openvino`` as its int8 export against the FP32 export in the same runtime
(OpenVINO's FP32 with ``INFERENCE_PRECISION_HINT=f32``), both written to a temporary folder first:

    python benchmarks/saved_vs_fp32.py --model quantized/dinov2s-c10-w8a8 --runtime onnxruntime --test-size 5000 \
        --out benchmarks/results_saved_vs_fp32_2026-12-06_dinov2s_c10_w8a8_ort.json

``--against OTHER`` (a second saved model of the same float model, PyTorch simulation) runs on the same images
too and prints the two models' paired difference: two variants of one recipe told apart with the images'
own noise removed (a 1,000-image drop alone has a standard error of about 1.1 points). The JSON keeps each
image's correctness ("0"/"1" strings), so later runs can be paired with this one: ``--paired-with RESULT.json``
(an earlier run's JSON on the same data and test size; its float model must have been right and wrong on the same
images, which checks that the images and their order are the same; up to 1% of them may differ, reported, since
another machine's float arithmetic can flip an image on the edge) prints the paired difference against the model
that run measured, without that model on disk:

    python benchmarks/saved_vs_fp32.py --model W4A4_output --test-size 1000 \
        --paired-with benchmarks/results_saved_vs_fp32_2026-12-07_dinov2s_c10_w4a4_fisher_vs_mse_1000.json:against
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


def paired_drop(ref_ok: torch.Tensor, q_ok: torch.Tensor) -> tuple[float, float]:
    """Drop in points (FP32 minus quantized) and its paired standard error over the same images."""
    d = ref_ok.double() - q_ok.double()
    n = d.numel()
    return 100 * float(d.mean()), 100 * float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")


def bits(ok: torch.Tensor) -> str:
    """Per-image correctness as a "0"/"1" string (what the JSON keeps for later pairing)."""
    return "".join("1" if v else "0" for v in ok.tolist())


def paired_difference(q_ok: torch.Tensor, other_ok: torch.Tensor, name: str) -> tuple[dict, str]:
    """--model's drop minus another model's (``name``: "against", "earlier"), its paired standard error over
    the same images and the images only one of the two gets right: the JSON entries and the printed clause."""
    diff, se = paired_drop(other_ok, q_ok)
    only_model, only_other = int((q_ok & ~other_ok).sum()), int((other_ok & ~q_ok).sum())
    entries = {f"model_minus_{name}_drop_pt": diff, "difference_se_pt": se,
               "images_only_model_right": only_model, f"images_only_{name}_right": only_other}
    return entries, (f"--model minus it: drop {diff:+.2f} +- {se:.2f} pt (paired SE; {only_model} images right only "
                     f"with --model, {only_other} only with it)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a folder written by vitc quantize -o")
    ap.add_argument("--data", default=str(CIFAR / "test.tar.gz"))
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime", "openvino"),
                    help="torch: the simulation against the float model; onnxruntime/openvino: both exported and run there")
    ap.add_argument("--against", default=None, help="a second saved model of the same float model, paired with --model")
    ap.add_argument("--paired-with", default=None,
                    help="an earlier run's JSON on the same images (FILE, or FILE:against for its --against model): "
                         "the paired difference against the model it measured")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    earlier = None
    if args.paired_with:
        file, _, part = args.paired_with.partition(":")
        whole = json.loads(Path(file).read_text())
        earlier = whole if not part else {**whole.get(part, {}), **{k: whole.get(k) for k in ("fp32_correct", "base", "data", "images")}}
        if "quantized_correct" not in earlier:
            ap.error(f"--paired-with {args.paired_with} keeps no per-image correctness: rerun it with this script")
    if args.against and args.runtime != "torch":
        ap.error("--against compares PyTorch simulations: drop --runtime or --against")

    from vitc.calibration.data import iter_batches, label_map
    from vitc.calibration.sources import open_source
    from vitc.commands.common import set_threads
    from vitc.compress.quantize.saved import load_base, load_quantized

    set_threads(args.threads)
    quantized = load_quantized(args.model)
    meta = json.loads((Path(args.model) / "vitc_quant.json").read_text())
    base = load_base(meta)
    run_ref, run_q = base, quantized
    other = None
    if args.against:
        other = load_quantized(args.against)
        other_base = json.loads((Path(args.against) / "vitc_quant.json").read_text())["base"]["spec"]
        if other_base != meta["base"]["spec"]:
            ap.error(f"--against {args.against} was made from {other_base}, --model from {meta['base']['spec']}")
    if args.runtime != "torch":
        import tempfile
        import warnings

        from vitc.export import export_artifact
        from vitc.runtimes import open_session

        folder = Path(tempfile.mkdtemp(prefix="vitc-saved-vs-fp32-"))
        sessions = []
        for name, model in (("fp32", base), ("quantized", quantized)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = export_artifact(model, "onnx" if args.runtime == "onnxruntime" else "openvino", folder / name,
                                       check=False, force=True).path
            session = open_session(path, runtime=args.runtime, threads=args.threads)
            sessions.append(lambda x, s=session: torch.from_numpy(s.run(x.numpy())).float())
        run_ref, run_q = sessions
    test = open_source(args.data).select(args.test_size, seed=0)
    # the data's folder may differ between machines: the same file name, base model and number of images
    # here, and the float model right and wrong on the same images after the run, say they are the same ones
    if earlier is not None and (earlier.get("base") != meta["base"]["spec"] or earlier.get("images") != len(test)
                                or Path(earlier.get("data") or "").name != Path(args.data).name):
        ap.error(f"--paired-with {args.paired_with} measured {earlier.get('images')} images of {earlier.get('data')} "
                 f"with base {earlier.get('base')}: pass the same --data and --test-size, and a model of that base")
    mapping = label_map(test, base.labels)
    ref_ok, q_ok, agree, kl, o_ok, o_kl, o_agree = [], [], [], [], [], [], []
    start = time.perf_counter()
    for x, y in iter_batches(test, quantized.preprocess, args.batch_size):
        if mapping is not None:
            y = torch.from_numpy(mapping[y.numpy()])
        with torch.no_grad():
            r, q = run_ref(x), run_q(x)
        ref_ok.append(r.argmax(1) == y)
        q_ok.append(q.argmax(1) == y)
        agree.append(r.argmax(1) == q.argmax(1))
        lr, lq = torch.log_softmax(r.double(), 1), torch.log_softmax(q.double(), 1)
        kl.append((lr.exp() * (lr - lq)).sum(1))
        if other is not None:
            with torch.no_grad():
                o = other(x)
            o_ok.append(o.argmax(1) == y)
            o_agree.append(o.argmax(1) == r.argmax(1))
            lo = torch.log_softmax(o.double(), 1)
            o_kl.append((lr.exp() * (lr - lo)).sum(1))
        n = sum(len(a) for a in agree)
        print(f"\r{n}/{len(test)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ref_ok, q_ok, agree, kl = (torch.cat(t) for t in (ref_ok, q_ok, agree, kl))
    drop, se = paired_drop(ref_ok, q_ok)
    result = {"model": args.model, "base": meta["base"]["spec"], "data": args.data, "images": int(ref_ok.numel()),
              "fp32_top1": float(ref_ok.double().mean()), "quantized_top1": float(q_ok.double().mean()),
              "drop_pt": drop, "drop_se_pt": se, "top1_agreement": float(agree.double().mean()),
              "changed_predictions": int((~agree).sum()), "mean_kl": float(kl.mean()),
              "wall_s": time.perf_counter() - start, "threads": args.threads, "runtime": args.runtime,
              "fp32_correct": bits(ref_ok), "quantized_correct": bits(q_ok)}
    print(f"{args.model} vs {result['base']} ({args.runtime}) on {result['images']} class-stratified images of {args.data}: "
          f"FP32 {100 * result['fp32_top1']:.2f}%, quantized {100 * result['quantized_top1']:.2f}%, "
          f"drop {drop:.2f} +- {se:.2f} pt (paired SE), agreement {100 * result['top1_agreement']:.2f}% "
          f"({result['changed_predictions']} predictions changed), KL {result['mean_kl']:.4f}")
    if other is not None:
        o_ok, o_kl, o_agree = torch.cat(o_ok), torch.cat(o_kl), torch.cat(o_agree)
        o_drop, o_se = paired_drop(ref_ok, o_ok)
        entries, clause = paired_difference(q_ok, o_ok, "against")
        result["against"] = {"model": args.against, "quantized_top1": float(o_ok.double().mean()), "drop_pt": o_drop,
                             "drop_se_pt": o_se, "mean_kl": float(o_kl.mean()),
                             "top1_agreement": float(o_agree.double().mean()), "quantized_correct": bits(o_ok), **entries}
        print(f"{args.against}: quantized {100 * float(o_ok.double().mean()):.2f}%, drop {o_drop:.2f} +- {o_se:.2f} pt, "
              f"agreement {100 * float(o_agree.double().mean()):.2f}%, KL {float(o_kl.mean()):.4f}; {clause}")
    if args.out:  # written before the pairing check, so that a refused pairing loses no evaluation
        args.out.write_text(json.dumps(result, indent=1))
    if earlier is not None:
        flipped = sum(a != b for a, b in zip(earlier.get("fp32_correct", ""), result["fp32_correct"]))
        # another machine's float arithmetic can flip an image on the edge (seen: 1 of 3,000 between two sessions'
        # machines); more than 1% flipped means other images
        if len(earlier.get("fp32_correct", "")) != len(result["fp32_correct"]) or flipped > 0.01 * len(result["fp32_correct"]):
            sys.exit(f"--paired-with {args.paired_with}: the float model was right on other images there, so they are "
                     "not the same images: pass the same --data and --test-size")
        if flipped:
            print(f"note: the float model's correctness differs on {flipped} of {len(result['fp32_correct'])} images from "
                  f"that run's (float arithmetic of another machine); the pairing compares the quantized models only")
        result["paired_with_fp32_flipped"] = flipped
        e_ok = torch.tensor([c == "1" for c in earlier["quantized_correct"]])
        entries, clause = paired_difference(q_ok, e_ok, "earlier")
        result["paired_with"] = {"result": args.paired_with, "model": earlier["model"], "drop_pt": earlier["drop_pt"],
                                 "mean_kl": earlier["mean_kl"], "top1_agreement": earlier["top1_agreement"], **entries}
        print(f"{earlier['model']} ({args.paired_with}): drop {earlier['drop_pt']:.2f} pt, agreement "
              f"{100 * earlier['top1_agreement']:.2f}%, KL {earlier['mean_kl']:.4f}; {clause}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
