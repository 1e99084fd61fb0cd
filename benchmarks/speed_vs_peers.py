"""int8 speed: vitc W8A8 against the vendors' own quantizers, with the profile of each.

Per model, one set of interleaved rounds times every arm at batch 1 and 8 (each round: a few
calls per arm, arms in a shuffled order; a figure is the median over rounds, a speedup the
median of per-round ratios against the FP32 arm of the same runtime, so load from other jobs
on a shared machine hits all arms alike):

* OpenVINO: FP32 with ``INFERENCE_PRECISION_HINT=f32``; FP32 at OpenVINO's default precision
  (no hint: bf16 on a CPU with AVX-512 BF16/AMX); NNCF's int8 graph (``nncf.quantize``,
  ``ModelType.TRANSFORMER``) under f32 and under its default hint; vitc W8A8 under the hint
  its measured precision policy chose (``vitc.export.precision_policy``);
* ONNX Runtime: FP32; ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
  its faster setting); vitc W8A8 (the ``--target onnx`` graph), and with ``fuse_qkv``;
* PyTorch (``--pt2e``): eager FP32 and PT2E with the X86 Inductor quantizer + ``torch.compile``.

Then each arm's per-op profile (``vitc.bench.profile``) at one batch, and the GEMM peaks.
Models: a ViT-S-shaped model (DeiT-S dims: hidden 384, 12 layers, 6 heads, MLP 1536, 224 px,
random weights; ``--model`` points it elsewhere, e.g. ``zoo:dinov2s-focus``) and
``zoo:vit-c10`` (with W8A8 fidelity on the bundled eval slice).

    python benchmarks/speed_vs_peers.py --out benchmarks/results_speed_vs_peers_2026-12-05.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMAGENET = ROOT.parent / "shared" / "data" / "imagenet-samples"


def vit_s(spec: str | None):
    from vitc.backbone import Backbone
    from vitc.models.preprocess import Preprocess
    from vitc.models.wrappers import LogitsModule

    if spec:
        from vitc.models.intake import load_model

        return load_model(spec), spec
    import transformers as T

    torch.manual_seed(0)
    cfg = T.ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                      intermediate_size=1536, num_labels=1000, qkv_bias=True)
    return (Backbone(LogitsModule(T.ViTForImageClassification(cfg).eval()).eval(), Preprocess(224, 256),
                     [str(i) for i in range(1000)], "vit-s-shaped (random)"), "vit-s-shaped@224 (DeiT-S dims, random weights)")


def nncf_int8(fp32: Path, out: Path, calib: np.ndarray) -> Path:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    q = nncf.quantize(model, nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]), subset_size=len(calib),
                      model_type=nncf.ModelType.TRANSFORMER)
    ov.save_model(q, str(out))
    return out


def ort_int8(fp32: Path, out: Path, calib: np.ndarray) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"pixel_values": calib[i:i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_name("ort_pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def build_arms(backbone, calib: torch.Tensor, tmp: Path, args, log) -> tuple[dict, dict]:
    """{arm: (artifact or backbone, runtime, session options, baseline arm)} and build facts."""
    import openvino as ov

    from vitc.compress.quantize import QuantConfig, apply
    from vitc.export import export_artifact
    from vitc.export.onnx import write_onnx
    from vitc.export.pipeline import ExportOptions
    from vitc.export.precision_policy import choose, record_in_ir
    from vitc.export.qdq import export_qdq_onnx
    from vitc.export.qdq_speed import SpeedConfig

    facts = {}
    fp32 = tmp / "fp32.onnx"
    write_onnx(backbone, fp32, ExportOptions("fp32"), None)
    t = time.perf_counter()
    q = apply(backbone, QuantConfig(wbits=8, abits=8), calib)
    facts["vitc_quantize_s"] = time.perf_counter() - t
    log(f"  vitc W8A8 calibrated in {facts['vitc_quantize_s']:.0f} s")
    vitc_ort, vitc_ort_qkv, vitc_ov_onnx = tmp / "vitc_ort.onnx", tmp / "vitc_ort_qkv.onnx", tmp / "vitc_ov.onnx"
    # as `vitc export --target onnx` writes it: the fused float attention only where it passes parity
    art = export_artifact(q, "onnx", vitc_ort, force=True, data=getattr(args, "parity_data", "bundled:eval"), eval_size=32)
    vitc_ort = art.path
    facts["vitc_ort_attention_core"] = art.manifest["export"]["attention_core"]
    facts["vitc_ort_parity"] = {k: v for k, v in art.parity.items() if isinstance(v, (int, float, str, bool, dict))}
    log(f"  vitc ORT artifact: parity {'passed' if art.parity.get('passed') else 'FAILED'}; attention {facts['vitc_ort_attention_core']}")
    export_qdq_onnx(q, vitc_ort_qkv, speed=SpeedConfig(patchify_conv=True, fuse_qkv=True))
    export_qdq_onnx(q, vitc_ov_onnx, split_shared_inputs=False)  # as `--target openvino` converts it
    model = ov.convert_model(str(vitc_ov_onnx))
    policy = choose(model, calib[:8].numpy())  # as `vitc export --target openvino` decides it
    record_in_ir(model, policy["chosen"])
    vitc_xml = tmp / "vitc_ov.xml"
    ov.save_model(model, str(vitc_xml), compress_to_fp16=False)  # as `vitc export` saves it
    facts["vitc_openvino_precision_policy"] = policy
    log(f"  vitc OpenVINO precision policy: {policy['chosen']} ({policy['reason']})")
    t = time.perf_counter()
    nncf_xml = nncf_int8(fp32, tmp / "nncf.xml", calib.numpy())
    facts["nncf_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ort_q = ort_int8(fp32, tmp / "ort_qs.onnx", calib.numpy())
    facts["ort_quantize_static_s"] = time.perf_counter() - t
    log(f"  NNCF {facts['nncf_s']:.0f} s, ORT quantize_static {facts['ort_quantize_static_s']:.0f} s")
    arms = runtime_arms(fp32, nncf_xml, vitc_xml, ort_q, vitc_ort, vitc_ort_qkv)
    if args.pt2e:
        arms["torch FP32 (eager)"] = (backbone, "torch", {}, None)
        arms["torch PT2E x86 int8 (compile)"] = (backbone, "torch", {"pt2e": True}, "torch FP32 (eager)")
    return arms, {**facts, "quantized": q, "fp32_onnx": fp32, "vitc_ort": vitc_ort, "vitc_xml": vitc_xml}


def prebuilt_arms(d: Path, calib: torch.Tensor, tmp: Path, log) -> tuple[dict, dict]:
    """Arms from artifacts built earlier from the same model (``fp32.onnx``, ``vitc_ov.onnx`` = vitc's QDQ
    export without the ONNX Runtime split, ``nncf.xml``): on a machine too loaded to calibrate again in
    the run's time. The ONNX Runtime graph and the OpenVINO IR are derived here exactly as the exporters do."""
    import onnx
    import openvino as ov

    from vitc.export.precision_policy import choose, record_in_ir
    from vitc.export.qdq import split_shared_activation_qdq
    from vitc.export.qdq_speed import SpeedConfig, apply_speed

    def ort_graph(speed, name):
        m = onnx.load(str(d / "vitc_ov.onnx"))
        apply_speed(m, speed)
        split_shared_activation_qdq(m)
        onnx.save(m, str(tmp / name))
        return tmp / name

    vitc_ort = ort_graph(SpeedConfig.for_runtime("onnxruntime"), "vitc_ort.onnx")
    vitc_ort_qkv = ort_graph(SpeedConfig(patchify_conv=True, fuse_qkv=True), "vitc_ort_qkv.onnx")
    model = ov.convert_model(str(d / "vitc_ov.onnx"))
    policy = choose(model, calib[:8].numpy())
    record_in_ir(model, policy["chosen"])
    ov.save_model(model, str(tmp / "vitc_ov.xml"), compress_to_fp16=False)
    log(f"  vitc OpenVINO precision policy: {policy['chosen']} ({policy['reason']})")
    t = time.perf_counter()
    ort_q = ort_int8(d / "fp32.onnx", tmp / "ort_qs.onnx", calib.numpy())
    log(f"  ORT quantize_static {time.perf_counter() - t:.0f} s")
    fp32, nncf_xml, vitc_xml = d / "fp32.onnx", d / "nncf.xml", tmp / "vitc_ov.xml"
    arms = runtime_arms(fp32, nncf_xml, vitc_xml, ort_q, vitc_ort, vitc_ort_qkv)
    return arms, {"prebuilt": str(d), "vitc_openvino_precision_policy": policy}


