"""``vitc merge``: training-free token merging / pruning / transforming, evaluated against the original."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import (BatchOpt, ConvertOpt, DataOpt, ForceOpt, InputSizeOpt, FitOpt, InterpOpt, LabelsOpt, MeanOpt, ModelOpt,
                     OutOpt, OutputOpt, ResizeOpt, SeedOpt, StdOpt, ThreadsOpt, WeightsOpt, console, load_backbone, pct,
                     progress, set_threads)


OUTPUT_KINDS = {".json": "description", ".onnx": "onnx", ".xml": "openvino"}


def _ints(text: str | None, flag: str) -> list[int] | None:
    from vitc.errors import VitcError

    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise VitcError(f"{flag} '{text}' is not a comma-separated list of integers", f"e.g. {flag} 8 or {flag} 16,12,8,4,0,0") from None


def merge_cmd(
    model: ModelOpt,
    method: str = typer.Option("tome", "--method", help="tome (bipartite merging), prune (EViT-style attentive pruning) or transform (Token Transforming)"),
    r: Optional[str] = typer.Option(None, "--r", help="tokens removed per block: one value, or one per block (comma-separated)"),
    flops: Optional[float] = typer.Option(None, "--flops", help="pick the smallest r whose FLOPs are at most this fraction of the original's"),
    schedule: str = typer.Option("constant", "--schedule", help="constant or decreasing (2r down to 0) when --r/--flops is one value"),
    layers: Optional[str] = typer.Option(None, "--layers", help="blocks that reduce tokens, e.g. 3,6,9 (default: all)"),
    k: int = typer.Option(4, "--k", help="transform: targets each removed token is spread over"),
    temperature: float = typer.Option(0.1, "--temperature", help="transform: softmax temperature of that spread"),
    prop_attn: bool = typer.Option(True, "--prop-attn/--no-prop-attn", help="add log(token size) to the attention logits"),
    data: DataOpt = "bundled:eval",
    labels: LabelsOpt = None,
    eval_size: Optional[int] = typer.Option(None, "--eval-size", help="evaluate on a deterministic subset of this many images"),
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 64,
    viz: Optional[Path] = typer.Option(None, "--viz", help="draw which patches were merged on a few images (PNG)"),
    viz_images: int = typer.Option(4, "--viz-images", help="images in the --viz drawing"),
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
    """Reduce a ViT's tokens without training; report accuracy, FLOPs and speed against the original.

    -o FILE.json writes a description (model + merge config) that every vitc command loads
    as a model; -o FILE.onnx / FILE.xml exports the merged model (with its parity check);
    --viz draws the merges.
    """
    from vitc.artifacts import atomic_path, check_writable, hold, write_json
    from vitc.calibration.data import DataSpec, load_tensors
    from vitc.compress.tokens import MergeConfig, apply, for_flops, save_description
    from vitc.errors import VitcError
    from vitc.evaluate import evaluate

    if (r is None) == (flops is None):
        raise VitcError("pass exactly one of --r and --flops", "e.g. --r 8, or --flops 0.6")
    if output is not None:
        if output.suffix not in OUTPUT_KINDS:
            raise VitcError(f"-o {output} does not end in one of {', '.join(OUTPUT_KINDS)}",
                            "pass -o merged.json (a description any vitc command loads) or -o merged.onnx / merged.xml (an exported artifact)")
        check_writable(output, force)
        from vitc.export.pipeline import claim_path

        hold(output if output.suffix == ".json" else claim_path(output, OUTPUT_KINDS[output.suffix]), force)
    if viz is not None and viz.suffix.lower() != ".png":
        raise VitcError(f"--viz {viz} is not a .png path", "pass --viz merges.png")
    n_threads = set_threads(threads)
    backbone = load_backbone(model, weights, input_size, resize, mean, std, interpolation, fit)
    layer_list = _ints(layers, "--layers")
    options = dict(prop_attn=prop_attn, k=k, temperature=temperature)
    if flops is not None:
        config, _ = for_flops(backbone, method, flops, schedule, layer_list, **options)
    else:
        values = _ints(r, "--r")
        config = MergeConfig(method, values[0] if len(values) == 1 else values, schedule, layer_list, **options)
    merged = apply(backbone, config)
    record = merged.transforms[-1]
    base_flops, merged_flops = backbone.flops(), merged.flops()

    source = DataSpec(data, str(labels) if labels else None, eval_size, seed, convert_rgb).open()
    with progress() as prog:
        base = evaluate(backbone, source, backbone.preprocess, backbone.labels, batch_size, convert_rgb, prog)
        red = evaluate(merged, source, merged.preprocess, merged.labels, batch_size, convert_rgb, prog)
    result = {
        "model": backbone.source, "data": source.location, "images": base["images"], "seed": seed, "threads": n_threads,
        "method": method, "config": config.to_dict(), "removals": record["removals"], "tokens": record["tokens"],
        "flops": {"original": base_flops, "merged": merged_flops, "ratio": merged_flops / base_flops},
        "original": {k: base[k] for k in ("top1", "top5", "images_per_s")},
        "merged": {k: red[k] for k in ("top1", "top5", "images_per_s")},
        "top1_drop": base["top1"] - red["top1"],
        "torch_speedup": red["images_per_s"] / base["images_per_s"],
    }
    if viz is not None:
        from vitc.compress.tokens.viz import draw

        images, _ = load_tensors(source.select(viz_images, seed), merged.preprocess, convert_rgb)
        draw(merged, images, viz, f"{backbone.source}: {method}, r={config.r}")
        result["viz"] = str(viz)
    if output is not None:
        if output.suffix == ".json":
            with atomic_path(output, force) as tmp:
                save_description(tmp, merged, str(weights) if weights else None)
        else:
            from vitc.export import export_artifact

            with progress() as prog:
                art = export_artifact(merged, OUTPUT_KINDS[output.suffix], output, force=force, data=data,
                                      eval_size=eval_size, progress=prog)
            result["export"] = {"path": str(art.path), "status": art.status, "parity": art.parity}
        result["output"] = str(output)

    table = Table(title=f"merge: {backbone.source} on {source.location} ({base['images']} images)")
    for col in ("model", "method", "r per block", "tokens out", "GFLOPs", "FLOPs", "top-1", "drop", "images/s (torch)"):
        table.add_column(col)
    table.add_row("original", "-", "-", str(record["tokens"][0]), f"{base_flops / 1e9:.3f}", "1.00", pct(base["top1"]), "-",
                  f"{base['images_per_s']:.1f}")
    table.add_row("merged", method, ",".join(map(str, record["removals"])), str(record["tokens"][-1]), f"{merged_flops / 1e9:.3f}",
                  f"{merged_flops / base_flops:.2f}", pct(red["top1"]), f"{100 * result['top1_drop']:+.2f} pt",
                  f"{red['images_per_s']:.1f} ({result['torch_speedup']:.2f}x)")
    console.print(table)
    if viz is not None:
        console.print(f"merges drawn in {viz}")
    if output is not None and output.suffix == ".json":
        console.print(f"wrote {output} (load it anywhere a model goes: --model {output})")
    elif output is not None:
        console.print(f"exported {output}: parity {result['export']['status']}")
    if out:
        write_json(out, result)
