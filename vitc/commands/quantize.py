"""``vitc quantize``: post-training quantization, evaluated against the float model.

JSON (``--out``) keys, stable: ``model``, ``wbits``, ``abits``, ``calibrator``,
``calibration_images``, ``calibration_s``, ``eval_images``, ``fp32_top1``, ``quantized_top1``,
``top1_drop`` (a fraction, like every accuracy: docs/json.md), ``top1_agreement``, ``fp32_bytes``, ``quantized_bytes``,
``compression``, ``latency`` (``runtime``, ``batch``, ``fp32_ms``, ``int8_ms``, ``speedup``;
null when not measured), ``worst_sqnr`` (list of ``{"layer", "sqnr_db"}``, five worst),
``vit_quantizers``, ``scheme_choice``, ``output``; ``task`` (classify/dense/embed/multi),
``coverage`` (the plan's ``coverage()``: ops and matmul/conv FLOPs quantized vs total, bit widths
used, ops left float with reasons; null when the module path could not be audited), ``sites``
(graph or modules) and ``fidelity`` (against FP32: per-sample cosine, Pearson, SQNR, max abs
error, mean and worst; for every task). For outputs other than class logits the top-1 keys are null.

The quantized model is saved before evaluation, so a failure there never loses the calibration.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import (AllowUnlabelledOpt, BatchOpt, ConvertOpt, DataOpt, ForceOpt, InputSizeOpt, FitOpt, InterpOpt, LabelsOpt, MeanOpt, OutOpt,
                     OutputOpt, ResizeOpt, SeedOpt, StdOpt, ThreadsOpt, WeightsOpt, console, load_backbone, pct,
                     positive, progress, set_threads)

DEFAULT_MODEL = "zoo:vit-c10"
DEFAULT_CALIB_SIZE = 512


def quantize_cmd(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="zoo:<name>, hf:<dir>, timm:<name>, pkg.module:factory, FILE.pt2"),
    bits: str = typer.Option("8", "--bits", help="weight and activation bits (8, 6 or 4): WnAn; auto: mixed precision per layer (with --size-budget or --max-drop)"),
    wbits: Optional[int] = typer.Option(None, "--wbits", help="weight bits (overrides --bits)"),
    abits: Optional[int] = typer.Option(None, "--abits", help="activation bits (overrides --bits)"),
    calib: Optional[str] = typer.Option(None, "--calib", help="activation calibrator: minmax, percentile, mse or entropy (default mse; minmax with --integer-only)"),
    percentile: float = typer.Option(99.99, "--percentile", help="percentile of the percentile calibrator"),
    calib_data: str = typer.Option("bundled:calib", "--calib-data", help="calibration images (same forms as --data)"),
    calib_size: Optional[int] = typer.Option(None, "--calib-size", help="calibration images drawn (class-stratified) from --calib-data (default 512, or all when fewer; more than the data holds is an error)"),
    softmax: str = typer.Option("auto", "--softmax", help="post-softmax quantizer: auto, uniform, log2, logsqrt2 or adalog (a log grid with a calibrated step; auto picks it at 4 bits)"),
    gelu: str = typer.Option("auto", "--gelu", help="post-GELU quantizer: auto, uniform or twin"),
    scheme: str = typer.Option("auto", "--scheme", help="activation grids: auto (symmetric int8 at 8 bits, which every target runs; per layer below), per-layer, symmetric or asymmetric"),
    granularity: str = typer.Option("auto", "--granularity", help="auto (per-channel conv inputs where it helps, below 8 bits) or tensor"),
    repq: bool = typer.Option(True, "--repq/--no-repq", help="RepQ-ViT reparameterisation of post-LayerNorm activations"),
    smooth: Optional[float] = typer.Option(None, "--smooth", help="SmoothQuant (with shift) strength alpha in (0, 1) before RepQ"),
    bias_correction: bool = typer.Option(True, "--bias-correction/--no-bias-correction", help="correct the output shift of quantized weights"),
    range_search: str = typer.Option("auto", "--range-search", help="widen activation ranges by the model's output error after calibration: auto (graph/ONNX backends), on, off; mean: on, minimising the mean error over 64 images instead of the worst of 16"),
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
    allow_unlabelled: AllowUnlabelledOpt = False,
    reconstruct: bool = typer.Option(False, "--reconstruct", help="block reconstruction after calibration (learned rounding and step sizes, BRECQ/QDrop)"),
    iters: int = typer.Option(150, "--iters", help="with --reconstruct: learning steps per block"),
    iters_ramp: float = typer.Option(0.0, "--iters-ramp", help="with --reconstruct: steps growing with depth at the same total, from (1-R) to (1+R) x --iters (e.g. 0.5)"),
    recon_loss: str = typer.Option("mse", "--recon-loss", help="with --reconstruct: mse (each block's plain output error) or fisher (each element weighted by its effect on the model output; helped CLS-token heads, hurt a CLS + patch-mean head: docs/quantize.md)"),
    recon_affine: bool = typer.Option(False, "--recon-affine", help="with --reconstruct: also learn each block's per-channel weight scales and its biases, norm affines and layer scales"),
    size_budget: Optional[float] = typer.Option(None, "--size-budget", help="with --bits auto: average weight bits, e.g. 5.0"),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="with --bits auto: the smallest model whose top-1 drop on the calibration images is at most this many points"),
    act_budget: Optional[float] = typer.Option(None, "--act-budget", help="with --bits auto --size-budget: also allocate activation bits, average at most this"),
    alloc: str = typer.Option("ilp", "--alloc", help="with --bits auto: ilp (exact) or greedy (MPTQ-ViT)"),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="weight-only (--abits 16): input channels per weight scale, 32, 64 or 128 (default 64)"),
    rounding: Optional[str] = typer.Option(None, "--rounding", help="weight-only (--abits 16) and graph-path weights below 8 bits: gptq (default; error compensation from the calibration images) or nearest"),
    weight_scheme: str = typer.Option("symmetric", "--weight-scheme", help="weight-only (--abits 16): symmetric int4 groups, or asymmetric (uint4 with a zero point per group)"),
    prefix_bits: int = typer.Option(0, "--prefix-bits", help="below 8-bit activations (graph path): the width of the CLS/prefix tokens' own grids (0: the activation bits)"),
    mlp_rotation: str = typer.Option("off", "--mlp-rotation", help="graph path: rotate each post-GELU linear input (fc2) by a block-diagonal Hadamard before its grid, folded into the weights (exact in float; spreads outlier channels); off, on"),
    norm_rotation: str = typer.Option("off", "--norm-rotation", help="graph path: rotate each post-LayerNorm linear input (q/k/v, fc1) the same way, in place of RepQ on those norms (exact in float; also spreads the weights' outliers); off, on"),
    value_reparam: str = typer.Option("off", "--value-reparam", help="graph path: RepQ-ViT's per-channel ranges for the attention output projection's input, folded into the value and output projections (exact in float, no op added); off, on"),
    key_centering: str = typer.Option("auto", "--key-centering", help="graph path: shift attention keys by their per-channel centre before their grid (exact under the softmax); auto: at 4-bit activations, on, off"),
    sites: str = typer.Option("auto", "--sites", help="auto, graph (every matmul-like op in the captured graph) or modules (Linear/Conv2d swaps + family adapters)"),
    task: str = typer.Option("auto", "--task", help="auto, classify (top-1 with labels), dense (maps) or embed (vectors): how the output is compared with FP32"),
    strict_coverage: bool = typer.Option(False, "--strict-coverage", help="fail (exit 2, nothing saved) below 90% of matmul/conv FLOPs quantized"),
) -> None:
    """Quantize a model (W8A8 by default), compare it with FP32, and save it (-o, default quantized/<model>-w<W>a<A>/)."""
    positive(calib_size, "--calib-size")
    positive(eval_size, "--eval-size")
    positive(batch_size, "--batch-size")
    from vitc.errors import VitcError

    auto = bits == "auto"
    if not auto:
        try:
            bits = int(bits)
        except ValueError:
            raise VitcError(f"--bits {bits} is not a bit width", "pass 8, 6, 4, or auto (mixed precision)") from None
    else:
        if (size_budget is None) == (max_drop is None):
            raise VitcError("--bits auto needs exactly one of --size-budget (average weight bits) and --max-drop (points)",
                            "e.g. --bits auto --size-budget 5.0")
        bits = 8
    if not auto and (size_budget is not None or max_drop is not None or act_budget is not None):
        raise VitcError("--size-budget, --max-drop and --act-budget choose widths per layer", "pass them with --bits auto")
    if act_budget is not None and max_drop is not None:
        raise VitcError("--act-budget goes with --size-budget, not --max-drop", "pass --size-budget with --act-budget")
    if integer_only:
        from vitc.compress.integer import IntegerConfig
        from vitc.compress.integer.command import run_integer_only

        calib = calib or IntegerConfig.calibration  # the integer model's own default (min-max: see there)

        return run_integer_only(model=model, weights=weights, input_size=input_size, resize=resize, mean=mean, std=std,
                                interpolation=interpolation, wbits=wbits or bits, abits=abits or bits, calib=calib,
                                percentile=percentile, calib_data=calib_data, calib_size=calib_size or DEFAULT_CALIB_SIZE,
                                recover_steps=recover_steps, data=data, labels=labels, eval_size=eval_size, seed=seed,
                                batch_size=batch_size, output=output, force=force, threads=threads,
                                convert_rgb=convert_rgb, out=out)
    calib = calib or "mse"
    if str(model).endswith(".onnx"):  # an ONNX graph, quantized by the ONNX backend
        from vitc.compress.quantize import QuantConfig as _Config

        # command options the ONNX backend has no use for: refused rather than dropped (it writes W8A8 Q/DQ at its own
        # sites); the config's own (--prefix-bits, --sites, ...) are refused by onnx_graph.check_config, for the API too
        unused = [flag for flag, asked in (("--bits auto", auto),
                                           ("--rounding", rounding is not None), ("--group-size", group_size is not None),
                                           ("--task", task != "auto"), ("--strict-coverage", strict_coverage),
                                           ("--weights", weights is not None)) if asked]
        if unused:
            raise VitcError(f"{', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} to PyTorch models; the ONNX "
                            f"backend writes W8A8 Q/DQ at the sites it finds and detects the task from the outputs",
                            f"drop {', '.join(f.split()[0] for f in unused)}, or quantize the PyTorch model")

        from .quantize_onnx import run_onnx_quantize

        cfg = _Config(wbits=wbits or bits, abits=abits or bits, calibrator=calib, percentile=percentile, softmax=softmax,
                      gelu=gelu, scheme=scheme, granularity=granularity, ln_reparam=repq, smooth_alpha=smooth,
                      bias_correction=bias_correction, range_search=range_search, weight_scheme=weight_scheme,
                      reconstruct_iters=iters if reconstruct else 0, reconstruct_affine=recon_affine,
                      mlp_rotation=mlp_rotation, norm_rotation=norm_rotation, value_reparam=value_reparam,
                      prefix_bits=prefix_bits, key_centering=key_centering, sites=sites).validate()
        run_onnx_quantize(model=model, config=cfg, calib_data=calib_data, calib_size=calib_size or DEFAULT_CALIB_SIZE, data=data, labels=labels,
                          eval_size=eval_size, seed=seed, batch_size=batch_size, output=output, force=force, threads=threads,
                          convert_rgb=convert_rgb, out=out, input_size=input_size, resize=resize, mean=mean, std=std,
                          interpolation=interpolation, fit=fit)
        return
    from vitc.artifacts import hold, write_json
    from vitc.calibration.data import DataSpec, load_tensors
    from vitc.calibration.observers import check_count
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.compress.quantize.saved import model_size, save_quantized
    from vitc.evaluate import agreement, evaluate
    from vitc.tasks import fidelity

    config = QuantConfig(wbits=wbits or bits, abits=abits or bits, calibrator=calib, percentile=percentile, softmax=softmax,
                         gelu=gelu, scheme=scheme, granularity=granularity, ln_reparam=repq, smooth_alpha=smooth,
                         bias_correction=bias_correction, group_size=group_size, range_search=range_search,
                         reconstruct_iters=iters if reconstruct else 0, reconstruct_ramp=iters_ramp, reconstruct_loss=recon_loss,
                         reconstruct_affine=recon_affine, sites=sites, prefix_bits=prefix_bits,
                         key_centering=key_centering, mlp_rotation=mlp_rotation, norm_rotation=norm_rotation, value_reparam=value_reparam, weight_rounding=rounding or "gptq", weight_scheme=weight_scheme).validate()
    weight_only = config.abits == 16
    if rounding is not None and not weight_only and config.wbits >= 8:
        raise VitcError(f"--rounding {rounding} applies to weight-only quantization and to weights below 8 bits",
                        "pass --abits 16 or --wbits 4/6, or drop --rounding")
    if not weight_only:
        check_count(config.calibrator, calib_size or DEFAULT_CALIB_SIZE)
    if reconstruct:
        from vitc.compress.quantize.reconstruct import check_count as check_reconstruct_count

        check_reconstruct_count(calib_size or DEFAULT_CALIB_SIZE)
    if auto and weight_only and size_budget is None:
        raise VitcError("weight-only mixed precision (--abits 16) takes --size-budget, not --max-drop",
                        "pass --bits auto --size-budget 5.0 --abits 16")
    n_threads = set_threads(threads)
    backbone = load_backbone(model, weights, input_size, resize, mean, std, interpolation, fit)
    backbone.require_module("quantization")
    from vitc.numerics import check_weights

    check_weights(backbone)  # name the NaN/Inf weight itself, not the activation it poisons downstream
    tag = (f"mixed{size_budget:g}" if size_budget is not None else f"maxdrop{max_drop:g}") if auto else f"w{config.wbits}a{config.abits}"
    tag += f"g{config.group_size}" + ("asym" if config.weight_scheme == "asymmetric" else "") if weight_only else ""
    tag += "-rec" if reconstruct else ""
    output = output or Path("quantized") / f"{_model_name(backbone.source)}-{tag}"
    hold(output, force)  # a second run on this -o fails now, before calibration; held until the command ends
    calib_source = DataSpec(calib_data, None, calib_size or DEFAULT_CALIB_SIZE, seed, convert_rgb,
                            size_flag="--calib-size" if calib_size is not None else None).open()
    eval_source = DataSpec(data, str(labels) if labels else None, eval_size, seed, convert_rgb, allow_unlabelled).open()
    with progress() as prog:
        x = y_calib = None
        # weight-only reads them too: its group scales weigh each input channel by its mean square there
        step = prog.add_task("reading calibration images", total=None)
        x, y_calib = load_tensors(calib_source, backbone.preprocess, convert_rgb)
        prog.remove_task(step)
        kind = resolve_task(backbone, task, x if x is not None else backbone.example_input(2))  # refused here, before any calibration
        staging = output.parent / f".{output.name}.reconstruct"
        run = lambda cfg: apply(backbone, cfg, x, prog, reconstruct_staging=staging, say=prog.console.print)
        mixed_info = None
        if auto:
            from dataclasses import replace

            from vitc.compress.quantize import mixed

            if size_budget is not None:
                mixed_info = mixed.plan_mixed(backbone, x, size_budget, act_budget, config.abits, alloc, progress=prog,
                                              group_size=config.group_size, asymmetric=config.weight_scheme == "asymmetric")
                quantized = run(replace(config, layer_bits=mixed_info["layer_bits"]))
            else:
                mixed_info, quantized = mixed.search_max_drop(
                    backbone, x, _calib_labels(calib_source, backbone, y_calib), max_drop,
                    lambda lb: run(replace(config, layer_bits=lb)), config.abits, alloc, prog, say=prog.console.print)
            quantized.transforms[-1]["mixed_precision"] = {k: v for k, v in mixed_info.items() if k != "rows"}
        else:
            quantized = run(config)
        if staging.exists() and not any(staging.iterdir()):  # each finished key folder removes itself
            staging.rmdir()
        record = quantized.transforms[-1]
        if weight_only:
            check_weight_coverage(record["weight_only"]["coverage"], strict_coverage)
        else:
            check_coverage(record.get("coverage"), config, strict_coverage)
        # saved first: nothing that runs afterwards (evaluation, export, timing) can lose the calibration
        save_quantized(quantized, output, force=force, weights=weights)
        if kind == "classify":
            base = evaluate(backbone, eval_source, backbone.preprocess, backbone.labels, batch_size, convert_rgb, prog, keep_logits=True)
            quant = evaluate(quantized, eval_source, backbone.preprocess, backbone.labels, batch_size, convert_rgb, prog, keep_logits=True)
            fid = fidelity(quant["logits"], base["logits"])
        else:
            base, quant, fid = compare_outputs(backbone, quantized, eval_source, batch_size, convert_rgb, prog)
        lat = measure_latency(backbone, quantized, x, n_threads, prog) if latency and config.wbits == config.abits == 8 and not auto else None
    fp32_bytes, q_bytes = model_size(backbone), model_size(quantized)
    worst = sorted(((k, v) for k, v in record["sqnr_db"].items() if v is not None), key=lambda kv: kv[1])[:5]
    classify = kind == "classify"
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
        "task": kind,
        "fp32_top1": base["top1"] if classify else None,
        "quantized_top1": quant["top1"] if classify else None,
        "top1_drop": base["top1"] - quant["top1"] if classify else None,
        "top1_agreement": agreement(base["logits"], quant["logits"])["top1_agreement"] if classify else None,
        "fidelity": fid,
        "sites": record.get("sites", "modules"),
        "coverage": record.get("coverage"),
        "fp32_bytes": fp32_bytes,
        "quantized_bytes": q_bytes,
        "compression": round(fp32_bytes / q_bytes, 3),
        "latency": lat,
        "worst_sqnr": [{"layer": k, "sqnr_db": v} for k, v in worst],
        "vit_quantizers": record["vit_quantizers"],
        "scheme_choice": record["scheme_choice"],
        "config": config.to_dict(),
        "reconstruction": _recon_summary(record.get("reconstruction")),
        "mixed_precision": {k: v for k, v in mixed_info.items() if k != "sensitivity"} if mixed_info else None,
        "weight_only": record.get("weight_only"),
        "threads": n_threads,
        "output": str(output),
    }
    _print(result)
    if out:
        write_json(out, result)


def _calib_labels(source, backbone, y):
    """The calibration images' labels in the model's label space, or None where they have none."""
    import torch

    from vitc.calibration.data import label_map

    try:
        mapping = label_map(source, backbone.labels)
    except Exception:
        return None
    return torch.from_numpy(mapping[y.numpy()]) if mapping is not None else None


def _recon_summary(rec: dict | None) -> dict | None:
    if not rec:
        return None
    return {"iters": rec["options"]["iters"], "iters_ramp": rec["options"].get("iters_ramp", 0.0),
            "loss": rec["options"].get("loss", "mse"), "affine": rec["options"].get("affine", False), "units": len(rec["units"]),
            "seconds": rec["seconds"], "estimate_s": rec["estimate_s"], "images": rec["images"],
            "unit_mse": [{"unit": u["unit"], "before": u["mse_before"], "after": u["mse_after"], "steps": u.get("steps"),
                          **({"output_weights": u["output_weights"]} if u.get("output_weights") else {})}
                         for u in rec["units"]]}


def _print_mixed(info: dict) -> None:
    table = Table(title=f"mixed precision ({info['method']}): average {info['average_wbits']:.2f} weight bits")
    for col in ("layer", "params", "W", "A", "KL W4", "KL W6", "KL W8"):
        table.add_column(col)
    fmt = lambda v: "-" if v is None else f"{v:.2e}"
    for r in info["rows"]:
        table.add_row(r["layer"], str(r["params"]), str(r["wbits"]), str(r["abits"]), fmt(r["kl_w4"]), fmt(r["kl_w6"]), fmt(r["kl_w8"]))
    console.print(table)


def resolve_task(backbone, task: str, x) -> str:
    """The output's task (``tasks.check_task`` on two calibration images): a mismatch is refused here."""
    import torch

    from vitc.tasks import check_task

    with torch.no_grad():
        sample = backbone.module.eval()(x[:2])
    return check_task(task, sample, has_labels=bool(backbone.labels), num_labels=len(backbone.labels) or None)


