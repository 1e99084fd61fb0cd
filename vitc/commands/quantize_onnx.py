"""``vitc quantize --model X.onnx``: quantize an ONNX graph directly (``compress/quantize/onnx_graph.py``).

Writes a folder: ``model.onnx`` (the Q/DQ graph for ONNX Runtime, one Q/DQ pair per consumer),
``openvino/model.xml`` (+ ``.bin``, converted from the Q/DQ graph with shared pairs), each with
the manifest and parity check of ``vitc export``, and ``quantize.json`` (the plan, coverage and
fidelity against the FP32 file). JSON (``--out``) keys: ``model``, ``task``, ``calibration_images``,
``calibration_s``, ``coverage``, ``fidelity`` (per runtime: ``fidelity()`` against FP32, plus
top-1 for logits with labels), ``artifacts``, ``output``.
"""
from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from rich.table import Table

from .common import console, err_console, load_backbone, pct, progress, set_threads


def run_onnx_quantize(*, model: str, config, calib_data: str, calib_size: int, data: str, labels, eval_size, seed: int,
                      batch_size: int, output, force: bool, threads, convert_rgb: bool, out, input_size, resize, mean, std,
                      interpolation, fit) -> dict:
    import onnx

    from vitc.artifacts import atomic_path, hold, write_json
    from vitc.calibration.data import DataSpec, load_tensors
    from vitc.compress.quantize import onnx_graph
    from vitc.models import onnx_source

    onnx_graph.check_config(config)
    n_threads = set_threads(threads)
    backbone = load_backbone(model, None, input_size, resize, mean, std, interpolation, fit)
    if backbone.preprocess_origin == "guess":
        err_console.print(f"[bold yellow]warning: {model} carries no preprocessing: calibrating with a guess "
                          f"({backbone.preprocess.fit}, ImageNet mean/std); pass --fit/--mean/--std if it was trained otherwise[/bold yellow]")
    output = Path(output) if output else Path("quantized") / f"{Path(model).stem}-w8a8"
    hold(output, force)  # claimed before calibration: a concurrent run on this -o fails now
    src = onnx_source.read(backbone.onnx_path, backbone.preprocess.input_size)
    calib_source = DataSpec(calib_data, None, calib_size, seed, convert_rgb).open()
    eval_source = DataSpec(data, str(labels) if labels else None, eval_size, seed, convert_rgb).open()
    with progress() as prog, tempfile.TemporaryDirectory() as tmp:
        task = prog.add_task("reading calibration images", total=None)
        x, _ = load_tensors(calib_source, backbone.preprocess, convert_rgb)
        prog.remove_task(task)
        qmodel, record = onnx_graph.quantize_model(src, config, x, n_threads, prog)
        console.print(onnx_graph.coverage_line(record), highlight=False)
        qdq = Path(tmp) / "model.qdq.onnx"
        onnx.save(qmodel, str(qdq))
        quantized = replace(backbone, onnx_path=qdq, transforms=[*backbone.transforms, record])
        with atomic_path(output, force=force, is_dir=True) as folder:
            arts = _export_both(quantized, folder, data, eval_size, batch_size, prog)
            fid = fidelity_vs_fp32(backbone, {"onnxruntime": folder / "model.onnx", "openvino": folder / "openvino" / "model.xml"},
                                   eval_source, batch_size, n_threads, convert_rgb, prog)
            result = {
                "model": str(model),
                "backend": "onnx",
                "task": fid.pop("task"),
                "config": record["config"],
                "calibration_data": calib_source.location,
                "calibration_images": record["calibration_images"],
                "calibration_s": record["calibration_s"],
                "coverage": record["coverage"],
                "reparameterised_norms": len(record["reparameterised_norms"]),
                "smoothed_inputs": len(record["smoothed_inputs"]),
                "bias_corrected": record["bias_corrected"],
                "activation_grids": record["activation_grids"],
                "eval_data": eval_source.location,
                "eval_images": len(eval_source),
                "fidelity": fid,
                "artifacts": arts,
                "threads": n_threads,
                "output": str(output),
            }
            write_json(folder / "quantize.json", {**result, "plan": record["plan"]})
    _print(result)
    if out:
        write_json(out, result)
    failed = [a for a in arts if a["status"] == "failed"]
    if failed:
        from vitc.errors import VitcError

        err = VitcError(f"{', '.join(a['target'] for a in failed)} artifact failed its parity check ({failed[0]['note']})",
                        f"the artifacts are kept in {output}, marked failed in their manifests")
        err.exit_code = 3
        raise err
    return result


