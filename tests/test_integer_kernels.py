"""Each integer kernel against its float function over its full input range; tolerances are
the maximum errors stated in the kernels' docstrings."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vitc.compress.integer import kernels as K


def test_isqrt_is_exact_over_the_whole_range():
    small = torch.arange(0, 1 << 18)
    got = K.isqrt(small)
    ref = torch.tensor([max(1, math.isqrt(v)) for v in small.tolist()])
    assert torch.equal(got, ref)
    g = torch.Generator().manual_seed(0)
    big = torch.cat([torch.randint(0, 1 << 62, (20000,), generator=g),
                     torch.tensor([(1 << 62) - 1, (1 << 31) ** 2 - 1, 4 ** 30, 4 ** 30 - 1, 3, 4, 5])])
    assert torch.equal(K.isqrt(big), torch.tensor([math.isqrt(v) for v in big.tolist()]))


def test_dyadic_and_requantize_round_like_float():
    m, s = K.dyadic(0.0123456)
    assert abs(float(m) / 2 ** s - 0.0123456) / 0.0123456 < 2 ** -22
    acc = torch.arange(-100000, 100000, 7)
    got = K.requantize(acc, m, s, -128, 127)
    ref = torch.round(acc.double() * 0.0123456).clamp(-128, 127)
    assert (got.double() - ref).abs().max() <= 1  # one step where the rounding tie breaks differently
    assert (got.double() - ref).abs().mean() < 0.01
    mv, sv = K.dyadic([0.5, 0.001, 0.25])
    assert mv.shape == (3,) and abs(float(mv[1]) / 2 ** sv - 0.001) / 0.001 < 2 ** -12


def test_rshift_round_rounds_half_up_for_negatives_too():
    x = torch.tensor([-6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 5])
    assert K.rshift_round(x, 1).tolist() == [math.floor(v / 2 + 0.5) for v in x.tolist()]


def test_shift_exp2_max_error():
    neg = torch.arange(0, (40 << K.EXP_FRAC_BITS) + 1)
    got = K.shift_exp2(neg).double() / 2 ** K.EXP_FRAC_BITS
    ref = torch.exp2(-neg.double() / 2 ** K.EXP_FRAC_BITS)
    assert (got - ref).abs().max() < 1.3e-3


@pytest.mark.parametrize("scale", [0.002, 0.02, 0.2])
def test_shiftmax_against_softmax(scale):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-4000, 4000, (2000, 65), generator=g)
    m, s = K.log2_multiplier(scale)
    got = K.shiftmax(x, m, s, 255).double() / 255
    ref = torch.softmax(x.double() * scale, -1)
    assert got.min() >= 0 and got.max() <= 1
    assert (got - ref).abs().max() <= 3 / 255


def _int8_grid(span: float):
    scale = span / 127
    return torch.arange(-128, 128), scale


def test_shift_gelu_max_error_over_int8_range():
    x, scale = _int8_grid(8.0)
    m, s = K.log2_multiplier(scale, 1.702)
    got = K.shift_gelu(x, m, s).double() * scale / 2 ** K.SIGMOID_BITS
    assert (got - F.gelu(x.double() * scale)).abs().max() < 0.021


def test_lambda_shift_gelu_fits_better_than_fixed_slope():
    x, scale = _int8_grid(8.0)
    lam = K.lambda_for_range(-8.0, 8.0)
    m, s = K.log2_multiplier(scale, lam)
    got = K.lambda_shift_gelu(x, m, s).double() * scale / 2 ** K.SIGMOID_BITS
    err = (got - F.gelu(x.double() * scale)).abs().max()
    assert err < 0.020
    m2, s2 = K.log2_multiplier(scale, 1.702)
    fixed = (K.shift_gelu(x, m2, s2).double() * scale / 2 ** K.SIGMOID_BITS - F.gelu(x.double() * scale)).abs().max()
    assert err < fixed


def test_sigmoid_and_silu_max_error():
    x, scale = _int8_grid(8.0)
    m, s = K.log2_multiplier(scale, 1.0)
    sig = K.shift_sigmoid(x, m, s).double() / 2 ** K.SIGMOID_BITS
    assert (sig - torch.sigmoid(x.double() * scale)).abs().max() < 1e-3
    silu = K.int_silu(x, m, s).double() * scale / 2 ** K.SIGMOID_BITS
    assert (silu - F.silu(x.double() * scale)).abs().max() < 0.01


def test_hardswish_is_exact_when_three_is_a_whole_number_of_steps():
    x = torch.arange(-128, 128)
    scale = 3.0 / 40  # 3 is exactly 40 steps
    three = K.hardswish_constant(scale)
    got = K.int_hardswish(x, three).double() * scale * scale / 6
    assert (got - F.hardswish(x.double() * scale)).abs().max() < 1e-12


@pytest.mark.parametrize("bits", [8, 16])
def test_int_layernorm_max_error(bits):
    g = torch.Generator().manual_seed(2)
    dim = 128
    span = torch.rand(400, 1, generator=g).mul(0.99).add(0.01)
    x = (torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (400, dim), generator=g) * span).long()
    k = 12
    gamma = torch.full((dim,), 1 << k)
    beta = torch.zeros(dim, dtype=torch.long)
    got = K.int_layernorm(x, gamma, beta, K.layernorm_pre_shift(bits, dim)).double() / 2 ** (K.NORM_FRAC_BITS + k)
    ref = F.layer_norm(x.double(), (dim,), eps=0.0)
    assert (got - ref).abs().max() < 2.5e-4


def test_aligned_add_matches_float_sum_within_one_step():
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-30000, 30000, (1000,), generator=g)
    b = torch.randint(-2 ** 20, 2 ** 20, (1000,), generator=g)
    sa, sb, so = 0.01, 3e-4, 0.02
    ma, ta = K.dyadic(sa / so)
    mb, tb = K.dyadic(sb / so)
    got = K.aligned_add(a, ma, ta, b, mb, tb, -32768, 32767).double()
    ref = (a.double() * sa + b.double() * sb) / so
    assert (got - ref).abs().max() <= 1.0


def test_int_conv2d_with_folded_batchnorm_matches_float_conv():
    g = torch.Generator().manual_seed(4)
    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
    bn = torch.nn.BatchNorm2d(16).eval()
    bn.running_mean.uniform_(-1, 1, generator=g)
    bn.running_var.uniform_(0.5, 2, generator=g)
    w, b = K.fold_batchnorm(conv.weight.detach(), conv.bias.detach(), bn.running_mean, bn.running_var,
                            bn.weight.detach(), bn.bias.detach(), bn.eps)
    x = torch.randint(-128, 128, (2, 8, 9, 9), generator=g)
    sx = 0.05
    sw = w.abs().amax((1, 2, 3)) / 127
    wq = torch.round(w / sw[:, None, None, None]).to(torch.int8)
    bq = torch.round(b / (sx * sw)).to(torch.int32)
    acc = K.int_conv2d(x.to(torch.int8), wq, bq, stride=2, padding=1, groups=2)
    assert acc.dtype == torch.int32
    exact_int = F.conv2d(x.double(), wq.double(), bq.double(), stride=2, padding=1, groups=2)
    assert torch.equal(acc.double(), exact_int)  # the integer accumulator is exact
    with torch.no_grad():
        ref = bn(conv(x.float() * sx)).double()
    got = acc.double() * (sx * sw.double()).reshape(1, -1, 1, 1)
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("scale", [1e-4, 2e-3, 0.05])
def test_shiftmax_table_is_the_kernel_bit_for_bit(scale):
    """The looked-up exponential equals the arithmetic one for every gap, and so does the whole Shiftmax."""
    m, s = K.log2_multiplier(scale)
    table = K.shiftmax_table(m, s)
    assert table is not None and int(table[0]) == int(K.shift_exp2(torch.tensor(0)))
    gaps = torch.arange(table.numel() + 5000, dtype=torch.int64)
    arith = K.shift_exp2(K.rshift_round(gaps * m, s))
    assert torch.equal(table[gaps.clamp_max(table.numel() - 1)], arith)
    x = torch.randint(-2**20, 2**20, (8, 65, 65), generator=torch.Generator().manual_seed(1)) // int(1 + 1 / scale)
    assert torch.equal(K.shiftmax_lut(x.to(torch.int32), table), K.shiftmax(x, m, s))
    assert K.shiftmax_table(*K.log2_multiplier(1e-9)) is None  # a table too long to hold: the arithmetic runs