def check_coverage(cov: dict | None, config, strict: bool) -> None:
    """Warn below ``COVERAGE_WARN`` of matmul/conv FLOPs quantized; with ``--strict-coverage``, refuse (nothing saved)."""
    from vitc.compress.quantize.plan import COVERAGE_WARN
    from vitc.errors import VitcError

    if cov is None:
        msg = "coverage unknown: the model's graph could not be captured to audit the module path"
        if strict:
            raise VitcError(msg, "quantize with --sites graph, or drop --strict-coverage")
        console.print(f"[yellow]warning:[/yellow] {msg}")
        return
    print_coverage(cov, config)
    _hold_to_coverage(cov["flops_share"], "the matmul/conv FLOPs", strict, "quantize with --sites graph, or drop --strict-coverage")


def _hold_to_coverage(share: float, what: str, strict: bool, hint: str) -> None:
    """Below ``COVERAGE_WARN`` of ``what`` quantized: a warning, or with ``--strict-coverage`` a refusal (nothing saved yet)."""
    from vitc.compress.quantize.plan import COVERAGE_WARN
    from vitc.errors import VitcError

    if share < COVERAGE_WARN:
        msg = f"only {100 * share:.1f}% of {what} are quantized (below {100 * COVERAGE_WARN:.0f}%)"
        if strict:
            raise VitcError(msg + "; nothing was saved", hint)
        console.print(f"[yellow]warning:[/yellow] {msg}; the rest stays float (listed above)")


