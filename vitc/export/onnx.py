"""ONNX target: ``model.onnx``, opset 17+, a dynamic batch axis by default, ``onnx.checker`` clean.

FP32 models go through ``torch.onnx.export(dynamo=False)``: at torch 2.13 the TorchScript
exporter writes the requested opset exactly, checker-clean (full check) and with a symbolic
batch axis for the transformers ViT, MobileViT and ResNet families, in well under a second;
the dynamo exporter takes 4-10 s on the same tiny models and writes opset 18 even when 17
is asked (its down-conversion fails on Reduce* axes). The dynamo exporter remains the
fallback for modules the TorchScript tracer cannot take (``torch.export`` programs, ...).
Quantized backbones are written as QDQ graphs by ``vitc.export.qdq`` and integer-only ones
by ``vitc.export.integer_onnx`` (both owned by the quantization helpers).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from vitc.backbone import mha_fast_path_off
from vitc.errors import MissingExtraError, VitcError

SUFFIX = ".onnx"
PRECISIONS = ("fp32", "int8")
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"


def pick_precision(requested: str | None, quant: dict | None) -> str:
    if quant is not None:
        if requested not in (None, "int8"):
            raise VitcError(f"the model is quantized ({quant['pass']}), so its ONNX graph is int8, not {requested}",
                            "drop --precision, or export the model from before quantization")
        return "int8"
    if requested not in (None, "fp32"):
        hint = "; int8 comes from quantizing the model first" if requested == "int8" else \
            "; for fp16 use --target openvino, coreml or tensorrt"
        raise VitcError(f"the onnx target writes fp32 graphs, not {requested}{hint}", "drop --precision or pass fp32")
    return "fp32"


def preflight(backbone, opts, quant) -> None:
    for module in ("onnx", "onnxruntime"):
        _require(module)
    if backbone.module is None:
        check_onnx_source(backbone, opts)


def output_names(stem: str) -> list[str]:
    return [f"{stem}{SUFFIX}"]


def write(backbone, staging: Path, stem: str, opts, quant, progress=None, fused_attention: bool = True):
    """The ONNX Runtime artifact. Where ``fuse_attention`` put ORT's float attention kernel in a
    quantized graph (not exact: the simulation quantizes the attention operands), the artifact
    carries a fallback without it, which the pipeline writes when the fused one fails parity."""
    from dataclasses import replace

    from vitc.export.pipeline import Staged
    from vitc.export.qdq_speed import SpeedConfig
    from vitc.runtimes import open_session

    path = staging / f"{stem}{SUFFIX}"
    speed = replace(SpeedConfig.for_runtime("onnxruntime"), fused_attention=fused_attention)
    info = write_onnx(backbone, path, opts, quant, progress=progress, speed=speed)
    fused = info["op_types"].get("MultiHeadAttention", 0) if quant is not None else 0
    if quant is not None:
        info["attention_core"] = (f"float32 in ONNX Runtime's MultiHeadAttention kernel ({fused} fused), where the "
                                  "simulation quantizes q and k; kept because it passed parity") if fused else "as quantized"
    fallback = None
    if fused:
        def fallback():
            path.unlink(missing_ok=True)
            staged = write(backbone, staging, stem, opts, quant, progress=progress, fused_attention=False)
            staged.info["attention_core"] = "as quantized (the fused float attention failed parity; see parity.fallback)"
            return staged
    return Staged(primary=path, info=info, open_session=lambda p: open_session(p, runtime="onnxruntime"), fallback=fallback)


def _require(module: str):
    from vitc.errors import require

    return require(module, "onnx")


def check_onnx_source(backbone, opts) -> None:
    """A backbone loaded from an ONNX file is re-exported as it is: it must honour the batch request."""
    import onnx

    graph = onnx.load(str(backbone.onnx_path), load_external_data=False).graph
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    if opts.dynamic_batch and not batch.dim_param:
        raise VitcError(f"{backbone.onnx_path} has a fixed batch of {batch.dim_value}, so it cannot be exported with a dynamic batch",
                        "pass --static-batch, or export the PyTorch model it came from")


def write_onnx(backbone, path: Path, opts, quant, progress=None, runtime: str = "onnxruntime", speed=None) -> dict:
    """Write ``backbone`` as an ONNX graph at ``path``; return facts for the manifest.
    ``runtime`` ("onnxruntime", "openvino", "tensorrt"): who runs the graph, which picks the speed
    rewrites of a quantized graph (``qdq_speed.SpeedConfig.for_runtime``, or ``speed`` when given);
    for "openvino" (converted to IR next) quantized graphs keep shared Q/DQ pairs."""
    from vitc.export.qdq_speed import SpeedConfig

    for_openvino = runtime == "openvino"
    speed = speed or SpeedConfig.for_runtime(runtime)
    import onnx
    import torch

    task = progress.add_task("exporting onnx", total=None) if progress is not None else None
    source_io = None
    if backbone.module is None:
        exporter, source_io = _write_from_onnx(backbone, path, quant, for_openvino, speed)
    elif quant is not None:
        exporter = _write_quantized(backbone, path, opts, quant, for_openvino, speed)
    else:
        exporter = _torch_export(backbone, path, opts)
    model = onnx.load(str(path))
    if opts.simplify:
        model = _simplify(model)
        onnx.save(model, str(path))
    folded = []
    if backbone.module is not None and quant is None:  # the QDQ writers and _write_from_onnx fold their own graphs
        from vitc.models.onnx_fold import fold_input_independent

        folded = fold_input_independent(model, backbone.preprocess.input_size)
        if folded:
            onnx.save(model, str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise VitcError(f"the exported ONNX graph does not pass onnx.checker ({str(exc).splitlines()[0][:160]})",
                        "report it with the model; try --target openvino or --simplify") from exc
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < opts.opset and backbone.module is not None:
        raise VitcError(f"the exporter wrote opset {opset}, older than the {opts.opset} asked for", "report it with the model")
    _check_batch(path, model, backbone, opts)
    if task is not None:
        progress.remove_task(task)
    io = source_io or {"input": _io(model.graph.input[0]), "output": _io(model.graph.output[0])}
    return {"exporter": exporter, "opset": opset, "nodes": len(model.graph.node), "simplified": opts.simplify,
            "folded_constants": folded,
            "op_types": _op_counts(model), **io}


def _write_from_onnx(backbone, path: Path, quant: dict | None, for_openvino: bool, speed) -> tuple[dict, dict]:
    """A model given as an ONNX file, written as it is (opset < 13 upgraded, external data inlined);
    a graph quantized by the ONNX backend gets the target's exact speed rewrites
    (``qdq_speed.SpeedConfig.for_runtime``) and, for ONNX Runtime, one Q/DQ pair per consumer (it
    keeps its shared pairs for OpenVINO). Returns (exporter facts, the graph's real input/output)."""
    import onnx

    from vitc.models import onnx_source

    src = onnx_source.read(backbone.onnx_path, backbone.preprocess.input_size)
    model = src.model
    note = "copy of the source ONNX file" + (f", upgraded from opset {src.original_opset}" if src.upgraded else "")
    if quant is not None and quant.get("backend") == "onnx":
        from vitc.export.qdq_speed import apply_speed

        rewrites = {k: v for k, v in apply_speed(model, speed).items() if v}
        if not for_openvino:
            from vitc.export.qdq import split_shared_activation_qdq

            split_shared_activation_qdq(model)
            note += ", shared activation Q/DQ split per consumer (ONNX Runtime fuses DQ -> MatMul only then)"
        if rewrites:
            note += ", exact speed rewrites " + ", ".join(f"{k} x{v}" for k, v in rewrites.items())
    elif quant is None:
        from vitc.models.onnx_fold import fold_input_independent

        folded = fold_input_independent(model, src.input_size)
        if folded:
            note += f", {len(folded)} image-independent subgraph(s) folded into constants (e.g. {folded[0]})"
    onnx.save(model, str(path))
    shapes = onnx_source.run_shapes(onnx_source.with_fixed_input(model, src.input_name, src.fixed_batch or 1, src.input_size),
                                    src.input_name, src.fixed_batch or 1, src.input_size, [o["name"] for o in src.outputs])
    # the graph's own name for a dynamic batch axis (e.g. "N"), else "batch"; a fixed batch as its number
    batch = src.fixed_batch if src.fixed_batch is not None else (src.input_shape[0] if isinstance(src.input_shape[0], str) and src.input_shape[0] else "batch")
    outputs = [{"name": o["name"], "dtype": o["dtype"], "shape": [batch, *shapes[o["name"]][1:]]} for o in src.outputs]
    io = {"input": {"name": src.input_name, "dtype": src.input_dtype,
                    "shape": [batch, 3, src.input_size, src.input_size] if not isinstance(src.input_shape[2], int) else
                    [batch, *src.input_shape[1:]]},
          "output": outputs[0], "outputs": outputs}
    return {"name": note, "version": onnx.__version__}, io


def _torch_export(backbone, path: Path, opts) -> dict:
    import torch

    module = backbone.module.eval()
    x = backbone.example_input(2)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if opts.dynamic_batch else None
    try:
        with warnings.catch_warnings(), torch.no_grad(), mha_fast_path_off():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x if opts.dynamic_batch else x[:1],), str(path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opts.opset, dynamic_axes=dynamic_axes,
                              dynamo=False, do_constant_folding=True)
        return {"name": "torch.onnx.export (TorchScript)", "version": torch.__version__}
    except torch.onnx.errors.UnsupportedOperatorError as exc:
        path.unlink(missing_ok=True)
        raise _unsupported_op_error("onnx", module, x, exc) from exc
    except Exception as exc:  # the tracer cannot take the module: try torch.export
        from vitc.artifacts import find_disk_error

        if find_disk_error(exc):  # a full disk is not the tracer's fault: no second exporter, no more warnings
            path.unlink(missing_ok=True)
            raise
        first_error = exc
    path.unlink(missing_ok=True)
    try:
        dyn = ({0: torch.export.Dim("batch", min=1, max=4096)},) if opts.dynamic_batch else None
        with warnings.catch_warnings(), torch.no_grad(), mha_fast_path_off():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x if opts.dynamic_batch else x[:1],), str(path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opts.opset, dynamic_shapes=dyn, dynamo=True,
                              external_data=False, verbose=False)
        return {"name": "torch.onnx.export (dynamo)", "version": torch.__version__}
    except Exception:
        path.unlink(missing_ok=True)
    raise _unsupported_op_error("onnx", module, x, first_error) from first_error


