"""QDQ ONNX export of quantized models: int8 weights in the graph, ONNX Runtime and OpenVINO agree with the simulation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitc.calibration.data import load_tensors
from vitc.compress.quantize import QuantConfig, apply
from vitc.errors import VitcError


@pytest.fixture(scope="module")
def calib32():
    from vitc.calibration.sources import open_source

    return open_source("bundled:calib").select(32, seed=0)


def _x(backbone, source):
    return load_tensors(source, backbone.preprocess)[0]


def _against_simulation(q, backbone, path, runtime, eval_images, session=None):
    """(top-1 agreement, max |logit error| relative to the logit scale) of the artifact vs the simulation."""
    from vitc.runtimes import open_session

    x = _x(backbone, eval_images)
    with torch.no_grad():
        sim = q(x).numpy()
    out = (session or open_session(path, runtime=runtime, threads=1)).run(x.numpy())
    return (out.argmax(-1) == sim.argmax(-1)).mean(), np.abs(out - sim).max() / max(1.0, np.abs(sim).max())


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_mobilevit"])
def test_qdq_export_runs_int8_in_onnxruntime(name, request, calib32, eval_images, tmp_path):
    import onnx

    from vitc.export.qdq import export_qdq_onnx

    backbone = request.getfixturevalue(name)
    q = apply(backbone, QuantConfig(), _x(backbone, calib32))
    path = export_qdq_onnx(q, tmp_path / "q.onnx")
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    n_layers = sum("input" in spec for spec in q.transforms[-1]["layers"].values())  # quantized Linear/Conv
    assert len(int8) >= n_layers  # every quantized weight is stored as int8 codes
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits for n in graph.node)
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= n_layers  # activations are quantized at run time
    agree, err = _against_simulation(q, backbone, path, "onnxruntime", eval_images)
    assert agree >= 0.98, f"onnxruntime agrees with the simulation on only {agree:.1%}"  # the int8 parity promise
    assert err < 0.1


def test_onnxruntime_runs_every_projection_in_int8(tiny_vit, calib32, eval_images, tmp_path):
    """q, k and v share one quantized input; without a Q/DQ pair each, ORT keeps them float MatMuls."""
    import onnx
    import onnxruntime as ort

    from vitc.export.qdq import export_qdq_onnx

    q = apply(tiny_vit, QuantConfig(), _x(tiny_vit, calib32))

    def float_matmuls_with_int8_weights(path):
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        g = onnx.load(opts.optimized_model_filepath).graph
        dq_weights = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and any(
            i.name == n.input[0] and i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2 for i in g.initializer)}
        return [n.name for n in g.node if n.op_type == "MatMul" and n.input[1] in dq_weights]

    from vitc.export.qdq_speed import SpeedConfig

    # no attention fusion on either side, so only the split differs (it is what this test is about)
    shared = export_qdq_onnx(q, tmp_path / "shared.onnx", split_shared_inputs=False, speed=SpeedConfig.for_runtime("tensorrt"))
    split = export_qdq_onnx(q, tmp_path / "split.onnx", speed=SpeedConfig.for_runtime("tensorrt"))
    assert len(float_matmuls_with_int8_weights(shared)) >= 3  # the q/k/v projections of each block
    assert float_matmuls_with_int8_weights(split) == []
    qs = lambda p: sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(p)).graph.node)
    assert qs(split) == qs(shared) + 2 * len(tiny_vit.structure.transformer_stages[0].blocks)  # k and v get their own pair
    agree, err = _against_simulation(q, tiny_vit, split, "onnxruntime", eval_images)
    assert agree >= 0.95 and err < 0.1


def test_openvino_runs_int8_kernels(tiny_vit, calib32, eval_images, tmp_path):
    from vitc.export.qdq import export_qdq_onnx
    from vitc.runtimes import open_session

    q = apply(tiny_vit, QuantConfig(), _x(tiny_vit, calib32))
    path = export_qdq_onnx(q, tmp_path / "q.onnx")
    session = open_session(path, runtime="openvino", threads=1)
    precisions = session.runtime_precisions()
    assert precisions.get("i8", 0) + precisions.get("u8", 0) > 0, precisions
    assert _against_simulation(q, tiny_vit, path, "openvino", eval_images, session)[0] >= 0.95


def test_low_bit_models_do_not_export(tiny_vit, calib32, tmp_path):
    from vitc.export.qdq import export_qdq_onnx

    # low-bit activations have no int8 QDQ form (4-bit weights do: issue 18, tests/test_lowbit.py)
    q = apply(tiny_vit, QuantConfig(wbits=8, abits=4, calibrator="minmax"), _x(tiny_vit, calib32))
    with pytest.raises(VitcError, match="to 4 bits; the int8 QDQ export takes 8-bit activations only"):
        export_qdq_onnx(q, tmp_path / "q.onnx")
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_mobilevit"])
def test_default_w8a8_is_symmetric_and_tensorrt_clean(name, request, calib32, eval_images, tmp_path):
    """8-bit activations default to signed int8 with zero point 0: TensorRT's explicit-quantization
    rule, and what keeps OpenVINO's padded int8 convs equal to the simulation."""
    import onnx
    from onnx import numpy_helper

    from vitc.export.qdq import export_qdq_onnx
    from vitc.export.trt_rules import check_graph

    backbone = request.getfixturevalue(name)
    q = apply(backbone, QuantConfig(), _x(backbone, calib32))
    from vitc.export.qdq_speed import SpeedConfig

    path = export_qdq_onnx(q, tmp_path / "q.onnx", speed=SpeedConfig.for_runtime("tensorrt"))  # the TensorRT target's graph
    model = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    zero_points = [consts[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert check_graph(model) == [], [str(v) for v in check_graph(model)]
    agree, _ = _against_simulation(q, backbone, path, "openvino", eval_images)
    assert agree >= 0.98, f"OpenVINO agrees with the simulation on only {agree:.1%}"


def test_asymmetric_padded_convs_match_in_openvino(tiny_mobilevit, calib32, eval_images, tmp_path):
    """Asymmetric conv inputs with padding export with a float Pad before the quantizer, so
    OpenVINO (which pads quantized inputs with code 0, not the zero point) matches the simulation."""
    import onnx

    from vitc.export.qdq import export_qdq_onnx

    q = apply(tiny_mobilevit, QuantConfig(scheme="asymmetric"), _x(tiny_mobilevit, calib32))
    path = export_qdq_onnx(q, tmp_path / "q.onnx")
    assert any(n.op_type == "Pad" for n in onnx.load(str(path)).graph.node)
    agree, err = _against_simulation(q, tiny_mobilevit, path, "openvino", eval_images)
    assert agree >= 0.98 and err < 0.1
