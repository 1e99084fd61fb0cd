"""The coreml target on Linux: an ML program converted through torch.export, validated as a spec.

Prediction parity needs macOS (CoreML runs models only there); elsewhere it is skipped with
that reason and the manifest says so. Quantized (W8A8) models convert their simulation: int8
weight constants and activation quantize/dequantize ops at the pass's own scales. Tiny models
keep this under a minute single-threaded."""
from __future__ import annotations

import platform

import pytest

import torch

from vitc.calibration.data import load_tensors
from vitc.compress.quantize import QuantConfig, apply
from vitc.errors import VitcError
from vitc.export import export_artifact


def _quantized(backbone, calib_images, **config):
    return apply(backbone, QuantConfig(**config), load_tensors(calib_images, backbone.preprocess)[0])


def test_coreml_package_is_structurally_valid(tiny_vit, tmp_path):
    pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'vitc[coreml]')")
    from vitc.export.coreml import validate_package

    art = export_artifact(tiny_vit, "coreml", tmp_path / "vit.mlpackage", eval_size=16)
    assert art.path.is_dir() and art.precision == "fp16" and (tmp_path / "vit.mlpackage.manifest.json").exists()
    structure = art.manifest["export"]["structure"]
    assert structure["type"] == "mlProgram"
    assert structure["input"] == {"name": "pixel_values", "dtype": "FLOAT32", "shape": [1, 3, 32, 32], "batch_range": [1, 64]}
    assert set(structure["weight_dtypes"]) == {"FLOAT16"}  # FP16 by default
    ops = structure["op_types"]
    # 2 blocks: 6 linears each (q, k, v, o, fc1, fc2) + the classifier; 2 matmuls (QK^T, PV) and a softmax per block
    assert ops["linear"] == 13 and ops["matmul"] == 4 and ops["softmax"] == 2 and ops["conv"] == 1
    if platform.system() != "Darwin":
        assert art.status == "unchecked" and "only on macOS" in art.parity["skipped"]
    # The validator holds packages to the precision they claim.
    with pytest.raises(VitcError, match=r"weights are stored as \['FLOAT16'\], not only \['FLOAT32'\]"):
        validate_package(art.path, 32, "fp32", True, 64)
    with pytest.raises(VitcError, match=r"the input is FLOAT32 \[1, 3, 32, 32\], not FLOAT32 \[N, 3, 64, 64\]"):
        validate_package(art.path, 64, "fp16", True, 64)
    with pytest.raises(VitcError, match="activations are quantized to nothing, not int8"):
        validate_package(art.path, 32, "w8a8", True, 64)


def test_coreml_refuses_what_it_cannot_take(tiny_vit, calib_images, tmp_path):
    pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'vitc[coreml]')")
    integer = tiny_vit.with_module(tiny_vit.module, {"pass": "integer", "config": {}})
    with pytest.raises(VitcError, match="takes the quantize pass's W8A8 models, not the integer pass's"):
        export_artifact(integer, "coreml", tmp_path / "q.mlpackage")
    with pytest.raises(VitcError, match="writes fp16, fp32 or int8"):
        export_artifact(tiny_vit, "coreml", tmp_path / "q.mlpackage", precision="bf16")
    w4 = _quantized(tiny_vit, calib_images, wbits=4, calibrator="minmax")
    with pytest.raises(VitcError, match=r"layer '.+' has 4-bit weights; the coreml W8A8 export takes 8-bit models only") as err:
        export_artifact(w4, "coreml", tmp_path / "q.mlpackage")
    assert "--bits 8" in err.value.fix
    log2 = _quantized(tiny_vit, calib_images, softmax="log2", calibrator="minmax")
    with pytest.raises(VitcError, match=r"layer '.+' quantizes its probs on a log2 grid") as err:
        export_artifact(log2, "coreml", tmp_path / "q.mlpackage")
    assert "--bits 8" in err.value.fix
    with pytest.raises(VitcError, match="its CoreML package is w8a8, not fp16"):
        export_artifact(_quantized(tiny_vit, calib_images, calibrator="minmax"), "coreml", tmp_path / "q.mlpackage",
                        precision="fp16")
    assert not list(tmp_path.iterdir())


