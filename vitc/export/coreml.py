"""CoreML target: an ``.mlpackage`` (ML program) converted through ``torch.export``.

FP16 compute by default; fp32 on request; int8 weights (W8A16) through
``coremltools.optimize``; a quantized backbone converts its fake-quantized graph as it is
(W8A8 where coremltools takes its quantize ops). Input and output stay float32 so the package
takes the same tensors as every other artifact. CoreML predicts only on macOS: elsewhere the
package is validated structurally (it loads as a spec; input, output, op types and weight
dtypes are what the precision promises) and prediction parity is skipped with that reason.
"""
from __future__ import annotations

import contextlib
import io
import platform
import warnings
from pathlib import Path

from vitc.errors import VitcError

SUFFIX = ".mlpackage"
PRECISIONS = ("fp16", "fp32", "int8")
INT8_WEIGHT_THRESHOLD = 256  # coremltools' default (2048 elements) would leave small models' layers in fp16
DEQUANTIZE_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")


def pick_precision(requested: str | None, quant: dict | None) -> str:
    if quant is not None:
        if requested not in (None, "int8"):
            raise VitcError(f"the model is quantized ({quant['pass']}), so its CoreML package is int8, not {requested}",
                            "drop --precision, or export the model from before quantization")
        return "int8"
    if requested not in (None, *PRECISIONS):
        raise VitcError(f"the coreml target writes fp16, fp32 or int8 (weights), not {requested}", "pass --precision fp16, fp32 or int8")
    return requested or "fp16"


def preflight(backbone, opts, quant) -> None:
    from vitc.errors import require

    from vitc.export.pipeline import TargetUnavailable

    if backbone.module is None:
        raise TargetUnavailable(f"the coreml target converts a PyTorch model through torch.export, and {backbone.source} is an ONNX file",
                        "pass the PyTorch model it was exported from (zoo:, hf:, module:factory, .pt2)")
    if quant is not None:
        # The quantize pass's simulation reads its scales as Python numbers, which torch.export
        # cannot capture, and coremltools takes no ONNX; activation quantization through
        # coremltools.optimize needs predictions, which run only on macOS.
        raise VitcError(f"the coreml target cannot take the {quant['pass']} pass's simulated int8 activations yet",
                        "export the float model with --target coreml --precision int8 (int8 weights), "
                        "or the quantized one to onnx, openvino or tensorrt")
    _quiet()
    require("coremltools", "coreml")


def output_names(stem: str) -> list[str]:
    return [f"{stem}{SUFFIX}"]


def _quiet() -> None:
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)


@contextlib.contextmanager
def _silenced():
    """coremltools draws tqdm bars on stderr during conversion; vitc shows its own progress."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def write(backbone, staging: Path, stem: str, opts, quant, progress=None):
    import numpy as np
    import torch

    from vitc.export.pipeline import Staged
    from vitc.runtimes import open_session

    _quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools as ct
    task = progress.add_task("converting to CoreML", total=None) if progress is not None else None
    size = backbone.preprocess.input_size
    module = backbone.module.eval()
    program = export_program(module, backbone.example_input(2), opts.dynamic_batch)
    check_ops(program)
    batch = ct.RangeDim(lower_bound=1, upper_bound=opts.max_batch, default=1) if opts.dynamic_batch else 1
    compute = ct.precision.FLOAT32 if opts.precision == "fp32" else ct.precision.FLOAT16
    try:
        with _silenced():
            mlmodel = ct.convert(program, inputs=[ct.TensorType(name="pixel_values", shape=(batch, 3, size, size), dtype=np.float32)],
                                 outputs=[ct.TensorType(name="logits", dtype=np.float32)], convert_to="mlprogram",
                                 compute_precision=compute, minimum_deployment_target=ct.target.iOS16, skip_model_load=True)
    except Exception as exc:
        hint = "pass --static-batch" if opts.dynamic_batch and "RangeDim" in str(exc) else "choose another --target, or report the model"
        raise VitcError(f"coremltools cannot convert the model ({_first_line(exc)})", hint) from exc
    weights = "fp32" if opts.precision == "fp32" else "fp16"
    if opts.precision == "int8" and quant is None:
        mlmodel = quantize_weights(mlmodel)
        weights = "int8 (per-channel symmetric), fp16 compute"
    path = staging / f"{stem}{SUFFIX}"
    mlmodel.save(str(path))
    structure = validate_package(path, size, opts.precision, opts.dynamic_batch, opts.max_batch)
    if task is not None:
        progress.remove_task(task)
    info = {"exporter": {"name": "coremltools.convert(torch.export program)", "version": ct.__version__},
            "compute_precision": "fp32" if opts.precision == "fp32" else "fp16", "weights": weights,
            "minimum_deployment_target": "iOS16", "structure": structure}
    if platform.system() == "Darwin":
        return Staged(primary=path, info=info, open_session=lambda p: open_session(p, runtime="coreml"))
    return Staged(primary=path, info=info,
                  not_run_reason=f"CoreML predicts only on macOS and this is {platform.system()}: prediction parity was "
                                 "skipped; the package was validated structurally (export.structure in this manifest)")


def export_program(module, x, dynamic_batch: bool):
    import torch

    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (x if dynamic_batch else x[:1],), dynamic_shapes=dynamic, strict=False)
            program = program.run_decompositions({})
    except Exception as exc:
        text = _first_line(exc)
        if dynamic_batch and _exports_with_static_batch(module, x):
            raise VitcError(f"the model fixes its batch size, so CoreML cannot take a dynamic batch ({text[:160]})",
                            "pass --static-batch") from exc
        raise VitcError(f"torch.export cannot capture the model for CoreML ({text[:160]})", "choose another --target") from exc
    return program


def _exports_with_static_batch(module, x) -> bool:
    import torch

    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.export.export(module, (x[:1],), strict=False)
        return True
    except Exception:
        return False


def check_ops(program) -> None:
    """Name the first op coremltools has no converter for, and the layer that calls it."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import is_torch_fx_node_supported

    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        try:
            supported = is_torch_fx_node_supported(node)
        except AssertionError:  # an in-place op: coremltools only takes functional ones
            supported = False
        if not supported:
            op = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            stack = node.meta.get("nn_module_stack") or {}
            layer = list(stack.values())[-1][0] if stack else ""
            raise VitcError(f"the coreml target cannot take op '{op}'" + (f" used by layer '{layer}'" if layer else ""),
                            "replace that op in the model, or choose another --target")


