"""Where the time goes: per-op profiles from each runtime's own profiler, aggregated by op kind.

    records = profile_session(session, pool, runs=20)      # list[OpRecord], averaged per call
    summary = aggregate(records, peak_gops)                # kinds, GEMM GOP/s against the peak

Sources: ONNX Runtime's profiler (``SessionOptions.enable_profiling``: one ``Node`` event per
kernel run, with input shapes and the size of its initializers), OpenVINO's performance
counters (``PERF_COUNT``: layer, type, kernel with its exec precision, time per layer of the
compiled graph) and ``torch.profiler`` (self CPU time per aten op, with FLOPs). A runtime
without a profiler vitc reads (TensorRT, CoreML) gives ``None``; the timing runs regardless.

Profilers add a little per-op overhead, so the profile runs in its own session after the
timing, and the table shows shares of the profiled time next to absolute milliseconds.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

KINDS = ("int8 GEMM", "float GEMM", "attention matmul", "norm", "softmax", "activation", "eltwise",
         "Q/DQ + reorder", "data movement", "other")
GEMM_KINDS = ("int8 GEMM", "float GEMM", "attention matmul")
INT8_NAMES = ("i8", "u8", "int8", "uint8")

# ONNX Runtime op types (contrib ops included) by kind; a GEMM without initializers is an attention matmul.
_ORT_INT8_GEMM = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "ConvInteger", "QLinearConv",
                  "DynamicQuantizeMatMul", "QAttention"}
_ORT_B_INPUT = {"QLinearMatMul": 3, "QGemm": 3, "QLinearConv": 3}
_ORT_FLOAT_GEMM = {"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv", "NhwcFusedConv", "MatMulNBits"}
_ORT_KINDS = {
    "attention matmul": {"Attention", "MultiHeadAttention", "GroupQueryAttention"},
    "norm": {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "BatchNormalization",
             "InstanceNormalization", "GroupNorm", "SkipSimplifiedLayerNormalization", "QLinearLayerNormalization"},
    "softmax": {"Softmax", "QLinearSoftmax", "LogSoftmax"},
    "activation": {"Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Erf", "Relu", "Sigmoid", "Tanh", "HardSigmoid",
                   "HardSwish", "Clip", "LeakyRelu", "QLinearSigmoid", "QLinearLeakyRelu", "Elu", "Softplus"},
    "eltwise": {"Add", "Mul", "Sub", "Div", "Pow", "Sqrt", "ReduceMean", "Neg", "Exp", "Where", "Max", "Min",
                "BiasAdd", "QLinearAdd", "QLinearMul", "Sum", "Equal"},
    "Q/DQ + reorder": {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Cast", "ReorderInput",
                       "ReorderOutput", "QuickQuantizeLinear"},
    "data movement": {"Transpose", "Reshape", "Concat", "Gather", "Slice", "Split", "Expand", "Squeeze", "Unsqueeze",
                      "Flatten", "Shape", "Identity", "Tile", "Pad", "QLinearConcat", "GatherElements", "ConstantOfShape",
                      "Range", "ScatterND", "QLinearGlobalAveragePool", "GlobalAveragePool", "AveragePool", "MaxPool"},
}
# OpenVINO CPU plugin layer types by kind (the compiled graph's names, not the IR's).
_OV_GEMM = {"FullyConnected", "Convolution", "GroupConvolution", "Deconvolution", "ConvolutionBackpropData", "MatMul", "Gemm"}
_OV_KINDS = {
    "attention matmul": {"ScaledDotProductAttention", "ScaledAttn", "MHA"},
    "norm": {"MVN", "NormalizeL2", "RMS", "LayerNorm", "BatchNormInference"},
    "softmax": {"Softmax", "SoftMax"},
    "activation": {"Gelu", "Relu", "Sigmoid", "Tanh", "Swish", "HSwish", "Mish", "Erf", "Elu", "Clamp"},
    "eltwise": {"Eltwise", "Subgraph", "Add", "Multiply", "Subtract", "Divide", "Power", "Sqrt", "Reduce", "ReduceMean",
                "Math"},
    "Q/DQ + reorder": {"FakeQuantize", "Reorder", "Convert", "Quantize", "Dequantize"},
    "data movement": {"Transpose", "Reshape", "Concatenation", "Concat", "Gather", "Split", "StridedSlice", "Broadcast",
                      "Squeeze", "Unsqueeze", "Pad", "Tile", "ShapeOf", "Slice", "VariadicSplit", "Pooling", "Interpolate"},
}
_OV_SKIP = {"Input", "Parameter", "Output", "Result", "Const", "Constant"}
# torch: aten / quantized op names (lower case, namespace dropped) by kind.
_TORCH_KINDS = {
    "int8 GEMM": ("qlinear", "quantized::linear", "_int_mm", "qconv", "quantized::conv", "int_mm", "onednn::qlinear"),
    "attention matmul": ("bmm", "baddbmm", "scaled_dot_product", "_flash_attention", "_efficient_attention"),
    "float GEMM": ("addmm", "mm", "linear", "conv", "matmul", "mkldnn_linear", "mkl_linear", "_linear_pointwise", "mkldnn_rnn"),
    "norm": ("layer_norm", "batch_norm", "group_norm", "rms_norm"),
    "softmax": ("softmax",),
    "activation": ("gelu", "relu", "silu", "sigmoid", "tanh", "hardswish", "erf"),
    "Q/DQ + reorder": ("quantize_per", "dequantize", "to_dense", "to_mkldnn", "_to_copy", "to", "reorder", "fake_quant"),
    "data movement": ("copy_", "contiguous", "clone", "cat", "transpose", "permute", "view", "reshape", "unsqueeze",
                      "squeeze", "expand", "slice", "select", "flatten", "as_strided", "index", "chunk", "split", "unbind",
                      "_unsafe_view", "t", "empty", "zeros", "stack", "narrow"),
    "eltwise": ("add", "mul", "sub", "div", "pow", "sqrt", "mean", "add_", "mul_", "rsub", "neg", "exp",
                "cpp_fused"),  # Inductor's generated C++ kernels fuse the pointwise ops around the GEMMs
}


@dataclass
class OpRecord:
    """One op (or one compiled layer) of one call: microseconds per call, its kind, precision and GEMM work."""

    name: str
    op_type: str
    kind: str
    precision: str
    time_us: float
    ops: float = 0.0  # multiply-adds x 2 of a GEMM per call; 0 elsewhere or when the shapes are unknown

    def to_dict(self) -> dict:
        return asdict(self)


def gemm_ops(a_shape, out_shape) -> float:
    """2·M·K·N of ``A @ B = O`` from A's and O's shapes: prod(A) · N (A's layout, transposed or not, does not matter)."""
    if not a_shape or not out_shape or any(not isinstance(d, int) or d <= 0 for d in list(a_shape) + list(out_shape)):
        return 0.0
    return 2.0 * float(np.prod(a_shape, dtype=np.float64)) * out_shape[-1]


# --------------------------------------------------------------------------- classification

def ort_kind(op_type: str, int8_inputs: bool, has_initializer: bool) -> str:
    if op_type in _ORT_INT8_GEMM or (op_type in _ORT_FLOAT_GEMM and int8_inputs):
        return "int8 GEMM" if has_initializer else "attention matmul"
    if op_type in _ORT_FLOAT_GEMM:
        return "float GEMM" if has_initializer else "attention matmul"
    for kind, types in _ORT_KINDS.items():
        if op_type in types:
            return kind
    return "other"


def ov_precision(exec_type: str) -> str:
    """``brgemm_avx512_amx_I8`` -> ``i8``; ``jit_avx512_FP32`` -> ``f32``; ``undef``/unknown -> ``?``."""
    tail = exec_type.rsplit("_", 1)[-1].lower() if "_" in exec_type else ""
    return {"i8": "i8", "u8": "u8", "fp32": "f32", "f32": "f32", "bf16": "bf16", "fp16": "f16", "f16": "f16",
            "i32": "i32", "i64": "i64"}.get(tail, "?")


def ov_kind(layer_type: str, precision: str, info: dict) -> str | None:
    """The kind of a compiled layer; ``info`` (from ``ov_layer_info``) says which IR matmuls it runs."""
    if layer_type in _OV_SKIP:
        return None
    if info.get("matmuls") and (layer_type in _OV_GEMM or layer_type.startswith(("FullyConnected", "Convolution", "Subgraph",
                                                                                  "MatMul", "ScaledDotProduct"))):
        if info.get("attention"):
            return "attention matmul"
        return "int8 GEMM" if precision in ("i8", "u8") else "float GEMM"
    if layer_type.startswith("FullyConnected") or layer_type in ("Convolution", "GroupConvolution", "Deconvolution",
                                                                 "ConvolutionBackpropData"):
        return "int8 GEMM" if precision in ("i8", "u8") else "float GEMM"
    for kind, types in _OV_KINDS.items():
        if layer_type in types:
            return kind
    return "other"


def torch_kind(name: str) -> str:
    short = name.split("::", 1)[-1].lower() if name.startswith("aten::") else name.lower()
    for kind in ("int8 GEMM", "attention matmul", "float GEMM", "norm", "softmax", "activation", "Q/DQ + reorder",
                 "data movement", "eltwise"):
        for key in _TORCH_KINDS[kind]:
            if short == key or (len(key) > 3 and key in short):
                return kind
    return "other"


# --------------------------------------------------------------------------- per runtime

def _ort_profile(session, pool, runs: int) -> list[OpRecord]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="vitc-ortprof-") as tmp:
        opts = ort.SessionOptions()
        if session.threads:
            opts.intra_op_num_threads = session.threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        prof = ort.InferenceSession(str(session.path), sess_options=opts, providers=session.session.get_providers())
        name = prof.get_inputs()[0].name
        for x in pool[:2]:  # warm-up calls: ort_records keeps only the last ``runs`` calls
            prof.run(None, {name: x})
        for i in range(runs):
            prof.run(None, {name: pool[i % len(pool)]})
        events = json.loads(Path(prof.end_profiling()).read_text())
    return ort_records(events, runs)