def runtime_arms(fp32, nncf_xml, vitc_xml, ort_q, vitc_ort, vitc_ort_qkv) -> dict:
    """The OpenVINO and ONNX Runtime arms: {arm: (artifact, runtime, session options, baseline arm)}."""
    base_ov, base_ort = "OV FP32 (f32 hint)", "ORT FP32"
    return {
        base_ov: (fp32, "openvino", {"precision": "f32"}, None),
        "OV FP32 (default precision)": (fp32, "openvino", {"precision": _ov_default()}, base_ov),
        "OV NNCF int8 (f32 hint)": (nncf_xml, "openvino", {"precision": "f32"}, base_ov),
        "OV NNCF int8 (default precision)": (nncf_xml, "openvino", {"precision": _ov_default()}, base_ov),
        "OV vitc W8A8": (vitc_xml, "openvino", {}, base_ov),
        base_ort: (fp32, "onnxruntime", {}, None),
        "ORT quantize_static (u8/s8)": (ort_q, "onnxruntime", {}, base_ort),
        "ORT vitc W8A8": (vitc_ort, "onnxruntime", {}, base_ort),
        "ORT vitc W8A8 +fuse_qkv": (vitc_ort_qkv, "onnxruntime", {}, base_ort),
    }


def _ov_default() -> str:
    """The precision OpenVINO's CPU plugin applies when no hint is given (bf16 on CPUs with AVX-512 BF16/AMX)."""
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


