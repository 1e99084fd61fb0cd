"""The low-bit frontier, side by side in one run (issue 18).

Per model (``--models``, default the CIFAR-10 zoo ViT and conv-stem hybrid; add the real ViT-S
classifier with ``--models zoo:vit-c10,zoo:convvit-c10,zoo:dinov2s-c10``), on one class-stratified
test subset and one class-stratified calibration subset from the training archive:

* W4A4 calibration only vs. W4A4 + block reconstruction (time of the reconstruction);
* W4A8; W6A6 + reconstruction;
* mixed precision at an average of 5 weight bits with 8-bit activations, and the accuracy-vs-size
  curve (mixed at 4.25..8 average bits against uniform W4A8/W6A8/W8A8) in one PNG;
* weight-only int4, group 64 (simulation, ONNX Runtime, OpenVINO; GPTQ rounding, and nearest
  rounding in simulation) against NNCF's ``compress_weights`` (INT4_SYM, group 64; data-free, and
  with the same calibration images, GPTQ and scale estimation) on the same FP32 OpenVINO model;
  weight-only int4/int8 mixed precision at ``--wo-budgets`` average bits against NNCF at the same
  int4 ratio (``ratio=``); file sizes against
  FP32; batch-1 OpenVINO latency of FP32, W8A8 and W4A16 (interleaved rounds);
* parity of every exported low-bit artifact against its own PyTorch simulation.

    python benchmarks/lowbit.py --iters 60 --out benchmarks/results_lowbit_2026-12-05_v2.json \
        --plot benchmarks/lowbit_curve_2026-12-05_v2.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
MODELS = ("zoo:vit-c10", "zoo:convvit-c10")
CURVE_BUDGETS = (4.25, 4.5, 5.0, 6.0, 7.0)


def predict(run, x: torch.Tensor, batch: int = 250) -> np.ndarray:
    outs = []
    for i in range(0, len(x), batch):
        with torch.no_grad():
            outs.append(np.asarray(run(x[i:i + batch]), dtype=np.float32))
    return np.concatenate(outs)


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def output_kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(FP32 || quantized) of the predicted class distributions."""
    p = torch.log_softmax(torch.from_numpy(ref_logits).double(), -1)
    q = torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits)).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def bench_model(spec: str, calib_src, test_src, args, plot_rows: list) -> list[dict]:
    from dataclasses import replace

    from vitc.calibration.data import load_tensors
    from vitc.compress.quantize import QuantConfig, apply, mixed
    from vitc.compress.quantize.saved import model_size
    from vitc.compress.quantize.weight_only import ir_weight_types
    from vitc.export.onnx import write_onnx
    from vitc.export.pipeline import ExportOptions
    from vitc.export.parity import RoundingJitter, logit_verdict
    from vitc.export.qdq import export_qdq_onnx
    from vitc.models.intake import load_model
    from vitc.runtimes import open_session

    import openvino as ov

    backbone = load_model(spec)
    calib, _ = load_tensors(calib_src, backbone.preprocess)
    x, y = load_tensors(test_src, backbone.preprocess)
    y = y.numpy()
    tmp = Path(tempfile.mkdtemp(prefix="vitc-lowbit-"))
    fp_logits = predict(backbone, x)
    fp_top1 = float((fp_logits.argmax(-1) == y).mean())
    fp_bytes = model_size(backbone)
    rows: list[dict] = []
    print(f"{spec} ({backbone.kind}): {len(calib)} calibration / {len(x)} test images, FP32 top-1 {100 * fp_top1:.2f}%", flush=True)

    def row(method, runtime, logits, sim_logits=None, floor_logits=None, **extra):
        acc = float((logits.argmax(-1) == y).mean())
        r = {"model": spec, "method": method, "runtime": runtime, "top1": acc, "drop_pt": 100 * (fp_top1 - acc),
             # fidelity to FP32: far less noisy than a top-1 difference of a few images out of 2,000
             "agreement_with_fp32": float((logits.argmax(-1) == fp_logits.argmax(-1)).mean()),
             "kl_vs_fp32": output_kl(fp_logits, logits), **extra}
        if sim_logits is not None:  # parity against the artifact's own simulation
            r["agreement_with_simulation"] = float((logits.argmax(-1) == sim_logits.argmax(-1)).mean())
            r["max_abs_diff_vs_simulation"] = float(np.abs(logits - sim_logits).max())
            # vitc export's rule (vitc.export.parity), with the simulation's own rounding floor
            verdict, failures = logit_verdict(logits, sim_logits, "int8", floor_logits)
            r["parity_passed"], r["parity_failure"] = not failures, "; ".join(failures)
            r["parity_min_agreement"] = verdict["min_agreement"]
            if "rounding_floor" in verdict:
                r["rounding_floor_agreement"] = verdict["rounding_floor"]["top1_agreement"]
        rows.append(r)
        par = (f"  agree w/ sim {100 * r['agreement_with_simulation']:.2f}% (parity {'passed' if r['parity_passed'] else 'FAILED'}"
               f", bar {100 * r['parity_min_agreement']:.1f}%)") if sim_logits is not None else ""
        print(f"  {method:34s} {runtime:12s} top-1 {100 * acc:6.2f}%  drop {r['drop_pt']:+.2f} pt  "
              f"agree w/ fp32 {100 * r['agreement_with_fp32']:.2f}%  KL {r['kl_vs_fp32']:.5f}{par}", flush=True)
        return r

    row("fp32", "torch", fp_logits, bytes=fp_bytes)

    def quantize(config, label, **extra):
        t = time.perf_counter()
        q = apply(backbone, config, calib, say=lambda m: print("   ", m, flush=True))
        s = time.perf_counter() - t
        rec = q.transforms[-1].get("reconstruction")
        logits = predict(q, x)
        r = row(label, "torch (sim)", logits, seconds=round(s, 2), bytes=model_size(q), **extra)
        if rec:
            r["reconstruction_s"] = rec["seconds"]
            r["reconstruction_estimate_s"] = rec["estimate_s"]
            r["units_kept_calibration"] = sum(u["kept_calibration"] for u in rec["units"])
            r["loadavg_after"] = loadavg()  # the machine is shared: the time means little without it
            print(f"    reconstruction {rec['seconds']:.1f} s, load average {' '.join(map(str, r['loadavg_after']))}", flush=True)
        return q, logits

    def exported(q, sim_logits, label):
        jitter, floor = RoundingJitter(q.module, 0), None
        if jitter:  # the simulation's own float-rounding spread (parity's floor); none without activation grids
            with jitter:
                floor = predict(q, x)
        onnx_path = tmp / f"{label}.onnx"
        export_qdq_onnx(q, onnx_path)
        row(label, "onnxruntime", predict(open_session(onnx_path, runtime="onnxruntime", threads=args.threads), x),
            sim_logits, floor, file_bytes=os.path.getsize(onnx_path))
        ov_onnx = tmp / f"{label}_ov.onnx"
        export_qdq_onnx(q, ov_onnx, split_shared_inputs=False)
        model = ov.convert_model(str(ov_onnx))
        xml = tmp / f"{label}.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        row(label, "openvino", predict(open_session(xml, runtime="openvino", threads=args.threads), x), sim_logits, floor,
            file_bytes=os.path.getsize(xml.with_suffix(".bin")), ir_weight_constants=ir_weight_types(model))
        return xml

    iters = args.iters
    if args.weight_only_only:  # rerun the weight-only comparison alone
        return _weight_only_section(backbone, x, y, calib, tmp, args, rows, row, quantize, exported, plot_rows)
    if args.calibration_only:  # uniform widths without reconstruction or mixed precision (the real ViT-S)
        for w, a in ((8, 8), (6, 6), (4, 4)):
            quantize(QuantConfig(wbits=w, abits=a), f"W{w}A{a}")
            if a < 8:  # what the prefix (CLS) grid and GPTQ each bring
                quantize(QuantConfig(wbits=w, abits=a, weight_rounding="nearest"), f"W{w}A{a}, nearest rounding")
                quantize(QuantConfig(wbits=w, abits=a, weight_rounding="nearest", prefix_grid="off"),
                         f"W{w}A{a}, nearest rounding, one grid for CLS and patches")
        q48, w4a8 = quantize(QuantConfig(wbits=4, abits=8), "W4A8")
        exported(q48, w4a8, "W4A8")
        quantize(QuantConfig(wbits=4, abits=8, weight_rounding="nearest"), "W4A8, nearest rounding")
        quantize(QuantConfig(wbits=6, abits=8), "W6A8")
        return rows
    if args.mixed_only:  # uniform W4A8 / W6A8 / W8A8 and mixed precision at CURVE_BUDGETS (the real ViT-S)
        q48, w4a8 = quantize(QuantConfig(wbits=4, abits=8), "W4A8")
        _, w6a8 = quantize(QuantConfig(wbits=6, abits=8), "W6A8")
        _, w8a8 = quantize(QuantConfig(), "W8A8")
        _mixed_section(backbone, calib, x, y, spec, fp_top1, quantize, exported, plot_rows, w4a8, w8a8, w6a8)
        return rows
    if args.reconstruction_only:  # each width calibration-only, then with block reconstruction (the real ViT-S)
        for w, a in (tuple(int(v) for v in wa.split("x")) for wa in args.widths.split(",")):
            quantize(QuantConfig(wbits=w, abits=a), f"W{w}A{a} calibration only")
            qr, logits = quantize(QuantConfig(wbits=w, abits=a, reconstruct_iters=iters), f"W{w}A{a} + reconstruction ({iters} it)")
            if a == 8:  # below 8-bit activations the CLS grid has no QDQ form
                exported(qr, logits, f"W{w}A{a}_recon")
        return rows
    _, w4a4 = quantize(QuantConfig(wbits=4, abits=4), "W4A4 calibration only")
    _, w4a4r = quantize(QuantConfig(wbits=4, abits=4, reconstruct_iters=iters), f"W4A4 + reconstruction ({iters} it)")
    q48, w4a8 = quantize(QuantConfig(wbits=4, abits=8), "W4A8")
    exported(q48, w4a8, "W4A8")
    quantize(QuantConfig(wbits=6, abits=6), "W6A6 calibration only")
    if not args.no_w6a6_reconstruct:
        quantize(QuantConfig(wbits=6, abits=6, reconstruct_iters=iters), f"W6A6 + reconstruction ({iters} it)")
    q88, w8a8 = quantize(QuantConfig(), "W8A8")
    w8a8_xml = exported(q88, w8a8, "W8A8")

    _mixed_section(backbone, calib, x, y, spec, fp_top1, quantize, exported, plot_rows, w4a8, w8a8)
    return _weight_only_section(backbone, x, y, calib, tmp, args, rows, row, quantize, exported, plot_rows)


