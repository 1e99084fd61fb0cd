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


def runner_for(backbone, threads: int):
    """A batch -> logits callable: the PyTorch module, or an ONNX Runtime session for .onnx."""
    if backbone.module is not None:
        return backbone
    from vitc.runtimes import open_session

    return open_session(backbone.onnx_path, threads=threads)
