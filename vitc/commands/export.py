"""``vitc export``: write a model as an ONNX, OpenVINO, TensorRT or CoreML artifact and check it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import (DataOpt, ForceOpt, InputSizeOpt, FitOpt, InterpOpt, MeanOpt, ModelOpt, OutOpt, OutputOpt, ResizeOpt, StdOpt,
                     ThreadsOpt, WeightsOpt, console, err_console, load_backbone, pct, positive, progress, set_threads)

TARGET_CHOICES = ("onnx", "openvino", "tensorrt", "coreml", "all")


def export_cmd(
    model: ModelOpt,
    target: str = typer.Option(..., "--target", "-t", help="onnx, openvino, tensorrt, coreml, or all (then -o is a folder)"),
    output: OutputOpt = None,
    force: ForceOpt = False,
    check: bool = typer.Option(True, "--check/--no-check", help="compare the artifact with PyTorch on real images (default on)"),
    data: DataOpt = "bundled:eval",
    eval_size: Optional[int] = typer.Option(None, "--eval-size", help="check parity on a deterministic subset of this many images"),
    precision: Optional[str] = typer.Option(None, "--precision", "-p", help="fp32, fp16 or int8 (default: fp32 for onnx/openvino, "
                                            "fp16 for coreml/tensorrt; a quantized model keeps its grids: int8, w8a8 on coreml)"),
    dynamic_batch: bool = typer.Option(True, "--dynamic-batch/--static-batch", help="a dynamic batch axis (default) or batch 1"),
    max_batch: int = typer.Option(64, "--max-batch", help="largest batch of the dynamic range (CoreML, TensorRT profile)"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset, 17 or newer"),
    simplify: bool = typer.Option(False, "--simplify", help="fold constants and drop dead nodes in the ONNX graph"),
    threads: ThreadsOpt = None,
    weights: WeightsOpt = None,
    out: OutOpt = None,
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    interpolation: InterpOpt = None,
    fit: FitOpt = None,
) -> None:
    """Export a model to a deployable artifact, with a manifest, and check it against PyTorch."""
    from vitc.artifacts import atomic_path, check_writable, hold, write_json
    from vitc.errors import VitcError
    from vitc.export import TARGETS, planned_paths
    from vitc.export.pipeline import claim_path

    if target not in TARGET_CHOICES:
        raise VitcError(f"unknown export target '{target}'", f"use one of: {', '.join(TARGET_CHOICES)}")
    if output is None:
        raise VitcError("vitc export needs -o/--output", "pass -o model.onnx (or a folder; with --target all, a folder)")
    positive(eval_size, "--eval-size")
    positive(max_batch, "--max-batch")
    set_threads(threads)
    options = dict(force=force, check=check, data=data, eval_size=eval_size, precision=precision, dynamic_batch=dynamic_batch,
                   opset=opset, simplify=simplify, max_batch=max_batch)
    if target != "all":  # a bad, existing or busy -o fails before the model loads
        hold(claim_path(output, target), force)  # held until the command ends: a concurrent export to it fails now
        for path in planned_paths(output, target):
            check_writable(path, force)
    else:
        hold(output, force)
    backbone = load_backbone(model, weights, input_size, resize, mean, std, interpolation, fit)
    if not check:
        err_console.print("[bold yellow]warning: --no-check: the artifacts are NOT compared with PyTorch; their manifests say "
                          "\"unchecked\"[/bold yellow]")
    rows, failed = [], []
    with progress() as prog:
        if target != "all":
            rows.append(_export_one(backbone, target, output, options, prog, failed, skip_missing=False))
        else:
            with atomic_path(output, force=force, is_dir=True) as tmp:
                for name in TARGETS:
                    row = _export_one(backbone, name, tmp / name, {**options, "force": False}, prog, failed, skip_missing=True)
                    for key in ("path", "manifest"):  # where they land once the folder is moved into place
                        if row.get(key):
                            row[key] = str(output / Path(row[key]).relative_to(tmp))
                    rows.append(row)
    _print_table(backbone.source, rows)
    if out:
        write_json(out, {"model": backbone.source, "source_sha256": backbone.source_hash, "target": target, "check": check,
                         "data": data if check else None, "results": rows})
    if failed:
        raise failed[0] if len(failed) == 1 else _many_failed(failed)


def _many_failed(failed):
    from vitc.errors import VitcError

    names = [e.artifact.target if hasattr(e, "artifact") else "tensorrt" for e in failed]
    err = VitcError(f"{len(failed)} targets failed their checks ({', '.join(names)})",
                    "failed artifacts are kept and marked failed in their manifests; rejected ones were not written")
    err.exit_code = max(e.exit_code for e in failed)
    return err


def _export_one(backbone, target: str, output: Path, options: dict, prog, failed: list, skip_missing: bool) -> dict:
    from vitc.errors import MissingExtraError
    from vitc.export import ParityError, export_artifact
    from vitc.export.pipeline import TargetUnavailable
    from vitc.export.tensorrt import TensorRTRuleError

    try:
        art = export_artifact(backbone, target, output, progress=prog, **options)
    except ParityError as exc:
        failed.append(exc)
        art = exc.artifact
    except TensorRTRuleError as exc:
        _print_violations(exc.violations)
        if not skip_missing:
            raise
        failed.append(exc)  # with --target all, the other targets are still written
        return {"target": target, "status": "rejected", "note": str(exc)}
    except (MissingExtraError, TargetUnavailable) as exc:
        if not skip_missing:
            raise
        return {"target": target, "status": "skipped", "note": str(exc)}
    p = art.parity or {}
    return {"target": target, "precision": art.precision, "path": str(art.path), "status": art.status,
            "manifest": str(art.manifest_path), "parity": art.parity, "note": p.get("failure") or p.get("skipped") or p.get("checked") or ""}


def _print_table(source: str, rows: list[dict]) -> None:
    from vitc.export.parity import MIN_AGREEMENT

    table = Table(title=f"export: {source}")
    for col in ("target", "precision", "status", "agree", "max |Δ|", "mean |Δ|"):
        table.add_column(col, no_wrap=True)
    table.add_column("artifact", overflow="fold")
    notes = []
    for r in rows:
        p = r.get("parity") or {}
        ran = "top1_agreement" in p
        table.add_row(r["target"], r.get("precision", "-"), _status(r["status"]), pct(p["top1_agreement"]) if ran else "-",
                      f"{p['max_abs_logit_error']:.1e}" if ran else "-", f"{p['mean_abs_logit_error']:.1e}" if ran else "-",
                      _short(r.get("path", "-")))
        if ran:
            runtime = (p.get("runtime") or {}).get("runtime", "?")
            notes.append(f"{r['target']}: parity on {p['images']} images of {p['data']} with {runtime}"
                         + (f" (reference top-1 {pct(p['reference_top1'])}, artifact {pct(p['artifact_top1'])})" if "artifact_top1" in p else ""))
            if p.get("images_chosen"):
                notes.append(f"{r['target']}: parity on {p['images_chosen']}")
            floor = p.get("rounding_floor")
            if floor and floor["min_agreement"] < MIN_AGREEMENT.get(r.get("precision"), MIN_AGREEMENT["int8"]):
                notes.append(f"{r['target']}: this model's rounding floor (its simulation against itself with 2-ulp jitter at every "
                             f"activation quantizer) agrees on {pct(floor['top1_agreement'])} at a mean logit error of "
                             f"{floor['mean_rel_logit_error']:.1e} of the spread, so the agreement bar is {pct(p['min_agreement'])} "
                             "(docs/export.md, 'The rounding floor')")
        if r.get("note"):
            notes.append(f"{r['target']}: {r['note']}")
    console.print(table)
    for note in notes:
        console.print(f"  {note}", highlight=False, soft_wrap=True)


def _short(path: str) -> str:
    import os

    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("../..") else path


def _status(status: str) -> str:
    color = {"passed": "green", "failed": "bold red", "rejected": "bold red", "unchecked": "yellow", "skipped": "dim"}.get(status, "")
    return f"[{color}]{status}[/{color}]" if color else status


def _print_violations(violations) -> None:
    table = Table(title="TensorRT rule violations")
    for col in ("node", "op", "rule", "detail"):
        table.add_column(col)
    for v in violations:
        table.add_row(v.node, v.op, v.rule, v.detail)
    err_console.print(table)
