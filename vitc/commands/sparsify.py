"""``vitc sparsify``: 2:4 semi-structured sparsity (magnitude, Wanda, SparseGPT)."""
from __future__ import annotations

from typing import Optional

import typer

from .common import (BatchOpt, ConvertOpt, DataOpt, ForceOpt, InputSizeOpt, FitOpt, InterpOpt, MeanOpt, ModelOpt, OutOpt,
                     OutputOpt, ResizeOpt, SeedOpt, StdOpt, ThreadsOpt, WeightsOpt, console, load_backbone, progress, set_threads)
from .prune import (CalibSizeOpt, EvalDataOpt, EvalSizeOpt, RecoverBatchOpt, RecoverFeaturesOpt, RecoverLrOpt, RecoverStepsOpt, TrainDataOpt,
                    TrainSizeOpt, calibration_images, finish, print_coverage)


def sparsify_cmd(
    model: ModelOpt,
    method: str = typer.Option("sparsegpt", "--method", help="magnitude, wanda or sparsegpt (with the OBS weight update)"),
    layers: Optional[str] = typer.Option(None, "--layers", help="comma-separated module paths to sparsify (default: every eligible layer)"),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="comma-separated module paths to leave dense"),
    damp: float = typer.Option(0.01, "--damp", help="SparseGPT Hessian dampening (fraction of its mean diagonal)"),
    shapes: str = typer.Option("kernel", "--shapes", help="kernel: only layers GPU 2:4 kernels run (outputs a multiple of 32, "
                               "inputs of 64); any: every layer with inputs a multiple of 4 (no sparse-kernel speed-up)"),
    data: DataOpt = "bundled:calib",
    calib_size: int = CalibSizeOpt,
    seed: SeedOpt = 0,
    recover_steps: int = RecoverStepsOpt,
    train_data: str = TrainDataOpt,
    train_size: int = TrainSizeOpt,
    recover_lr: float = RecoverLrOpt,
    recover_batch: int = RecoverBatchOpt,
    recover_features: float = RecoverFeaturesOpt,
    eval_data: Optional[str] = EvalDataOpt,
    eval_size: Optional[int] = EvalSizeOpt,
    batch_size: BatchOpt = 32,
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
) -> None:
    """Make every eligible Linear/Conv 2:4 sparse (2 non-zeros in each 4 inputs); -o DIR saves a model that loads as hf:DIR."""
    from vitc.artifacts import hold
    from vitc.compress.sparsity import SparsityConfig, apply, layer_masks
    from vitc.compress.sparsity.api import selected_layers

    def paths(text):
        return [p.strip() for p in text.split(",") if p.strip()] if text else None

    config = SparsityConfig(method=method, layers=paths(layers), exclude=paths(exclude) or [], damp=damp, batch_size=batch_size, shapes=shapes)
    config.validate()
    if output is not None:
        hold(output, force)  # a concurrent run on this -o fails now, not after the work
    set_threads(threads)
    dense = load_backbone(model, weights, input_size, resize, mean, std, interpolation, fit)
    selected_layers(dense.require_module("2:4 sparsity"), config)  # a wrong layer name fails before any work
    if output is not None:
        from vitc.compress.prune.persist import check_savable

        check_savable(dense)  # before the work, not after it
    images = calibration_images(dense, data, calib_size, seed, convert_rgb) if method != "magnitude" else None
    with progress() as prog:
        sparse = apply(dense, config, images, prog)
    record = sparse.transforms[-1]
    print_coverage(record["coverage"], "sparsified", whole=not (config.layers or config.exclude))
    finish(dense, sparse, "2:4", recover_steps, train_data, train_size, recover_lr, recover_batch, seed,
           eval_data, eval_size, batch_size, convert_rgb, output, force, out, masks=layer_masks,
           feature_weight=recover_features,
           extra={"method": method, "sparse_layers": record["sparse_layers"], "dense_layers": record["dense_layers"],
                  "coverage": record["coverage"]})