def quantize_weights(mlmodel):
    import coremltools.optimize.coreml as cto

    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=INT8_WEIGHT_THRESHOLD))
    with _silenced():
        return cto.linear_quantize_weights(mlmodel, config)


def validate_package(path: Path, size: int, precision: str, dynamic_batch: bool, max_batch: int) -> dict:
    """Load the package as a spec and check what the precision promises; raise on the first broken promise."""
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as exc:
        raise VitcError(f"the written package does not load as a CoreML spec ({_first_line(exc)})", "report the model") from exc
    problems = []
    if spec.WhichOneof("Type") != "mlProgram":
        problems.append(f"it is a {spec.WhichOneof('Type')}, not an ML program")
    inputs, outputs = list(spec.description.input), list(spec.description.output)
    if [i.name for i in inputs] != ["pixel_values"] or [o.name for o in outputs] != ["logits"]:
        problems.append(f"inputs {[i.name for i in inputs]} and outputs {[o.name for o in outputs]} are not pixel_values -> logits")
    arr = inputs[0].type.multiArrayType if inputs else None
    in_shape = list(arr.shape) if arr is not None else []
    dtype_name = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.Name(arr.dataType) if arr is not None else "?"
    if in_shape[1:] != [3, size, size] or dtype_name != "FLOAT32":
        problems.append(f"the input is {dtype_name} {in_shape}, not FLOAT32 [N, 3, {size}, {size}]")
    batch_range = None
    if arr is not None and arr.WhichOneof("ShapeFlexibility") == "shapeRange":
        r = arr.shapeRange.sizeRanges[0]
        batch_range = [int(r.lowerBound), int(r.upperBound)]
    if dynamic_batch and batch_range != [1, max_batch]:
        problems.append(f"the batch range is {batch_range}, not [1, {max_batch}]")
    ops: dict[str, int] = {}
    weight_dtypes: dict[str, int] = {}
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                ops[op.type] = ops.get(op.type, 0) + 1
                for name, attr in op.attributes.items():
                    if attr.WhichOneof("value") == "blobFileValue":  # stored weights, not small immediates
                        dt = MIL_pb2.DataType.Name(attr.type.tensorType.dataType)
                        weight_dtypes[dt] = weight_dtypes.get(dt, 0) + 1
    want = {"fp32": {"FLOAT32"}, "fp16": {"FLOAT16"}}.get(precision)
    if want is not None and set(weight_dtypes) - want:
        problems.append(f"weights are stored as {sorted(weight_dtypes)}, not only {sorted(want)}")
    if precision == "int8" and not (any(ops.get(o) for o in DEQUANTIZE_OPS) or "INT8" in weight_dtypes):
        problems.append("no weight is stored in int8")
    if problems:
        raise VitcError(f"the CoreML package fails structural validation: {'; '.join(problems)}", "report the model")
    return {"type": "mlProgram", "spec_version": int(spec.specificationVersion), "input": {"name": "pixel_values",
            "dtype": dtype_name, "shape": in_shape, "batch_range": batch_range},
            "output": {"name": "logits"}, "op_types": dict(sorted(ops.items())), "weight_dtypes": weight_dtypes}


def _first_line(exc: Exception) -> str:
    lines = [l for l in str(exc).splitlines() if l.strip()]
    return lines[0][:200] if lines else type(exc).__name__
