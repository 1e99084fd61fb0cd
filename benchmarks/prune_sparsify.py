"""Structured pruning and 2:4 sparsity on the reference ViT, in one run, side by side with the peers.

    python benchmarks/prune_sparsify.py --model zoo:vit-c10 --recover-steps 1000 --out prune_sparsify.json

Sections (``--sections``, all by default):

* prune: dense vs. pruned to ``--flops`` of the FLOPs, with the magnitude criterion (the
  common baseline, peer) and Taylor/distillation (vitc's default), before and after
  ``--recover-steps`` of distillation; ONNX Runtime CPU throughput at batch 32, dense vs. pruned.
* sparsity: dense vs. 2:4 by magnitude (peer), Wanda and SparseGPT without recovery, and
  SparseGPT after recovery with fixed masks.
* chain: prune (+ recovery) -> 2:4 SparseGPT -> W8A8 -> ONNX, top-1 of every stage, the
  last one run in ONNX Runtime.

Images: calibration and recovery from the CIFAR-10 training archive, top-1 on a stratified
subset of the test archive (``--eval-size``); never the same images. Goals of issue 7: pruned
at 70% FLOPs within 2 points of dense after <= 1,000 steps and >= 1.25x ORT throughput;
SparseGPT >= 3 points above magnitude without recovery and within 2 points of dense after.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


def top1(backbone_or_session, source, preprocess, labels, batch=200) -> float:
    from vitc.evaluate import evaluate

    return evaluate(backbone_or_session, source, preprocess, labels, batch)["top1"]


def export_onnx(backbone, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(backbone.module.eval(), (backbone.example_input(2),), str(path), input_names=["pixel_values"],
                          output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return path


def ort_throughput(paths: dict[str, Path], size: int, threads: int, batch: int = 32, rounds: int = 7, seconds: float = 1.5) -> dict[str, float]:
    """Images/s per model; rounds alternate between the models so load on a shared machine hits them alike."""
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    sessions = {}
    for name, p in paths.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sessions[name] = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sessions[name].run(None, {"pixel_values": x})
    rates = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                s.run(None, {"pixel_values": x})
                n += batch
            rates[name].append(n / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def table(title: str, rows: list[dict], cols: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for _, head in cols:
        t.add_column(head)
    for r in rows:
        t.add_row(*[_fmt(r.get(key)) for key, _ in cols])
    Console().print(t)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:vit-c10")
    ap.add_argument("--train-data", default=str(CIFAR / "train.tar.gz"))
    ap.add_argument("--eval-data", default=str(CIFAR / "test.tar.gz"))
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--train-size", type=int, default=10000)
    ap.add_argument("--flops", type=float, default=0.7)
    ap.add_argument("--recover-steps", type=int, default=1000)
    ap.add_argument("--recover-batch", type=int, default=64)
    ap.add_argument("--recover-lr", type=float, default=2e-4)
    ap.add_argument("--recover-peer", action="store_true", help="also recover the magnitude-pruned peer (doubles the time)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sections", default="prune,sparsity,chain")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.commands.common import set_threads
    from vitc.compress.prune import PruneConfig
    from vitc.compress.prune import apply as prune
    from vitc.compress.recover import RecoverConfig, recover
    from vitc.compress.sparsity import SparsityConfig, layer_masks
    from vitc.compress.sparsity import apply as sparsify
    from vitc.models.intake import load_model

    threads = set_threads(args.threads)
    sections = set(args.sections.split(","))
    dense = load_model(args.model)
    pre, labels = dense.preprocess, dense.labels
    t0 = time.perf_counter()
    train_source = open_source(args.train_data)
    calib_source, rest = train_source.split_off(args.calib_size, seed=0)
    calib = load_tensors(calib_source, pre)[0]
    train = load_tensors(rest.select(args.train_size, seed=1), pre)[0] if args.recover_steps else None
    evals = open_source(args.eval_data).select(args.eval_size, seed=0)
    print(f"data: {len(calib)} calibration + {0 if train is None else len(train)} recovery images from {args.train_data}, "
          f"{len(evals)} evaluation images from {args.eval_data} ({time.perf_counter() - t0:.0f} s)", flush=True)
    rc = RecoverConfig(steps=max(1, args.recover_steps), batch_size=args.recover_batch, lr=args.recover_lr)
    dense_top1 = top1(dense, evals, pre, labels)
    report = {"model": args.model, "threads": threads, "eval_images": len(evals), "dense_top1": dense_top1,
              "dense_flops": dense.flops(), "recover_steps": args.recover_steps}
    tmp = Path(tempfile.mkdtemp(prefix="vitc-bench-"))

    pruned_best = None
    if "prune" in sections:
        rows = [{"model": "dense", "flops": 1.0, "params": dense.parameters_count(), "top1": dense_top1}]
        for importance in ("magnitude", "taylor"):
            t = time.perf_counter()
            p = prune(dense, PruneConfig(importance=importance, flops=args.flops), calib)
            rows.append({"model": f"pruned ({importance}{', peer' if importance == 'magnitude' else ''})",
                         "flops": p.flops() / dense.flops(), "params": p.parameters_count(), "top1": top1(p, evals, pre, labels),
                         "seconds": time.perf_counter() - t})
            print(rows[-1], flush=True)
            if args.recover_steps and (importance == "taylor" or args.recover_peer):
                r = recover(p, dense, train, rc)
                rows.append({"model": f"pruned ({importance}) + {args.recover_steps} steps", "flops": rows[-1]["flops"],
                             "params": rows[-1]["params"], "top1": top1(r, evals, pre, labels),
                             "seconds": r.transforms[-1]["seconds"], "s_per_step": r.transforms[-1]["seconds_per_step"]})
                print(rows[-1], flush=True)
                if importance == "taylor":
                    pruned_best = r
            elif importance == "taylor":
                pruned_best = p
        for r in rows:
            r["drop_points"] = 100 * (dense_top1 - r["top1"])
        speed = ort_throughput({"dense": export_onnx(dense, tmp / "dense.onnx"), "pruned": export_onnx(pruned_best, tmp / "pruned.onnx")},
                               pre.input_size, threads)
        report["prune"] = {"rows": rows, "ort_images_per_s_batch32": speed, "speedup": speed["pruned"] / speed["dense"],
                           "structure": [{"heads": b.attention.num_heads if b.attention else 0, "mlp": b.mlp.hidden}
                                         for b in pruned_best.structure.blocks]}
        table(f"prune to {args.flops:.0%} FLOPs: {args.model}, {len(evals)} test images", rows,
              [("model", "model"), ("flops", "FLOPs kept"), ("params", "params"), ("top1", "top-1"), ("drop_points", "drop (points)"),
               ("s_per_step", "s/step")])
        print(f"ONNX Runtime CPU, batch 32, {threads} threads: dense {speed['dense']:.0f} img/s, pruned {speed['pruned']:.0f} img/s, "
              f"speed-up {speed['pruned'] / speed['dense']:.2f}x", flush=True)

    if "sparsity" in sections:
        rows = [{"model": "dense", "top1": dense_top1}]
        sparse = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            t = time.perf_counter()
            s = sparsify(dense, SparsityConfig(method=method), calib)
            sparse[method] = s
            rows.append({"model": f"2:4 {method}{' (peer)' if method == 'magnitude' else ''}", "top1": top1(s, evals, pre, labels),
                         "layers": len(s.transforms[-1]["sparse_layers"]), "seconds": time.perf_counter() - t})
            print(rows[-1], flush=True)
        if args.recover_steps:
            r = recover(sparse["sparsegpt"], dense, train, rc, layer_masks(sparse["sparsegpt"]))
            rows.append({"model": f"2:4 sparsegpt + {args.recover_steps} steps", "top1": top1(r, evals, pre, labels),
                         "layers": len(layer_masks(r)), "seconds": r.transforms[-1]["seconds"]})
        for r in rows:
            r["drop_points"] = 100 * (dense_top1 - r["top1"])
        report["sparsity"] = {"rows": rows, "dense_layers": sparse["sparsegpt"].transforms[-1]["dense_layers"],
                              "sparsegpt_minus_magnitude_points": 100 * (rows[3]["top1"] - rows[1]["top1"])}
        table(f"2:4 sparsity: {args.model}, {len(evals)} test images", rows,
              [("model", "model"), ("layers", "2:4 layers"), ("top1", "top-1"), ("drop_points", "drop (points)"), ("seconds", "seconds")])

    if "chain" in sections:
        from vitc.compress.quantize import QuantConfig
        from vitc.compress.quantize import apply as quantize
        from vitc.export import export_artifact
        from vitc.runtimes import open_session

        p = pruned_best or prune(dense, PruneConfig(importance="taylor", flops=args.flops), calib)
        rows = [{"stage": "dense", "top1": dense_top1, "runtime": "torch"},
                {"stage": "pruned" + (" + recovery" if pruned_best is not None and args.recover_steps else ""),
                 "top1": top1(p, evals, pre, labels), "runtime": "torch"}]
        s = sparsify(p, SparsityConfig(method="sparsegpt"), calib)
        rows.append({"stage": "+ 2:4 sparsegpt", "top1": top1(s, evals, pre, labels), "runtime": "torch"})
        q = quantize(s, QuantConfig(wbits=8, abits=8), calib)
        rows.append({"stage": "+ W8A8 (simulated)", "top1": top1(q, evals, pre, labels), "runtime": "torch"})
        from vitc.compress.sparsity import sparse_layers

        art = export_artifact(q, "onnx", tmp / "chain.onnx", check=False, force=True)
        session = open_session(art.path, threads=threads)
        rows.append({"stage": "+ ONNX export", "top1": top1(session, evals, pre, labels), "runtime": "onnxruntime"})
        for r in rows:
            r["drop_points"] = 100 * (dense_top1 - r["top1"])
        report["chain"] = {"rows": rows, "sparse_layers_after_quantization": len(sparse_layers(q)),
                           "sparse_layers_before_quantization": len(sparse_layers(s)), "artifact_precision": art.precision}
        table(f"prune -> 2:4 -> W8A8 -> ONNX: {args.model}", rows,
              [("stage", "stage"), ("runtime", "runtime"), ("top1", "top-1"), ("drop_points", "drop (points)")])
        print(f"2:4 layers: {len(sparse_layers(s))} after sparsify, {len(sparse_layers(q))} still 2:4 after W8A8", flush=True)

    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
