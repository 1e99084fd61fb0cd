"""The integer ViT: its constants (``IntViT``) and the reference executor that runs it.

An ``IntViT`` holds only integer tensors plus two float vectors used at the boundary: the
input scale (pixels -> int8) and the logit scales (int32 accumulators -> float logits).
``execute`` runs from the int8 input to the int32 logit accumulator with integer tensors
only and checks every intermediate's dtype; ``IntegerViT`` wraps it as an ``nn.Module`` so
the result travels as a Backbone.

Storage types: activations entering a matmul are int8 (attention probabilities uint8),
matmul accumulators int32, the residual stream ``residual_bits`` wide (held in int64), and
non-linear arithmetic int64. Matmuls run on int32 copies of the int8 operands, which is
exact: the int32 accumulator is what ``MatMulInteger`` produces.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import kernels as K

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (..., K) @ int8 (K, M) -> exact int32, like ONNX ``MatMulInteger``.

    ``torch._int_mm`` (int8 GEMM with int32 accumulation) is twice as fast as an int32
    matmul on CPU; the int32 matmul is the fallback where it is missing. A uint8 ``a`` (the
    output of a ReLU) runs as ``(a - 128) @ b + 128 * colsum(b)``, the same integers on the
    int8 GEMM.
    """
    if a.dtype == torch.uint8:
        shifted = (a.to(torch.int16) - 128).to(torch.int8)
        return int8_matmul(shifted, b) + 128 * b.to(torch.int32).sum(0)
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    if a2.dtype == torch.int8 and b.dtype == torch.int8 and hasattr(torch, "_int_mm") and a2.shape[0] > 16:
        try:
            return torch._int_mm(a2, b.contiguous()).reshape(*lead, b.shape[-1])
        except RuntimeError:
            pass
    return torch.matmul(a2.to(torch.int32), b.to(torch.int32)).reshape(*lead, b.shape[-1])


@dataclass
class Requant:
    """Dyadic requantization ``clamp(round(acc * multiplier / 2**shift), lo, hi)``."""

    multiplier: torch.Tensor  # int64 scalar or per-channel vector
    shift: int
    lo: int
    hi: int

    def __call__(self, acc: torch.Tensor) -> torch.Tensor:
        return K.requantize(acc, self.multiplier, self.shift, self.lo, self.hi)


@dataclass
class ResidualAdd:
    """``clamp(round(a*ma/2**sa) + round(b*mb/2**sb))``: both operands aligned to the output scale."""

    a: Requant  # the residual stream (scalar multiplier); its lo/hi are unused
    b: Requant  # the branch accumulator (per-channel multiplier)
    lo: int
    hi: int

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return K.aligned_add(a, self.a.multiplier, self.a.shift, b, self.b.multiplier, self.b.shift, self.lo, self.hi)


@dataclass
class IntLinear:
    name: str  # layer path in the float model, for messages
    weight: torch.Tensor  # int8 (out, in)
    bias: torch.Tensor  # int32 (out,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight.t()) + self.bias


@dataclass
class IntNorm:
    name: str
    gamma: torch.Tensor  # int64
    beta: torch.Tensor  # int64
    pre_shift: int
    out: Requant

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(K.int_layernorm(x, self.gamma, self.beta, self.pre_shift)).to(torch.int8)


@dataclass
class IntHeadPart:
    """One read of a multi-block probe head (``reference.FloatHeadPart``), ending on the int8 feature grid.

    ``"cls"``: the integer LayerNorm of the CLS token, requantized. ``"mean"``: the integer
    LayerNorm of every patch token *before* requantization (int64 at ``2**-(12 + k)``), summed
    over the tokens, shifted down by ``sum_shift`` bits (so the product with the multiplier
    stays inside int64), then requantized once; the 1/tokens of the mean is in the multiplier.
    """

    block: int  # index into IntViT.blocks: the part reads that block's output
    pool: str  # "cls" | "mean"
    norm: IntNorm
    sum_shift: int = 0

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls":
            return self.norm(h[:, 0])
        n = self.norm
        total = K.int_layernorm(h[:, 1:], n.gamma, n.beta, n.pre_shift).sum(dim=1)
        return n.out(K.rshift_round(total, self.sum_shift)).to(torch.int8)