def open_arms(arms: dict, threads: int, log) -> tuple[dict, dict]:
    from vitc.runtimes import open_session

    sessions, failures = {}, {}
    for name, (art, runtime, options, _) in arms.items():
        t = time.perf_counter()
        try:
            sessions[name] = open_session(art, runtime=runtime, threads=threads, **options)
        except Exception as exc:  # a peer that does not run here is reported, not fatal
            failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            log(f"  {name}: does not run here ({failures[name]})")
            continue
        log(f"  opened {name} in {time.perf_counter() - t:.1f} s")
    return sessions, failures


def interleaved(sessions: dict, pool: list[np.ndarray], rounds: int, calls: int, budget_s: float, seed: int) -> dict:
    """Per arm, the median latency (s) of ``calls`` calls in each round; rounds stop early at ``budget_s``."""
    per: dict[str, list[float]] = {k: [] for k in sessions}
    order, rng, t0 = list(sessions), random.Random(seed), time.perf_counter()
    for s in sessions.values():  # warm-up
        s.run(pool[0])
        s.run(pool[1 % len(pool)])
    for r in range(rounds):
        rng.shuffle(order)
        for k in order:
            samples = []
            for i in range(calls):
                x = pool[(r + i) % len(pool)]
                t = time.perf_counter()
                sessions[k].run(x)
                samples.append(time.perf_counter() - t)
            per[k].append(float(np.median(samples)))
        if time.perf_counter() - t0 > budget_s and r >= 2:
            break
    return per


