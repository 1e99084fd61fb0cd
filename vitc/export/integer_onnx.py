"""Export an integer ViT (``vitc.compress.integer``) as an ONNX graph of integer ops.

The graph mirrors ``vitc.compress.integer.program.execute`` op for op, so ONNX Runtime
reproduces the reference executor bit for bit: ``MatMulInteger`` for every matmul (the
left operand as uint8 with zero point 128, ONNX Runtime's fast u8 x s8 kernel; attention
probabilities are uint8 already), int64 ``Mul``/``Add``/``Sub``/``Div``/
``Clip``/``Max``/``ReduceSum``/``ReduceMax`` for requantization, Shiftmax and LayerNorm,
``BitShift`` (unsigned only in ONNX Runtime) for the shifts and the per-element shifts of
Shiftmax's exponent, and a ``Gather`` for the MLP activation, whose input is an integer of
``in_bits`` (the table is ShiftGELU's output for every such value: ``IntActivation.table``), and a ``Gather``
for Shiftmax's exponential (``shiftmax_table``, the softmax then in int32). A hybrid's conv
stem runs in NHWC as ``Pad`` (with the zero point), strided ``Slice``s (im2col), ``Concat`` and
``MatMulInteger``; its ReLU outputs are uint8 with zero point 0. Float appears only at the two ends: the input quantizer (``Div``, ``Round``,
``Clip``, as in ``IntViT.quantize_input``, then ``Add`` of the zero point and ``Cast`` to uint8) and the logit dequantizer.

ONNX Runtime's integer ``Div`` truncates toward zero and its ``BitShift`` has no signed
form, so the floor shifts of the reference are emitted as ``((x + 2**61 + half) as uint64 >> s)
- 2**(61-s)`` (a logical shift of a non-negative number), and floor divisions by a
variable divisor of a signed numerator get the remainder correction.

Outputs: ``logits`` (float32) first, for the runtime sessions, and ``logits_int32``, the
accumulator the bit-exactness check compares.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vitc.errors import VitcError

OPSET = 17
# the lowest IR version each opset needs (ONNX Runtime 1.31 loads IR <= 13; onnx 1.23 would write 14)
IR_FOR_OPSET = {17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10, 23: 11}
INPUT_NAME = "pixel_values"
OFFSET_BITS = 61
ZERO_POINT = 128  # left matmul operands are stored as uint8 = int8 + 128
LN_LIFT = 1 << 20  # see layernorm: enough for rows up to 16,000 wide


class _Graph:
    def __init__(self, opset: int = OPSET):
        from onnx import TensorProto, helper, numpy_helper

        self.opset = opset
        self.helper, self.numpy_helper, self.TP = helper, numpy_helper, TensorProto
        self.nodes, self.inits, self.n = [], [], 0
        self._consts: dict = {}
        self.int64: set[str] = set()  # values known to be int64 already, so i64() adds no copy

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in self._consts:
            return self._consts[key]
        nm = self.name("c")
        self.inits.append(self.numpy_helper.from_array(arr, nm))
        self._consts[key] = nm
        if arr.dtype == np.int64:
            self.int64.add(nm)
        return nm

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    # ------------------------------------------------------------ integer helpers (mirror kernels.py)
    def cast(self, x: str, to) -> str:
        return self.op("Cast", [x], to=to)

    def i64(self, x: str) -> str:
        if x in self.int64:
            return x
        out = self.cast(x, self.TP.INT64)
        self.int64.add(out)
        return out

    def mark64(self, x: str) -> str:
        self.int64.add(x)
        return x

    def mul(self, x: str, c) -> str:
        return self.op("Mul", [x, c if isinstance(c, str) else self.const(c)])

    def add(self, x: str, c) -> str:
        return self.op("Add", [x, c if isinstance(c, str) else self.const(c)])

    def sub(self, x: str, c) -> str:
        return self.op("Sub", [x, c if isinstance(c, str) else self.const(c)])

    def clip(self, x: str, lo: int, hi: int) -> str:
        return self.op("Clip", [x, self.const(lo), self.const(hi)])

    def rshift_round(self, x: str, shift: int, half: bool = True) -> str:
        """``floor((x + half) / 2**shift)`` via an unsigned shift of a non-negative number."""
        if shift <= 0:
            return x
        if shift > OFFSET_BITS:
            raise VitcError(f"integer export: a shift of {shift} bits exceeds {OFFSET_BITS}", "re-convert the model")
        bias = (1 << OFFSET_BITS) + ((1 << (shift - 1)) if half else 0)
        # a logical shift of the offset (non-negative) value; an int64 Div costs 3x more in ONNX Runtime
        u = self.cast(self.add(x, bias), self.TP.UINT64)
        q = self.op("BitShift", [u, self.const(shift, np.uint64)], direction="RIGHT")
        return self.mark64(self.sub(self.i64(q), 1 << (OFFSET_BITS - shift)))

    def floor_div(self, a: str, b: str) -> str:
        """Floor division for b > 0 and a of either sign: truncate, then step down where the remainder is negative."""
        q = self.op("Div", [a, b])
        r = self.op("Sub", [a, self.op("Mul", [q, b])])
        return self.op("Sub", [q, self.i64(self.op("Less", [r, self.const(0)]))])

    def _offset_shift(self, x: str, multiplier, shift: int) -> tuple[str, int]:
        """``(x*m + 2**61 + half) >> shift`` as uint64, and the offset ``2**(61-shift)`` it still carries."""
        u = self.cast(self.add(self.mul(self.i64(x), multiplier), (1 << OFFSET_BITS) + (1 << (shift - 1))), self.TP.UINT64)
        return self.ushift(u, shift), 1 << (OFFSET_BITS - shift)

    def requant(self, acc: str, rq, to: str = "int64", zero_point: int = ZERO_POINT, gamma=None) -> str:
        """``requantize`` with its result as int64, int8, uint8 with ``zero_point`` (128; 0 after a ReLU),
        or ``index``: int64 codes plus ``zero_point``, for a ``Gather`` into a 256-entry table.

        The clip and the removal of the shift's offset happen in uint64, so the offset and
        the zero point cost one subtraction together. (Not in int64: ONNX Runtime 1.31's int64
        ``Clip``/``Max``/``Min`` return wrong results for inputs in [2**31, 2**32), e.g. ``Max(x, 0)``
        gives 0 for ``x = 2**31``; ``test_clips_run_on_unsigned_offsets`` keeps wide values away from them.)
        ``gamma=(g, b)`` (LayerNorm's affine): ``acc`` is the normalised value and
        ``(acc*g + b)*m`` is computed as ``acc*(g*m) + b*m``, the same integers in two ops fewer
        (``build`` bounds ``|acc*g + b| * m`` below 2**60).
        """
        if gamma is not None:
            g, b = gamma
            m = torch.as_tensor(rq.multiplier, dtype=torch.int64)
            if rq.shift <= 0 or (1 << (OFFSET_BITS - rq.shift)) + rq.lo < 0:
                return self.requant(self.mark64(self.add(self.mul(acc, g), b)), rq, to, zero_point)
            u = self.cast(self.add(self.mul(self.i64(acc), g * m), b * m + (1 << OFFSET_BITS) + (1 << (rq.shift - 1))),
                          self.TP.UINT64)
            q, base = self.ushift(u, rq.shift), 1 << (OFFSET_BITS - rq.shift)
        elif rq.shift <= 0 or (1 << (OFFSET_BITS - rq.shift)) + rq.lo < 0:
            y = self.mark64(self.clip(self.rshift_round(self.mul(self.i64(acc), rq.multiplier), rq.shift), rq.lo, rq.hi))
            if to == "index":
                return self.mark64(self.add(y, zero_point))
            return y if to == "int64" else self.to_u8(y, zero_point) if to == "uint8" else self.cast(y, self.TP.INT8)
        else:
            q, base = self._offset_shift(acc, rq.multiplier, rq.shift)
        q = self.op("Clip", [q, self.const(base + rq.lo, np.uint64), self.const(base + rq.hi, np.uint64)])
        if to in ("uint8", "index"):
            q = self.op("Sub", [q, self.const(base - zero_point, np.uint64)])
            return self.cast(q, self.TP.UINT8) if to == "uint8" else self.mark64(self.cast(q, self.TP.INT64))
        y = self.mark64(self.sub(self.cast(q, self.TP.INT64), base))
        return y if to == "int64" else self.cast(y, self.TP.INT8)

    def aligned_add(self, a: str, b: str, add) -> str:
        """``aligned_add``: both operands shifted in uint64 with their offsets, summed, clipped, offsets removed once."""
        if add.a.shift <= 0 or add.b.shift <= 0:
            ra = self.rshift_round(self.mul(self.i64(a), add.a.multiplier), add.a.shift)
            rb = self.rshift_round(self.mul(self.i64(b), add.b.multiplier), add.b.shift)
            return self.mark64(self.clip(self.op("Add", [ra, rb]), add.lo, add.hi))
        qa, base_a = self._offset_shift(a, add.a.multiplier, add.a.shift)
        qb, base_b = self._offset_shift(b, add.b.multiplier, add.b.shift)
        base = base_a + base_b
        total = self.op("Clip", [self.op("Add", [qa, qb]), self.const(base + add.lo, np.uint64),
                                 self.const(base + add.hi, np.uint64)])
        return self.mark64(self.sub(self.cast(total, self.TP.INT64), base))

    def ushift(self, x: str, shift: int) -> str:
        """Floor shift of a uint64 tensor."""
        return self.op("BitShift", [x, self.const(shift, np.uint64)], direction="RIGHT")

    def exp2(self, neg: str) -> str:
        """``shift_exp2`` on a uint64 tensor (every intermediate is non-negative: no offsets, no casts)."""
        from vitc.compress.integer import kernels as K

        f = K.EXP_FRAC_BITS
        c0, c1, c2 = K.exp2_constants()
        u = lambda v: self.const(v, np.uint64)  # noqa: E731
        whole = self.ushift(neg, f)
        frac = self.op("Sub", [neg, self.op("Mul", [whole, u(1 << f)])])
        t1 = self.ushift(self.op("Mul", [frac, u(-c1)]), f)
        t2 = self.ushift(self.op("Mul", [self.ushift(self.op("Mul", [frac, u(c2)]), f), frac]), f)
        poly = self.op("Add", [self.op("Sub", [u(c0), t1]), t2])
        return self.op("BitShift", [poly, self.op("Min", [whole, u(62)])], direction="RIGHT")

    def shiftmax(self, x: str, m, shift: int, levels: int) -> str:
        top = self.op("ReduceMax", [x], axes=[-1], keepdims=1) if self.opset < 18 else \
            self.op("ReduceMax", [x, self.const([-1])], keepdims=1)
        below = self.cast(self.op("Sub", [top, x]), self.TP.UINT64)  # int32 scores: the difference fits
        scaled = self.op("Mul", [below, self.const(m, np.uint64)])
        if shift > 0:
            scaled = self.ushift(self.op("Add", [scaled, self.const(1 << (shift - 1), np.uint64)]), shift)
        e = self.i64(self.exp2(scaled))
        total = self.op("ReduceSum", [e, self.const([-1])], keepdims=1)
        num = self.op("Add", [self.mul(e, levels), self.rshift_round(total, 1, half=False)])
        return self.op("Div", [num, total])

    def shiftmax_lut(self, x: str, table, levels: int) -> str:
        """``shiftmax_lut`` in int32 (gaps, table values and sums all fit): ReduceMax, Sub, Min, Gather, one Div.

        Every operand of the two divisions is non-negative, so the truncating ``Div`` floors.
        """
        top = self.op("ReduceMax", [x], axes=[-1], keepdims=1) if self.opset < 18 else \
            self.op("ReduceMax", [x, self.const([-1])], keepdims=1)
        gap = self.op("Min", [self.op("Sub", [top, x]), self.const(table.numel() - 1, np.int32)])
        e = self.op("Gather", [self.const(table, np.int32), gap], axis=0)
        total = self.op("ReduceSum", [e, self.const([-1])], keepdims=1)
        num = self.op("Add", [self.op("Mul", [e, self.const(levels, np.int32)]),
                              self.op("Div", [total, self.const(2, np.int32)])])
        return self.op("Div", [num, total])

    def isqrt(self, n: str) -> str:
        from vitc.compress.integer import kernels as K

        powers4 = self.const([1 << (2 * i) for i in range(31)])
        ge = self.op("Not", [self.op("Less", [self.op("Unsqueeze", [n, self.const([-1])]), powers4])])
        bits = self.op("ReduceSum", [self.i64(ge), self.const([-1])], keepdims=0)
        one = self.const(1, np.uint64)
        x = self.i64(self.op("BitShift", [one, self.cast(bits, self.TP.UINT64)], direction="LEFT"))
        for _ in range(K.ISQRT_STEPS):
            y = self.rshift_round(self.op("Add", [x, self.op("Div", [n, x])]), 1, half=False)
            x = self.op("Max", [self.op("Min", [x, y]), self.const(1)])
        return x

    def layernorm(self, x: str, norm) -> str:
        return self.requant(self.normalized(x, norm), norm.out, to="uint8", gamma=(norm.gamma, norm.beta))

    def token_mean(self, h: str, part) -> str:
        """``IntHeadPart`` "mean": the patch tokens' LayerNorm (affine, no requantization) summed over the
        tokens, shifted by ``sum_shift``, requantized once; uint8 with zero point 128."""
        n = part.norm
        tokens = self.op("Slice", [h, self.const([1]), self.const([1 << 62]), self.const([1])])
        normed = self.normalized(tokens, n)
        affine = self.mark64(self.add(self.mul(normed, n.gamma), n.beta))
        total = self.mark64(self.op("ReduceSum", [affine, self.const([1])], keepdims=0))
        return self.requant(self.rshift_round(total, part.sum_shift), n.out, to="uint8")

    def normalized(self, x: str, norm) -> str:
        """``int_layernorm`` up to the normalised value ``(x - mean) / std * 2**12`` (before the affine)."""
        from vitc.compress.integer import kernels as K

        dim = int(norm.gamma.numel())
        x = self.mul(self.i64(x), 1 << norm.pre_shift)
        dconst = self.const(dim)
        mean = self.floor_div(self.add(self.op("ReduceSum", [x, self.const([-1])], keepdims=1), dim // 2), dconst)
        c = self.op("Sub", [x, mean])
        var = self.op("Div", [self.op("ReduceSum", [self.op("Mul", [c, c]), self.const([-1])], keepdims=1), dconst])
        std = self.op("Max", [self.isqrt(var), self.const(1)])
        # num + L*std >= 0 (|num| < 2**13 * sqrt(dim) * std), so a truncating Div floors; the rounding
        # half (std >> 1) and the lift L*std are one per-row term
        row = self.op("Add", [self.rshift_round(std, 1, half=False), self.mul(std, LN_LIFT)])
        lifted = self.op("Add", [self.mul(c, 1 << K.NORM_FRAC_BITS), row])
        return self.mark64(self.sub(self.op("Div", [lifted, std]), LN_LIFT))

    def to_u8(self, x: str, zero_point: int = ZERO_POINT) -> str:
        """An int64 tensor clipped to int8's range as uint8 with zero point 128.

        ONNX Runtime's MatMulInteger is ~15x faster with a uint8 left operand than with
        int8 (its u8s8 kernel); the zero point makes the product identical.
        """
        return self.cast(self.add(x, zero_point) if zero_point else x, self.TP.UINT8)

    def matmul_u8(self, a: str, b: str, zero_point: int = ZERO_POINT) -> str:
        """``(a - zero_point) @ b`` for uint8 ``a`` and int8 ``b``: int32."""
        return self.op("MatMulInteger", [a, b, self.const(zero_point, np.uint8)])

    def linear(self, x: str, lin, zero_point: int = ZERO_POINT) -> str:
        w = self.const(lin.weight.t().contiguous(), np.int8)
        return self.op("Add", [self.matmul_u8(x, w, zero_point), self.const(lin.bias, np.int32)])

    def conv(self, x: str, conv, side: int, zero_point: int) -> tuple[str, int]:
        """``IntConv`` on an NHWC uint8 tensor: Pad with the zero point, im2col by strided Slices, MatMulInteger.

        Returns the uint8 output (zero point 0 after a ReLU, else 128) and its side.
        """
        k, st, pad = conv.kernel, conv.stride, conv.padding
        if pad:
            x = self.op("Pad", [x, self.const([0, pad, pad, 0, 0, pad, pad, 0]), self.const(zero_point, np.uint8)],
                        mode="constant")
        side = side + 2 * pad
        out = (side - k) // st + 1
        end = st * (out - 1) + 1
        cols = [self.op("Slice", [x, self.const([i, j]), self.const([i + end, j + end]), self.const([1, 2]),
                                  self.const([st, st])]) for i in range(k) for j in range(k)]
        cols = self.op("Concat", cols, axis=3) if len(cols) > 1 else cols[0]
        acc = self.linear(cols, conv, zero_point)
        zp_out = 0 if conv.unsigned else ZERO_POINT
        return self.requant(acc, conv.out, to="uint8", zero_point=zp_out), out


def build_graph(program, batch: int | None = None, opset: int = OPSET):
    """The ONNX ModelProto of an ``IntViT`` (``batch`` None: a symbolic batch axis)."""
    import onnx

    if opset not in IR_FOR_OPSET:
        raise VitcError(f"the integer ONNX writer supports opsets {min(IR_FOR_OPSET)}-{max(IR_FOR_OPSET)}, not {opset}",
                        f"pass --opset {OPSET}")
    g = _Graph(opset)
    TP = g.TP
    p = program
    n_tok = p.pos.shape[0] + p.prefix.shape[0]
    dim = p.pos.shape[1]
    in_ch = p.in_channels if p.stem else p.patch.weight.shape[1] // (p.patch_size ** 2)
    side = p.image_size or int(round((p.pos.shape[0]) ** 0.5)) * p.patch_size
    bdim = batch if batch else "batch"
    # input quantizer (float): round(x / s) clamped to int8, as IntViT.quantize_input
    xq = g.op("Div", [INPUT_NAME, g.const(p.input_scale.reshape(()), np.float32)])
    xq = g.op("Clip", [g.op("Round", [xq]), g.const(-128.0, np.float32), g.const(127.0, np.float32)])
    xq = g.cast(g.op("Add", [xq, g.const(float(ZERO_POINT), np.float32)]), TP.UINT8)  # zero point 128, exact
    ps = p.patch_size
    grid = int(round((p.pos.shape[0]) ** 0.5))
    if p.stem:
        t, zp, fm = g.op("Transpose", [xq], perm=[0, 2, 3, 1]), ZERO_POINT, side
        for conv in p.stem:
            t, fm = g.conv(t, conv, fm, zp)
            zp = 0 if conv.unsigned else ZERO_POINT
        ch = int(p.stem[-1].weight.shape[0])
        t = g.op("Reshape", [t, g.const([0, grid, ps, grid, ps, ch])])
        t = g.op("Transpose", [t], perm=[0, 1, 3, 2, 4, 5])
        t = g.op("Reshape", [t, g.const([0, grid * grid, ps * ps * ch])])
    else:
        zp = ZERO_POINT
        t = g.op("Reshape", [xq, g.const([0, in_ch, grid, ps, grid, ps])])
        t = g.op("Transpose", [t], perm=[0, 2, 4, 1, 3, 5])
        t = g.op("Reshape", [t, g.const([0, grid * grid, in_ch * ps * ps])])
    acc = g.linear(t, p.patch, zp)
    h = g.aligned_add(g.const(p.pos.unsqueeze(0)), acc, p.embed_add)
    nb = g.op("Shape", [INPUT_NAME], start=0, end=1)
    shape = g.op("Concat", [nb, g.const([p.prefix.shape[0], dim])], axis=0)
    prefix = g.op("Expand", [g.const(p.prefix.unsqueeze(0)), shape])
    h = g.mark64(g.op("Concat", [prefix, h], axis=1))
    read = {part.block for part in p.head}
    outputs = {}
    for i, b in enumerate(p.blocks):
        h = _block(g, b, h, n_tok, dim)
        if i in read:
            outputs[i] = h
    if p.head:  # a multi-block probe head: every part on the feature grid (uint8, zero point 128), concatenated
        parts = [g.layernorm(g.mark64(g.op("Gather", [outputs[part.block], g.const(0)], axis=1)), part.norm)
                 if part.pool == "cls" else g.token_mean(outputs[part.block], part) for part in p.head]
        cls = g.op("Concat", parts, axis=-1)
    else:
        cls = g.mark64(g.op("Gather", [h, g.const(0)], axis=1))
        cls = g.layernorm(cls, p.final_norm)
    logits_int = g.op("Identity", [g.linear(cls, p.classifier)], hint="logits_int32")
    logits = g.op("Mul", [g.cast(logits_int, TP.FLOAT), g.const(p.logit_scale, np.float32)], hint="logits")
    g.nodes.append(g.helper.make_node("Identity", [logits], ["logits"]))
    g.nodes.append(g.helper.make_node("Identity", [logits_int], ["logits_int32"]))
    classes = p.logit_scale.numel()
    graph = g.helper.make_graph(
        g.nodes, "vitc_integer_vit",
        [g.helper.make_tensor_value_info(INPUT_NAME, TP.FLOAT, [bdim, in_ch, side, side])],
        [g.helper.make_tensor_value_info("logits", TP.FLOAT, [bdim, classes]),
         g.helper.make_tensor_value_info("logits_int32", TP.INT32, [bdim, classes])],
        initializer=g.inits)
    model = g.helper.make_model(graph, opset_imports=[g.helper.make_opsetid("", opset)], ir_version=IR_FOR_OPSET[opset],
                                producer_name="vitc", doc_string="integer-only ViT (vitc.compress.integer)")
    onnx.checker.check_model(model, full_check=True)
    return model


def _block(g: _Graph, b, h: str, n_tok: int, dim: int) -> str:
    TP = g.TP
    x = g.layernorm(h, b.norm1)

    def heads(lin, rq, transpose_k: bool = False, left: bool = False) -> str:
        y = g.requant(g.linear(x, lin), rq, to="uint8" if left else "int8")
        y = g.op("Reshape", [y, g.const([0, n_tok, b.heads, b.head_dim])])
        return g.op("Transpose", [y], perm=[0, 2, 3, 1] if transpose_k else [0, 2, 1, 3])

    q, k, v = heads(b.q, b.q_out, left=True), heads(b.k, b.k_out, transpose_k=True), heads(b.v, b.v_out)
    scores = g.matmul_u8(q, k)
    levels = b.prob_levels
    if getattr(b, "softmax_table", None) is not None:
        probs = g.shiftmax_lut(scores, b.softmax_table, levels)
    else:
        probs = g.shiftmax(scores, b.softmax_multiplier, b.softmax_shift, levels)
    if levels <= 255:
        ctx = g.op("MatMulInteger", [g.cast(probs, TP.UINT8), v])
    else:
        # p = 256 * high + low, each a uint8 digit: p @ V = 256 * (high @ V) + low @ V, exact in int32
        # (every row of p sums to about `levels`, so |p @ V| <= levels * 128 + rounding)
        probs = g.cast(probs, TP.INT32)
        high = g.op("Div", [probs, g.const(256, np.int32)])  # non-negative: Div floors
        low = g.op("Sub", [probs, g.op("Mul", [high, g.const(256, np.int32)])])
        ctx = g.op("Add", [g.op("Mul", [g.op("MatMulInteger", [g.cast(high, TP.UINT8), v]), g.const(256, np.int32)]),
                           g.op("MatMulInteger", [g.cast(low, TP.UINT8), v])])
    ctx = g.requant(ctx, b.context_out, to="uint8")
    ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.const([0, n_tok, dim])])
    h = g.aligned_add(h, g.linear(ctx, b.o), b.add1)
    x = g.layernorm(h, b.norm2)
    a = g.requant(g.linear(x, b.fc1), b.fc1_out, to="index", zero_point=1 << (b.act.in_bits - 1))
    a = g.op("Gather", [g.const(activation_table(b.act), np.uint8), a], axis=0)
    # the stored codes u = c + zero_point go in as they are: fc2's bias already carries -zero_point * colsum(W)
    return g.aligned_add(h, g.linear(a, b.fc2, zero_point=0), b.add2)


def activation_table(act) -> np.ndarray:
    """``act.table()``, the stored unsigned codes, for the graph's ``Gather``."""
    return act.table().numpy().astype(np.uint8)


def export_integer_onnx(backbone, path: Path | str, opset: int = OPSET, dynamic_batch: bool = True) -> Path:
    """The writer ``vitc export`` calls for ``integer`` backbones (it stages and checks the file itself)."""
    return export(backbone, path, force=True, batch=None if dynamic_batch else 1, opset=opset)


def export(backbone, path: Path | str, force: bool = False, batch: int | None = None, opset: int = OPSET) -> Path:
    """Write ``backbone`` (converted by ``vitc.compress.integer.apply``) as an integer ONNX file."""
    from vitc.artifacts import atomic_path
    from vitc.compress.integer.program import IntegerViT
    from vitc.errors import require

    module = backbone.require_module("integer ONNX export")
    if not isinstance(module, IntegerViT):
        raise VitcError(f"{backbone.source} is not an integer-only model",
                        "convert it first with vitc quantize --integer-only (or vitc.compress.integer.apply)")
    onnx = require("onnx", "onnx")
    model = build_graph(module.program, batch, opset)
    path = Path(path)
    with atomic_path(path, force=force) as tmp:
        onnx.save(model, str(tmp))
    return path
