"""CoreML target: an ``.mlpackage`` (ML program) converted through ``torch.export``.

FP16 compute by default; fp32 on request; int8 weights (W8A16) through
``coremltools.optimize``. A model quantized by ``vitc quantize --bits 8`` becomes a W8A8
package that reproduces vitc's simulation, not a re-calibration (coremltools' activation
calibration needs predictions, which run only on macOS): the simulation modules switch to
their ``torch.export`` form (``set_decomposed_export``: int8 weight codes with the pass's
per-channel scales, activation quantize/dequantize with its calibrated scales as constants),
which coremltools' torch frontend converts to ``constexpr_affine_dequantize`` weights and MIL
``quantize``/``dequantize`` ops (iOS17+). Before converting, the exported program is run on 64
bundled images against the simulation (``pre_conversion_parity`` in the manifest).

Input and output stay float32 so the package takes the same tensors as every other artifact.
CoreML predicts only on macOS: elsewhere the package is validated structurally (it loads as a
spec; input, output, op types and weight dtypes are what the precision promises; a W8A8
package holds its int8 weights and one quantize/dequantize pair per distinct activation grid)
and prediction parity is skipped with that reason.
"""
from __future__ import annotations

import contextlib
import copy
import io
import platform
import warnings
from pathlib import Path

from vitc.errors import VitcError

SUFFIX = ".mlpackage"
PRECISIONS = ("fp16", "fp32", "int8")
QUANTIZED = "w8a8"  # the precision of a quantized model's package
INT8_WEIGHT_THRESHOLD = 256  # coremltools' default (2048 elements) would leave small models' layers in fp16
DEQUANTIZE_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")
# ops that move a dequantized tensor without computing on it: an int8 kernel still reads its input
LAYOUT_OPS = ("reshape", "transpose", "squeeze", "expand_dims")
PARITY_IMAGES = 64
PARITY_DATA = "bundled:eval"
# the exported program runs the simulation's own arithmetic; anything above float noise is a bug
PARITY_ATOL = 1e-4
# the package stores scales in fp16 (FP16 compute): half an fp16 ulp is 2**-11 relative
SCALE_RTOL = 1e-3


def pick_precision(requested: str | None, quant: dict | None) -> str:
    if quant is not None:
        if requested not in (None, "int8", QUANTIZED):
            raise VitcError(f"the model is quantized ({quant['pass']}), so its CoreML package is {QUANTIZED}, not {requested}",
                            "drop --precision, or export the model from before quantization")
        return QUANTIZED
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
        check_w8a8(quant)
    _quiet()
    require("coremltools", "coreml")


def check_w8a8(quant: dict) -> None:
    """Refuse, naming the layer, what a CoreML int8 quantize op cannot express: only uniform
    per-tensor 8-bit activation grids and 8-bit weights have an int8 form there."""
    if quant.get("pass") != "quantize":
        # integer-only models replace softmax/GELU/LayerNorm by integer kernels CoreML has no ops for
        raise VitcError(f"the coreml target takes the quantize pass's W8A8 models, not the {quant.get('pass')} pass's",
                        "quantize without --integer-only (vitc quantize --bits 8) for CoreML, or export this model with --target onnx")
    if quant.get("weight_only"):  # issue 18: int4/int8 weight-only models export to onnx and openvino
        raise VitcError("the coreml target does not take weight-only (--abits 16) models yet",
                        "export it with --target onnx or --target openvino, or quantize with --bits 8 for CoreML")
    for name, spec in (quant.get("layers") or {}).items():
        grids = {"input": spec["input"]} if "input" in spec else {k: spec[k] for k in ("q", "k", "probs", "v")}
        if spec.get("wbits", 8) != 8:
            raise VitcError(f"layer '{name}' has {spec['wbits']}-bit weights; the coreml W8A8 export takes 8-bit models only",
                            "quantize with --bits 8, or keep the low-bit model in the PyTorch simulation (vitc eval)")
        for which, g in grids.items():
            if g["kind"] != "uniform":
                raise VitcError(f"layer '{name}' quantizes its {which} on a {g['kind']} grid, which CoreML's int8 "
                                "quantize op cannot express",
                                "quantize with --bits 8 and its default uniform grids (not --softmax log2/logsqrt2/adalog or --gelu twin)")
            if g["bits"] != 8 or g.get("granularity") == "channel":
                raise VitcError(f"layer '{name}' quantizes its {which} to {g['bits']} bits"
                                f"{' per channel' if g.get('granularity') == 'channel' else ''}; the coreml W8A8 export "
                                "takes 8-bit per-tensor activations only", "quantize with --bits 8")


