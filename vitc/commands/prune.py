"""``vitc prune``: structured pruning (heads, MLP channels, attention sublayers, conv channels).

The recovery and evaluation helpers here are shared with ``vitc sparsify``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import (BatchOpt, ConvertOpt, DataOpt, ForceOpt, InputSizeOpt, FitOpt, InterpOpt, MeanOpt, ModelOpt, OutOpt,
                     OutputOpt, ResizeOpt, SeedOpt, StdOpt, ThreadsOpt, WeightsOpt, console, load_backbone, pct,
                     progress, set_threads)

CalibSizeOpt = typer.Option(128, "--calib-size", help="calibration images drawn from --data")
RecoverStepsOpt = typer.Option(0, "--recover-steps", help="distil from the dense model for this many steps (0: no recovery)")
TrainDataOpt = typer.Option("bundled:calib", "--train-data", help="training images for recovery (never the evaluation images)")
TrainSizeOpt = typer.Option(5000, "--train-size", help="training images loaded for recovery")
RecoverLrOpt = typer.Option(2e-4, "--recover-lr", help="recovery learning rate (AdamW, cosine)")
RecoverBatchOpt = typer.Option(64, "--recover-batch", help="recovery batch size")
RecoverFeaturesOpt = typer.Option(0.0, "--recover-features", help="weight of distilling every block's output "
                                  "(relative MSE) besides the logits; 0: logits only (the teacher then runs on every batch)")
EvalDataOpt = typer.Option(None, "--eval-data", help="labelled images to compare dense and compressed top-1 on")
EvalSizeOpt = typer.Option(None, "--eval-size", help="evaluate on a deterministic subset of this many images")


def prune_cmd(
    model: ModelOpt,
    flops: Optional[float] = typer.Option(None, "--flops", help="keep this fraction of the FLOPs, e.g. 0.7"),
    params: Optional[float] = typer.Option(None, "--params", help="keep this fraction of the parameters"),
    heads: Optional[float] = typer.Option(None, "--heads", help="keep this fraction of the heads of every attention"),
    mlp: Optional[float] = typer.Option(None, "--mlp", help="keep this fraction of every MLP's hidden channels"),
    conv: Optional[float] = typer.Option(None, "--conv", help="keep this fraction of the prunable conv channels"),
    drop_attention: int = typer.Option(0, "--drop-attention", help="remove this many whole attention sublayers (least residual change first)"),
    units: str = typer.Option("heads,mlp,conv", "--units", help="unit kinds a --flops/--params target may shrink"),
    importance: str = typer.Option("taylor", "--importance", help="magnitude, activation, or taylor (distillation loss)"),
    round_to: int = typer.Option(8, "--round-to", help="kept MLP/conv channel counts are multiples of this"),
    method: str = typer.Option("auto", "--method", help="where channel groups come from: adapter (family knowledge), graph "
                               "(the model's torch.export graph: any CNN or ViT), auto (adapter where the family has one, else graph)"),
    allocation: str = typer.Option("uniform", "--allocation", help="how a --flops/--params target is shared: uniform (one "
                                   "keep ratio for every block) or global (units of all blocks ranked by Taylor score per cost)"),
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
    """Remove heads, MLP channels, attention sublayers or conv channels; -o DIR saves a model that loads as hf:DIR."""
    from vitc.artifacts import hold
    from vitc.compress.prune import PruneConfig, apply

    config = PruneConfig(importance=importance, flops=flops, params=params, heads=heads, mlp=mlp, conv=conv,
                         drop_attention=drop_attention, units=[u.strip() for u in units.split(",") if u.strip()],
                         round_to=round_to, allocation=allocation, batch_size=batch_size, method=method)
    config.validate()
    if output is not None:
        hold(output, force)  # a concurrent run on this -o fails now, not after the work
    set_threads(threads)
    dense = load_backbone(model, weights, input_size, resize, mean, std, interpolation, fit)
    if output is not None:
        from vitc.compress.prune.persist import check_savable

        check_savable(dense)  # before any work: a result that cannot be saved is not computed
    images = None
    if importance != "magnitude" or drop_attention:
        images = calibration_images(dense, data, calib_size, seed, convert_rgb)
    with console.status("scoring and pruning"):
        pruned = apply(dense, config, images)
    record = pruned.transforms[-1]
    if record["plan"]["dropped_attention"]:
        console.print("removed attention sublayers: " + ", ".join(record["plan"]["dropped_attention"]))
    print_coverage(record["coverage"], "pruned", whole=not (set(config.units) < {"heads", "mlp", "conv"}))
    finish(dense, pruned, "prune", recover_steps, train_data, train_size, recover_lr, recover_batch, seed,
           eval_data, eval_size, batch_size, convert_rgb, output, force, out, masks=None, feature_weight=recover_features,
           extra={"keep_ratio": record["keep_ratio"], "allocation": allocation, "channels": record["plan"]["channels"],
                  "dropped_attention": record["plan"]["dropped_attention"],
                  "reloads_with_plain_transformers": record["plan"]["config_describes_all_layers"],
                  "groups_from": record["groups_from"], "coverage": record["coverage"]})


def print_coverage(cover: dict, verb: str, whole: bool = True, shown: int = 8) -> None:
    """What a pass covered, said out loud: ops and FLOPs, the ops left alone with why, a warning below 90%."""
    from vitc.compress.quantize.plan import COVERAGE_WARN

    console.print(f"coverage: {cover[f'ops_{verb}']}/{cover['ops_total']} matmul/conv ops {verb}, "
                  f"{pct(cover['flops_share'])} of matmul/conv FLOPs ({cover['capture']})")
    left = cover["left_alone"]
    for item in left[:shown]:
        console.print(f"  left alone: {item['name']} ({item['op']}, {item['flops'] / 1e6:.2f} MFLOPs): {item['reason']}")
    if len(left) > shown:
        console.print(f"  ... and {len(left) - shown} more (all listed in --out)")
    if whole and cover["flops_share"] < COVERAGE_WARN:
        console.print(f"[yellow]warning: only {pct(cover['flops_share'])} of the model's matmul/conv FLOPs are {verb} "
                      f"(below {COVERAGE_WARN:.0%}); the ops above were left alone[/yellow]")


def calibration_images(backbone, data: str, size: int, seed: int, convert_rgb: bool):
    from vitc.calibration.data import DataSpec, load_tensors
    from vitc.errors import VitcError

    if size <= 0:
        raise VitcError(f"--calib-size {size} is not positive", "pass 1 or more images")
    source = DataSpec(data, None, size, seed, convert_rgb, size_flag="--calib-size").open()
    return load_tensors(source, backbone.preprocess, convert_rgb)[0]


def finish(dense, compressed, verb: str, recover_steps: int, train_data: str, train_size: int, lr: float, batch: int,
           seed: int, eval_data: str | None, eval_size: int | None, eval_batch: int, convert_rgb: bool,
           output: Path | None, force: bool, out: Path | None, masks, extra: dict, feature_weight: float = 0.0) -> dict:
    """Recovery, evaluation, the table, -o and --out: the part prune and sparsify share."""
    from vitc.artifacts import atomic_path, write_json
    from vitc.calibration.data import DataSpec, load_tensors
    from vitc.compress.prune.persist import save_backbone
    from vitc.compress.recover import RecoverConfig, recover

    stages = [("dense", dense), (verb, compressed)]
    if recover_steps:
        rconfig = RecoverConfig(steps=recover_steps, batch_size=batch, lr=lr, seed=seed, feature_weight=feature_weight)
        rconfig.validate()
        train = DataSpec(train_data, None, train_size, seed, convert_rgb).open()
        images = load_tensors(train, dense.preprocess, convert_rgb)[0]
        with progress() as prog:
            compressed = recover(compressed, dense, images, rconfig, masks(compressed) if masks else None, prog)
        stages.append((f"{verb} + recovery", compressed))
    rows = []
    for name, b in stages:
        rows.append({"stage": name, "params": b.parameters_count(), "flops": b.flops()})
    if eval_data is not None:
        from vitc.evaluate import evaluate

        source = DataSpec(eval_data, None, eval_size, seed, convert_rgb).open()
        with progress() as prog:
            for row, (_, b) in zip(rows, stages):
                row["top1"] = evaluate(b, source, b.preprocess, b.labels, eval_batch, convert_rgb, prog)["top1"]
        for row in rows:  # a fraction of the images, like every accuracy figure (docs/json.md)
            row["top1_drop"] = rows[0]["top1"] - row["top1"]
    table = Table(title=f"{verb}: {dense.source}")
    for col in ("stage", "params", "FLOPs / image", "FLOPs kept", "top-1"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["stage"], f"{row['params'] / 1e6:.3f}M", f"{row['flops'] / 1e6:.1f}M",
                      pct(row["flops"] / rows[0]["flops"]), pct(row.get("top1")))
    console.print(table)
    if compressed.transforms and compressed.transforms[-1].get("pass") == "recover":
        r = compressed.transforms[-1]
        console.print(f"recovery: {r['config']['steps']} steps, distillation loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}, "
                      f"{r['seconds_per_step']:.3f} s/step")
        if r.get("feature_blocks"):  # blocks whose outputs changed shape are left out: say so
            console.print(f"feature distillation on {r['feature_blocks']} of {r['feature_blocks_of']} blocks' outputs")
    result = {"model": dense.source, "stages": rows, **extra, "transforms": compressed.transforms}
    if output is not None:
        with atomic_path(output, force, is_dir=True) as tmp:
            spec = save_backbone(compressed, tmp)
        result["output"] = str(output)
        console.print(f"saved {output} (load it with --model {'hf:' if spec.startswith('hf:') else ''}{output})")
    if out:
        write_json(out, result)
    return result
