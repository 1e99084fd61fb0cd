"""TensorRT target: a folder with the rule-checked ONNX graph, the build configuration, the
``trtexec`` command that builds the engine, and the engine itself where ``tensorrt`` imports.

Quantized models are built by explicit quantization from their QDQ graph (TensorRT's
implicit calibration is deprecated), so the graph is checked against TensorRT's rules
(``trt_rules``) first and every violation is reported by node name. The engine uses an
optimisation profile for a dynamic batch, a timing cache beside it, and the sparse-weights
flag when some weights are 2:4 sparse.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from vitc.errors import VitcError

SUFFIX = None  # the artifact is a folder
REFUSED_SUFFIXES = (".engine", ".plan", ".onnx")
PRECISIONS = ("fp32", "fp16", "int8")
TRTEXEC_SCRIPT = "build_engine.sh"
BUILD_CONFIG = "build_config.json"


class TensorRTRuleError(VitcError):
    """The graph breaks TensorRT's explicit-quantization rules; ``violations`` lists each one."""

    def __init__(self, violations):
        self.violations = violations
        shown = "; ".join(str(v) for v in violations[:3])
        more = f" (and {len(violations) - 3} more)" if len(violations) > 3 else ""
        super().__init__(f"the graph breaks {len(violations)} TensorRT rule(s): {shown}{more}",
                         "fix the quantization of those nodes (vitc quantize), or export to another target")


def pick_precision(requested: str | None, quant: dict | None) -> str:
    if quant is not None:
        if requested not in (None, "int8"):
            raise VitcError(f"the model is quantized ({quant['pass']}), so its TensorRT engine is int8, not {requested}",
                            "drop --precision, or export the model from before quantization")
        return "int8"
    if requested == "int8":
        raise VitcError("an int8 TensorRT engine needs a quantized model (explicit Q/DQ); implicit calibration is deprecated",
                        "quantize it first (vitc quantize), then export")
    if requested not in (None, "fp32", "fp16"):
        raise VitcError(f"the tensorrt target builds fp32, fp16 or int8 (from quantized models), not {requested}",
                        "pass --precision fp32 or fp16")
    return requested or "fp16"


def preflight(backbone, opts, quant) -> None:
    from vitc.export import onnx as onnx_target

    onnx_target.preflight(backbone, opts, quant)


def output_names(stem: str) -> list[str]:
    return [f"{stem}.onnx", f"{stem}.engine", f"{stem}.timing.cache", BUILD_CONFIG, TRTEXEC_SCRIPT]


def tensorrt_module():
    """``tensorrt`` when it imports here, else None."""
    try:
        import tensorrt

        return tensorrt
    except Exception:  # ImportError, or a broken CUDA install
        return None


