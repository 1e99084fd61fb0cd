"""``vitc quantize``: post-training quantization, evaluated against the float model.

JSON (``--out``) keys, stable: ``model``, ``wbits``, ``abits``, ``calibrator``,
``calibration_images``, ``calibration_s``, ``eval_images``, ``fp32_top1``, ``quantized_top1``,
``top1_drop`` (points), ``top1_agreement``, ``fp32_bytes``, ``quantized_bytes``,
``compression``, ``latency`` (``runtime``, ``batch``, ``fp32_ms``, ``int8_ms``, ``speedup``;
null when not measured), ``worst_sqnr`` (list of ``{"layer", "sqnr_db"}``, five worst),
``vit_quantizers``, ``scheme_choice``, ``output``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import (BatchOpt, ConvertOpt, DataOpt, ForceOpt, InputSizeOpt, FitOpt, InterpOpt, LabelsOpt, MeanOpt, OutOpt,
                     OutputOpt, ResizeOpt, SeedOpt, StdOpt, ThreadsOpt, WeightsOpt, console, load_backbone, pct,
                     progress, set_threads)

DEFAULT_MODEL = "zoo:vit-c10"


def quantize_cmd(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="zoo:<name>, hf:<dir>, timm:<name>, pkg.module:factory, FILE.pt2"),
    bits: int = typer.Option(8, "--bits", help="weight and activation bits (8, 6 or 4): WnAn"),
    wbits: Optional[int] = typer.Option(None, "--wbits", help="weight bits (overrides --bits)"),
    abits: Optional[int] = typer.Option(None, "--abits", help="activation bits (overrides --bits)"),
    calib: str = typer.Option("mse", "--calib", help="activation calibrator: minmax, percentile, mse or entropy"),
    percentile: float = typer.Option(99.99, "--percentile", help="percentile of the percentile calibrator"),
    calib_data: str = typer.Option("bundled:calib", "--calib-data", help="calibration images (same forms as --data)"),
    calib_size: int = typer.Option(512, "--calib-size", help="calibration images drawn (class-stratified) from --calib-data"),
    softmax: str = typer.Option("auto", "--softmax", help="post-softmax quantizer: auto, uniform, log2 or logsqrt2"),
    gelu: str = typer.Option("auto", "--gelu", help="post-GELU quantizer: auto, uniform or twin"),
    scheme: str = typer.Option("auto", "--scheme", help="activation grids: auto (symmetric int8 at 8 bits, which every target runs; per layer below), per-layer, symmetric or asymmetric"),
    granularity: str = typer.Option("auto", "--granularity", help="auto (per-channel conv inputs where it helps, below 8 bits) or tensor"),
    repq: bool = typer.Option(True, "--repq/--no-repq", help="RepQ-ViT reparameterisation of post-LayerNorm activations"),
    smooth: Optional[float] = typer.Option(None, "--smooth", help="SmoothQuant (with shift) strength alpha in (0, 1) before RepQ"),
    bias_correction: bool = typer.Option(True, "--bias-correction/--no-bias-correction", help="correct the output shift of quantized weights"),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="measure CPU latency of FP32 and int8 in OpenVINO (W8A8 only)"),
    data: DataOpt = "bundled:eval",
    labels: LabelsOpt = None,
    eval_size: Optional[int] = typer.Option(None, "--eval-size", help="evaluate on a deterministic subset of this many images"),
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 100,
    output: OutputOpt = None,
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
    weights: WeightsOpt = None,
    convert_rgb: ConvertOpt = False,
    out: OutOpt = None,
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    interpolation: InterpOpt = None,
    fit: FitOpt = None,
    integer_only: bool = typer.Option(False, "--integer-only", help="integer-only inference (ViT): integer kernels for every op, written as an integer ONNX graph"),
    recover_steps: int = typer.Option(0, "--recover-steps", help="with --integer-only: fine-tune steps with the integer rounding simulated"),
) -> None:
    """Quantize a model (W8A8 by default), compare it with FP32, and save it (-o, default quantized/<model>-w<W>a<A>/)."""
    if integer_only:
        from vitc.compress.integer.command import run_integer_only

        return run_integer_only(model=model, weights=weights, input_size=input_size, resize=resize, mean=mean, std=std,
                                interpolation=interpolation, wbits=wbits or bits, abits=abits or bits, calib=calib,
                                percentile=percentile, calib_data=calib_data, calib_size=calib_size,
                                recover_steps=recover_steps, data=data, labels=labels, eval_size=eval_size, seed=seed,
                                batch_size=batch_size, output=output, force=force, threads=threads,
                                convert_rgb=convert_rgb, out=out)
    if str(model).endswith(".onnx"):  # an ONNX graph, quantized by the ONNX backend
        from vitc.compress.quantize import QuantConfig as _Config

        from .quantize_onnx import run_onnx_quantize

        cfg = _Config(wbits=wbits or bits, abits=abits or bits, calibrator=calib, percentile=percentile, softmax=softmax,
                      gelu=gelu, scheme=scheme, granularity=granularity, ln_reparam=repq, smooth_alpha=smooth,
                      bias_correction=bias_correction).validate()
        run_onnx_quantize(model=model, config=cfg, calib_data=calib_data, calib_size=calib_size, data=data, labels=labels,
                          eval_size=eval_size, seed=seed, batch_size=batch_size, output=output, force=force, threads=threads,
                          convert_rgb=convert_rgb, out=out, input_size=input_size, resize=resize, mean=mean, std=std,
                          interpolation=interpolation, fit=fit)
        return
    from vitc.artifacts import check_writable, write_json
    from vitc.calibration.data import DataSpec, load_tensors
    from vitc.calibration.observers import check_count
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.compress.quantize.saved import model_size, save_quantized
    from vitc.evaluate import agreement, evaluate

    config = QuantConfig(wbits=wbits or bits, abits=abits or bits, calibrator=calib, percentile=percentile, softmax=softmax,
                         gelu=gelu, scheme=scheme, granularity=granularity, ln_reparam=repq, smooth_alpha=smooth,
                         bias_correction=bias_correction).validate()
    check_count(config.calibrator, calib_size)
    n_threads = set_threads(threads)
    backbone = load_backbone(model, weights, input_size, resize, mean, std, interpolation, fit)
    backbone.require_module("quantization")
    output = output or Path("quantized") / f"{_model_name(backbone.source)}-w{config.wbits}a{config.abits}"
    check_writable(output, force)
    calib_source = DataSpec(calib_data, None, calib_size, seed, convert_rgb).open()
    eval_source = DataSpec(data, str(labels) if labels else None, eval_size, seed, convert_rgb).open()
    with progress() as prog:
        task = prog.add_task("reading calibration images", total=None)
        x, _ = load_tensors(calib_source, backbone.preprocess, convert_rgb)
        prog.remove_task(task)
        quantized = apply(backbone, config, x, prog)
        base = evaluate(backbone, eval_source, backbone.preprocess, backbone.labels, batch_size, convert_rgb, prog, keep_logits=True)
        quant = evaluate(quantized, eval_source, backbone.preprocess, backbone.labels, batch_size, convert_rgb, prog, keep_logits=True)
        lat = measure_latency(backbone, quantized, x, n_threads, prog) if latency and config.wbits == config.abits == 8 else None
    record = quantized.transforms[-1]
    fp32_bytes, q_bytes = model_size(backbone), model_size(quantized)
    worst = sorted(((k, v) for k, v in record["sqnr_db"].items() if v is not None), key=lambda kv: kv[1])[:5]
    result = {
        "model": backbone.source,
        "wbits": config.wbits,
        "abits": config.abits,
        "calibrator": config.calibrator,
        "calibration_data": calib_source.location,
        "calibration_images": record["calibration_images"],
        "calibration_s": record["calibration_s"],
        "eval_data": eval_source.location,
        "eval_images": quant["images"],
        "fp32_top1": base["top1"],
        "quantized_top1": quant["top1"],
        "top1_drop": round(100 * (base["top1"] - quant["top1"]), 3),
        "top1_agreement": agreement(base["logits"], quant["logits"])["top1_agreement"],
        "fp32_bytes": fp32_bytes,
        "quantized_bytes": q_bytes,
        "compression": round(fp32_bytes / q_bytes, 3),
        "latency": lat,
        "worst_sqnr": [{"layer": k, "sqnr_db": v} for k, v in worst],
        "vit_quantizers": record["vit_quantizers"],
        "scheme_choice": record["scheme_choice"],
        "config": config.to_dict(),
        "threads": n_threads,
        "output": str(output),
    }
    save_quantized(quantized, output, force=force)
    _print(result)
    if out:
        write_json(out, result)


def _model_name(source: str) -> str:
    name = source.split(":", 1)[1] if source.startswith(("zoo:", "hf:", "timm:")) else source
    return Path(name.rstrip("/")).name.replace(".", "-") or "model"


def measure_latency(backbone, quantized, images, threads: int, prog=None) -> dict:
    """Batch-1 latency of the FP32 model (OpenVINO, INFERENCE_PRECISION_HINT=f32) and of its int8 QDQ export."""
    import tempfile

    from vitc.bench.harness import HarnessConfig, build_pool, measure
    from vitc.export.onnx import write_onnx
    from vitc.export.pipeline import ExportOptions
    from vitc.runtimes.cpu_isa import guard_int8_isa
    from vitc.runtimes import open_session

    guard_int8_isa()
    task = prog.add_task("measuring latency", total=None) if prog is not None else None
    config = HarnessConfig(min_samples=30, min_time_s=0.5, max_time_s=3.0, warmup_max_s=2.0)
    pool = build_pool(images.numpy(), 1)
    out = {"runtime": "openvino", "batch": 1}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        write_onnx(backbone, fp32, ExportOptions("fp32"), None)
        write_onnx(quantized, int8, ExportOptions("int8"), quantized.transforms[-1])
        for key, path in (("fp32_ms", fp32), ("int8_ms", int8)):
            session = open_session(path, runtime="openvino", threads=threads)
            out[key] = 1000 * measure(session, pool, 1, config, label=key)["stats"]["p50"]["value"]
    out["speedup"] = out["fp32_ms"] / out["int8_ms"]
    if task is not None:
        prog.remove_task(task)
    return out


def _print(r: dict) -> None:
    table = Table(title=f"quantize: {r['model']} W{r['wbits']}A{r['abits']} ({r['calibrator']}, {r['calibration_images']} images)")
    table.add_column("")
    table.add_column("FP32")
    table.add_column(f"W{r['wbits']}A{r['abits']}")
    table.add_row(f"top-1 ({r['eval_images']} images)", pct(r["fp32_top1"]), f"{pct(r['quantized_top1'])} ({-r['top1_drop']:+.2f} pt)")
    table.add_row("top-1 agreement with FP32", "", pct(r["top1_agreement"]))
    table.add_row("size", f"{r['fp32_bytes'] / 2**20:.2f} MiB", f"{r['quantized_bytes'] / 2**20:.2f} MiB ({r['compression']:.1f}x smaller)")
    if r["latency"]:
        lat = r["latency"]
        table.add_row(f"CPU latency, batch 1 ({lat['runtime']})", f"{lat['fp32_ms']:.3f} ms", f"{lat['int8_ms']:.3f} ms ({lat['speedup']:.2f}x)")
    table.add_row("calibration time", "", f"{r['calibration_s']:.1f} s")
    console.print(table)
    if r["vit_quantizers"]:
        console.print("ViT quantizers: " + ", ".join(f"{k}={v}" for k, v in r["vit_quantizers"].items()))
    worst = Table(title="five layers with the worst SQNR")
    worst.add_column("layer")
    worst.add_column("SQNR (dB)")
    for w in r["worst_sqnr"]:
        worst.add_row(w["layer"], f"{w['sqnr_db']:.1f}")
    console.print(worst)
    console.print(f"wrote {r['output']}")