def expected_quant_ops(quant: dict) -> dict:
    """What the quant record promises the package holds: one int8 weight per quantized layer
    and one activation quantizer per grid (a layer's input; q, k, probabilities and v per attention)."""
    layers = quant.get("layers") or {}
    return {"int8_weights": sum("input" in spec for spec in layers.values()),
            "activation_quantizers": sum(1 if "input" in spec else 4 for spec in layers.values()),
            "attention_matmuls": 2 * sum("input" not in spec for spec in layers.values())}


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
    w8a8 = opts.precision == QUANTIZED
    module = backbone.module.eval()
    if w8a8:
        from vitc.compress.quantize.modules import set_decomposed_export

        module = copy.deepcopy(module)
        set_decomposed_export(module, True)
    program = export_program(module, backbone.example_input(2), opts.dynamic_batch)
    check_ops(program)
    pre_parity = pre_conversion_parity(backbone, program, opts.dynamic_batch)
    expected = None
    if w8a8:
        expected = {**expected_quant_ops(quant), **program_quant_ops(program)}
        if expected["program_quantize_ops"] != expected["activation_quantizers"]:
            raise VitcError(f"the exported program quantizes {expected['program_quantize_ops']} activations, but the quant "
                            f"record has {expected['activation_quantizers']}", "report the model")
    # MIL's quantize/dequantize ops exist from iOS17 on
    target = ct.target.iOS17 if w8a8 else ct.target.iOS16
    batch = ct.RangeDim(lower_bound=1, upper_bound=opts.max_batch, default=1) if opts.dynamic_batch else 1
    compute = ct.precision.FLOAT32 if opts.precision == "fp32" else ct.precision.FLOAT16
    try:
        with _silenced():
            mlmodel = ct.convert(program, inputs=[ct.TensorType(name="pixel_values", shape=(batch, 3, size, size), dtype=np.float32)],
                                 outputs=[ct.TensorType(name="logits", dtype=np.float32)], convert_to="mlprogram",
                                 compute_precision=compute, minimum_deployment_target=target, skip_model_load=True)
    except Exception as exc:
        hint = "pass --static-batch" if opts.dynamic_batch and "RangeDim" in str(exc) else "choose another --target, or report the model"
        raise VitcError(f"coremltools cannot convert the model ({_first_line(exc)})", hint) from exc
    weights = "fp32" if opts.precision == "fp32" else "fp16"
    if opts.precision == "int8" and quant is None:
        mlmodel = quantize_weights(mlmodel)
        weights = "int8 (per-channel symmetric), fp16 compute"
    if w8a8:
        weights = "int8 (the quantize pass's per-channel scales, zero point 0); activations int8 at its calibrated scales"
    path = staging / f"{stem}{SUFFIX}"
    mlmodel.save(str(path))
    structure = validate_package(path, size, opts.precision, opts.dynamic_batch, opts.max_batch, expected=expected,
                                 scales=vitc_scales(program, module) if w8a8 else None)
    if task is not None:
        progress.remove_task(task)
    info = {"exporter": {"name": "coremltools.convert(torch.export program)", "version": ct.__version__},
            "compute_precision": "fp32" if opts.precision == "fp32" else "fp16", "weights": weights,
            "minimum_deployment_target": "iOS17" if w8a8 else "iOS16", "pre_conversion_parity": pre_parity,
            "structure": structure}
    if platform.system() == "Darwin":
        return Staged(primary=path, info=info, open_session=lambda p: open_session(p, runtime="coreml"))
    checked = "the package was validated structurally"
    if w8a8:
        f = structure["w8a8"]
        checked += (f" ({f['int8_weight_constants']} int8 weights, {f['quantize_ops']} activation quantize/dequantize "
                    f"pairs for the {expected['activation_quantizers']} quantizers, at vitc's scales)")
    checked += (f" and the torch.export program it was converted from matches PyTorch on {pre_parity['images']} images "
                f"(max |logit diff| {pre_parity['max_abs_logit_diff']:.2g}); see export.structure and "
                "export.pre_conversion_parity in the manifest")
    return Staged(primary=path, info=info,
                  not_run_reason=f"CoreML predicts only on macOS and this is {platform.system()}: prediction parity was "
                                 f"skipped; {checked}")


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


