"""Generality matrix for structured pruning and 2:4 sparsity on models vitc has no adapter for.

For each model (tiny transformers configs with random weights, and hand-written modules; see
``tests/generality_prune_models.py``): channel groups found from the ``torch.export`` graph, pruned to
``--flops`` of the dense FLOPs (Taylor scores on real calibration images), the FLOPs ratio
reached, the share of conv/matmul FLOPs in ops the pruning shrank, ONNX export parity, and a
strict save/reload with equal outputs; then 2:4 (Wanda) on the dense model: the share of the
Linear/Conv FLOPs sparsified, every sparsified weight checked to be exactly 2:4, and save/reload.

    PYTHONPATH=$PWD python benchmarks/generality_prune.py --out benchmarks/results_generality_prune_2026-12-05.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import generality_prune_models as gm  # noqa: E402

ROWS = ("mobilenetv2", "efficientnet", "convnext", "resnet", "subclassed-cnn", "dinov2", "fused-vit")


def _same(a, b) -> bool:
    return bool(torch.allclose(a, b, atol=1e-5, rtol=1e-4))


def row(name: str, work: Path, flops: float, calib: int) -> dict:
    import vitc
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.sparsity import masks
    from vitc.errors import VitcError
    from vitc.models.intake import load_model

    spec, weights = gm.write(name, work / "models")
    dense = load_model(spec, weights)
    images = load_tensors(open_source("bundled:calib").select(calib, seed=0), dense.preprocess)[0]
    check = load_tensors(open_source("bundled:eval").select(16, seed=0), dense.preprocess)[0]
    out = {"model": name, "spec": spec.split(":")[0] + ":" if spec.startswith("hf:") else spec, "family": dense.structure.family}
    t0 = time.perf_counter()
    out["prune_setting"] = f"flops {flops}"
    try:
        pruned = vitc.prune(dense, images, importance="taylor", flops=flops, method="graph", round_to=1, batch_size=16)
    except VitcError as exc:  # too few prunable units for the target (e.g. only the MLPs): recorded, then half the MLPs
        if "out of reach" not in str(exc):
            raise
        out["prune_refusal"] = str(exc)
        out["prune_setting"] = "mlp 0.5"
        pruned = vitc.prune(dense, images, importance="taylor", mlp=0.5, method="graph", round_to=1, batch_size=16)
    out["prune_s"] = time.perf_counter() - t0
    rec = pruned.transforms[-1]
    out["groups"] = len(rec["plan"]["channels"])
    out["heads_pruned"] = {k: v["heads"] for k, v in rec["plan"]["heads"].items()}
    out["flops_ratio"] = rec["flops"] / rec["flops_dense"]
    out["prune_coverage"] = rec["coverage"]["flops_share"]
    out["prune_left_alone"] = rec["coverage"]["left_alone"]
    art = vitc.export(pruned, "onnx", work / name / "pruned.onnx", eval_size=16, batch_size=16)
    out["onnx_parity"] = art.status
    with torch.no_grad():
        y = pruned.module(check)
        again = load_model(vitc.save(pruned, work / name / "pruned"))
        out["prune_reload_ok"] = _same(again.module(check), y) and tuple(y.shape) == tuple(dense.module(check).shape)
    t0 = time.perf_counter()
    out["sparse_shapes"] = "kernel"
    try:
        sparse = vitc.sparsify(dense, images, method="wanda", batch_size=16)
    except VitcError as exc:  # no layer at GPU-kernel shapes (narrow toy CNNs): the refusal is recorded, then --shapes any
        out["sparse_kernel_refusal"] = str(exc)
        out["sparse_shapes"] = "any"
        sparse = vitc.sparsify(dense, images, method="wanda", batch_size=16, shapes="any")
    out["sparsify_s"] = time.perf_counter() - t0
    srec = sparse.transforms[-1]
    layers = dict(sparse.module.named_modules())
    exact = all(masks.violations(masks.conv_to_2d(layers[p].weight.detach())) == 0 for p in srec["sparse_layers"])
    out["sparse_layers"] = len(srec["sparse_layers"])
    out["sparse_coverage"] = srec["coverage"]["flops_share"]
    out["sparse_exact_24"] = exact
    out["sparse_left_alone"] = srec["coverage"]["left_alone"]
    with torch.no_grad():
        y = sparse.module(check)
        again = load_model(vitc.save(sparse, work / name / "sparse"))
        out["sparse_reload_ok"] = _same(again.module(check), y)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flops", type=float, default=0.6, help="fraction of FLOPs to keep")
    ap.add_argument("--calib", type=int, default=16, help="real calibration images (bundled CIFAR-10 slice)")
    ap.add_argument("--models", default=",".join(ROWS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitc-generality-") as tmp:
        for name in args.models.split(","):
            try:
                rows.append(row(name, Path(tmp), args.flops, args.calib))
            except Exception as exc:  # a row that fails is a result, recorded as such
                rows.append({"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
    table = Table(title=f"prune to {args.flops:.0%} FLOPs (graph groups, Taylor) and 2:4 (Wanda): random-weight models, "
                        f"{args.calib} real calibration images")
    for col in ("model", "prune", "groups", "FLOPs kept", "pruned-op FLOPs", "ONNX parity", "prune reload",
                "2:4 shapes", "2:4 layers", "2:4 FLOPs", "exact 2:4", "2:4 reload"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], "[red]" + r["error"] + "[/red]", *[""] * 10)
            continue
        table.add_row(r["model"], r["prune_setting"], str(r["groups"]), f"{r['flops_ratio']:.3f}", f"{r['prune_coverage']:.1%}", r["onnx_parity"],
                      "ok" if r["prune_reload_ok"] else "FAIL", r["sparse_shapes"], str(r["sparse_layers"]), f"{r['sparse_coverage']:.1%}",
                      "yes" if r["sparse_exact_24"] else "NO", "ok" if r["sparse_reload_ok"] else "FAIL")
    console = Console(record=True, width=160)
    console.print(table)
    for r in rows:
        if "error" in r:
            continue
        left = [f"{d['name']} ({d['reason'][:90]})" for d in r["prune_left_alone"][:3]]
        console.print(f"{r['model']}: prune left alone (largest first): " + "; ".join(left))
        left = [f"{d['name']} ({d['reason'][:60]})" for d in r["sparse_left_alone"][:3]]
        console.print(f"{r['model']}: 2:4 left dense (largest first): " + "; ".join(left))
    if args.out:
        doc = {"benchmark": "generality_prune", "flops_target": args.flops, "calibration_images": args.calib,
               "note": "random-weight tiny configs; 2-core machine shared with other jobs (times are indicative only)",
               "rows": rows}
        args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        args.out.with_suffix(".txt").write_text(console.export_text())


if __name__ == "__main__":
    main()