def fidelity_vit_c10(q, fp32_onnx: Path, vitc_ort: Path, vitc_xml: Path, threads: int) -> dict:
    """W8A8 top-1 and agreement with FP32 on the bundled eval slice, in ONNX Runtime and OpenVINO (what the quantize tests assert)."""
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.runtimes import open_session

    x, y = load_tensors(open_source("bundled:eval"), q.preprocess, convert_rgb=True)
    preds = {}
    for name, (art, rt) in {"fp32": (fp32_onnx, "onnxruntime"), "vitc W8A8 onnxruntime": (vitc_ort, "onnxruntime"),
                            "vitc W8A8 openvino": (vitc_xml, "openvino")}.items():
        s = open_session(art, runtime=rt, threads=threads)
        preds[name] = np.concatenate([s.run(x[i:i + 100].numpy()).argmax(-1) for i in range(0, len(x), 100)])
    out = {"images": len(x)}
    for name, p in preds.items():
        out[name] = {"top1": float((p == y.numpy()).mean()), "agreement_with_fp32": float((p == preds["fp32"]).mean())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="the ViT-S-sized model spec (default: DeiT-S dims, random weights)")
    p.add_argument("--models", default="vits,zoo:vit-c10", help="comma list: vits (the --model one) and/or zoo specs")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--budget", type=float, default=90.0, help="seconds of interleaved rounds per model and batch at most")
    p.add_argument("--profile-runs", type=int, default=3)
    p.add_argument("--calib", type=int, default=32, help="calibration images (ImageNet samples for vits, CIFAR slice for zoo:)")
    p.add_argument("--pt2e", default="zoo:vit-c10", help="models (comma list, 'vits' for the ViT-S) that get the PyTorch PT2E x86 row; '' for none")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prebuilt", type=Path, default=None,
                   help="for vits: a folder with fp32.onnx, vitc_ov.onnx and nncf.xml built earlier from the same model")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from vitc.bench.fingerprint import fingerprint
    from vitc.bench.harness import build_pool
    from vitc.bench.profile import aggregate, measure_peaks, profile_session, profile_table
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.commands.common import set_threads
    from vitc.runtimes.cpu_isa import guard_int8_isa

    console = Console(width=220, record=True)
    log = lambda m: console.print(m)
    args.threads = set_threads(args.threads)
    isa_cap = guard_int8_isa()
    batches = [int(b) for b in args.batches.split(",")]
    pt2e_models = set(filter(None, args.pt2e.split(",")))
    t_start = time.perf_counter()
    peaks = {rt: measure_peaks(rt, args.threads) for rt in ("onnxruntime", "openvino", "torch")}
    log(f"peaks (GOP/s): " + "; ".join(f"{rt} int8 {p.get('int8') or 0:.0f} bf16 {p.get('bf16') or 0:.0f} f32 {p.get('f32') or 0:.0f}"
                                       for rt, p in peaks.items()))
    doc = {"peaks": peaks, "models": [], "machine": fingerprint(), "onednn_max_cpu_isa": isa_cap,
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "note": "shared 2-core VM: other jobs ran during the measurement; figures are ratios from interleaved rounds"}
    for spec in filter(None, args.models.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix="vitc-speed-"))
        if spec == "vits":
            backbone, name = vit_s(args.model)
            calib, _ = load_tensors(open_source(IMAGENET).select(args.calib, seed=0), backbone.preprocess, convert_rgb=True)
        else:
            from vitc.models.intake import load_model

            backbone, name = load_model(spec), spec
            calib, _ = load_tensors(open_source("bundled:calib").select(args.calib, seed=0), backbone.preprocess, convert_rgb=True)
        log(f"[bold]{name}[/bold]: building arms ({len(calib)} calibration images)")

        class A:
            pt2e = spec in pt2e_models
            parity_data = IMAGENET if spec == "vits" else "bundled:eval"  # held out from the calibration images
        if spec == "vits" and args.prebuilt:
            arms, facts = prebuilt_arms(args.prebuilt, calib, tmp, log)
        else:
            arms, facts = build_arms(backbone, calib, tmp, A, log)
        sessions, failures = open_arms(arms, args.threads, log)
        images, _ = load_tensors(open_source(IMAGENET).select(64, seed=1), backbone.preprocess, convert_rgb=True)
        entry = {"model": name, "arms": {}, "failures": failures, "facts": {k: v for k, v in facts.items()
                                                                             if k not in ("quantized", "fp32_onnx", "vitc_ort", "vitc_xml")}}
        for b in batches:
            pool = build_pool(images.numpy(), b, 4)
            per = interleaved(sessions, pool, args.rounds, 5 if b == 1 else 2, args.budget, seed=b)
            for arm, samples in per.items():
                base = arms[arm][3]
                row = entry["arms"].setdefault(arm, {"runtime": arms[arm][1], "baseline": base})
                row[f"b{b}_ms"] = 1e3 * float(np.median(samples))
                row[f"b{b}_rounds_ms"] = [1e3 * s for s in samples]
                if base in per:
                    row[f"b{b}_speedup"] = float(np.median(np.array(per[base]) / np.array(samples)))
            log(f"  b{b}: {len(next(iter(per.values())))} rounds ({time.perf_counter() - t_start:.0f} s since start)")
        prof_batch = max(batches) if spec == "vits" else min(batches)
        pool = build_pool(images.numpy(), prof_batch, 4)
        for arm, s in sessions.items():
            rt = arms[arm][1]
            recs = profile_session(s, pool, args.profile_runs)
            if recs is not None:
                prof = {"batch": prof_batch, "runs": args.profile_runs, "source": rt, **aggregate(recs, peaks.get(rt))}
                entry["arms"][arm]["profile"] = prof
                console.print(profile_table(f"{name} / {arm} b={prof_batch}", prof))
        for arm in ("OV vitc W8A8",):
            if "OV NNCF int8 (f32 hint)" in entry["arms"]:
                for b in batches:
                    per_nncf = entry["arms"]["OV NNCF int8 (f32 hint)"][f"b{b}_rounds_ms"]
                    per_v = entry["arms"][arm][f"b{b}_rounds_ms"]
                    entry["arms"][arm][f"b{b}_vs_nncf_f32"] = float(np.median(np.array(per_nncf) / np.array(per_v)))
                    per_nd = entry["arms"]["OV NNCF int8 (default precision)"][f"b{b}_rounds_ms"]
                    entry["arms"][arm][f"b{b}_vs_nncf_default"] = float(np.median(np.array(per_nd) / np.array(per_v)))
                    per_fd = entry["arms"]["OV FP32 (default precision)"][f"b{b}_rounds_ms"]
                    entry["arms"][arm][f"b{b}_vs_fp32_default"] = float(np.median(np.array(per_fd) / np.array(per_v)))
        if spec == "zoo:vit-c10" and "quantized" in facts:
            entry["fidelity"] = fidelity_vit_c10(facts["quantized"], facts["fp32_onnx"], facts["vitc_ort"], facts["vitc_xml"], args.threads)
            log(f"  fidelity: {entry['fidelity']}")
        doc["models"].append(entry)
        del sessions

        table = Table(title=f"{name}: interleaved rounds, {args.threads} threads (shared machine)")
        for col in ["arm", "runtime"] + [f"b{b} ms" for b in batches] + [f"b{b} vs FP32" for b in batches] + \
                ["vs NNCF f32 / default", "int8 GEMM % of peak", "top profile kinds"]:
            table.add_column(col)
        for arm, row in entry["arms"].items():
            prof = row.get("profile", {})
            kinds = sorted(prof.get("kinds", {}).items(), key=lambda kv: -kv[1]["ms"])[:4]
            i8 = prof.get("kinds", {}).get("int8 GEMM", {}).get("of_peak")
            vs_nncf = " / ".join(f"{row[f'b{b}_vs_nncf_f32']:.2f}x, {row[f'b{b}_vs_nncf_default']:.2f}x" for b in batches) \
                if f"b{batches[0]}_vs_nncf_f32" in row else "-"
            table.add_row(arm, row["runtime"], *[f"{row.get(f'b{b}_ms', float('nan')):.2f}" for b in batches],
                          *[f"{row[f'b{b}_speedup']:.2f}x" if f"b{b}_speedup" in row else "-" for b in batches], vs_nncf,
                          f"{i8:.0%}" if i8 else "-", ", ".join(f"{k} {v['share']:.0%}" for k, v in kinds))
        console.print(table)
    doc["elapsed_s"] = time.perf_counter() - t_start
    log(f"elapsed {doc['elapsed_s']:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        args.out.with_suffix(".txt").write_text(console.export_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
