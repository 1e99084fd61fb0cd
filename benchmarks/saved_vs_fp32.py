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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a folder written by vitc quantize -o")
    ap.add_argument("--data", default=str(CIFAR / "test.tar.gz"))
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtime", default="torch", choices=("torch", "onnxruntime", "openvino"),
                    help="torch: the simulation against the float model; onnxruntime/openvino: both exported and run there")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from vitc.calibration.data import iter_batches, label_map
    from vitc.calibration.sources import open_source
    from vitc.commands.common import set_threads
    from vitc.compress.quantize.saved import load_base, load_quantized

    set_threads(args.threads)
    quantized = load_quantized(args.model)
    meta = json.loads((Path(args.model) / "vitc_quant.json").read_text())
    base = load_base(meta)
    run_ref, run_q = base, quantized
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
    mapping = label_map(test, base.labels)
    ref_ok, q_ok, agree, kl = [], [], [], []
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
        n = sum(len(a) for a in agree)
        print(f"\r{n}/{len(test)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ref_ok, q_ok, agree, kl = (torch.cat(t) for t in (ref_ok, q_ok, agree, kl))
    drop, se = paired_drop(ref_ok, q_ok)
    result = {"model": args.model, "base": meta["base"]["spec"], "data": args.data, "images": int(ref_ok.numel()),
              "fp32_top1": float(ref_ok.double().mean()), "quantized_top1": float(q_ok.double().mean()),
              "drop_pt": drop, "drop_se_pt": se, "top1_agreement": float(agree.double().mean()),
              "changed_predictions": int((~agree).sum()), "mean_kl": float(kl.mean()),
              "wall_s": time.perf_counter() - start, "threads": args.threads, "runtime": args.runtime}
    print(f"{args.model} vs {result['base']} ({args.runtime}) on {result['images']} class-stratified images of {args.data}: "
          f"FP32 {100 * result['fp32_top1']:.2f}%, quantized {100 * result['quantized_top1']:.2f}%, "
          f"drop {drop:.2f} +- {se:.2f} pt (paired SE), agreement {100 * result['top1_agreement']:.2f}% "
          f"({result['changed_predictions']} predictions changed), KL {result['mean_kl']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