def _mixed_section(backbone, calib, x, y, spec, fp_top1, quantize, exported, plot_rows, w4a8, w8a8, w6a8=None):
    """Mixed precision at 5.0 average weight bits (exported) and the accuracy-vs-size curve against uniform widths."""
    from vitc.compress.quantize import QuantConfig, mixed

    # mixed precision: one sensitivity table, an allocation per budget
    t = time.perf_counter()
    plan = mixed.plan_mixed(backbone, calib, size_budget=5.0)
    sens_s = time.perf_counter() - t
    qm, mixed5 = quantize(QuantConfig(layer_bits=plan["layer_bits"]), "mixed 5.0 avg weight bits, A8",
                          average_wbits=plan["average_wbits"], sensitivity_s=round(sens_s, 2),
                          widths={str(b): sum(1 for w, _ in plan["layer_bits"].values() if w == b) for b in (4, 6, 8)})
    exported(qm, mixed5, "mixed5")
    layers = mixed.candidate_layers(backbone.module, backbone.structure)
    costs = {l.name: l.params for l in layers}
    fixed = {l.name for l in layers if l.fixed}
    wsens = {n: {int(b): v for b, v in s["w"].items()} for n, s in plan["sensitivity"].items()}
    curve = []
    for budget in CURVE_BUDGETS:
        bits = mixed.allocate(wsens, costs, budget, fixed)
        lb = {n: [bits[n], 8] for n in costs}
        if abs(budget - 5.0) < 1e-9:
            logits = mixed5
        else:
            _, logits = quantize(QuantConfig(layer_bits=lb), f"mixed {budget:g} avg weight bits, A8",
                                 average_wbits=mixed.average_bits(bits, costs))
        curve.append({"kind": "mixed", "average_wbits": mixed.average_bits(bits, costs),
                      "top1": float((logits.argmax(-1) == y).mean())})
    for wb, logits in ((4, w4a8), (8, w8a8)):
        curve.append({"kind": "uniform", "average_wbits": mixed.average_bits({n: (8 if n in fixed else wb) for n in costs}, costs),
                      "top1": float((logits.argmax(-1) == y).mean())})
    if w6a8 is None:
        _, w6a8 = quantize(QuantConfig(wbits=6, abits=8), "W6A8")
    curve.append({"kind": "uniform", "average_wbits": mixed.average_bits({n: (8 if n in fixed else 6) for n in costs}, costs),
                  "top1": float((w6a8.argmax(-1) == y).mean())})
    plot_rows.append({"model": spec, "fp32_top1": fp_top1, "curve": curve})