def ort_records(events: list[dict], runs: int) -> list[OpRecord]:
    """Kernel events of the last ``runs`` calls (earlier ones are warm-up), averaged per call."""
    calls = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    t0 = calls[-runs]["ts"] if len(calls) >= runs else 0
    starts = [c["ts"] for c in calls[-runs:]] if len(calls) >= runs else [0]
    per: dict[str, OpRecord] = {}
    samples: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < t0:
            continue
        args = e.get("args", {})
        node = e["name"][: -len("_kernel_time")]
        op_type = args.get("op_name", "?")
        inputs = [next(iter(d.items())) for d in args.get("input_type_shape", []) if d]
        outputs = [next(iter(d.items())) for d in args.get("output_type_shape", []) if d]
        int8_in = any(t in INT8_NAMES for t, _ in inputs[:1])
        b = inputs[_ORT_B_INPUT.get(op_type, 1)] if len(inputs) > _ORT_B_INPUT.get(op_type, 1) and "Conv" not in op_type else None
        # Weights are initializers (often pre-packed and absent from the event); B of rank >= 3 is an activation.
        kind = ort_kind(op_type, int8_in, not (b is not None and len(b[1]) >= 3))
        prec = "i8" if (int8_in or op_type in _ORT_INT8_GEMM) and kind in GEMM_KINDS else (inputs[0][0] if inputs else "?")
        ops = 0.0
        if kind in GEMM_KINDS and inputs and outputs:
            if "Conv" in op_type:  # 2 * output elements * (in channels / groups * kernel area), from the weight's shape
                w = next((shape for _, shape in inputs[1:] if len(shape) == 4), None)
                ops = 2.0 * float(np.prod(outputs[0][1])) * float(np.prod(w[1:])) if w else 0.0
            else:
                ops = gemm_ops(inputs[0][1], outputs[0][1])
        per.setdefault(node, OpRecord(node, op_type, kind, _short_type(prec), 0.0, ops))
        call = int(np.searchsorted(starts, e["ts"], side="right"))  # which call this kernel ran in
        samples.setdefault(node, [0.0] * (len(starts) + 1))[call] += e["dur"]
    return _with_medians(per, {k: v[1:] for k, v in samples.items()})


