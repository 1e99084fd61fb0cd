"""Runtime sessions: thread control, input shapes, fallback detection, and clear errors for what is absent here."""
from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from vitc.errors import MissingExtraError, VitcError
from vitc.runtimes import open_session, runtime_for


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    path = tmp_path_factory.mktemp("rt") / "m.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    return path, model


@pytest.fixture(scope="module")
def openvino_file(onnx_file, tmp_path_factory):
    import openvino as ov

    path = tmp_path_factory.mktemp("rt") / "m.xml"
    ov.save_model(ov.convert_model(str(onnx_file[0])), str(path), compress_to_fp16=False)
    return path


def _batch(n=2):
    return np.random.default_rng(0).normal(size=(n, 3, 16, 16)).astype(np.float32)


def test_onnxruntime_session_threads_shape_and_no_fallback(onnx_file):
    path, model = onnx_file
    s = open_session(path, threads=1)
    assert s.describe()["threads"] == 1 and s.session.get_session_options().intra_op_num_threads == 1
    assert s.input_shape == (None, 3, 16, 16)
    assert s.fallbacks() == []
    x = _batch()
    np.testing.assert_allclose(s.run(x), model(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_onnxruntime_without_cuda_says_so(onnx_file):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(VitcError, match="CUDAExecutionProvider"):
        open_session(onnx_file[0], device="cuda")


def test_onnxruntime_fallback_is_detected(onnx_file):
    s = open_session(onnx_file[0], threads=1)
    s.requested = ["CUDAExecutionProvider", "CPUExecutionProvider"]  # as if CUDA had failed to initialise
    assert s.fallbacks() == ["onnxruntime asked for CUDAExecutionProvider but runs on CPUExecutionProvider"]


def test_openvino_session_records_threads_precision_and_devices(openvino_file, onnx_file):
    s = open_session(openvino_file, threads=1)
    d = s.describe()
    assert d["precision"] == "INFERENCE_PRECISION_HINT=f32" and d["threads"] == 1 and d["execution_devices"] == ["CPU"]
    assert s.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    assert s.fallbacks() == []
    x = _batch()
    np.testing.assert_allclose(s.run(x), onnx_file[1](torch.from_numpy(x)).detach().numpy(), atol=1e-4)
    s.execution_devices = ["GPU.0"]  # as if the plugin had placed the graph elsewhere
    assert "asked for CPU but runs on GPU.0" in s.fallbacks()[0]


def test_openvino_absent_device_is_an_error(openvino_file):
    import openvino as ov

    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an NPU")
    with pytest.raises(VitcError, match="no device NPU"):
        open_session(openvino_file, device="npu")


def test_torch_session_sets_threads(tiny_vit):
    before = torch.get_num_threads()
    try:
        s = open_session(tiny_vit, threads=1)
        assert torch.get_num_threads() == 1 and s.describe()["threads"] == 1 and s.input_shape is None
        assert s.run(tiny_vit.example_input(2).numpy()).shape == (2, 10)
    finally:
        torch.set_num_threads(before)


def test_runtime_picked_by_type_and_errors(tmp_path, onnx_file, tiny_vit):
    assert runtime_for("a.onnx") == "onnxruntime" and runtime_for("a.xml") == "openvino"
    assert runtime_for("a.engine") == "tensorrt" and runtime_for("a.mlpackage") == "coreml"
    assert runtime_for(tiny_vit) == "torch"
    with pytest.raises(VitcError, match="no runtime runs"):
        runtime_for("a.bin")
    with pytest.raises(VitcError, match="unknown runtime"):
        open_session(onnx_file[0], runtime="tvm")
    with pytest.raises(VitcError, match="torch runtime runs a PyTorch model"):
        open_session(onnx_file[0], runtime="torch")
    with pytest.raises(VitcError, match="exported artifacts"):
        open_session(tiny_vit, runtime="onnxruntime")
    with pytest.raises(VitcError, match="does not exist"):
        open_session(tmp_path / "missing.onnx")


def test_tensorrt_and_coreml_fail_clearly_where_absent(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(MissingExtraError, match="tensorrt"):
            open_session(engine)
    package = tmp_path / "m.mlpackage"
    package.mkdir()
    if platform.system() != "Darwin":
        with pytest.raises(VitcError, match="only on macOS"):
            open_session(package)