def test_decomposed_export_mode_keeps_the_simulation(tiny_vit, calib_images, eval_images):
    """The export hook changes the ops torch.export sees, not the numbers, and undoes cleanly."""
    from vitc.compress.quantize.modules import act_quantizers, set_decomposed_export, weighted_layers

    q = _quantized(tiny_vit, calib_images)
    x = load_tensors(eval_images, tiny_vit.preprocess)[0]
    sim = q(x)
    state = {k: v.clone() for k, v in q.module.state_dict().items()}
    set_decomposed_export(q.module, True)
    assert all(a.frozen_qparams is not None for a in act_quantizers(q.module).values())
    assert all(layer.weight_int8.dtype == torch.int8 for layer in weighted_layers(q.module).values())
    assert torch.equal(q(x), sim)  # same rounding, clamping and weight values, bit for bit
    assert q.module.state_dict().keys() == state.keys()  # the int8 codes are not saved
    set_decomposed_export(q.module, False)
    assert torch.equal(q(x), sim)
    assert not any("weight_int8" in layer._buffers for layer in weighted_layers(q.module).values())


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_resnet"])
def test_w8a8_package_holds_the_simulation(name, request, calib_images, tmp_path):
    pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'vitc[coreml]')")
    from vitc.compress.quantize.modules import weighted_layers
    from vitc.export.coreml import package_scales, validate_package

    backbone = request.getfixturevalue(name)
    q = _quantized(backbone, calib_images)
    layers = q.transforms[-1]["layers"]
    n_weights = sum("input" in spec for spec in layers.values())
    n_acts = sum(1 if "input" in spec else 4 for spec in layers.values())
    dynamic = name == "tiny_vit"  # the resnet covers --static-batch
    art = export_artifact(q, "coreml", tmp_path / "q.mlpackage", eval_size=16, dynamic_batch=dynamic)
    assert art.precision == "w8a8" and art.manifest["precision"] == "w8a8"
    export = art.manifest["export"]
    assert export["minimum_deployment_target"] == "iOS17"
    assert export["structure"]["input"]["batch_range"] == ([1, 64] if dynamic else None)
    pre = export["pre_conversion_parity"]
    assert pre["images"] == 64 and pre["max_abs_logit_diff"] <= 1e-4 and pre["top1_agreement"] == 1.0
    structure = export["structure"]
    facts, expected = structure["w8a8"], structure["w8a8"]["expected"]
    assert expected["int8_weights"] == n_weights and expected["activation_quantizers"] == n_acts
    assert expected["program_quantize_ops"] == n_acts  # every quantizer of the record made it into the program
    # one int8 weight constant per quantized layer, each linear/conv reading int8 on both operands
    assert facts["int8_weight_constants"] == n_weights == facts["linear_conv_int8"] == facts["linear_conv_ops"]
    assert set(structure["weight_dtypes"]) == {"INT8", "FLOAT16"}  # int8 codes (and zero points), the rest fp16
    # quantizers reading one tensor on one grid (q/k/v projections) are one op in the package
    assert 0 < facts["quantize_ops"] == expected["distinct_activation_quantizers"] <= n_acts
    assert facts["quantize_output_dtypes"] == {"INT8": facts["quantize_ops"]}  # symmetric at 8 bits
    assert facts["dequantize_of_quantize"] == facts["quantize_ops"]
    # the package's grids are the pass's own (stored in fp16), not a re-calibration
    assert facts["scales"]["activation"]["count"] == facts["quantize_ops"]
    assert facts["scales"]["weight"]["count"] == sum(l.weight_scale.numel() for l in weighted_layers(q.module).values())
    assert facts["scales"]["activation"]["max_rel_diff"] <= 2 ** -11 and facts["scales"]["weight"]["max_rel_diff"] <= 1e-3
    n_attention = sum("input" not in spec for spec in layers.values())
    assert facts["matmul_int8"] == 2 * n_attention == expected["attention_matmuls"]
    if name == "tiny_vit":
        assert n_attention == 2 and n_weights == 14  # patch conv, 6 linears per block, classifier
    if platform.system() != "Darwin":
        assert art.status == "unchecked" and "only on macOS" in art.parity["skipped"]
    # The validator holds the package to the counts it is given.
    with pytest.raises(VitcError, match=rf"{n_weights} int8 weight constants, not the {n_weights + 1}"):
        validate_package(art.path, q.preprocess.input_size, "w8a8", dynamic, 64, expected={**expected, "int8_weights": n_weights + 1})
    scales = package_scales(art.path)
    scales["activation"][0, 0] *= 1.01  # a grid 1% off is not the pass's grid
    with pytest.raises(VitcError, match=r"activation scales differ from vitc.s by up to 0.0099 \(relative\)"):
        validate_package(art.path, q.preprocess.input_size, "w8a8", dynamic, 64, scales=scales)
