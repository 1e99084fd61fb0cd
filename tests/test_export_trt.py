"""The tensorrt target: TensorRT's explicit-quantization rules on hand-built QDQ graphs, the
written build configuration and trtexec command, and the engine build where tensorrt imports."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vitc.errors import VitcError
from vitc.export import export_artifact
from vitc.export import trt_rules
from vitc.export.tensorrt import TensorRTRuleError, build_config, tensorrt_module, trtexec_command


def _graph(nodes, initializers, opset=17):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _init(name, array):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array), name)


def _qdq(prefix, x, scale=0.05, zero=0, zero_dtype=np.int8):
    """An activation Q/DQ pair (per tensor)."""
    from onnx import helper

    inits = [_init(f"{prefix}_s", np.float32(scale)), _init(f"{prefix}_z", zero_dtype(zero))]
    nodes = [helper.make_node("QuantizeLinear", [x, f"{prefix}_s", f"{prefix}_z"], [f"{prefix}_q"], name=f"{prefix}_quant"),
             helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_s", f"{prefix}_z"], [f"{prefix}_dq"], name=f"{prefix}_dequant")]
    return nodes, inits, f"{prefix}_dq"


def _weight(prefix, shape, per_channel_axis):
    """int8 weights behind a DequantizeLinear: per channel along ``per_channel_axis``, per tensor when None."""
    from onnx import helper

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=shape).astype(np.int8)
    if per_channel_axis is None:
        scale, zero, attrs = np.float32(0.01), np.int8(0), {}
    else:
        scale = np.full(shape[per_channel_axis], 0.01, np.float32)
        zero, attrs = np.zeros(shape[per_channel_axis], np.int8), {"axis": per_channel_axis}
    inits = [_init(f"{prefix}_w", w), _init(f"{prefix}_ws", scale), _init(f"{prefix}_wz", zero)]
    node = helper.make_node("DequantizeLinear", [f"{prefix}_w", f"{prefix}_ws", f"{prefix}_wz"], [f"{prefix}_wdq"],
                            name=f"{prefix}_weight_dequant", **attrs)
    return [node], inits, f"{prefix}_wdq"


def _attention_model(bad: bool):
    """pixels -> tokens (batch, 3, 16) -> QK^T and PV attention matmuls -> a quantized linear -> logits.

    ``bad`` breaks four rules: an asymmetric zero point, per-tensor weights, an attention
    matmul with Q/DQ on one input only, and one with none at all; plus an op TensorRT lacks."""
    from onnx import helper

    nodes, inits = [], [_init("tok_shape", np.array([0, 3, 16], np.int64)), _init("flat_shape", np.array([0, 48], np.int64))]
    nodes.append(helper.make_node("Reshape", ["pixel_values", "tok_shape"], ["tokens"], name="to_tokens"))
    n, i, q = _qdq("q_in", "tokens", zero=3 if bad else 0)
    nodes += n; inits += i
    n, i, k = _qdq("k_in", "tokens")
    nodes += n; inits += i
    nodes.append(helper.make_node("Transpose", [k], ["k_t"], name="k_transpose", perm=[0, 2, 1]))
    scores_right = "tokens_t" if bad else "k_t"
    if bad:  # the key path skips its Q/DQ
        nodes.append(helper.make_node("Transpose", ["tokens"], ["tokens_t"], name="raw_transpose", perm=[0, 2, 1]))
    nodes.append(helper.make_node("MatMul", [q, scores_right], ["scores"], name="attn_scores"))
    nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], name="attn_softmax", axis=-1))
    if bad:
        nodes.append(helper.make_node("MatMul", ["probs", "tokens"], ["context"], name="attn_context"))
    else:
        n, i, p = _qdq("p_in", "probs", scale=1 / 127)
        nodes += n; inits += i
        n, i, v = _qdq("v_in", "tokens")
        nodes += n; inits += i
        nodes.append(helper.make_node("MatMul", [p, v], ["context"], name="attn_context"))
    nodes.append(helper.make_node("Reshape", ["context", "flat_shape"], ["flat"], name="flatten"))
    n, i, x = _qdq("fc_in", "flat")
    nodes += n; inits += i
    n, i, w = _weight("fc", (48, 10), None if bad else 1)
    nodes += n; inits += i
    nodes.append(helper.make_node("MatMul", [x, w], ["fc_out"], name="fc"))
    if bad:
        nodes.append(helper.make_node("Shrink", ["fc_out"], ["shrunk"], name="odd_op"))
        nodes.append(helper.make_node("Det", ["scores"], ["det"], name="det_op"))
        nodes.append(helper.make_node("Identity", ["shrunk"], ["logits"], name="out"))
    else:
        nodes.append(helper.make_node("Identity", ["fc_out"], ["logits"], name="out"))
    return _graph(nodes, inits)


def test_a_clean_qdq_graph_has_no_violations():
    assert trt_rules.check_graph(_attention_model(bad=False)) == []


def test_each_broken_rule_is_reported_by_node_name():
    violations = trt_rules.check_graph(_attention_model(bad=True))
    found = {(v.node, v.rule) for v in violations}
    assert ("q_in_quant", "symmetric") in found and ("q_in_dequant", "symmetric") in found
    assert ("fc_weight_dequant", "per-channel-weights") in found
    assert ("attn_scores", "qdq-both-inputs") in found  # Q/DQ on the query only
    assert ("attn_context", "qdq-attention-matmul") in found  # no Q/DQ on probs or values
    assert ("det_op", "unsupported-op") in found
    assert ("odd_op", "unsupported-op") not in found  # Shrink is on TensorRT's list
    assert len(violations) == 6
    text = {str(v) for v in violations}
    assert "q_in_quant (QuantizeLinear): zero point is 3; TensorRT needs symmetric quantization with zero point 0" in text
    assert any(t.startswith("fc_weight_dequant (DequantizeLinear): weights of fc are quantized per tensor") for t in text)


def test_uint8_and_wrong_axis_and_foreign_domain():
    from onnx import helper

    nodes, inits = [], [_init("flat_shape", np.array([0, 48], np.int64))]
    nodes.append(helper.make_node("Reshape", ["pixel_values", "flat_shape"], ["flat"], name="flatten"))
    n, i, x = _qdq("u8", "flat", zero=128, zero_dtype=np.uint8)
    nodes += n; inits += i
    n, i, w = _weight("fc", (48, 10), 0)  # per channel, but along the input channels
    nodes += n; inits += i
    nodes.append(helper.make_node("MatMul", [x, w], ["logits"], name="fc"))
    model = _graph(nodes, inits)
    rules = {(v.node, v.rule) for v in trt_rules.check_graph(model)}
    assert {("u8_quant", "signed-int8"), ("u8_quant", "symmetric"), ("fc_weight_dequant", "per-channel-weights")} <= rules
    model.graph.node[-1].domain = "com.microsoft"
    assert ("fc", "unsupported-op") in {(v.node, v.rule) for v in trt_rules.check_graph(model)}


def test_24_sparsity_detection():
    w = np.arange(1, 33, dtype=np.float32).reshape(8, 4)
    assert not trt_rules.is_24_sparse(w, 0)
    w[[0, 1, 4, 5], :] = 0  # two zeros in every group of 4 along axis 0
    assert trt_rules.is_24_sparse(w, 0) and not trt_rules.is_24_sparse(w, 1)


def test_trtexec_command_and_build_config():
    from vitc.export.pipeline import ExportOptions

    opts = ExportOptions(precision="int8", max_batch=32, opt_batch=4, workspace_mib=2048)
    config = build_config("model.onnx", "model.engine", "model.timing.cache", 224, opts, sparse=True, fp8=False)
    assert config["builder_flags"] == ["FP16", "INT8", "SPARSE_WEIGHTS"] and config["explicit_quantization"]
    assert config["profile"] == {"input": "pixel_values", "min": [1, 3, 224, 224], "opt": [4, 3, 224, 224], "max": [32, 3, 224, 224]}
    assert trtexec_command(config) == (
        "trtexec --onnx=model.onnx --saveEngine=model.engine --minShapes=pixel_values:1x3x224x224 "
        "--optShapes=pixel_values:4x3x224x224 --maxShapes=pixel_values:32x3x224x224 --fp16 --int8 --sparsity=enable "
        "--timingCacheFile=model.timing.cache --memPoolSize=workspace:2048M --skipInference")
    static = build_config("m.onnx", "m.engine", "m.cache", 32, ExportOptions(precision="fp32", dynamic_batch=False), sparse=False, fp8=False)
    assert trtexec_command(static) == ("trtexec --onnx=m.onnx --saveEngine=m.engine --timingCacheFile=m.cache "
                                       "--memPoolSize=workspace:1024M --skipInference")


def test_tensorrt_folder_without_tensorrt(tiny_resnet, tmp_path):
    if tensorrt_module() is not None:
        pytest.skip("tensorrt imports here: the engine build test covers this machine")
    art = export_artifact(tiny_resnet, "tensorrt", tmp_path / "trt", eval_size=32)
    assert art.path == tmp_path / "trt" and art.precision == "fp16" and art.status == "passed"
    assert sorted(p.name for p in art.path.iterdir()) == ["build_config.json", "build_engine.sh", "model.manifest.json", "model.onnx"]
    config = json.loads((art.path / "build_config.json").read_text())
    assert config["rule_check"]["clean"] and config["builder_flags"] == ["FP16"]
    script = (art.path / "build_engine.sh").read_text()
    assert "trtexec --onnx=model.onnx --saveEngine=model.engine --minShapes=pixel_values:1x3x64x64" in script
    assert "not importable" in art.manifest["export"]["engine"] and "onnxruntime" in art.parity["checked"]
    # parity ran on the checked graph TensorRT builds from: fp32 ONNX vs PyTorch within 1e-4
    assert art.parity["top1_agreement"] == 1.0 and art.parity["max_abs_logit_error"] < 1e-4


def test_rule_violations_stop_the_export_and_leave_nothing(tmp_path):
    import onnx

    from vitc.models.intake import PreprocessFlags, load_model

    path = tmp_path / "bad.onnx"
    onnx.save(_attention_model(bad=True), str(path))
    backbone = load_model(str(path), flags=PreprocessFlags(input_size=4))
    with pytest.raises(TensorRTRuleError) as info:
        export_artifact(backbone, "tensorrt", tmp_path / "out", check=False)
    assert len(info.value.violations) == 6 and "q_in_quant (QuantizeLinear): zero point is 3" in str(info.value)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()
    with pytest.raises(VitcError, match="writes a folder, not m.engine"):
        export_artifact(backbone, "tensorrt", tmp_path / "m.engine")


def test_engine_build_where_tensorrt_imports(tiny_resnet, tmp_path):
    if tensorrt_module() is None:
        pytest.skip("tensorrt is not importable on this machine (no TensorRT, no NVIDIA GPU); the rule checks and the "
                    "trtexec command are tested above")
    art = export_artifact(tiny_resnet, "tensorrt", tmp_path / "trt", precision="fp32", eval_size=32)
    assert art.path.suffix == ".engine" and art.path.stat().st_size > 0 and (tmp_path / "trt" / "model.timing.cache").exists()
    assert art.parity["top1_agreement"] >= 0.995


def test_all_targets_write_what_they_can_past_a_rule_violation(tmp_path, capsys):
    import onnx

    from vitc.cli import run

    path = tmp_path / "bad.onnx"
    onnx.save(_attention_model(bad=True), str(path))
    out = tmp_path / "all"
    code = run(["export", "-m", str(path), "--input-size", "4", "-t", "all", "-o", str(out), "--no-check"])
    captured = capsys.readouterr()
    assert code == 2 and "the graph breaks 6 TensorRT rule(s)" in captured.err
    assert "attn_context" in captured.err and "rejected" in captured.out and "skipped" in captured.out  # coreml: an ONNX file
    assert sorted(p.name for p in out.iterdir()) == ["onnx", "openvino"]