@dataclass
class IntActivation:
    """The MLP activation: a table over its ``in_bits``-bit input (fc1's requantized output), giving
    unsigned codes ``u = c + zero_point`` on the output grid (``convert.activation_grid``)."""

    kind: str  # "gelu" (ShiftGELU / lambda-ShiftGELU), "silu", "relu", or "exact" (``values``)
    multiplier: torch.Tensor
    shift: int
    out: Requant | None
    in_bits: int = 8
    zero_point: int = 0
    values: torch.Tensor | None = None  # "exact": the stored codes, the model's own function rounded offline

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel itself: ShiftGELU / SiLU / ReLU, then requantization to the output codes ``c``."""
        if self.values is not None:
            return self.values[x.to(torch.int64) + (1 << (self.in_bits - 1))] - self.zero_point
        if self.kind == "relu":
            y = x.to(torch.int64).clamp_min(0)
        elif self.kind == "silu":
            y = K.int_silu(x, self.multiplier, self.shift)
        else:
            y = K.shift_gelu(x, self.multiplier, self.shift)
        return self.out(y)

    def table(self) -> torch.Tensor:
        """The stored output ``c + zero_point`` (0..255) for every input -2**(in_bits-1)..2**(in_bits-1)-1 (int64).

        The activation's input is an integer of ``in_bits`` bits, so these integers are the whole
        function: the executor and the ONNX graph look them up instead of running ~40 int64 ops
        per element (65,536 entries at 16 bits).
        """
        half = 1 << (self.in_bits - 1)
        return self(torch.arange(-half, half, dtype=torch.int64)).to(torch.int64) + self.zero_point

    def lookup(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "_table"):
            self._table = self.table().to(torch.uint8)
        return self._table[x.to(torch.int64) + (1 << (self.in_bits - 1))]


def im2col_nhwc(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """(N, H, W, C) -> (N, OH, OW, kernel*kernel*C), zero padded, in (ky, kx, c) order."""
    if padding:
        x = torch.nn.functional.pad(x, (0, 0, padding, padding, padding, padding))
    oh = (x.shape[1] - kernel) // stride + 1
    ow = (x.shape[2] - kernel) // stride + 1
    cols = [x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            for i in range(kernel) for j in range(kernel)]
    return torch.cat(cols, dim=-1) if len(cols) > 1 else cols[0]


@dataclass
class IntConv:
    """A BatchNorm-folded conv of a hybrid's stem, in NHWC: im2col, int8 GEMM, int32 bias, requantization.

    After a ReLU the requantization clamps to [0, 2**bits - 1] (the ReLU is the clamp) and
    the output is uint8 (zero point 0): the unsigned range keeps the bit a symmetric int8
    would spend on the empty negative half.
    """

    name: str
    weight: torch.Tensor  # int8 (out, k*k*in), flattened in (ky, kx, in) order like im2col_nhwc
    bias: torch.Tensor  # int32 (out,)
    kernel: int
    stride: int
    padding: int
    out: Requant

    @property
    def unsigned(self) -> bool:
        return self.out.lo == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        acc = int8_matmul(im2col_nhwc(x, self.kernel, self.stride, self.padding), self.weight.t()) + self.bias
        return self.out(acc).to(torch.uint8 if self.unsigned else torch.int8)


@dataclass
class IntBlock:
    name: str
    heads: int
    head_dim: int
    norm1: IntNorm
    q: IntLinear
    k: IntLinear
    v: IntLinear
    q_out: Requant
    k_out: Requant
    v_out: Requant
    softmax_multiplier: torch.Tensor
    softmax_shift: int
    context_out: Requant
    o: IntLinear
    add1: ResidualAdd
    norm2: IntNorm
    fc1: IntLinear
    fc1_out: Requant
    act: IntActivation
    fc2: IntLinear
    add2: ResidualAdd
    softmax_table: torch.Tensor | None = None  # K.shiftmax_table: the exponential for every logit gap
    prob_levels: int = 255  # attention probabilities on the grid 1/prob_levels (above 255: two uint8 digits)

    def shiftmax(self, scores: torch.Tensor) -> torch.Tensor:
        if self.softmax_table is not None:
            return K.shiftmax_lut(scores, self.softmax_table, self.prob_levels)
        return K.shiftmax(scores, self.softmax_multiplier, self.softmax_shift, self.prob_levels)


@dataclass
class IntViT:
    input_scale: torch.Tensor  # float scalar: pixels / input_scale -> int8 (the input quantizer)
    patch_size: int
    patch: IntLinear  # Conv2d with stride = kernel as a matmul over flattened patches
    embed_add: ResidualAdd  # patch accumulator + position embedding -> residual stream
    pos: torch.Tensor  # int64 (num_patches, dim), position embedding in residual units
    prefix: torch.Tensor  # int64 (num_prefix, dim), CLS (+ position) in residual units
    blocks: list[IntBlock]
    final_norm: IntNorm | None  # None where ``head`` replaces it
    classifier: IntLinear
    logit_scale: torch.Tensor  # float (classes,): int32 accumulator -> logits (the output dequantizer)
    residual_bits: int = 16
    meta: dict = field(default_factory=dict)  # config and calibration record
    stem: list[IntConv] = field(default_factory=list)  # a hybrid's conv stem (NHWC), before ``patch``
    image_size: int = 0  # input side in pixels
    in_channels: int = 3
    head: list[IntHeadPart] = field(default_factory=list)  # a multi-block probe head in place of final_norm on CLS

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x / self.input_scale).clamp(-128, 127).to(torch.int8)

    def dequantize_logits(self, acc: torch.Tensor) -> torch.Tensor:
        return acc.to(torch.float32) * self.logit_scale.to(torch.float32)


def _int(t: torch.Tensor, where: str) -> torch.Tensor:
    if t.dtype in FLOAT_DTYPES or t.is_complex():
        raise AssertionError(f"float tensor ({t.dtype}) in the integer executor at {where}")
    return t


def patches_of(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/p * W/p, C*p*p) in the order of a flattened Conv2d kernel."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def patches_of_nhwc(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, H, W, C) -> (N, H/p * W/p, p*p*C) in (ky, kx, c) order (the stem's weight order)."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def execute(model: IntViT, x: torch.Tensor) -> torch.Tensor:
    """Run the integer ViT on an int8 image batch (N, C, H, W); return the int32 logit accumulator."""
    _int(x, "input")
    n = x.shape[0]
    if model.stem:
        t = x.permute(0, 2, 3, 1)
        for conv in model.stem:
            t = _int(conv(t), conv.name)
        patches = patches_of_nhwc(t, model.patch_size)
    else:
        patches = patches_of(x, model.patch_size)
    acc = _int(model.patch(patches), model.patch.name)
    h = _int(model.embed_add(model.pos.unsqueeze(0), acc), "embeddings")
    h = torch.cat([model.prefix.unsqueeze(0).expand(n, -1, -1), h], dim=1)
    read = {part.block for part in model.head}
    outputs = {}
    for i, b in enumerate(model.blocks):
        h = _block(b, h)
        if i in read:
            outputs[i] = h
    if model.head:
        parts = [_int(part(outputs[part.block]), f"{part.norm.name} ({part.pool} of block {part.block + 1})")
                 for part in model.head]
        return _int(model.classifier(torch.cat(parts, dim=-1)), model.classifier.name)
    cls = _int(model.final_norm(h[:, 0]), model.final_norm.name)
    return _int(model.classifier(cls), model.classifier.name)


def _block(b: IntBlock, h: torch.Tensor) -> torch.Tensor:
    n, t, d = h.shape
    x = _int(b.norm1(h), b.norm1.name)

    def heads(lin: IntLinear, rq: Requant) -> torch.Tensor:
        y = _int(rq(lin(x)).to(torch.int8), lin.name)
        return y.reshape(n, t, b.heads, b.head_dim).transpose(1, 2)

    q, k, v = heads(b.q, b.q_out), heads(b.k, b.k_out), heads(b.v, b.v_out)
    scores = _int(torch.matmul(q.to(torch.int32), k.to(torch.int32).transpose(-1, -2)), f"{b.name} scores")
    probs = _int(b.shiftmax(scores).to(torch.uint8 if b.prob_levels <= 255 else torch.int32), f"{b.name} shiftmax")
    ctx = _int(torch.matmul(probs.to(torch.int32), v.to(torch.int32)), f"{b.name} context")
    ctx = b.context_out(ctx).to(torch.int8).transpose(1, 2).reshape(n, t, d)
    h = _int(b.add1(h, b.o(ctx)), f"{b.name} residual 1")
    x = _int(b.norm2(h), b.norm2.name)
    a = _int(b.act.lookup(b.fc1_out(b.fc1(x))), b.fc1.name)
    return _int(b.add2(h, b.fc2(a)), f"{b.name} residual 2")


class IntegerViT(nn.Module):
    """An ``IntViT`` as a Backbone module: float pixels -> int8 -> integer executor -> float logits."""

    def __init__(self, program: IntViT):
        super().__init__()
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.program
        return p.dequantize_logits(execute(p, p.quantize_input(x)))

    def integer_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The int32 accumulator of the logits, the quantity the ONNX export reproduces bit for bit."""
        p = self.program
        return execute(p, p.quantize_input(x))