def write(backbone, staging: Path, stem: str, opts, quant, progress=None):
    import onnx

    from vitc.export import onnx as onnx_target
    from vitc.export import trt_rules
    from vitc.export.pipeline import Staged
    from vitc.runtimes import open_session

    onnx_path = staging / f"{stem}.onnx"
    info = {"onnx": onnx_target.write_onnx(backbone, onnx_path, opts, quant, progress=progress, runtime="tensorrt")}
    model = onnx.load(str(onnx_path))
    violations = trt_rules.check_graph(model)
    if violations:
        raise TensorRTRuleError(violations)
    sparsity = trt_rules.sparse_24_layers(model)
    fp8 = any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer)
    config = build_config(f"{stem}.onnx", f"{stem}.engine", f"{stem}.timing.cache", backbone.preprocess.input_size, opts,
                          sparse=bool(sparsity["sparse_24_layers"]), fp8=fp8, input_name=model.graph.input[0].name)
    config["rule_check"] = {"violations": [], "clean": True, "rules": "vitc.export.trt_rules"}
    config["sparsity"] = sparsity
    command = trtexec_command(config)
    (staging / TRTEXEC_SCRIPT).write_text("#!/bin/sh\n# Builds the same engine as vitc export --target tensorrt.\n"
                                          f"cd \"$(dirname \"$0\")\"\n{command}\n")
    (staging / TRTEXEC_SCRIPT).chmod(0o755)
    trt = tensorrt_module()
    info.update({"rule_check": config["rule_check"], "sparsity": sparsity, "trtexec": command,
                 "build_config": BUILD_CONFIG})
    if trt is None:
        info["engine"] = ("not built: tensorrt is not importable here; the folder holds the checked ONNX graph, "
                          f"{BUILD_CONFIG} and the trtexec command in {TRTEXEC_SCRIPT}")
        (staging / BUILD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        # The engine cannot run here; the checked ONNX graph can, and it is what TensorRT builds from.
        return Staged(primary=staging, info=info, open_session=lambda p: open_session(p / f"{stem}.onnx", runtime="onnxruntime"),
                      parity_subject=f"the checked {stem}.onnx on onnxruntime: tensorrt is not importable here, so no engine "
                                     f"was built; build it with {TRTEXEC_SCRIPT}")
    config["tensorrt_version"] = trt.__version__
    (staging / BUILD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    engine = build_engine(trt, staging, config, progress)
    info["engine"] = f"built with tensorrt {trt.__version__}"
    return Staged(primary=engine, info=info, open_session=lambda p: open_session(p, runtime="tensorrt", device="cuda"))


def build_config(onnx_name: str, engine_name: str, cache_name: str, size: int, opts, sparse: bool, fp8: bool,
                 input_name: str = "pixel_values") -> dict:
    """The builder settings, in a form both ``build_engine`` and ``trtexec_command`` read."""
    flags = []
    if opts.precision in ("fp16", "int8"):
        flags.append("FP16")  # int8 graphs keep their unquantized layers in fp16, as trtexec --int8 --fp16 does
    if opts.precision == "int8":
        flags.append("INT8")
    if fp8:
        flags.append("FP8")
    if sparse:
        flags.append("SPARSE_WEIGHTS")
    shape = lambda n: [n, 3, size, size]  # noqa: E731
    profile = {"input": input_name, "min": shape(1), "opt": shape(opts.opt_batch), "max": shape(opts.max_batch)} \
        if opts.dynamic_batch else None
    return {"onnx": onnx_name, "engine": engine_name, "timing_cache": cache_name, "precision": opts.precision,
            "explicit_quantization": opts.precision == "int8", "builder_flags": flags, "profile": profile,
            "workspace_mib": opts.workspace_mib}


def trtexec_command(config: dict) -> str:
    args = ["trtexec", f"--onnx={config['onnx']}", f"--saveEngine={config['engine']}"]
    profile = config["profile"]
    if profile is not None:
        dims = lambda s: "x".join(str(d) for d in s)  # noqa: E731
        args += [f"--minShapes={profile['input']}:{dims(profile['min'])}", f"--optShapes={profile['input']}:{dims(profile['opt'])}",
                 f"--maxShapes={profile['input']}:{dims(profile['max'])}"]
    flag_args = {"FP16": "--fp16", "INT8": "--int8", "FP8": "--fp8", "SPARSE_WEIGHTS": "--sparsity=enable"}
    args += [flag_args[f] for f in config["builder_flags"]]
    args += [f"--timingCacheFile={config['timing_cache']}", f"--memPoolSize=workspace:{config['workspace_mib']}M", "--skipInference"]
    return " ".join(shlex.quote(a) for a in args)


def build_engine(trt, folder: Path, config: dict, progress=None) -> Path:
    """Build the engine through the TensorRT Python API with the same settings as the trtexec command."""
    task = progress.add_task("building the TensorRT engine", total=None) if progress is not None else None
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    explicit_batch = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(1 << int(explicit_batch) if explicit_batch is not None and int(trt.__version__.split(".")[0]) < 10 else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(folder / config["onnx"])):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise VitcError(f"TensorRT cannot parse the graph ({errors[0][:200] if errors else 'no detail'})", "report the model")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config["workspace_mib"] << 20)
    for flag in config["builder_flags"]:
        if not hasattr(trt.BuilderFlag, flag):
            raise VitcError(f"tensorrt {trt.__version__} has no builder flag {flag}", "use a newer TensorRT, or another --precision")
        builder_config.set_flag(getattr(trt.BuilderFlag, flag))
    cache_path = folder / config["timing_cache"]
    cache = builder_config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    builder_config.set_timing_cache(cache, ignore_mismatch=False)
    if config["profile"] is not None:
        p = config["profile"]
        profile = builder.create_optimization_profile()
        profile.set_shape(p["input"], p["min"], p["opt"], p["max"])
        builder_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise VitcError("TensorRT could not build the engine (see its log above)", "check the build log, or try --precision fp32")
    engine = folder / config["engine"]
    engine.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(builder_config.get_timing_cache().serialize()))
    if task is not None:
        progress.remove_task(task)
    return engine