def _with_medians(per: dict[str, OpRecord], samples: dict[str, list[float]]) -> list[OpRecord]:
    """Each op's time per call is its median over the calls: on a shared machine one preempted
    kernel would otherwise dominate a short profile."""
    for name, rec in per.items():
        rec.time_us = float(np.median(samples[name])) if samples.get(name) else 0.0
    return list(per.values())


def _short_type(t: str) -> str:
    return {"float": "f32", "float16": "f16", "bfloat16": "bf16", "int8": "i8", "uint8": "u8", "int64": "i64", "int32": "i32"}.get(t, t)


def _ov_profile(session, pool, runs: int) -> list[OpRecord]:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": session.precision, "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True}
    if session.threads:
        config["INFERENCE_NUM_THREADS"] = session.threads
    compiled = core.compile_model(core.read_model(str(session.path)), session.device, config)
    request = compiled.create_infer_request()
    layers = ov_layer_info(compiled, ir_matmuls(core.read_model(str(session.path)), pool[0].shape))
    for x in pool[:2]:
        request.infer({0: x})
    per: dict[str, OpRecord] = {}
    samples: dict[str, list[float]] = {}
    for i in range(runs):
        request.infer({0: pool[i % len(pool)]})
        for p in request.get_profiling_info():
            info = layers.get(p.node_name, {})
            prec = ov_precision(p.exec_type)
            if prec == "?":
                prec = info.get("precision", "?")
            kind = ov_kind(p.node_type, prec, info)
            if kind is None:
                continue
            rec = per.get(p.node_name)
            if rec is None:
                rec = per[p.node_name] = OpRecord(p.node_name, f"{p.node_type}/{p.exec_type}", kind, prec, 0.0,
                                                  info.get("ops", 0.0) if kind in GEMM_KINDS else 0.0)
            samples.setdefault(p.node_name, []).append(p.real_time.total_seconds() * 1e6)
    return _with_medians(per, samples)