def check_weight_coverage(cov: dict, strict: bool) -> None:
    """Weight-only: say what share of the weight matrices is quantized and name each one left float;
    below ``COVERAGE_WARN`` warn, or with ``--strict-coverage`` refuse (nothing saved)."""
    console.print(f"coverage (weight-only): {cov['params_quantized']:,} of {cov['params_total']:,} weight-matrix "
                  f"parameters quantized ({100 * cov['share']:.1f}%)")
    for r in cov["left_float"][:10]:
        console.print(f"  left float: {r['module']}.{r['parameter']} ({r['type']}, {r['params']:,} parameters): {r['reason']}")
    if len(cov["left_float"]) > 10:
        console.print(f"  ... and {len(cov['left_float']) - 10} more (the JSON's weight_only.coverage lists them)")
    _hold_to_coverage(cov["share"], "the weight-matrix parameters", strict,
                      "drop --strict-coverage, or quantize with activations (--abits 8), whose graph path finds every matmul")


def print_coverage(cov: dict, config) -> None:
    asked = f"W{config.wbits}A{config.abits}"
    console.print(f"coverage ({cov['capture'] or 'module swaps'}): {cov['ops_quantized']}/{cov['ops_total']} matmul/conv ops, "
                  f"{100 * cov['flops_share']:.1f}% of {cov['flops_total'] / 1e6:.1f} MFLOPs quantized; "
                  f"bit widths used: {', '.join(cov['bit_widths'])} (W16 = no weight operand)")
    if cov.get("attention_flops"):
        console.print(f"without the attention matmuls ({cov['attention_flops'] / 1e6:.1f} MFLOPs, activation x activation): "
                      f"{100 * cov['flops_share_without_attention']:.1f}% of the linear/conv FLOPs quantized")
    other = [w for w in cov["bit_widths"] if w not in (asked, f"W16A{config.abits}")]
    if other:
        console.print(f"note: {asked} was asked, but some layers run at {', '.join(other)} "
                      "(the first and last layers stay at 8 bits)")
    if cov["left_float"]:
        table = Table(title="largest ops left in float")
        for col in ("op", "kind", "MFLOPs", "reason"):
            table.add_column(col)
        for s in cov["left_float"][:5]:
            table.add_row(s["name"], s["op"], f"{s['flops'] / 1e6:.2f}", s["reason"])
        console.print(table)


