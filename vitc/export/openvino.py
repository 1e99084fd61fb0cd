"""OpenVINO target: IR (``model.xml`` + ``model.bin``) converted from the checked ONNX graph.

Going through ONNX means one graph for every target (QDQ for quantized models, which
OpenVINO turns into FakeQuantize and then int8 kernels). FP32 IRs are saved with
``compress_to_fp16=False`` because ``save_model`` halves the weights by default; fp16
asks for that compression. Parity runs with ``INFERENCE_PRECISION_HINT=f32`` (the session
always sets it) so a CPU with bf16 does not silently lower an f32 model; for int8 models the
compiled model's runtime precisions must show int8 layers, not only the IR.
"""
from __future__ import annotations

from pathlib import Path

from vitc.errors import VitcError

SUFFIX = ".xml"
PRECISIONS = ("fp32", "fp16", "int8")
INT8_RUNTIME = ("i8", "u8")
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")


def pick_precision(requested: str | None, quant: dict | None) -> str:
    if quant is not None:
        if requested not in (None, "int8"):
            raise VitcError(f"the model is quantized ({quant['pass']}), so its OpenVINO IR is int8, not {requested}",
                            "drop --precision, or export the model from before quantization")
        return "int8"
    if requested == "int8":
        raise VitcError("an int8 OpenVINO IR needs a quantized model", "quantize it first (vitc quantize), then export")
    if requested not in (None, "fp32", "fp16"):
        raise VitcError(f"the openvino target writes fp32, fp16 or int8 (from quantized models), not {requested}",
                        "pass --precision fp32 or fp16")
    return requested or "fp32"


def preflight(backbone, opts, quant) -> None:
    from vitc.errors import require
    from vitc.export import onnx as onnx_target

    require("openvino", "openvino")
    onnx_target.preflight(backbone, opts, quant)
    from vitc.runtimes.cpu_isa import guard_int8_isa

    # Before the first compile in this process: oneDNN reads its ISA cap once, and int8 kernels
    # on a CPU that lists AMX without enabling it die with SIGILL.
    guard_int8_isa()


def output_names(stem: str) -> list[str]:
    return [f"{stem}.xml", f"{stem}.bin"]


def write(backbone, staging: Path, stem: str, opts, quant, progress=None):
    import openvino as ov

    from vitc.export import onnx as onnx_target
    from vitc.export.pipeline import Staged
    from vitc.runtimes import open_session

    onnx_path = staging / f".{stem}.from.onnx"
    info = {"onnx": onnx_target.write_onnx(backbone, onnx_path, opts, quant, progress=progress, runtime="openvino")}
    task = progress.add_task("converting to OpenVINO IR", total=None) if progress is not None else None
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:
        raise VitcError(f"OpenVINO cannot convert the graph ({_first_line(exc)})", "choose another --target, or report the model") from exc
    finally:
        onnx_path.unlink(missing_ok=True)
    if not opts.dynamic_batch:
        size = backbone.preprocess.input_size
        model.reshape({model.inputs[0]: ov.PartialShape([1, 3, size, size])})
    # weight-only models compute in float by request (A16): their remainder stays f32, not a measured bf16
    policy = opts.precision == "int8" and not (quant or {}).get("weight_only")
    if policy:
        info["float_precision_policy"] = _float_precision(model, backbone, progress)
    xml = staging / f"{stem}.xml"
    ov.save_model(model, str(xml), compress_to_fp16=opts.precision == "fp16")
    if task is not None:
        progress.remove_task(task)
    info.update({"exporter": {"name": "openvino.convert_model from ONNX", "version": ov.get_version()},
                 "ir_ops": _op_counts(model), "compress_to_fp16": opts.precision == "fp16",
                 "input": {"name": model.inputs[0].get_any_name(), "shape": str(model.inputs[0].get_partial_shape())}})
    checks = lambda session: runtime_precision_check(session, opts.precision)
    if quant is not None and quant.get("weight_only"):  # float compute on int4/int8 weights: check the weights instead
        from vitc.compress.quantize.weight_only import ir_weight_types, openvino_checks

        checks = openvino_checks(quant)
        info["weight_constants"] = ir_weight_types(model)
    # int8 IRs: parity runs under the precision the policy chose (the IR carries it); float IRs under f32
    hint = None if policy else "f32"
    return Staged(primary=xml, info=info, open_session=lambda p: open_session(p, runtime="openvino", precision=hint),
                  runtime_checks=checks)


def _float_precision(model, backbone, progress=None) -> dict:
    """The measured float precision of an int8 IR's remainder (``vitc.export.precision_policy``), stored in the IR."""
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.export import precision_policy

    task = progress.add_task("measuring the float precision of the int8 IR", total=None) if progress is not None else None
    images, _ = load_tensors(open_source("bundled:eval").select(8, 0), backbone.preprocess, convert_rgb=True)
    record = precision_policy.choose(model, images.numpy())
    precision_policy.record_in_ir(model, record["chosen"])
    if task is not None:
        progress.remove_task(task)
    return record


def runtime_precision_check(session, precision: str) -> dict:
    """What the compiled model really runs. Masks and indices run in u8 even in f32 models, so
    int8 is judged on the compute layers (convolutions, fully connected, matmuls) alone."""
    compute: dict[str, dict[str, int]] = {}
    for op in session.compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        layer = rt["layerType"].astype(str) if "layerType" in rt else "?"
        if layer in COMPUTE_LAYERS:
            prec = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else "?"
            compute.setdefault(layer, {})
            compute[layer][prec] = compute[layer].get(prec, 0) + 1
    int8_layers = sum(n for by_prec in compute.values() for p, n in by_prec.items() if p.lower() in INT8_RUNTIME)
    out = {"compute_layer_precisions": compute, "int8_compute_layers": int8_layers, "failures": []}
    fallbacks = getattr(session, "fallbacks", None)
    if fallbacks is not None:
        out["runtime_fallbacks"] = fallbacks()
        out["failures"] += out["runtime_fallbacks"]
    if precision == "int8" and int8_layers == 0:
        out["failures"].append("the compiled OpenVINO model runs no int8 compute layer: the quantization was lost")
    return out


def _op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in model.get_ops():
        t = op.get_type_name()
        counts[t] = counts.get(t, 0) + 1
    return dict(sorted(counts.items()))


def _first_line(exc: Exception) -> str:
    lines = [l for l in str(exc).splitlines() if l.strip()]
    return lines[0][:200] if lines else type(exc).__name__