def ir_matmuls(model, input_shape) -> dict[str, dict]:
    """Each MatMul/Convolution of the IR at ``input_shape``: its GEMM work and whether both inputs are activations.

    An input is an activation when it depends on the model's input (weights, however dequantized, do not)."""
    model.reshape({model.inputs[0]: list(input_shape)})
    live: set[str] = set()
    out = {}
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        srcs = [op.input_value(i).get_node().get_friendly_name() for i in range(op.get_input_size())]
        if op.get_type_name() == "Parameter" or any(s in live for s in srcs):
            live.add(name)
        t = op.get_type_name()
        if t == "ConvolutionBackpropData":  # a deconvolution: every input element times Cout x kh x kw weights
            a, w = op.get_input_partial_shape(0), op.get_input_partial_shape(1)
            ops = 2.0 * float(np.prod([d.get_length() for d in a])) * float(np.prod([d.get_length() for d in w][1:])) \
                if a.is_static and w.is_static else 0.0
            out[name] = {"ops": ops, "two_activations": False}
        elif t in ("MatMul", "Convolution", "GroupConvolution"):
            a, o = op.get_input_partial_shape(0), op.get_output_partial_shape(0)
            if t == "MatMul":
                ops = gemm_ops([d.get_length() for d in a], [d.get_length() for d in o]) if a.is_static and o.is_static else 0.0
            else:  # 2 * out elements * (in channels / groups) * kernel area
                w = op.get_input_partial_shape(1)
                ops = 2.0 * float(np.prod([d.get_length() for d in o])) * float(np.prod([d.get_length() for d in w][-3:])) \
                    if o.is_static and w.is_static else 0.0
            out[name] = {"ops": ops, "two_activations": srcs[1] in live if len(srcs) > 1 else False}
            if t == "MatMul" and out[name]["two_activations"]:
                out[name]["scores_from"] = _scores_matmul(op, out)
        elif t == "ScaledDotProductAttention":  # OpenVINO's frontend folds QK^T, softmax and P.V into one op
            q, k, o = (op.get_input_partial_shape(0), op.get_input_partial_shape(1), op.get_output_partial_shape(0))
            # QK^T: 2 * |q| * Sk; P.V: 2 * |out| * Sk
            ops = 2.0 * k[-2].get_length() * (float(np.prod([d.get_length() for d in q])) + float(np.prod([d.get_length() for d in o]))) \
                if q.is_static and k.is_static and o.is_static else 0.0
            out[name] = {"ops": ops, "two_activations": True}
    return out


