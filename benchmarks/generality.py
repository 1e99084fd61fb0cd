"""Issue 14's generality matrix: vitc's graph-path W8A8 on models written in every style.

For each model (``tests/generality_models.py``: transformers Dinov2, Swin, ConvNeXt, MobileViT,
MobileNetV2, EfficientNet, SegFormer, YOLOS with random weights and tiny configs; hand-written
modules with a subclassed conv, F.linear, einsum attention, fused qkv, nn.MultiheadAttention,
SDPA): matmul/conv ops and FLOPs quantized vs total, the ops left in float with their reasons,
fidelity of the simulation against FP32 on real images (the bundled CIFAR-10 slice at each model's
input size), QDQ ONNX export parity against the simulation in ONNX Runtime (``vitc.tasks``' int8
thresholds), and save/reload equality. The module path's audit (what ``--sites modules`` would
have quantized) is listed beside it, for the before/after.

    PYTHONPATH=$PWD python benchmarks/generality.py --out benchmarks/results_generality_2026-12-05.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def row(name: str, calib_src, eval_src, tmp: Path) -> dict:
    from tests.generality_models import STYLES
    from vitc.calibration.data import load_tensors
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.compress.quantize.ptq import module_path_reach
    from vitc.compress.quantize.saved import load_quantized, save_quantized
    from vitc.compress.quantize.torch_graph import audit_module_path
    from vitc.errors import VitcError
    from vitc.export.qdq import export_qdq_onnx
    from vitc.models.intake import load_model
    from vitc.tasks import fidelity, passes

    t0 = time.perf_counter()
    base = load_model(f"tests.generality_models:{name}")
    calib = load_tensors(calib_src, base.preprocess)[0]
    x = load_tensors(eval_src, base.preprocess)[0]
    out = {"model": name, "style": STYLES.get(name, "")}
    try:
        layers, attention = module_path_reach(base.module, base.structure)
        before = audit_module_path(base.module, calib[:2], layers, attention).coverage()
        out["module_path_flops_share"] = before["flops_share"]
    except VitcError as exc:
        out["module_path_flops_share"] = None
        out["module_path_note"] = exc.problem
    q = apply(base, QuantConfig(sites="graph"), calib)
    cov = q.transforms[-1]["coverage"]
    out.update(ops_quantized=cov["ops_quantized"], ops_total=cov["ops_total"], flops_share=cov["flops_share"],
               flops_total=cov["flops_total"], bit_widths=cov["bit_widths"],
               left_float=[{"op": s["name"], "reason": s["reason"], "flops": s["flops"]} for s in cov["left_float"]])
    with torch.no_grad():
        sim, ref = q(x), base(x)
    out["fidelity_vs_fp32"] = fidelity(sim, ref)
    import onnxruntime as ort

    path = export_qdq_onnx(q, tmp / f"{name}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    parity = fidelity(onnx_out, sim)
    out["export_parity"] = {"passed": passes(parity, "int8") == [], "cosine_worst": parity["cosine_worst"],
                            "pearson_mean": parity["pearson_mean"], "max_abs_error": parity["max_abs_error"]}
    save_quantized(q, tmp / f"{name}-saved")
    back = load_quantized(tmp / f"{name}-saved")
    with torch.no_grad():
        diff = (back(x) - sim).abs().max().item()
    out["reload"] = {"passed": diff <= 1e-5, "max_abs_difference": diff}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> int:
    from tests.generality_models import HAND_WRITTEN, HF_FACTORIES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(HAND_WRITTEN + HF_FACTORIES))
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from vitc.calibration.sources import open_source

    calib_src = open_source("bundled:calib").select(args.calib_size, seed=0)
    eval_src = open_source("bundled:eval").select(args.eval_size, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="vitc-generality-"))
    rows = []
    for name in filter(None, args.models.split(",")):
        try:
            rows.append(row(name, calib_src, eval_src, tmp))
        except Exception as exc:  # noqa: BLE001 - a failing row is a result, recorded as such
            rows.append({"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
    table = Table(title=f"generality matrix: vitc W8A8, graph path ({args.calib_size} calibration / {args.eval_size} eval images, bundled CIFAR-10 slice)")
    for col in ("model", "ops q/total", "FLOPs quantized", "module path before", "cos worst vs FP32", "export parity", "reload", "left float"):
        table.add_column(col)
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], "error", r["error"], "", "", "", "", "")
            continue
        before = "n/a" if r["module_path_flops_share"] is None else f"{100 * r['module_path_flops_share']:.1f}%"
        table.add_row(r["model"], f"{r['ops_quantized']}/{r['ops_total']}", f"{100 * r['flops_share']:.2f}%", before,
                      f"{r['fidelity_vs_fp32']['cosine_worst']:.4f}",
                      f"{'pass' if r['export_parity']['passed'] else 'FAIL'} (cos {r['export_parity']['cosine_worst']:.5f})",
                      "pass" if r["reload"]["passed"] else "FAIL",
                      "; ".join(f"{s['op']}: {s['reason']}" for s in r["left_float"][:2]) or "-")
    Console(width=200).print(table)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "calibration_images": args.calib_size, "eval_images": args.eval_size,
                                        "machine": "2-core CPU shared with other jobs"}, indent=2) + "\n")
    return 0 if all("error" not in r and r["flops_share"] >= 0.95 and r["export_parity"]["passed"] and r["reload"]["passed"]
                    for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