def compare_outputs(backbone, quantized, source, batch_size: int, convert_rgb: bool, prog=None):
    """FP32 and quantized outputs over ``source`` and their fidelity (tasks other than classify)."""
    import torch

    from vitc.calibration.data import iter_batches
    from vitc.tasks import fidelity, flatten_outputs

    refs, outs = [], []
    step = prog.add_task("comparing with FP32", total=len(source)) if prog is not None else None
    with torch.no_grad():
        for x, _ in iter_batches(source, backbone.preprocess, batch_size, convert_rgb):
            refs.append([t.float() for t in flatten_outputs(backbone(x))])
            outs.append([t.float() for t in flatten_outputs(quantized(x))])
            if step is not None:
                prog.advance(step, x.shape[0])
    ref = [torch.cat([r[i] for r in refs]) for i in range(len(refs[0]))]
    out = [torch.cat([o[i] for o in outs]) for i in range(len(outs[0]))]
    n = ref[0].shape[0]
    return {"images": n}, {"images": n}, fidelity(out, ref)


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
        write_onnx(quantized, int8, ExportOptions("int8"), quantized.transforms[-1], runtime="openvino")  # as OpenVINO gets it
        for key, path in (("fp32_ms", fp32), ("int8_ms", int8)):
            session = open_session(path, runtime="openvino", threads=threads)
            out[key] = 1000 * measure(session, pool, 1, config, label=key)["stats"]["p50"]["value"]
    out["speedup"] = out["fp32_ms"] / out["int8_ms"]
    if task is not None:
        prog.remove_task(task)
    return out