def _weight_only_section(backbone, x, y, calib, tmp, args, rows, row, quantize, exported, plot_rows):
    import openvino as ov

    from vitc.compress.quantize import QuantConfig
    from vitc.compress.quantize.weight_only import ir_weight_types
    from vitc.export.onnx import write_onnx
    from vitc.export.pipeline import ExportOptions
    from vitc.runtimes import open_session

    spec = backbone.source
    w8a8_xml = tmp / "W8A8.xml"
    if not w8a8_xml.exists() and not args.no_latency:  # only the latency rounds use it
        q88, w8a8 = quantize(QuantConfig(), "W8A8")
        w8a8_xml = exported(q88, w8a8, "W8A8")
    # weight-only int4 g64 against NNCF compress_weights on the same FP32 model
    quantize(QuantConfig(wbits=4, abits=16, group_size=64, weight_rounding="nearest"), "W4A16 g64, nearest rounding")
    qwo, wo = quantize(QuantConfig(wbits=4, abits=16, group_size=64), "W4A16 g64 (weight-only, GPTQ)")
    wo_xml = exported(qwo, wo, "W4A16g64")
    if not args.no_asymmetric:  # uint4 with a zero point per group (--weight-scheme asymmetric)
        qwa, woa = quantize(QuantConfig(wbits=4, abits=16, group_size=64, weight_scheme="asymmetric"),
                            "W4A16 g64 asymmetric (weight-only, GPTQ)")
        exported(qwa, woa, "W4A16g64asym")
    # weight-only mixed precision: each layer int4 g64 or int8 per channel by output-KL sensitivity
    # under an average-weight-bits budget (vitc quantize --bits auto --size-budget B --abits 16)
    from vitc.compress.quantize import mixed

    int4_ratios, table = {}, None
    for budget in args.wo_budgets:
        t = time.perf_counter()  # one sensitivity pass, an allocation per budget
        plan = mixed.plan_mixed(backbone, calib, size_budget=budget, abits=16, group_size=64, sensitivity_table=table)
        table, sens_s = plan["sensitivity"], time.perf_counter() - t
        free = {r["layer"]: r["params"] for r in plan["rows"] if r["kl_w4"] is not None}  # unmeasured: fixed at int8
        int4 = sum(p for n, p in free.items() if plan["layer_bits"][n][0] == 4)
        int4_ratios[budget] = int4 / sum(free.values())
        label = f"W{budget:g}A16 mixed g64"
        qm, mixed_logits = quantize(QuantConfig(wbits=4, abits=16, group_size=64, layer_bits=plan["layer_bits"]),
                                    f"{label} (int4 ratio {int4_ratios[budget]:.2f}, GPTQ)", average_wbits=plan["average_wbits"],
                                    int4_ratio=round(int4_ratios[budget], 4), sensitivity_s=round(sens_s, 2))
        if budget == args.wo_budgets[0]:  # the first budget's artifacts through ONNX Runtime and OpenVINO
            exported(qm, mixed_logits, label.replace(" ", "_"))
    fp_onnx = tmp / "fp32.onnx"
    write_onnx(backbone, fp_onnx, ExportOptions("fp32"), None)
    fp_model = ov.convert_model(str(fp_onnx))
    fp_xml = tmp / "fp32.xml"
    ov.save_model(fp_model, str(fp_xml), compress_to_fp16=False)
    row("fp32", "openvino", predict(open_session(fp_xml, runtime="openvino", threads=args.threads), x),
        file_bytes=os.path.getsize(fp_xml.with_suffix(".bin")), onnx_bytes=os.path.getsize(fp_onnx))
    import nncf

    def nncf_row(label: str, stem: str, mode, ratio: float = 1.0, dataset=None) -> Path:
        """``nncf.compress_weights`` on the FP32 IR (g64; with ``dataset``: GPTQ + scale estimation), timed, saved, evaluated."""
        t = time.perf_counter()
        extra = {"dataset": dataset, "subset_size": len(calib), "scale_estimation": True, "gptq": True} if dataset is not None else {}
        model = nncf.compress_weights(ov.convert_model(str(fp_onnx)), mode=mode, group_size=64, ratio=ratio, **extra)
        seconds = time.perf_counter() - t
        xml = tmp / f"{stem}.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        row(label, "openvino", predict(open_session(xml, runtime="openvino", threads=args.threads), x), seconds=round(seconds, 2),
            file_bytes=os.path.getsize(xml.with_suffix(".bin")), ir_weight_constants=ir_weight_types(model))
        return xml

    nncf_xml = nncf_row("nncf.compress_weights INT4_SYM g64", "nncf_int4", nncf.CompressWeightsMode.INT4_SYM)
    # NNCF with its data-aware options, on the same calibration images as vitc, all of them (its
    # subset_size, default 128, raised to match; GPTQ with scale estimation: NNCF's strongest INT4
    # setting for a model without AWQ's MatMul->MatMul patterns)
    dataset = nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))])
    nncf_row("nncf.compress_weights INT4_SYM g64 +data (GPTQ, scale estimation)", "nncf_int4_data",
             nncf.CompressWeightsMode.INT4_SYM, dataset=dataset)
    if not args.no_asymmetric:  # NNCF's asymmetric int4 with the same data-aware options
        nncf_row("nncf.compress_weights INT4_ASYM g64 +data (GPTQ, scale estimation)", "nncf_int4_asym_data",
                 nncf.CompressWeightsMode.INT4_ASYM, dataset=dataset)
    # NNCF's own int4/int8 mix at the same int4 share of the weights as vitc's allocation
    # (``ratio``; with a dataset NNCF ranks layers by its Hessian-input-activation metric)
    for budget, ratio in int4_ratios.items():
        nncf_row(f"nncf.compress_weights INT4_SYM g64 ratio {ratio:.2f} +data (GPTQ, scale estimation)",
                 f"nncf_int4_mix{budget:g}", nncf.CompressWeightsMode.INT4_SYM, round(ratio, 4), dataset)

    if not args.no_latency:
        from vitc.bench.harness import HarnessConfig, build_pool, measure

        paths = {"fp32": fp_xml, "W8A8": w8a8_xml, "W4A16 g64": wo_xml, "nncf INT4_SYM g64": nncf_xml}
        sessions = {k: open_session(p, runtime="openvino", threads=args.threads) for k, p in paths.items()}
        pool = build_pool(x[:128].numpy(), 1)
        config = HarnessConfig(min_samples=20, min_time_s=0.3, max_time_s=1.5, warmup_max_s=0.5)
        per_round = {k: [] for k in paths}
        import random

        rng, order = random.Random(0), list(paths)
        for _ in range(args.rounds):
            rng.shuffle(order)
            for k in order:
                per_round[k].append(1000 * measure(sessions[k], pool, 1, config)["stats"]["p50"]["value"])
        lat = {"runtime": "openvino", "batch": 1, "rounds": args.rounds,
               "p50_ms": {k: float(np.median(v)) for k, v in per_round.items()},
               "speedup_vs_fp32": {k: float(np.median(np.array(per_round["fp32"]) / np.array(v))) for k, v in per_round.items()},
               "rounds_ms": per_round}
        rows.append({"model": spec, "method": "latency", "runtime": "openvino", **lat})
        print("  batch-1 OpenVINO p50 (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in lat["p50_ms"].items()), flush=True)
    return rows


def plot(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, c in zip(axes[0], curves):
        for kind, style in (("mixed", "o-"), ("uniform", "s--")):
            pts = sorted((p["average_wbits"], 100 * p["top1"]) for p in c["curve"] if p["kind"] == kind)
            ax.plot(*zip(*pts), style, label=f"{kind} (A8)")
        ax.axhline(100 * c["fp32_top1"], color="gray", lw=0.8, label="FP32")
        ax.set_title(c["model"])
        ax.set_xlabel("average weight bits")
        ax.set_ylabel("top-1 (%)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--calib-size", type=int, default=512)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--iters", type=int, default=150, help="reconstruction steps per unit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--weight-only-only", action="store_true", help="only the weight-only comparison (with W8A8 for latency)")
    p.add_argument("--wo-budgets", type=lambda v: [float(b) for b in v.split(",") if b], default=[5.0],
                   help="weight-only mixed int4/int8 at these average weight bits (comma-separated; empty: none), "
                        "each against NNCF at the same int4 ratio")
    p.add_argument("--calibration-only", action="store_true",
                   help="W8A8, W6A6, W4A4 (each also with nearest rounding, and with one grid for CLS and patches), W4A8, W6A8: no reconstruction, mixed precision or weight-only")
    p.add_argument("--reconstruction-only", action="store_true",
                   help="each of --widths calibration-only and with block reconstruction (A8 ones also exported)")
    p.add_argument("--mixed-only", action="store_true",
                   help="uniform W4A8/W6A8/W8A8 and mixed precision at the curve's budgets (5.0 exported), with the plot")
    p.add_argument("--widths", default="4x8,6x6,4x4", help="with --reconstruction-only: WxA pairs")
    p.add_argument("--no-w6a6-reconstruct", action="store_true", help="W6A6 calibration only (saves one reconstruction)")
    p.add_argument("--no-asymmetric", action="store_true", help="skip the asymmetric int4 weight-only rows (vitc's and NNCF's)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from vitc.bench.fingerprint import fingerprint
    from vitc.calibration.sources import open_source
    from vitc.commands.common import set_threads
    from vitc.runtimes.cpu_isa import guard_int8_isa

    args.threads = set_threads(args.threads)
    isa_cap = guard_int8_isa()
    calib_src = open_source(CIFAR / "train.tar.gz").select(args.calib_size, seed=0)
    test_src = open_source(CIFAR / "test.tar.gz").select(args.test_size, seed=0)
    rows, curves = [], []
    load_start = loadavg()
    start = time.perf_counter()
    for spec in filter(None, args.models.split(",")):
        rows += bench_model(spec, calib_src, test_src, args, curves)
    wall = time.perf_counter() - start

    table = Table(title=f"low-bit frontier ({args.calib_size} calibration images from the training archive, "
                        f"{len(test_src)} class-stratified test images)")
    for col in ("model", "method", "runtime", "top-1", "drop (pt)", "agree w/ fp32", "KL vs fp32", "agree w/ sim", "bytes", "time (s)"):
        table.add_column(col)
    for r in rows:
        if r["method"] == "latency":
            continue
        size = r.get("file_bytes") or r.get("bytes")
        table.add_row(r["model"], r["method"], r["runtime"], f"{100 * r['top1']:.2f}%", f"{r['drop_pt']:+.2f}",
                      f"{100 * r['agreement_with_fp32']:.2f}%", f"{r['kl_vs_fp32']:.5f}",
                      f"{100 * r['agreement_with_simulation']:.2f}%" if "agreement_with_simulation" in r else "-",
                      f"{size:,}" if size else "-", f"{r['seconds']:.1f}" if r.get("seconds") else "-")
    Console(width=220).print(table)
    for r in rows:
        if r["method"] == "latency":
            print(f"{r['model']} batch-1 OpenVINO p50 ms: " + ", ".join(f"{k} {v:.3f} ({r['speedup_vs_fp32'][k]:.2f}x)"
                                                                        for k, v in r["p50_ms"].items()))
    if args.plot:
        plot(curves, args.plot)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "curves": curves, "wall_s": wall, "loadavg_start": load_start,
                                        "loadavg_end": loadavg(),
                                        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                        "onednn_max_cpu_isa": isa_cap, "machine": fingerprint()}, indent=2, default=str) + "\n")
    print(f"wall {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