def _export_both(quantized, folder: Path, data: str, eval_size, batch_size: int, prog) -> list[dict]:
    """The ONNX Runtime graph and the OpenVINO IR through ``vitc export``'s pipeline (manifest, parity)."""
    from vitc.export import ParityError, export_artifact

    rows = []
    for target, path in (("onnx", folder / "model.onnx"), ("openvino", folder / "openvino" / "model.xml")):
        try:
            art = export_artifact(quantized, target, path, force=True, data=data, eval_size=eval_size, progress=prog,
                                  batch_size=batch_size)
        except ParityError as exc:
            art = exc.artifact
        p = art.parity or {}
        rows.append({"target": target, "path": str(Path(folder.name) / art.path.relative_to(folder)), "status": art.status,
                     "parity": {k: p.get(k) for k in ("images", "pearson_mean", "cosine_worst", "top1_agreement",
                                                       "int8_compute_layers", "reference") if k in p},
                     "note": p.get("failure", "")})
    return rows


def fidelity_vs_fp32(backbone, artifacts: dict, source, batch_size: int, threads: int, convert_rgb: bool, prog) -> dict:
    """Each artifact against the FP32 file on the evaluation images: ``tasks.fidelity`` (and top-1 for logits)."""
    import torch

    from vitc import tasks
    from vitc.calibration.data import iter_batches, label_map
    from vitc.errors import VitcError
    from vitc.runtimes import open_session

    sessions = {"fp32": open_session(backbone.onnx_path, runtime="onnxruntime", threads=threads)}
    for name, path in artifacts.items():
        sessions[name] = open_session(path, runtime=name, threads=threads)
    outs = {k: [] for k in sessions}
    ys = []
    task_id = prog.add_task("fidelity against FP32", total=len(source))
    for x, y in iter_batches(source, backbone.preprocess, batch_size, convert_rgb):
        for k, s in sessions.items():
            outs[k].append(torch.as_tensor(s(x)).float())
        ys.append(y)
        prog.advance(task_id, len(y))
    prog.remove_task(task_id)
    ref = torch.cat(outs.pop("fp32"))
    y = torch.cat(ys)
    try:
        mapping = label_map(source, backbone.labels)
        labelled = bool(backbone.labels) and (y >= 0).all().item()
    except VitcError:
        mapping, labelled = None, False
    task = tasks.detect(ref, labelled, backbone.num_classes or None)
    result = {"task": task}
    if task == "classify" and mapping is not None:
        y = torch.from_numpy(mapping[y.numpy()])
    for k, chunks in outs.items():
        o = torch.cat(chunks)
        r = tasks.fidelity(o, ref)
        if task == "classify":
            r["top1_agreement"] = (o.argmax(-1) == ref.argmax(-1)).float().mean().item()
            r["fp32_top1"] = (ref.argmax(-1) == y).float().mean().item()
            r["top1"] = (o.argmax(-1) == y).float().mean().item()
            r["top1_drop"] = round(100 * (r["fp32_top1"] - r["top1"]), 3)
        result[k] = r
    return result


def _print(r: dict) -> None:
    c = r["coverage"]
    table = Table(title=f"quantize (ONNX graph): {r['model']} W8A8 ({r['config']['calibrator']}, {r['calibration_images']} images, "
                        f"{r['calibration_s']:.1f} s)")
    for col in ("runtime", "Pearson mean", "Pearson worst", "cosine worst", "SQNR mean (dB)", "top-1 (FP32)", "parity"):
        table.add_column(col)
    status = {a["target"]: a["status"] for a in r["artifacts"]}
    for k in ("onnxruntime", "openvino"):
        f = r["fidelity"][k]
        top1 = f"{pct(f['top1'])} ({pct(f['fp32_top1'])})" if "top1" in f else "-"
        table.add_row(k, f"{f['pearson_mean']:.5f}", f"{f['pearson_worst']:.5f}", f"{f['cosine_worst']:.5f}",
                      f"{f['sqnr_db_mean']:.1f}", top1, status.get("onnx" if k == "onnxruntime" else k, "-"))
    console.print(table)
    console.print(f"task: {r['task']}, {r['eval_images']} images of {r['eval_data']}; coverage {100 * c['flops_share']:.1f}% of "
                  f"matmul/conv FLOPs ({c['ops_quantized']}/{c['ops_total']} ops)", highlight=False)
    reasons: dict[str, list] = {}
    for s in c["left_float"]:
        reasons.setdefault(s["reason"], []).append(s)
    for reason, ops in reasons.items():
        flops = sum(s["flops"] for s in ops)
        console.print(f"  float: {len(ops)} op(s), e.g. {ops[0]['name']} ({flops / 1e6:.1f} MFLOPs in all): {reason}", highlight=False)
    console.print(f"wrote {r['output']}")