def _unsupported_op_error(target: str, module, x, exc: Exception) -> VitcError:
    """A one-line error naming the op the exporter refused and the layer that uses it."""
    import re

    text = str(exc)
    m = re.search(r"operator '(?:aten::)?([\w.]+)'", text) or re.search(r"aten[.:]+(\w+)", text)
    if m is None:
        return VitcError(f"torch cannot export the model to {target} ({text.splitlines()[0][:200]})",
                         "run again with --debug for the traceback")
    op = m.group(1)
    layer = layer_using(module, x, op)
    return VitcError(f"the {target} target cannot take op '{op}'" + (f" used by layer '{layer}'" if layer else ""),
                     "replace that op in the model, or choose another --target")


def layer_using(module, x, op: str) -> str | None:
    """The module path (``model.encoder.layer.0``, or its class for the root) whose forward calls ``op``."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, (x[:1],), strict=False)
    except Exception:
        return None
    for node in ep.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", str(node.target)).split(".")[0] == op:
            stack = node.meta.get("nn_module_stack") or {}
            if not stack:
                return type(module).__name__
            path, cls = list(stack.values())[-1]
            cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
            return f"{path} ({cls_name.rsplit('.', 1)[-1]})" if path else cls_name.rsplit(".", 1)[-1]
    return None


def _write_quantized(backbone, path: Path, opts, quant: dict, for_openvino: bool, speed) -> dict:
    import importlib

    kind = quant["pass"]
    module_name, fn_name = {"quantize": ("vitc.export.qdq", "export_qdq_onnx"),
                            "integer": ("vitc.export.integer_onnx", "export_integer_onnx")}[kind]
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise VitcError(f"this vitc has no ONNX writer for {kind}d models ({module_name}.{fn_name} is missing)",
                        "export the model from before the quantization pass, or update vitc") from exc
    if kind == "quantize":
        fn(backbone, path, opts.opset, opts.dynamic_batch, split_shared_inputs=not for_openvino, speed=speed)
    else:
        fn(backbone, path, opts.opset, opts.dynamic_batch)
    if not path.exists():
        raise VitcError(f"{module_name}.{fn_name} wrote no file at {path}", "report it as a bug, with --debug")
    return {"name": f"{module_name}.{fn_name}", "version": _vitc_version()}


def _vitc_version() -> str:
    from vitc.export.manifest import vitc_version

    return vitc_version()


def _simplify(model):
    """Constant folding and dead-code removal (onnxscript's optimizer; it keeps the opset)."""
    try:
        import onnxscript.optimizer as optimizer
    except ImportError as exc:
        raise MissingExtraError("onnxscript", "onnx") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optimizer.optimize(model)


def _check_batch(path: Path, model, backbone, opts) -> None:
    """A dynamic batch is a promise: run batch 1 and 3 through onnxruntime before writing it down."""
    import numpy as np
    import onnxruntime as ort

    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if not opts.dynamic_batch:
        return
    if not dim.dim_param:
        raise VitcError(f"the exporter fixed the batch of {path.name} at {dim.dim_value}", "pass --static-batch")
    size = backbone.preprocess.input_size
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for n in (1, 3):
            out = sess.run(None, {sess.get_inputs()[0].name: np.zeros((n, 3, size, size), np.float32)})[0]
            if out.shape[0] != n:
                raise RuntimeError(f"batch {n} gave {out.shape[0]} rows")
    except Exception as exc:
        raise VitcError(f"the model fixes its batch size, so it cannot be exported with a dynamic batch ({str(exc).splitlines()[0][:120]})",
                        "pass --static-batch") from exc


def _op_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _io(value_info) -> dict:
    import onnx

    t = value_info.type.tensor_type
    return {"name": value_info.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