def pre_conversion_parity(backbone, program, dynamic_batch: bool = True) -> dict:
    """Run the program coremltools converts on real images against the backbone (the simulation,
    for a quantized model): CoreML itself predicts only on macOS, so this is what Linux can check."""
    import torch

    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source

    x = load_tensors(open_source(PARITY_DATA).select(PARITY_IMAGES, seed=0), backbone.preprocess)[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = program.module()
        # a static-batch program is specialised to one image; the reference runs the same batches,
        # since float kernels round differently by batch size and int8 grids amplify that
        chunks = x.split(x.shape[0]) if dynamic_batch else x.split(1)
        reference = torch.cat([backbone(chunk) for chunk in chunks])
        outs = [run(chunk) for chunk in chunks]
    exported = torch.cat([o[0] if isinstance(o, (tuple, list)) else o for o in outs])
    diff = (exported - reference).abs()
    result = {"data": PARITY_DATA, "images": int(x.shape[0]), "max_abs_logit_diff": float(diff.max()),
              "mean_abs_logit_diff": float(diff.mean()),
              "top1_agreement": float((exported.argmax(-1) == reference.argmax(-1)).float().mean()), "atol": PARITY_ATOL}
    if not result["max_abs_logit_diff"] <= PARITY_ATOL:
        raise VitcError(f"the torch.export program differs from the PyTorch model by {result['max_abs_logit_diff']:.3g} "
                        f"in the logits on {result['images']} images (tolerance {PARITY_ATOL})", "report the model")
    return result


def program_quant_ops(program) -> dict:
    """Activation quantize ops in the exported program, and how many distinct ones CoreML keeps:
    quantizers on the same tensor with the same grid (a block's q, k and v projections read one
    normed input) are one op after coremltools' common-subexpression passes."""
    quantize = [n for n in program.graph.nodes
                if n.op == "call_function" and "quantized_decomposed.quantize_per_tensor" in str(n.target)]
    distinct = {(n.args[0].name, *(a for a in n.args[1:])) for n in quantize}
    return {"program_quantize_ops": len(quantize), "distinct_activation_quantizers": len(distinct)}


def vitc_scales(program, module) -> dict:
    """The grids the package must carry: each distinct activation quantizer's (scale, zero point)
    and every quantized layer's per-output-channel weight scales, as the quantize pass set them."""
    import numpy as np

    from vitc.compress.quantize.modules import weighted_layers

    quantize = [n for n in program.graph.nodes
                if n.op == "call_function" and "quantized_decomposed.quantize_per_tensor" in str(n.target)]
    distinct = {(n.args[0].name, float(n.args[1]), int(n.args[2])) for n in quantize}
    weights = [layer.weight_scale.detach().numpy().ravel() for layer in weighted_layers(module).values() if layer.quantized]
    return {"activation": np.array(sorted((s, z) for _, s, z in distinct), dtype=np.float64).reshape(-1, 2),
            "weight": np.sort(np.concatenate(weights)) if weights else np.zeros(0)}


def package_scales(path: Path) -> dict:
    """The same grids as stored in the package (its quantize ops and int8 weight constants)."""
    import numpy as np
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    program = load_mil(spec, spec.specificationVersion, str(Path(path) / "Data" / "com.apple.CoreML" / "weights"))
    ops = [op for f in program.functions.values() for op in f.operations]
    act = [(float(np.ravel(op.scale.val)[0]), int(np.ravel(op.zero_point.val)[0]) if op.zero_point is not None else 0)
           for op in ops if op.op_type == "quantize"]
    weights = [np.ravel(op.scale.val).astype(np.float64) for op in ops if op.op_type in DEQUANTIZE_OPS]
    return {"activation": np.array(sorted(act), dtype=np.float64).reshape(-1, 2),
            "weight": np.sort(np.concatenate(weights)) if weights else np.zeros(0)}


def compare_scales(want: dict, have: dict) -> tuple[dict, list[str]]:
    """Match the package's grids to vitc's as multisets: same count, zero points equal, scales
    within fp16 rounding. Sorted order pairs them up without names (MIL renames every op)."""
    import numpy as np

    facts, problems = {}, []
    for kind in ("activation", "weight"):
        w, h = want[kind], have[kind]
        if len(w) != len(h):
            problems.append(f"{len(h)} {kind} scales in the package, not the {len(w)} vitc calibrated")
            continue
        ws, hs = (w[:, 0], h[:, 0]) if kind == "activation" else (w, h)
        rel = float(np.max(np.abs(hs - ws) / np.abs(ws))) if len(ws) else 0.0
        facts[kind] = {"count": int(len(ws)), "max_rel_diff": rel}
        if not rel <= SCALE_RTOL:
            problems.append(f"{kind} scales differ from vitc's by up to {rel:.2g} (relative), more than fp16 rounding")
        if kind == "activation" and not np.array_equal(w[:, 1], h[:, 1]):
            problems.append("activation zero points differ from vitc's")
    return facts, problems


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
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, is_torch_fx_node_supported
    from coremltools.converters.mil.frontend.torch.utils import sanitize_op_kind

    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        try:
            # the registry's check drops the namespace, but ops outside aten (quantized_decomposed)
            # are registered under their qualified name, which is how the converter looks them up
            supported = is_torch_fx_node_supported(node) or sanitize_op_kind(str(node.target)) in _TORCH_OPS_REGISTRY
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


def validate_package(path: Path, size: int, precision: str, dynamic_batch: bool, max_batch: int,
                     expected: dict | None = None, scales: dict | None = None) -> dict:
    """Load the package as a spec and check what the precision promises; raise on the first broken promise.

    ``expected`` (W8A8): the counts from the quant record and the exported program that the
    package's int8 weights and quantize/dequantize ops must match; ``scales``: vitc's grids
    (``vitc_scales``), which the package's must equal up to fp16 rounding."""
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
    operations = [op for function in spec.mlProgram.functions.values()
                  for block in function.block_specializations.values() for op in block.operations]
    for op in operations:
        ops[op.type] = ops.get(op.type, 0) + 1
        for name, attr in op.attributes.items():
            if attr.WhichOneof("value") == "blobFileValue":  # stored weights, not small immediates
                dt = MIL_pb2.DataType.Name(attr.type.tensorType.dataType)
                weight_dtypes[dt] = weight_dtypes.get(dt, 0) + 1
    want = {"fp32": {"FLOAT32"}, "fp16": {"FLOAT16"}, QUANTIZED: {"FLOAT16", "INT8"}}.get(precision)
    if want is not None and set(weight_dtypes) - want:
        problems.append(f"weights are stored as {sorted(weight_dtypes)}, not only {sorted(want)}")
    if precision == "int8" and not (any(ops.get(o) for o in DEQUANTIZE_OPS) or "INT8" in weight_dtypes):
        problems.append("no weight is stored in int8")
    w8a8 = None
    if precision == QUANTIZED:
        w8a8 = w8a8_facts(operations)
        problems += w8a8_problems(w8a8, expected or {})
        if scales is not None:
            w8a8["scales"], scale_problems = compare_scales(scales, package_scales(path))
            problems += scale_problems
    if problems:
        raise VitcError(f"the CoreML package fails structural validation: {'; '.join(problems)}", "report the model")
    out = {"type": "mlProgram", "spec_version": int(spec.specificationVersion), "input": {"name": "pixel_values",
           "dtype": dtype_name, "shape": in_shape, "batch_range": batch_range},
           "output": {"name": "logits"}, "op_types": dict(sorted(ops.items())), "weight_dtypes": weight_dtypes}
    if w8a8 is not None:
        out["w8a8"] = {**w8a8, "expected": expected}
    return out


def w8a8_facts(operations) -> dict:
    """Counts that show a package runs W8A8: int8 weight constants, activation quantize/dequantize
    ops, and the linear/conv/matmul ops whose operands all come from int8 (through layout ops only)."""
    from coremltools.proto import MIL_pb2

    producer = {out.name: op for op in operations for out in op.outputs}

    def source(op, arg: str) -> str:
        binding = op.inputs[arg].arguments[0] if arg in op.inputs and op.inputs[arg].arguments else None
        up = producer.get(binding.name) if binding is not None and binding.WhichOneof("binding") == "name" else None
        while up is not None and up.type in LAYOUT_OPS:
            up = producer.get(up.inputs["x"].arguments[0].name)
        return up.type if up is not None else "input"

    quantize = [op for op in operations if op.type == "quantize"]
    dequantize = [op for op in operations if op.type == "dequantize"]
    out_dtypes: dict[str, int] = {}
    for op in quantize:
        dt = MIL_pb2.DataType.Name(op.outputs[0].type.tensorType.dataType)
        out_dtypes[dt] = out_dtypes.get(dt, 0) + 1
    operands = {"linear": ("x", "weight"), "conv": ("x", "weight"), "matmul": ("x", "y")}
    layers = [op for op in operations if op.type in ("linear", "conv")]
    int8_layers = sum(source(op, "x") == "dequantize" and source(op, "weight") in DEQUANTIZE_OPS for op in layers)
    matmuls = [op for op in operations if op.type == "matmul"]
    int8_matmuls = sum(all(source(op, a) == "dequantize" for a in operands["matmul"]) for op in matmuls)
    constexpr = [op for op in operations if op.type in DEQUANTIZE_OPS]
    stored = [op.attributes.get("quantized_data") or op.attributes.get("data") for op in constexpr]
    int8_stored = sum(a is not None and MIL_pb2.DataType.Name(a.type.tensorType.dataType) == "INT8" for a in stored)
    return {"int8_weight_constants": int8_stored,
            "quantize_ops": len(quantize), "quantize_output_dtypes": out_dtypes,
            "dequantize_ops": len(dequantize),
            "dequantize_of_quantize": sum(source(op, "input") == "quantize" for op in dequantize),
            "linear_conv_ops": len(layers), "linear_conv_int8": int8_layers,
            "matmul_ops": len(matmuls), "matmul_int8": int8_matmuls}


def w8a8_problems(facts: dict, expected: dict) -> list[str]:
    problems = []
    if set(facts["quantize_output_dtypes"]) - {"INT8", "UINT8"} or not facts["quantize_ops"]:
        problems.append(f"activations are quantized to {facts['quantize_output_dtypes'] or 'nothing'}, not int8")
    if facts["dequantize_of_quantize"] != facts["quantize_ops"] or facts["dequantize_ops"] != facts["quantize_ops"]:
        problems.append(f"{facts['quantize_ops']} quantize ops but {facts['dequantize_ops']} dequantize ops, "
                        f"{facts['dequantize_of_quantize']} of them on a quantize")
    checks = (("int8_weight_constants", "int8_weights", "int8 weight constants"),
              ("quantize_ops", "distinct_activation_quantizers", "activation quantize ops"),
              ("linear_conv_int8", "int8_weights", "linear/conv ops with int8 input and weight"),
              ("matmul_int8", "attention_matmuls", "attention matmuls with int8 operands"))
    for have, want, what in checks:
        if want in expected and facts[have] != expected[want]:
            problems.append(f"{facts[have]} {what}, not the {expected[want]} the quantized model has")
    return problems


def _first_line(exc: Exception) -> str:
    lines = [l for l in str(exc).splitlines() if l.strip()]
    return lines[0][:200] if lines else type(exc).__name__