def _print(r: dict) -> None:
    if r.get("mixed_precision"):
        _print_mixed(r["mixed_precision"])
    label = f"mixed W{r['mixed_precision']['average_wbits']:.2f}A{r['abits']}" if r.get("mixed_precision") else f"W{r['wbits']}A{r['abits']}"
    if r.get("weight_only"):
        label += f" g{r['weight_only']['group_size']}" + (" asymmetric" if r["weight_only"].get("asymmetric") else "")
    if r.get("reconstruction"):
        label += " +reconstruction"
    table = Table(title=f"quantize: {r['model']} {label} ({r['calibrator']}, {r['calibration_images']} images)")
    table.add_column("")
    table.add_column("FP32")
    table.add_column(label)
    if r["task"] == "classify":
        table.add_row(f"top-1 ({r['eval_images']} images)", pct(r["fp32_top1"]), f"{pct(r['quantized_top1'])} ({-100 * r['top1_drop']:+.2f} pt)")
        table.add_row("top-1 agreement with FP32", "", pct(r["top1_agreement"]))
    f = r["fidelity"]
    table.add_row(f"{r['task']} fidelity vs FP32 ({f['samples']} images): Pearson mean / worst", "",
                  f"{f['pearson_mean']:.5f} / {f['pearson_worst']:.5f}")
    table.add_row("cosine mean / worst; SQNR mean / worst; max abs error", "",
                  f"{f['cosine_mean']:.5f} / {f['cosine_worst']:.5f}; {f['sqnr_db_mean']:.1f} / {f['sqnr_db_worst']:.1f} dB; {f['max_abs_error']:.3g}")
    table.add_row("size", f"{r['fp32_bytes'] / 2**20:.2f} MiB", f"{r['quantized_bytes'] / 2**20:.2f} MiB ({r['compression']:.1f}x smaller)")
    if r["latency"]:
        lat = r["latency"]
        table.add_row(f"CPU latency, batch 1 ({lat['runtime']})", f"{lat['fp32_ms']:.3f} ms", f"{lat['int8_ms']:.3f} ms ({lat['speedup']:.2f}x)")
    table.add_row("calibration time", "", f"{r['calibration_s']:.1f} s")
    if r.get("reconstruction"):
        rec = r["reconstruction"]
        table.add_row("reconstruction", "", f"{rec['units']} units x {rec['iters']} steps" + (f" (ramp {rec['iters_ramp']:g})" if rec['iters_ramp'] else "")
                      + (f", {rec['loss']} loss" if rec.get('loss', 'mse') != 'mse' else "")
                      + (", affine parameters learned" if rec.get("affine") else "")
                      + f", {rec['seconds']:.0f} s (estimated {rec['estimate_s']:.0f} s)")
    console.print(table)
    if r["vit_quantizers"]:
        console.print("ViT quantizers: " + ", ".join(f"{k}={v}" for k, v in r["vit_quantizers"].items()))
    if r["worst_sqnr"]:
        worst = Table(title="five layers with the worst SQNR")
        worst.add_column("layer")
        worst.add_column("SQNR (dB)")
        for w in r["worst_sqnr"]:
            worst.add_row(w["layer"], f"{w['sqnr_db']:.1f}")
        console.print(worst)
    console.print(f"wrote {r['output']}")
