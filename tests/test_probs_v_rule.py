"""Attention probabilities x V at 8 bits (softmax="auto"): quantized where calibration shows the
probabilities' uint8 grid keeps their mass, float where it rounds more than
``plan.PROBS_MASS_LOSS_MAX`` of it to 0, listed with the measured share; the same rule in both
backends (PyTorch graph and ONNX)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitc.calibration.observers import Histogram, mass_rounded_to_zero
from vitc.compress.quantize import QuantConfig
from vitc.compress.quantize.plan import PROBS_MASS_LOSS_MAX

CONFIG = QuantConfig(calibrator="minmax", sites="graph")


class PatchAttention(nn.Module):
    """64 px image -> 256 tokens of 16 channels -> one attention whose sharpness sets how much of each
    row's probability mass sits in values far below 1/255 (sharp: ~0.9 on the token itself, the rest
    spread thin over 255 others; flat: every probability near 1/256)."""

    def __init__(self, sharpness: float):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.v = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)
        self.sharpness = sharpness

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        u = F.normalize(t, dim=-1)
        p = torch.softmax(self.sharpness * (u @ u.transpose(1, 2)), dim=-1)
        return self.out(p @ self.v(t))


def _backbone(sharpness: float):
    from vitc.backbone import Backbone
    from vitc.models.preprocess import Preprocess

    return Backbone(PatchAttention(sharpness).eval(), Preprocess(64, 64), [], f"attn{sharpness}")


def _images(base, calib_images, n=16):
    from vitc.calibration.data import load_tensors

    return load_tensors(calib_images.select(n, seed=0), base.preprocess)[0]


def test_mass_rounded_to_zero_counts_the_values_below_half_a_step():
    # values 0.001 (x900) and 0.9 (x1): 0.9 of the mass above, 0.9 * 0.001 / (0.9 + 0.9) = half below
    counts = torch.zeros(1000, dtype=torch.float64)
    counts[1], counts[900] = 900, 1  # centres 0.0015 and 0.9005 on [0, 1]
    h = Histogram(counts, 0.0, 1.0)
    lost = mass_rounded_to_zero(h, 1 / 255)
    assert lost == pytest.approx(900 * 0.0015 / (900 * 0.0015 + 0.9005), rel=1e-9)
    assert mass_rounded_to_zero(h, 0.002) == 0.0  # 0.0015 is above half of 0.002


def _probs_v_float(coverage) -> list[dict]:
    return [s for s in coverage["left_float"] if s["attention"]]


@pytest.mark.parametrize("sharpness, kept_float", [(0.5, False), (12.0, True)])
def test_graph_path_decides_probs_v_by_the_mass_its_grid_keeps(sharpness, kept_float, calib_images):
    from vitc.compress.quantize.torch_graph import apply_graph

    base = _backbone(sharpness)
    x = _images(base, calib_images)
    q = apply_graph(base, CONFIG, x)
    cov = q.transforms[-1]["coverage"]
    floats = _probs_v_float(cov)
    if kept_float:
        assert len(floats) == 1 and "of the probability mass to 0" in floats[0]["reason"]
        lost = float(floats[0]["reason"].split("rounds ")[1].split("%")[0]) / 100
        assert lost > PROBS_MASS_LOSS_MAX
        assert cov["flops_share"] < 1.0 and cov["flops_share_without_attention"] == 1.0
        # the dropped site's quantizers are out of the graph: its operands are the float tensors
        assert not any(i["pattern"] == "post-softmax" for s in q.transforms[-1]["quant_plan"]["sites"] for i in s["inputs"])
    else:
        assert floats == [] and cov["flops_share"] == 1.0
    with torch.no_grad():
        ref, sim = base(x), q(x)
    assert F.cosine_similarity(ref.flatten(1), sim.flatten(1)).min() > 0.99
    # --softmax uniform quantizes it whatever the rule would say
    asked = apply_graph(base, QuantConfig(calibrator="minmax", sites="graph", softmax="uniform"), x)
    assert asked.transforms[-1]["coverage"]["flops_share"] == 1.0


@pytest.mark.parametrize("sharpness, kept_float", [(0.5, False), (12.0, True)])
def test_onnx_backend_applies_the_same_rule(sharpness, kept_float, calib_images, tmp_path):
    import onnx

    from vitc.compress.quantize.onnx_graph import quantize_model
    from vitc.models import onnx_source

    base = _backbone(sharpness)
    x = _images(base, calib_images)
    path = tmp_path / "attn.onnx"
    torch.onnx.export(base.module, x[:1], str(path), input_names=["image"], output_names=["out"], opset_version=17,
                      dynamo=False)
    model, record = quantize_model(onnx_source.read(path, 64), CONFIG, x)
    floats = _probs_v_float(record["coverage"])
    assert (len(floats) == 1) == kept_float
    softmax_out = next(n.output[0] for n in model.graph.node if n.op_type == "Softmax")
    probs_quantized = any(n.op_type == "QuantizeLinear" and n.input[0] == softmax_out for n in model.graph.node)
    assert probs_quantized != kept_float
    if kept_float:  # the site's operands get no Q/DQ at all (none left dangling)
        quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
        pv = next(n for n in model.graph.node if n.op_type == "MatMul" and softmax_out in n.input)
        assert not quantized & set(pv.input)
    onnx.checker.check_model(model)
