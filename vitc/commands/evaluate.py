"""``vitc eval``: accuracy and throughput of a model on labelled images."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from .common import (AllowUnlabelledOpt, BatchOpt, ConvertOpt, DataOpt, InputSizeOpt, FitOpt, InterpOpt, LabelsOpt, MeanOpt, ModelOpt, OutOpt,
                     ResizeOpt, SeedOpt, StdOpt, ThreadsOpt, WeightsOpt, console, load_backbone, pct, positive, progress, set_threads)


def eval_cmd(
    model: ModelOpt,
    data: DataOpt = "bundled:eval",
    labels: LabelsOpt = None,
    eval_size: Optional[int] = typer.Option(None, "--eval-size", help="evaluate on a deterministic subset of this many images"),
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 100,
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
    allow_unlabelled: AllowUnlabelledOpt = False,
) -> None:
    """Top-1/top-5 accuracy and images/s of a model on --data."""
    from vitc.artifacts import write_json
    from vitc.calibration.data import DataSpec
    from vitc.evaluate import evaluate

    positive(eval_size, "--eval-size")
    positive(batch_size, "--batch-size")
    n_threads = set_threads(threads)
    backbone = load_backbone(model, weights, input_size, resize, mean, std, interpolation, fit)
    source = DataSpec(data, str(labels) if labels else None, eval_size, seed, convert_rgb, allow_unlabelled).open()
    run = runner_for(backbone, n_threads)
    reference = _fp32_reference(backbone, model)
    if reference is not None:
        return _eval_fidelity(backbone, run, reference, source, batch_size, convert_rgb, seed, out)
    with progress() as prog:
        result = evaluate(run, source, backbone.preprocess, backbone.labels, batch_size, convert_rgb, prog)
    result.update({"model": backbone.source, "data": source.location, "seed": seed, "runtime": getattr(run, "name", "torch")})
    table = Table(title=f"eval: {backbone.source} on {source.location}")
    for col in ("images", "top-1", "top-5", "images/s", "runtime", "threads"):
        table.add_column(col)
    table.add_row(str(result["images"]), pct(result["top1"]), pct(result["top5"]), f"{result['images_per_s']:.1f}",
                  result["runtime"], str(n_threads))
    console.print(table)
    if out:
        write_json(out, result)


def _fp32_reference(backbone, model: str):
    """The FP32 base of a saved quantized folder whose output is not class logits (else None):
    such a model is evaluated by its fidelity to that base, not by top-1."""
    import json
    from pathlib import Path

    import torch

    from vitc.tasks import detect

    meta_file = Path(model) / "vitc_quant.json"
    if backbone.module is None or not meta_file.exists():
        return None
    with torch.no_grad():
        sample = backbone.module(backbone.example_input(2))
    if detect(sample, bool(backbone.labels), len(backbone.labels) or None) == "classify":
        return None
    from vitc.models.intake import load_model

    base = json.loads(meta_file.read_text())["base"]
    return load_model(base["spec"], base.get("weights"))


def _eval_fidelity(backbone, run, reference, source, batch_size, convert_rgb, seed, out) -> None:
    from vitc.artifacts import write_json
    from vitc.evaluate import fidelity_against

    with progress() as prog:
        f = fidelity_against(run, reference, source, backbone.preprocess, batch_size, convert_rgb, prog)
    result = {"model": backbone.source, "reference": reference.source, "data": source.location, "seed": seed, "fidelity": f}
    table = Table(title=f"eval: {backbone.source} against its FP32 base {reference.source} on {source.location}")
    for col in ("images", "Pearson mean / worst", "cosine mean / worst", "SQNR mean / worst (dB)", "max abs error"):
        table.add_column(col)
    table.add_row(str(f["samples"]), f"{f['pearson_mean']:.5f} / {f['pearson_worst']:.5f}",
                  f"{f['cosine_mean']:.5f} / {f['cosine_worst']:.5f}", f"{f['sqnr_db_mean']:.1f} / {f['sqnr_db_worst']:.1f}",
                  f"{f['max_abs_error']:.3g}")
    console.print(table)
    if out:
        write_json(out, result)


def runner_for(backbone, threads: int):
    """A batch -> logits callable: the PyTorch module, or an ONNX Runtime session for .onnx."""
    if backbone.module is not None:
        return backbone
    from vitc.runtimes import open_session

    return open_session(backbone.onnx_path, threads=threads)