def _scores_matmul(op, seen: dict, depth: int = 8) -> str | None:
    """For P.V: the activation x activation MatMul (QK^T) its probabilities come from, found by
    walking up its first input through the non-MatMul ops between them (softmax, scale, Q/DQ)."""
    node = op.input_value(0).get_node()
    for _ in range(depth):
        name = node.get_friendly_name()
        if node.get_type_name() == "MatMul":
            return name if seen.get(name, {}).get("two_activations") else None
        if node.get_input_size() == 0:
            return None
        node = node.input_value(0).get_node()
    return None


def ov_layer_info(compiled, matmuls: dict[str, dict]) -> dict[str, dict]:
    """Per compiled layer: the IR matmuls it runs (by its original layer names), their work, its runtime precision."""
    out = {}
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        info = {"precision": rt["runtimePrecision"].astype(str).lower() if "runtimePrecision" in rt else "?"}
        names = rt["originalLayersNames"].astype(str).split(",") if "originalLayersNames" in rt else []
        hits = {k: m for n in names for k, m in matmuls.items() if n == k or n.startswith(k + "/")}
        if any("softmax" in n.lower() for n in names):  # "node_softmax" (dynamo) or ".../Softmax" (TorchScript)
            # A fused attention layer (OpenVINO's MHA snippet) lists the P.V matmul, while the QK^T matmul
            # may survive only under a renamed dequantization node: count the QK^T that feeds each P.V.
            hits.update({m["scores_from"]: matmuls[m["scores_from"]] for m in list(hits.values()) if m.get("scores_from")})
        hits = list(hits.values())
        if hits:
            info["ops"] = sum(h["ops"] for h in hits)
            info["attention"] = any(h["two_activations"] for h in hits)
            info["matmuls"] = len(hits)
        out[op.get_friendly_name()] = info
    return out


def _torch_profile(session, pool, runs: int) -> list[OpRecord]:
    from torch.profiler import ProfilerActivity, profile

    for x in pool[:2]:
        session.run(x)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=False) as prof:
        for i in range(runs):
            session.run(pool[i % len(pool)])
    records = []
    for evt in prof.key_averages():
        t = evt.self_cpu_time_total / runs
        if t <= 0 or evt.key.startswith("ProfilerStep"):
            continue
        kind = torch_kind(evt.key)
        ops = float(getattr(evt, "flops", 0) or 0) / runs if kind in GEMM_KINDS else 0.0
        prec = "i8" if kind == "int8 GEMM" else "f32"
        records.append(OpRecord(evt.key, evt.key, kind, prec, t, ops))
    return records


PROFILERS = {"onnxruntime": _ort_profile, "openvino": _ov_profile, "torch": _torch_profile}


def has_profiler(runtime: str) -> bool:
    return runtime.split("+")[0] in PROFILERS


def profile_session(session, pool: list[np.ndarray], runs: int = 20) -> list[OpRecord] | None:
    """Per-op records averaged over ``runs`` calls, or None when vitc reads no profiler of this runtime."""
    runtime = session.describe()["runtime"].split("+")[0]
    if runtime not in PROFILERS:
        return None
    return PROFILERS[runtime](session, pool, max(1, runs))


SOURCES = {"onnxruntime": "onnxruntime profiler", "openvino": "OpenVINO performance counters", "torch": "torch.profiler"}


def profile(session, pool: list[np.ndarray], runs: int = 20, peak_gops: dict | None = None) -> dict:
    """The profile document of one session at one batch: ``aggregate`` plus its source, or a note when there is none."""
    runtime = session.describe()["runtime"].split("+")[0]
    records = profile_session(session, pool, runs)
    if records is None:
        return {"available": False, "note": f"{runtime} has no profiler vitc reads; the timing above ran without a profile"}
    return {"available": True, "source": SOURCES[runtime], "runs": runs, "batch": int(pool[0].shape[0]),
            **aggregate(records, peak_gops)}


# --------------------------------------------------------------------------- aggregation

