"""The quantization pass on the tiny fixtures: exact rewrites, scheme choice, save/load, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from vitc.calibration.data import load_tensors
from vitc.compress.quantize import QuantConfig, apply, quant_params
from vitc.compress.quantize import ptq, reparam
from vitc.compress.quantize.modules import QuantConv2d, weighted_layers
from vitc.errors import VitcError


@pytest.fixture(scope="module")
def calib32():
    from vitc.calibration.sources import open_source

    return open_source("bundled:calib").select(32, seed=0)


def _x(backbone, source):
    return load_tensors(source, backbone.preprocess)[0]


def test_fold_channel_affine_preserves_layernorm_linear_exactly():
    torch.manual_seed(0)
    norm, lin = nn.LayerNorm(16), nn.Linear(16, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    x = torch.randn(4, 5, 16) * 3
    ref = lin(norm(x))
    out = norm(x).detach()
    lo, hi = out.amin((0, 1)).clamp_max(0), out.amax((0, 1)).clamp_min(0)  # grids always hold zero
    r, t = reparam.repq_factors(lo, hi, 8)
    nw, nb, [(w, b)] = reparam.fold_channel_affine(norm.weight.detach(), norm.bias.detach(),
                                                   [(lin.weight.detach(), lin.bias.detach())], r, t)
    y = nn.functional.layer_norm(x, (16,), nw, nb, norm.eps)
    assert torch.allclose(nn.functional.linear(y, w, b), ref, atol=1e-5)
    # after RepQ every channel has the same (per-tensor) scale and zero point
    ylo, yhi = (lo + t) / r, (hi + t) / r
    s = (yhi - ylo) / 255
    assert torch.allclose(s, s.mean().expand_as(s), rtol=1e-4)
    z = -ylo / s
    # ... up to the rounding of each channel's own zero point (half a step)
    assert torch.all((z - z.mean().round()).abs() <= 0.5 + 1e-3)


def test_repq_and_smoothing_preserve_the_float_vit(tiny_vit, calib32):
    x = _x(tiny_vit, calib32)
    for config in (QuantConfig(), QuantConfig(smooth_alpha=0.5)):
        module = copy.deepcopy(tiny_vit.module)
        changed = ptq.reparameterise_norms(module, tiny_vit.structure, config, x)
        assert len(changed) == 4
        with torch.no_grad():
            assert torch.allclose(module(x), tiny_vit.module(x), atol=1e-4)


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_mobilevit"])
def test_batchnorm_folding_preserves_outputs(name, request, eval_images):
    backbone = request.getfixturevalue(name)
    x = _x(backbone, eval_images.select(8))
    module = copy.deepcopy(backbone.module)
    folded = ptq.fold_batchnorms(module, backbone.structure)
    assert folded and not any(isinstance(m, nn.BatchNorm2d) for n, m in module.named_modules() if n in folded)
    with torch.no_grad():
        assert torch.allclose(module(x), backbone.module(x), atol=1e-4)


def test_w8a8_vit_close_to_float_and_reports(tiny_vit, calib32, eval_images):
    q = apply(tiny_vit, QuantConfig(), _x(tiny_vit, calib32))
    x = _x(tiny_vit, eval_images)
    with torch.no_grad():
        a, b = tiny_vit(x), q(x)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
    record = q.transforms[-1]
    assert record["pass"] == "quantize" and record["config"]["wbits"] == 8
    assert len(record["plan"]["attention"]) == 2  # both attention matmuls routed through the core
    assert min(v for v in record["sqnr_db"].values()) > 25  # dB, every layer output at W8A8
    assert record["vit_quantizers"]["post_layernorm"].startswith("repq")
    params = quant_params(q)
    core = params["model.vit.layers.0.attention.core"]
    assert set(core) == {"q", "k", "probs", "v"} and core["probs"]["scale"].numel() == 1
    fc1 = params["model.vit.layers.0.mlp.fc1"]
    assert fc1["weight_codes"].abs().max() <= 127 and fc1["weight_scale"].shape == (128,)
    assert tiny_vit.transforms == []  # the input backbone is untouched


def test_low_bit_vit_uses_vit_quantizers(tiny_vit, calib32):
    q = apply(tiny_vit, QuantConfig(wbits=4, abits=4, gelu="twin"), _x(tiny_vit, calib32))
    layers = q.transforms[-1]["layers"]
    assert q.transforms[-1]["vit_quantizers"]["post_gelu"] == "twin x2"
    assert layers["model.vit.layers.0.attention.core"]["probs"]["kind"] == "logsqrt2"
    assert layers["model.vit.layers.0.mlp.fc2"]["input"]["kind"] == "twin"
    assert layers["model.vit.layers.0.mlp.fc1"]["wbits"] == 4
    assert layers["model.classifier"]["wbits"] == 8  # the ends stay at 8 bits


def test_zeros_in_weights_stay_zero(tiny_vit, calib32):
    backbone = tiny_vit.copy()
    fc1 = backbone.module.get_submodule("model.vit.layers.0.mlp.fc1")
    with torch.no_grad():
        fc1.weight[:, ::2] = 0.0  # what 2:4 sparsity or pruning leaves behind
    for bits in (8, 4):
        q = apply(backbone, QuantConfig(wbits=bits, abits=bits), _x(backbone, calib32))
        wq = q.module.get_submodule("model.vit.layers.0.mlp.fc1").weight
        assert torch.all(wq[:, ::2] == 0)


def test_per_layer_scheme_choice_by_reconstruction():
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(2, 4, 1), "c", abits=4, wbits=8)
    x = torch.rand(8, 2, 6, 6)
    x[:, 1] *= 100.0  # one channel a hundred times wider than the other: per-tensor wastes its grid
    lo, hi = x.amin((0, 2, 3)), x.amax((0, 2, 3))
    from vitc.compress.quantize import quantizers as Q

    tensor = (True, False, *Q.uniform_qparams(x.min(), x.max(), 4, True))
    tensor_asym = (False, False, *Q.uniform_qparams(x.min(), x.max(), 4, False))
    channel = (False, True, *Q.uniform_qparams(lo, hi, 4, False))
    root = nn.Sequential(conv)
    chosen = ptq.choose_layer_schemes(root, x, {"0": [tensor, tensor_asym, channel]})
    assert chosen == {"0": "asymmetric/channel"}
    y = torch.relu(torch.randn(8, 2, 6, 6))  # non-negative: asymmetric beats symmetric per tensor
    chosen = ptq.choose_layer_schemes(root, y, {"0": [(True, False, *Q.uniform_qparams(0.0, y.max(), 4, True)),
                                                      (False, False, *Q.uniform_qparams(0.0, y.max(), 4, False))]})
    assert chosen == {"0": "asymmetric/tensor"}


def test_hybrid_w6a6_picks_schemes_per_layer(tiny_mobilevit, calib32):
    q = apply(tiny_mobilevit, QuantConfig(wbits=6, abits=6), _x(tiny_mobilevit, calib32))
    record = q.transforms[-1]
    assert record["plan"]["folded_bn"] and record["plan"]["attention"]
    assert any(v.endswith("/channel") for v in record["scheme_choice"].values())
    for layer in weighted_layers(q.module).values():
        qmin, qmax = layer.input_quant.qrange
        assert torch.all((layer.input_quant.zero_point >= qmin) & (layer.input_quant.zero_point <= qmax))


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_mobilevit"])
def test_save_load_round_trip(name, request, calib32, eval_images, tmp_path):
    from vitc.compress.quantize.saved import save_quantized
    from vitc.models.intake import load_model

    backbone = request.getfixturevalue(name)
    q = apply(backbone, QuantConfig(), _x(backbone, calib32))
    folder = save_quantized(q, tmp_path / "q")
    assert (folder / "vitc_quant.json").exists() and (folder / "model.safetensors").exists()
    loaded = load_model(str(folder))
    x = _x(backbone, eval_images.select(16))
    with torch.no_grad():
        assert torch.allclose(loaded(x), q(x), atol=1e-5)
    assert loaded.transforms[-1]["pass"] == "quantize"
    with pytest.raises(VitcError, match="already exists"):
        save_quantized(q, folder)


def test_python_api(tiny_vit, calib32):
    import vitc

    q = vitc.quantize(tiny_vit, _x(tiny_vit, calib32), {"calibrator": "minmax"}, abits=6, wbits=6)
    assert q.transforms[-1]["config"]["abits"] == 6 and q.transforms[-1]["config"]["calibrator"] == "minmax"
    with pytest.raises(VitcError, match="unknown quantization settings"):
        vitc.quantize(tiny_vit, None, bitz=3)


# ---------------------------------------------------------------- bad input

def test_wrong_image_size_and_channels(tiny_vit, calib32):
    x = _x(tiny_vit, calib32)
    with pytest.raises(VitcError, match="64x64 but the model takes 32x32"):
        apply(tiny_vit, QuantConfig(), torch.nn.functional.interpolate(x, size=64))
    with pytest.raises(VitcError, match=r"expected \(N, 3, 32, 32\)"):
        apply(tiny_vit, QuantConfig(), x[:, :1])


def test_nan_in_activations_names_the_layer(tiny_vit, calib32):
    broken = tiny_vit.copy()
    with torch.no_grad():
        broken.module.get_submodule("model.vit.layers.1.mlp.fc1").bias[3] = float("nan")
    with pytest.raises(VitcError, match="NaN in the activations of model.vit.layers.1.mlp.fc2"):
        apply(broken, QuantConfig(ln_reparam=False), _x(tiny_vit, calib32))


def test_too_few_images_and_bad_bits(tiny_vit, calib32):
    x = _x(tiny_vit, calib32)
    with pytest.raises(VitcError, match="entropy calibrator needs at least 64 calibration images, got 32"):
        apply(tiny_vit, QuantConfig(calibrator="entropy"), x)
    with pytest.raises(VitcError, match="--wbits 5 is not supported"):
        apply(tiny_vit, QuantConfig(wbits=5), x)
    with pytest.raises(VitcError, match="--abits 12 is not supported"):  # 16 is weight-only (issue 18)
        QuantConfig(abits=12).validate()


def test_no_quantizable_layer(calib32):
    from vitc.backbone import Backbone
    from vitc.models.preprocess import Preprocess

    class Pool(nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    backbone = Backbone(module=Pool(), preprocess=Preprocess(32, 32), labels=["a", "b", "c"], source="pool")
    with pytest.raises(VitcError, match="no quantizable layer"):
        apply(backbone, QuantConfig(), torch.rand(8, 3, 32, 32))


def test_w8a8_on_the_trained_reference_vit(calib32, eval_images):
    from conftest import zoo_or_skip

    backbone = zoo_or_skip("vit-c10")
    q = apply(backbone, QuantConfig(), _x(backbone, calib32))
    x, y = load_tensors(eval_images, backbone.preprocess)
    with torch.no_grad():
        a, b = backbone(x).argmax(-1), q(x).argmax(-1)
    assert (a == b).float().mean() >= 0.95  # 64 real test images: at most 3 flips
    assert (b == y).float().mean() >= (a == y).float().mean() - 0.05
