"""Parity's rounding floor: a quantized model is held to its artifact only as closely as its
simulation agrees with itself under float-rounding-sized changes at its rounding points."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitc.calibration.data import load_tensors
from vitc.calibration.sources import open_source
from vitc.compress.quantize import QuantConfig, apply
from vitc.export import parity
from vitc.runtimes.base import Session


class _Simulated(Session):
    """A stand-in runtime: the simulation itself, jittered with its own seed (a runtime whose only
    difference is float rounding), and optionally with a wrong output scale (a broken artifact)."""

    name = "simulated"

    def __init__(self, backbone, seed: int | None, logit_scale: float = 1.0):
        self.backbone, self.seed, self.logit_scale = backbone, seed, logit_scale
        self.jitter = parity.RoundingJitter(backbone.module, seed) if seed is not None else None

    def run(self, batch):
        x = torch.from_numpy(batch)
        with torch.no_grad():
            if self.jitter is None:
                out = self.backbone(x)
            else:
                with self.jitter:
                    out = self.backbone(x)
        return (out * self.logit_scale).numpy()

    def describe(self):
        return {"runtime": self.name, "seed": self.seed}


@pytest.fixture(scope="module")
def vit_w4a4():
    from vitc.models.intake import load_model

    backbone = load_model("zoo:vit-c10")
    calib = load_tensors(open_source("bundled:calib").select(32, seed=0), backbone.preprocess)[0]
    return apply(backbone, QuantConfig(wbits=4, abits=4), calib)


def test_jitter_is_float_rounding_sized_and_removed_after():
    from vitc.compress.quantize.modules import ActQuant

    q = ActQuant("x")
    q.mode = "quant"
    jitter = parity.RoundingJitter(torch.nn.Sequential(q), seed=0)
    x = torch.linspace(-3, 3, 1000)
    seen = []
    q.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with jitter:
        q(x)
    q(x)
    rel = ((seen[0] - x).abs() / x.abs().clamp_min(1e-6)).max().item()
    assert 0 < rel < 8 * parity.FLOOR_JITTER  # a few ulps, no more
    assert torch.equal(seen[1], x)  # hooks gone after the block
    assert not parity.RoundingJitter(torch.nn.Linear(2, 2))  # nothing that rounds: no floor


def test_stable_model_keeps_the_fixed_int8_bounds():
    from vitc.models.intake import load_model

    backbone = load_model("zoo:vit-c10")
    calib = load_tensors(open_source("bundled:calib").select(32, seed=0), backbone.preprocess)[0]
    q = apply(backbone, QuantConfig(), calib)  # W8A8: its floor is far inside the fixed bounds
    result = parity.check(q, _Simulated(q, None), "int8", data="bundled:eval", eval_size=200)
    floor = result["rounding_floor"]
    assert floor["top1_agreement"] >= 0.99 and floor["mean_rel_logit_error"] < 0.02
    assert result["min_agreement"] == parity.MIN_AGREEMENT["int8"]
    assert result["max_logit_error"]["mean_rel"] == parity.MAX_LOGIT_ERROR["int8"][0]
    assert result["passed"]


def test_a_runtime_at_the_floor_passes_and_a_broken_one_fails(vit_w4a4):
    # zoo:vit-c10 at W4A4 is chaotic: 2-ulp jitter flips about 4.5% of 200 top-1s (measured 95.5%).
    # The stand-in runtime jitters with the check's own seed, so it sits exactly at the floor.
    at_floor = parity.check(vit_w4a4, _Simulated(vit_w4a4, seed=0), "int8", data="bundled:eval", eval_size=200, seed=0)
    floor = at_floor["rounding_floor"]
    assert at_floor["top1_agreement"] == pytest.approx(floor["top1_agreement"])
    assert at_floor["top1_agreement"] < parity.MIN_AGREEMENT["int8"]  # the fixed bar is out of reach for any runtime
    assert at_floor["min_agreement"] == pytest.approx(floor["min_agreement"])
    assert at_floor["passed"], at_floor.get("failure")
    # a wrong output scale of 10% (a head's dequantize scale, say) still fails
    broken = parity.check(vit_w4a4, _Simulated(vit_w4a4, seed=1, logit_scale=1.1), "int8", data="bundled:eval", eval_size=200)
    assert not broken["passed"]
    assert "mean logit error" in broken["failure"] and "rounding floor" in broken["rule"]


def test_floor_bound_follows_the_image_count():
    ref = torch.randn(400, 10)
    same = parity.logit_floor(ref.clone(), ref)
    # a floor that flips nothing moves no bar (int8's 98% stands, whatever the image count)
    assert same["top1_agreement"] == 1.0 and same["min_agreement"] == 1.0
    few = ref[:64].clone()
    few[:4] = -few[:4]
    assert parity.logit_floor(few, ref[:64])["min_agreement"] == 1.0  # a rate from 64 images moves no bar
    flipped = ref.clone()
    flipped[:20] = -flipped[:20]  # 20 of 400 top-1s flip (at most; ties aside)
    f = parity.logit_floor(flipped, ref)
    d = 1 - f["top1_agreement"]
    assert f["min_agreement"] == pytest.approx(f["top1_agreement"] - 2 * np.sqrt(2 * d / 400))