def aggregate(records: list[OpRecord], peak_gops: dict | None = None) -> dict:
    """Time per kind (ms per call, share, op count) and each GEMM kind's achieved GOP/s and share of the peak.

    ``peak_gops``: {"int8": ..., "f32": ..., "bf16": ...} of the same runtime and threads; a
    kind's GOP/s is compared with the peak of the precision most of its work ran in."""
    total = sum(r.time_us for r in records)
    kinds = {}
    for kind in KINDS:
        rs = [r for r in records if r.kind == kind]
        t = sum(r.time_us for r in rs)
        if not rs:
            continue
        row = {"ms": t / 1e3, "share": t / total if total else 0.0, "ops": len(rs)}
        if kind in GEMM_KINDS:
            timed = [r for r in rs if r.ops > 0]
            work, tw = sum(r.ops for r in timed), sum(r.time_us for r in timed)
            precs: dict[str, float] = {}
            for r in rs:
                precs[r.precision] = precs.get(r.precision, 0.0) + r.time_us
            main = max(precs, key=precs.get)
            row["precisions"] = {p: v / 1e3 for p, v in sorted(precs.items(), key=lambda kv: -kv[1])}
            row["gop"] = work / 1e9
            row["gops"] = work / tw / 1e3 if tw > 0 else None
            peak_key = "int8" if main in ("i8", "u8") else ("bf16" if main == "bf16" else "f32")
            peak = (peak_gops or {}).get(peak_key)
            row["peak_key"] = peak_key
            row["of_peak"] = row["gops"] / peak if peak and row["gops"] else None
        kinds[kind] = row
    return {"total_ms": total / 1e3, "kinds": kinds,
            "top_ops": [r.to_dict() for r in sorted(records, key=lambda r: -r.time_us)[:10]]}


# --------------------------------------------------------------------------- peaks

@dataclass(frozen=True)
class PeakConfig:
    m: int = 1576  # batch 8 x 197 tokens
    k: int = 1536
    n: int = 1536
    runs: int = 25  # best of these: on a shared machine most calls lose time to other jobs


