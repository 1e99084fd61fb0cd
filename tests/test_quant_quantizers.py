"""Quantizers and calibrators against hand-computed values and known distributions."""
from __future__ import annotations

import math

import pytest
import torch

from vitc.calibration import observers as O
from vitc.compress.quantize import quantizers as Q
from vitc.errors import VitcError


def test_uniform_qparams_asymmetric_by_hand():
    scale, zero = Q.uniform_qparams(-1.0, 3.0, 8, symmetric=False)
    assert scale.item() == pytest.approx(4 / 255, rel=1e-6)
    assert zero.item() == 64  # round(1 / (4/255)) = round(63.75)


def test_uniform_qparams_symmetric_has_zero_point_zero():
    scale, zero = Q.uniform_qparams(-1.0, 3.0, 8, symmetric=True)
    assert scale.item() == pytest.approx(3 / 127, rel=1e-6)
    assert zero.item() == 0


def test_zero_point_never_overflows():
    # an all-negative range would put the zero point past 255: it is clamped into [0, 255]
    _, zero = Q.uniform_qparams(-5.0, 0.0, 8, symmetric=False)
    assert 0 <= zero.item() <= 255
    _, zero = Q.uniform_qparams(-5.0, 0.0, 4, symmetric=False)
    assert zero.item() == 15


def test_fake_quant_rounds_and_clamps():
    x = torch.tensor([0.14, 0.16, -0.26, 20.0, -20.0])
    out = Q.fake_quant(x, torch.tensor(0.1), torch.tensor(0), -128, 127)
    assert torch.allclose(out, torch.tensor([0.1, 0.2, -0.3, 12.7, -12.8]), atol=1e-6)


def test_int_ranges():
    assert Q.int_range(8, True) == (-128, 127)
    assert Q.int_range(8, True, restricted=True) == (-127, 127)
    assert Q.int_range(4, False) == (0, 15)
    assert Q.int_range(6, True) == (-32, 31)


def test_log2_quantizer_by_hand():
    x = torch.tensor([1.0, 0.5, 0.3, 1e-4])
    # codes round(-log2 x) = 0, 1, 2 (1.74), 13 (>= 2**3 - 1, so "negligible": 0)
    assert torch.allclose(Q.fake_quant_log2(x, 3), torch.tensor([1.0, 0.5, 0.25, 0.0]))


def test_log_sqrt2_quantizer_by_hand():
    x = torch.tensor([1.0, 0.3, 0.7])
    # codes round(-2 log2 x) = 0, 3 (3.47), 1 (1.03): values 1, 2**-1.5, 2**-0.5
    expected = torch.tensor([1.0, 2 ** -1.5, 2 ** -0.5])
    assert torch.allclose(Q.fake_quant_log2(x, 4, sqrt2=True), expected, atol=1e-6)


def test_twin_uniform_by_hand():
    neg, pos = Q.twin_scales(-0.17, 10.0, 8)
    assert neg == pytest.approx(0.17 / 127)
    # 10/127 over 0.17/127 is 58.8: the positive scale is the next power of two, 64x
    assert pos == pytest.approx(neg * 64)
    out = Q.fake_quant_twin(torch.tensor([-0.1, 0.5, 20.0, 0.0]), neg, pos, 8)
    assert out[0].item() == pytest.approx(-75 * neg, rel=1e-5)  # -0.1/neg = -74.7
    assert out[1].item() == pytest.approx(6 * pos, rel=1e-5)  # 0.5/pos = 5.84
    assert out[2].item() == pytest.approx(127 * pos, rel=1e-5)  # clamped
    assert out[3].item() == 0.0


def test_weight_scales_and_zeros_stay_zero():
    w = torch.tensor([[0.0, 1.0, -0.5, 0.0], [2.54, 0.0, 0.01, -1.0]])
    scale = Q.weight_qparams(w, 8, search=False)
    assert torch.allclose(scale, torch.tensor([1 / 127, 2.54 / 127]))
    for search in (False, True):
        for bits in (8, 4):
            s = Q.weight_qparams(w, bits, search=search)
            wq = Q.fake_quant_weight(w, s, bits)
            assert torch.all(wq[w == 0] == 0), "symmetric weights must keep zeros exactly zero"


def test_weight_search_lowers_error_at_4_bits():
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0, 1).sample((16, 256))
    plain = Q.fake_quant_weight(w, Q.weight_qparams(w, 4, search=False), 4)
    searched = Q.fake_quant_weight(w, Q.weight_qparams(w, 4, search=True), 4)
    assert (searched - w).pow(2).sum() < 0.9 * (plain - w).pow(2).sum()


def test_sqnr_by_hand():
    assert Q.sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])) == pytest.approx(20.0, abs=1e-4)  # float32 1.1
    assert Q.sqnr_db(torch.ones(3), torch.ones(3)) == math.inf


def _hist(x: torch.Tensor) -> O.Histogram:
    o = O.Observer("x")
    o.update(x)
    o.start_histogram()
    o.update(x)
    return o.histogram()


def test_minmax_calibrator_finds_the_extremes():
    x = torch.linspace(-2.0, 5.0, 10001)
    lo, hi = O.minmax_range(_hist(x))
    assert lo == pytest.approx(-2.0, abs=7 / 2048 + 1e-6)
    assert hi == pytest.approx(5.0, abs=7 / 2048 + 1e-6)


def test_percentile_calibrator_on_a_gaussian():
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    lo, hi = O.percentile_range(_hist(x), 99.0)
    assert hi == pytest.approx(2.326, abs=0.03)  # the 99th percentile of N(0, 1)
    assert lo == pytest.approx(-2.326, abs=0.03)


def test_mse_calibrator_clips_a_long_tail_but_not_a_uniform():
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(200_000, generator=g) * 2 - 1
    lo, hi = O.mse_range(_hist(uniform), 8, symmetric=True)
    assert hi > 0.97 and lo < -0.97  # clipping a uniform only adds error
    laplace = torch.distributions.Laplace(0, 1).sample((200_000,))
    h = _hist(laplace)
    lo, hi = O.mse_range(h, 4, symmetric=True)
    assert hi < 0.6 * max(abs(h.lo), h.hi)  # a 4-bit grid over a Laplace tail clips hard
    err = lambda l, u: O.expected_error(h, torch.tensor([l]), torch.tensor([u]), 4, True).item()
    assert err(lo, hi) < err(h.lo, h.hi)


def test_entropy_calibrator_on_a_gaussian():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    h = _hist(x)
    lo, hi = O.entropy_range(h, 8, symmetric=True)
    assert 2.5 < hi <= h.hi + 1e-6
    assert lo == pytest.approx(-hi, abs=1e-6) or lo == pytest.approx(h.lo)


def test_observer_names_the_layer_with_nan():
    o = O.Observer("model.blocks.3.fc1")
    with pytest.raises(VitcError, match="NaN in the activations of model.blocks.3.fc1"):
        o.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(VitcError, match="Inf"):
        O.Observer("l").update(torch.tensor([float("inf")]))


def test_calibrators_need_enough_images():
    with pytest.raises(VitcError, match="entropy calibrator needs at least 64"):
        O.check_count("entropy", 10)
    O.check_count("minmax", 1)
    with pytest.raises(VitcError, match="unknown calibrator"):
        O.check_count("best", 100)
