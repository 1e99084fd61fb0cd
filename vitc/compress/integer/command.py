"""``vitc quantize --integer-only``: convert, evaluate against FP32, check ONNX Runtime against
the reference executor, and write the integer ONNX graph.

JSON (``--out``) keys: ``model``, ``weight_bits``, ``act_bits``, ``residual_bits``,
``calibrator``, ``calibration_images``, ``recover_steps``, ``eval_images``, ``fp32_top1``,
``integer_top1``, ``top1_drop`` (a fraction: docs/json.md), ``top1_agreement``, ``exact_images`` (images whose
ONNX Runtime int32 logits were compared with the reference executor), ``exact_mismatches``
(must be 0), ``convert_s``, ``output``.
"""
from __future__ import annotations

import time
from pathlib import Path

EXACT_CHECK_IMAGES = 100  # the reference executor is slow; ONNX Runtime is checked on this many eval images


def run_integer_only(*, model: str, weights, input_size, resize, mean, std, interpolation, wbits: int, abits: int,
                     calib: str, percentile: float, calib_data: str, calib_size: int, recover_steps: int, data: str,
                     labels, eval_size, seed: int, batch_size: int, output: Path | None, force: bool, threads,
                     convert_rgb: bool, out: Path | None) -> None:
    from rich.table import Table

    from vitc.artifacts import atomic_path, check_writable, write_json
    from vitc.calibration.data import DataSpec, iter_batches, load_tensors
    from vitc.commands.common import console, load_backbone, pct, progress, set_threads
    from vitc.evaluate import agreement, evaluate
    from vitc.export.integer_onnx import export
    from vitc.runtimes import open_session

    from . import IntegerConfig, apply

    config = IntegerConfig(weight_bits=wbits, act_bits=abits, calibration=calib, percentile=percentile,
                           calib_size=calib_size, seed=seed, recover_steps=recover_steps)
    config.validate()
    n_threads = set_threads(threads)
    backbone = load_backbone(model, weights, input_size, resize, mean, std, interpolation)
    backbone.require_module("integer-only conversion")
    from .hf_vit import read_vit

    read_vit(backbone)  # an op without an integer version fails here, before any work starts
    name = Path(backbone.source.split(":", 1)[-1].rstrip("/")).name.replace(".", "-") or "model"
    output = output or Path("quantized") / f"{name}-int-w{wbits}a{abits}"
    check_writable(output, force)
    calib_source = DataSpec(calib_data, None, None, seed, convert_rgb).open()
    eval_source = DataSpec(data, str(labels) if labels else None, eval_size, seed, convert_rgb).open()
    with progress() as prog:
        task = prog.add_task("reading calibration images", total=None)
        x, _ = load_tensors(calib_source.select(max(calib_size, config.recover_size if recover_steps else 0), seed),
                            backbone.preprocess, convert_rgb)
        prog.remove_task(task)
        t0 = time.perf_counter()
        converted = apply(backbone, config, x, progress=prog)
        convert_s = time.perf_counter() - t0
        with atomic_path(output, force=force, is_dir=True) as tmp:
            path = export(converted, tmp / "model.onnx", force=True)
            session = open_session(path, threads=n_threads)
            exact_n = mismatches = 0
            for xb, _ in iter_batches(eval_source.select(min(EXACT_CHECK_IMAGES, len(eval_source)), seed),
                                      backbone.preprocess, batch_size, convert_rgb):
                got = session.session.run(None, {session.input_name: xb.numpy()})[1]
                ref = converted.module.integer_logits(xb).numpy()
                mismatches += int((got != ref).any(-1).sum())
                exact_n += len(xb)
            base = evaluate(backbone, eval_source, backbone.preprocess, backbone.labels, batch_size, convert_rgb, prog,
                            keep_logits=True)
            integer = evaluate(session, eval_source, backbone.preprocess, backbone.labels, batch_size, convert_rgb, prog,
                               keep_logits=True)
            write_json(tmp / "integer.json", {"source": backbone.source, "transform": converted.transforms[-1]})
    result = {
        "model": backbone.source, "weight_bits": wbits, "act_bits": abits, "residual_bits": config.residual_bits,
        "calibrator": calib, "calibration_data": calib_source.location, "calibration_images": min(calib_size, len(x)),
        "recover_steps": recover_steps, "eval_data": eval_source.location, "eval_images": integer["images"],
        "fp32_top1": base["top1"], "integer_top1": integer["top1"],
        "top1_drop": base["top1"] - integer["top1"],
        "top1_agreement": agreement(base["logits"], integer["logits"])["top1_agreement"],
        "exact_images": exact_n, "exact_mismatches": mismatches, "convert_s": convert_s, "threads": n_threads,
        "output": str(output / "model.onnx"),
    }
    table = Table(title=f"quantize --integer-only: {result['model']} W{wbits}A{abits} "
                        f"({calib}, {result['calibration_images']} images, {recover_steps} recovery steps)")
    table.add_column("")
    table.add_column("FP32")
    table.add_column("integer-only (ONNX Runtime)")
    table.add_row(f"top-1 ({result['eval_images']} images)", pct(result["fp32_top1"]),
                  f"{pct(result['integer_top1'])} ({-100 * result['top1_drop']:+.2f} pt)")
    table.add_row("top-1 agreement with FP32", "", pct(result["top1_agreement"]))
    table.add_row("ONNX Runtime vs reference executor", "",
                  f"{exact_n - mismatches} of {exact_n} images bit-exact")
    table.add_row("conversion time", "", f"{convert_s:.1f} s")
    console.print(table)
    console.print(f"wrote {result['output']}")
    if out:
        write_json(out, result)
    if mismatches:
        from vitc.errors import VitcError

        raise VitcError(f"ONNX Runtime differs from the reference executor on {mismatches} of {exact_n} images",
                        "report it with --debug output; the written graph is not bit-exact")