def _matmul_onnx(path: Path, cfg: PeakConfig, int8: bool) -> Path:
    """One large MatMul (X[M,K] @ W[K,N]); int8: QDQ on both inputs, the form the runtimes fuse into int8 kernels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((cfg.k, cfg.n)).astype(np.float32)
    inits, nodes = [], []
    x_in = "x"
    if int8:
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz"),
                  numpy_helper.from_array(np.clip(np.round(w / 0.02), -127, 127).astype(np.int8), "wq"),
                  numpy_helper.from_array(np.full(cfg.n, 0.02, np.float32), "ws"),
                  numpy_helper.from_array(np.zeros(cfg.n, np.int8), "wz")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1)]
        x_in, w_in = "xd", "wd"
    else:
        inits.append(numpy_helper.from_array(w, "w"))
        w_in = "w"
    nodes.append(helper.make_node("MatMul", [x_in, w_in], ["y"]))
    graph = helper.make_graph(nodes, "peak", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [cfg.m, cfg.k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [cfg.m, cfg.n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _best_gops(run, x, cfg: PeakConfig) -> float:
    import time

    run(x)
    best = math.inf
    for _ in range(cfg.runs):
        t = time.perf_counter()
        run(x)
        best = min(best, time.perf_counter() - t)
    return 2.0 * cfg.m * cfg.k * cfg.n / best / 1e9


def measure_peaks(runtime: str, threads: int | None, cfg: PeakConfig = PeakConfig()) -> dict:
    """GOP/s of one large MatMul per precision in ``runtime``'s own kernels: {"int8": .., "f32": .., "bf16": ..|None, "notes": [...]}.

    The best of ``cfg.runs`` calls: a peak, not a typical figure (the machine may be shared)."""
    from vitc.runtimes import open_session

    x = np.random.default_rng(1).standard_normal((cfg.m, cfg.k)).astype(np.float32)
    out: dict = {"shape": [cfg.m, cfg.k, cfg.n], "threads": threads, "notes": []}
    runtime = runtime.split("+")[0]
    with tempfile.TemporaryDirectory(prefix="vitc-peak-") as tmp:
        if runtime in ("onnxruntime", "openvino"):
            f32, i8 = _matmul_onnx(Path(tmp) / "f32.onnx", cfg, False), _matmul_onnx(Path(tmp) / "i8.onnx", cfg, True)
            if runtime == "onnxruntime":
                out["f32"] = _best_gops(open_session(f32, runtime=runtime, threads=threads).run, x, cfg)
                out["int8"] = _best_gops(open_session(i8, runtime=runtime, threads=threads).run, x, cfg)
                out["bf16"] = None
                out["notes"].append("onnxruntime's CPU provider has no bf16 MatMul kernel")
            else:
                out["f32"] = _best_gops(open_session(f32, runtime=runtime, threads=threads, precision="f32").run, x, cfg)
                out["int8"] = _best_gops(open_session(i8, runtime=runtime, threads=threads, precision="f32").run, x, cfg)
                s = open_session(f32, runtime=runtime, threads=threads, precision="bf16")
                if s.fallbacks():
                    out["bf16"] = None
                    out["notes"].append("; ".join(s.fallbacks()))
                else:
                    out["bf16"] = _best_gops(s.run, x, cfg)
        elif runtime == "torch":
            import torch

            if threads:
                torch.set_num_threads(threads)
            xt = torch.from_numpy(x)
            w = torch.randn(cfg.k, cfg.n)
            out["f32"] = _best_gops(lambda a: a @ w, xt, cfg)
            xb, wb = xt.bfloat16(), w.bfloat16()
            out["bf16"] = _best_gops(lambda a: a @ wb, xb, cfg)
            if hasattr(torch, "_int_mm"):
                xi, wi = torch.randint(-127, 127, (cfg.m, cfg.k), dtype=torch.int8), torch.randint(-127, 127, (cfg.k, cfg.n), dtype=torch.int8)
                out["int8"] = _best_gops(lambda a: torch._int_mm(a, wi), xi, cfg)
            else:
                out["int8"] = None
                out["notes"].append("this torch has no torch._int_mm")
        else:
            out.update({"f32": None, "int8": None, "bf16": None})
            out["notes"].append(f"vitc measures GEMM peaks in onnxruntime, openvino and torch, not {runtime}")
    return out


# --------------------------------------------------------------------------- rendering

def profile_table(label: str, prof: dict):
    """A rich table of one profile: time per kind, share, GEMM GOP/s against the peak, precisions."""
    from rich.table import Table

    table = Table(title=f"profile: {label} ({prof['total_ms']:.2f} ms per call profiled, {prof['runs']} calls, {prof['source']})")
    for col in ("op kind", "ms/call", "share", "ops", "GOP/s", "of peak", "precision (ms)"):
        table.add_column(col)
    for kind, row in prof["kinds"].items():
        gops = f"{row['gops']:.0f}" if row.get("gops") else "-"
        of_peak = f"{row['of_peak']:.0%} of {row['peak_key']}" if row.get("of_peak") else "-"
        precs = ", ".join(f"{p} {v:.2f}" for p, v in row.get("precisions", {}).items())
        table.add_row(kind, f"{row['ms']:.3f}", f"{row['share']:.1%}", str(row["ops"]), gops, of_peak, precs)
    return table


def peak_table(peaks: dict):
    from rich.table import Table

    table = Table(title="GEMM peaks (GOP/s, best of the calls; one large MatMul in the runtime's own kernels)")
    for col in ("runtime", "M x K x N", "threads", "int8", "bf16", "f32", "notes"):
        table.add_column(col)
    for runtime, p in peaks.items():
        fmt = lambda v: f"{v:.0f}" if v else "-"
        table.add_row(runtime, " x ".join(map(str, p["shape"])), str(p["threads"]), fmt(p.get("int8")), fmt(p.get("bf16")),
                      fmt(p.get("f32")), "; ".join(p.get("notes", [])))
    return table


def stacked_png(entries: list[tuple[str, dict]], path) -> None:
    """One stacked bar per profiled artifact (and batch): ms per call by op kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _ in entries]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(entries) + 3), 5))
    bottom = np.zeros(len(entries))
    colors = plt.get_cmap("tab10").colors
    for i, kind in enumerate(KINDS):
        vals = np.array([p["kinds"].get(kind, {}).get("ms", 0.0) for _, p in entries])
        if not vals.any():
            continue
        ax.bar(labels, vals, bottom=bottom, label=kind, color=colors[i % len(colors)])
        bottom += vals
    ax.set_ylabel("ms per call (profiled)")
    ax.set_title("where the time goes, by op kind")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the atomic temp path has no .png suffix
    plt.close(fig)
