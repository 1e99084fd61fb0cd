"""Channel groups of any ``nn.Module``, found from its captured graph (Torch-Pruning's idea, compact).

The model is captured with ``torch.export`` (non-strict: transformers models and user code
trace without rewriting; a model that cannot be captured gets one line naming the op or line).
Every tensor in the graph may carry a *channel axis*; the axis is a list of pieces, each a
*space* (an internal channel dimension that can shrink as one). Walking the graph in order:

* conv / linear (subclasses and ``F.linear``/``F.conv2d`` included: the op is matched, its
  weight traced to the parameter) start a new space on their output and consume the input's
  pieces (their weight's input axis);
* depthwise convs, BatchNorm, LayerNorm over channels, pooling and element-wise ops carry the
  input's pieces through (their parameters join as members); adds/muls of two carriers unite
  their spaces (residual adds, squeeze-excitation gates), parameters broadcast onto a carrier
  (layer scales, position embeddings) join as members;
* permutes, transposes and reshapes move the axis; a reshape that splits the axis into
  (heads, head_dim) carries it in head units, so ``q @ k^T``, ``attn @ v`` and
  ``scaled_dot_product_attention`` unite q, k and v head by head (a fused qkv projection is
  split into three spaces first); concatenation along the axis concatenates the pieces;
* anything else that touches a space (unknown ops, the model's input and outputs, grouped
  convs, a parameter used twice) *blocks* it, with the reason, so it is never pruned.

A space that is not blocked and has a producer is a ``GraphGroup``: removing any of its units
keeps every shape consistent. Surgery slices the members' parameters in place, so subclassed
layers keep their class and forward.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vitc.errors import VitcError

PASSTHROUGH = {
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "hardswish", "hardswish_", "hardsigmoid",
    "hardtanh", "hardtanh_", "tanh", "dropout", "dropout_", "clone", "contiguous", "to", "_to_copy", "detach", "alias",
    "neg", "abs", "exp", "sqrt", "rsqrt", "erf", "clamp", "clamp_min", "clamp_max", "softplus", "leaky_relu", "elu",
    "mish", "log", "relu6", "adaptive_avg_pool2d", "avg_pool2d", "max_pool2d", "upsample_nearest2d",
    "upsample_bilinear2d", "_adaptive_avg_pool2d", "lift_fresh_copy", "type_as", "feature_dropout", "alpha_dropout",
    "native_dropout", "prelu",
}
ELEMENTWISE = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "rsub", "where", "pow"}
SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax"}
RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_"}
REDUCE = {"mean", "sum", "amax", "amin"}
BATCHNORM = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm", "_native_batch_norm_legit",
             "cudnn_batch_norm"}


@dataclass
class Space:
    size: int  # channels (elements of the flat axis)
    unit: int = 1  # channels per prunable unit (head_dim for attention heads)
    members: list = field(default_factory=list)  # (fqn, axis, offset, n)
    producers: list = field(default_factory=list)  # module paths of the layers that create it
    consumers: list = field(default_factory=list)
    attention: list = field(default_factory=list)  # modules whose head count follows
    gates: list = field(default_factory=list)  # (module path, "in"|"out", channel dim): where Taylor/activation scores look
    blocked: str | None = None
    fresh: bool = True  # only its producer's members so far (it may still be split)


@dataclass
class Chan:
    """Where a tensor carries channels: ``dim`` indexes units, ``pieces`` [(space, count along dim)]."""

    dim: int
    pieces: list
    unit: int = 1  # channels per index along dim (head_dim once split into heads)
    sub: int | None = None  # the head_dim axis, while split
    outer: tuple | None = None  # (dim, [space per index]) of a stacked q/k/v axis


@dataclass
class WeightedOp:
    name: str  # graph node
    op: str  # linear | conv | matmul | attention
    module: str | None
    flops: int
    spaces: list  # space ids it reads or writes (roots resolved later)
    scales: list = field(default_factory=list)  # [[(space, n), ...], ...]: its FLOPs scale with each list's kept share


class Graph:
    """Union-find over spaces plus the bookkeeping of one capture."""

    def __init__(self):
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.ops: list[WeightedOp] = []
        self.pinned: dict[str, str] = {}  # parameter fqn -> the op that uses it outside any group
        self.split: dict[int, list[int]] = {}  # a fused output's space -> the spaces it was split into

    def new(self, size: int, reason: str | None = None) -> int:
        self.spaces.append(Space(size, blocked=reason))
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        sa, sb = self.spaces[a], self.spaces[b]
        if sa.size != sb.size:
            self.block(a, "joins channels of different widths")
            self.block(b, "joins channels of different widths")
        self.parent[b] = a
        sa.unit = math.lcm(sa.unit, sb.unit)
        for f in ("members", "producers", "consumers", "attention", "gates"):
            getattr(sa, f).extend(getattr(sb, f))
        sa.blocked = sa.blocked or sb.blocked
        sa.fresh = False
        return a

    def block(self, s: int, reason: str) -> None:
        sp = self.spaces[self.find(s)]
        sp.blocked = sp.blocked or reason

    def block_chan(self, c: Chan | None, reason: str) -> None:
        if c is None:
            return
        for s, _ in c.pieces or []:
            self.block(s, reason)
        if c.outer:
            for s in c.outer[1]:
                self.block(s, reason)

    def add_members(self, fqn: str, axis: int, c: Chan) -> None:
        off = 0
        for s, n in c.pieces:
            el = n * c.unit
            sp = self.spaces[self.find(s)]
            sp.members.append((fqn, axis, off, el))
            off += el


def _name(target) -> str:
    if target is operator.getitem:
        return "getitem"
    s = str(target)
    return s.split(".")[1] if s.startswith("aten.") else getattr(target, "__name__", s)


def _shape(node) -> tuple | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(int(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


def _where(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    frame = node.meta.get("stack_trace") or ""
    line = [ln.strip() for ln in frame.strip().splitlines() if ln.strip().startswith("File")]
    return f"{path} ({line[-1]})" if line else path


def capture(module: nn.Module, example: torch.Tensor):
    """``torch.export`` (non-strict) of ``module`` on ``example``; one-line VitcError if it cannot be captured."""
    import traceback

    import logging

    import contextlib
    import io

    logging.disable(logging.WARNING)  # export logs and prints the partial graph of a failed capture; the user gets one line
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return torch.export.export(module.eval(), (example,), strict=False)
    except Exception as exc:  # export raises many types; the user gets the op/line and what to do
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename and "/vitc/" not in f.filename]
        where = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise VitcError(f"cannot capture the model as a graph{where}: {type(exc).__name__}: {first}",
                        "make that code traceable (no data-dependent Python control flow), prune with a family "
                        "adapter (--method adapter), or export the model to ONNX first") from exc
    finally:
        logging.disable(logging.NOTSET)


def analyse(module: nn.Module, example: torch.Tensor) -> tuple[Graph, dict]:
    """Walk the captured graph of ``module``: the spaces, weighted ops and parameters (fqn -> node name)."""
    ep = capture(module, example)
    sig = ep.graph_signature
    params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    batch = int(example.shape[0])
    g = Graph()
    info: dict = {}  # node -> Chan | tuple of Chan | None

    def pfqn(a):
        return params.get(a.name) if isinstance(a, torch.fx.Node) and a.op == "placeholder" else None

    def chan(a):
        c = info.get(a) if isinstance(a, torch.fx.Node) else None
        return c if isinstance(c, Chan) else None

    def module_of(fqn: str) -> str:
        return fqn.rsplit(".", 1)[0] if "." in fqn else ""

    def handled_params(n):
        return {a for a in n.args if pfqn(a)} | {a for a in n.kwargs.values() if pfqn(a)}

    for n in ep.graph.nodes:
        if n.op == "placeholder":
            info[n] = None
            continue
        if n.op == "output":
            for a in _flat(n.args):
                g.block_chan(chan(a), "reaches the model's output")
                c = info.get(a) if isinstance(a, torch.fx.Node) else None
                if isinstance(c, tuple):
                    for cc in c:
                        g.block_chan(cc, "reaches the model's output")
            continue
        if n.op != "call_function":
            for a in _flat(n.args):
                g.block_chan(chan(a), f"used by {n.op} {n.target}")
            info[n] = None
            continue
        op = _name(n.target)
        args = list(n.args)
        out_shape = _shape(n)
        used = set()
        try:
            info[n], used = _step(g, n, op, args, out_shape, chan, pfqn, module_of, batch, info)
        except _Block as b:
            for a in _flat(args):
                g.block_chan(chan(a), b.reason)
            info[n] = None
        for a in handled_params(n) - used:
            g.pinned.setdefault(pfqn(a), f"{op} in {_where(n)}")
    _finalize(g)
    return g, params


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        elif isinstance(a, dict):
            yield from _flat(list(a.values()))
        else:
            yield a


class _Block(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _flops_per_image(shape, batch: int, k: int) -> int:
    return int(2 * math.prod(shape) // max(batch, 1) * k)


def _step(g: Graph, n, op: str, args: list, out_shape, chan, pfqn, module_of, batch: int, info: dict):
    """Channel info of node ``n``'s output, and the parameter nodes it registered as members."""
    where = _where(n)
    x = args[0] if args else None
    cx = chan(x)
    if op in ("conv2d", "conv1d", "convolution"):
        wf = pfqn(args[1])
        if op == "convolution":
            transposed, groups = args[6], args[8]
            if transposed:
                raise _Block(f"transposed conv {where}")
        else:
            groups = args[6] if len(args) > 6 else n.kwargs.get("groups", 1)
        bias = args[2] if len(args) > 2 else None
        w_shape = _shape(args[1])
        cin = _shape(x)[1]
        cout = out_shape[1]
        k = math.prod(w_shape[1:])
        spaces = [s for s, _ in (cx.pieces if cx else [])]
        if wf is None:
            g.block_chan(cx, f"conv with a computed weight {where}")
            g.ops.append(WeightedOp(n.name, "conv", None, _flops_per_image(out_shape, batch, k), spaces))
            return None, set()
        path = module_of(wf)
        if cx is not None and (cx.dim != 1 or cx.sub is not None or cx.outer):
            g.block_chan(cx, f"conv input laid out unexpectedly {where}")
            cx = None
        used = {args[1]} | ({bias} if pfqn(bias) else set())
        if groups == 1:
            s = g.new(cout)
            sp = g.spaces[s]
            sp.members += [(wf, 0, 0, cout)] + ([(pfqn(bias), 0, 0, cout)] if pfqn(bias) else [])
            sp.producers.append(path)
            sp.gates.append((path, "out", 1))
            if cx is not None:
                g.add_members(wf, 1, cx)
                for s2, _ in cx.pieces:
                    g.spaces[g.find(s2)].consumers.append(path)
                    if len(cx.pieces) == 1:
                        g.spaces[g.find(s2)].gates.insert(0, (path, "in", 1))
            g.ops.append(WeightedOp(n.name, "conv", path, _flops_per_image(out_shape, batch, k), spaces + [s],
                                    [list(cx.pieces) if cx else [], [(s, cout)]]))
            return Chan(1, [(s, cout)]), used
        if groups == cin == cout and cx is not None:  # depthwise: its channels are its input's
            g.add_members(wf, 0, cx)
            if pfqn(bias):
                g.add_members(pfqn(bias), 0, cx)
            for s2, _ in cx.pieces:
                g.spaces[g.find(s2)].fresh = False
            g.ops.append(WeightedOp(n.name, "conv", path, _flops_per_image(out_shape, batch, k), spaces, [list(cx.pieces)]))
            return Chan(1, list(cx.pieces)), used
        g.block_chan(cx, f"grouped conv ({groups} groups) {path}")
        s = g.new(cout, f"output of grouped conv ({groups} groups) {path}")
        g.ops.append(WeightedOp(n.name, "conv", path, _flops_per_image(out_shape, batch, k), spaces + [s]))
        return Chan(1, [(s, cout)]), used
    if op in ("linear", "matmul", "mm") and (op == "linear" or pfqn(args[1])):
        wf = pfqn(args[1])
        bias = args[2] if op == "linear" and len(args) > 2 else None
        in_shape = _shape(x)
        kdim = in_shape[-1]
        cout = out_shape[-1]
        spaces = [s for s, _ in (cx.pieces if cx else [])]
        if wf is None:
            g.block_chan(cx, f"linear with a computed weight {where}")
            g.ops.append(WeightedOp(n.name, "linear", None, _flops_per_image(out_shape, batch, kdim), spaces))
            return None, set()
        path = module_of(wf)
        last = len(in_shape) - 1
        if cx is not None and (cx.dim != last or cx.sub is not None or cx.outer):
            g.block_chan(cx, f"linear input laid out unexpectedly {where}")
            cx = None
        w_in_axis, w_out_axis = (1, 0) if op == "linear" else (0, 1)
        s = g.new(cout)
        sp = g.spaces[s]
        sp.members += [(wf, w_out_axis, 0, cout)] + ([(pfqn(bias), 0, 0, cout)] if pfqn(bias) else [])
        sp.producers.append(path)
        sp.gates.append((path, "out", -1))
        if cx is not None:
            g.add_members(wf, w_in_axis, cx)
            for s2, _ in cx.pieces:
                g.spaces[g.find(s2)].consumers.append(path)
                if len(cx.pieces) == 1:
                    g.spaces[g.find(s2)].gates.insert(0, (path, "in", -1))
        g.ops.append(WeightedOp(n.name, "linear", path, _flops_per_image(out_shape, batch, kdim), spaces + [s],
                                [list(cx.pieces) if cx else [], [(s, cout)]]))
        return Chan(len(out_shape) - 1, [(s, cout)]), {args[1]} | ({bias} if pfqn(bias) else set())
    if op in BATCHNORM:
        if cx is None:
            return (None, None, None) if op != "batch_norm" else None, set()
        if cx.dim != 1 or cx.sub is not None or cx.outer:
            raise _Block(f"batch norm over an unexpected axis {where}")
        used = set()
        for a in args[1:5]:
            if pfqn(a):
                g.add_members(pfqn(a), 0, cx)
                used.add(a)
        for s, _ in cx.pieces:
            g.spaces[g.find(s)].fresh = False
        out = Chan(1, list(cx.pieces))
        return (out if op == "batch_norm" else (out, None, None)), used
    if op == "layer_norm":
        if cx is None:
            return None, set()
        nshape = args[1]
        if len(nshape) != 1 or cx.dim != len(out_shape) - 1 or cx.sub is not None or cx.outer:
            raise _Block(f"layer norm over an unexpected axis {where}")
        used = set()
        for a in args[2:4]:
            if pfqn(a):
                g.add_members(pfqn(a), 0, cx)
                used.add(a)
        for s, _ in cx.pieces:
            g.spaces[g.find(s)].fresh = False
        return Chan(cx.dim, list(cx.pieces)), used
    if op == "scaled_dot_product_attention":
        q, k, v = (chan(a) for a in args[:3])
        for a in list(args[3:]) + list(n.kwargs.values()):
            g.block_chan(chan(a), f"attention mask {where}")
        if not (q and k and v) or any(c.dim != len(out_shape) - 3 or c.outer for c in (q, k, v)):
            raise _Block(f"attention whose heads vitc cannot follow {where}")
        _unite_pieces(g, [q, k, v], f"attention {where}")
        for s, _ in v.pieces:
            sp = g.spaces[g.find(s)]
            sp.attention.append(list((n.meta.get("nn_module_stack") or {"": ("",)}).values())[-1][0])
        hd = out_shape[-1]
        g.ops.append(WeightedOp(n.name, "attention", None, _flops_per_image(out_shape, batch, 2 * _shape(args[1])[-2]),
                                [s for s, _ in v.pieces], [list(v.pieces)]))
        return Chan(cx.dim, list(v.pieces), hd, len(out_shape) - 1), set()
    if op in ("matmul", "bmm"):
        a, b = chan(args[0]), chan(args[1])
        sa, sb = _shape(args[0]), _shape(args[1])
        nd = len(out_shape)
        op_ = WeightedOp(n.name, "matmul", None, _flops_per_image(out_shape, batch, sa[-1]),
                         [s for c in (a, b) if c for s, _ in c.pieces or []])
        g.ops.append(op_)
        batch_a = a is not None and a.dim < len(sa) - 2 and not a.outer
        batch_b = b is not None and b.dim < len(sb) - 2 and not b.outer
        if batch_a and batch_b and a.dim - len(sa) == b.dim - len(sb):
            _unite_pieces(g, [a, b], f"matmul {where}")
            op_.scales = [list(a.pieces)]
            od = a.dim - len(sa) + nd
            sub = nd - 1 if b.sub == len(sb) - 1 else None
            for s, _ in a.pieces:
                sp = g.spaces[g.find(s)]
                sp.attention.append(list((n.meta.get("nn_module_stack") or {"": ("",)}).values())[-1][0])
            return Chan(od, list(a.pieces), a.unit, sub), set()
        raise _Block(f"matmul of activations {where}")
    if op in PASSTHROUGH or op in SOFTMAX:
        if cx is None:
            return None, set()
        if op in SOFTMAX and args[1] % len(out_shape) in (cx.dim, cx.sub):
            raise _Block(f"softmax over channels {where}")
        return cx, set()
    if op in ("pad", "constant_pad_nd"):
        if cx is None:
            return None, set()
        padded = len(args[1]) // 2
        if cx.dim >= len(out_shape) - padded:
            raise _Block(f"pads the channel axis {where}")
        return cx, set()
    if op in ("max_pool2d_with_indices",):
        return (cx, None), set()
    if op == "getitem":
        src = info.get(n.args[0])
        return (src[args[1]] if isinstance(src, tuple) else None), set()
    if op in ELEMENTWISE:
        return _elementwise(g, n, args, out_shape, chan, pfqn, where)
    if op in ("permute", "transpose", "t"):
        if cx is None:
            return None, set()
        nd = len(out_shape)
        if op == "permute":
            perm = [p % nd for p in args[1]]
        else:
            d0, d1 = (args[1] % nd, args[2] % nd) if op == "transpose" else (0, 1)
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        mv = perm.index
        return Chan(mv(cx.dim), cx.pieces, cx.unit, mv(cx.sub) if cx.sub is not None else None,
                    (mv(cx.outer[0]), cx.outer[1]) if cx.outer else None), set()
    if op in RESHAPE:
        if cx is None:
            return None, set()
        return _reshape(g, cx, _shape(x), out_shape, where), set()
    if op == "expand":
        if cx is None:
            return None, set()
        shift = len(out_shape) - len(_shape(x))
        return Chan(cx.dim + shift, cx.pieces, cx.unit, cx.sub + shift if cx.sub is not None else None,
                    (cx.outer[0] + shift, cx.outer[1]) if cx.outer else None), set()
    if op in REDUCE:
        if cx is None:
            return None, set()
        in_nd = len(_shape(x))
        dims = args[1] if len(args) > 1 and args[1] is not None else list(range(in_nd))
        dims = {d % in_nd for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        keep = (args[2] if len(args) > 2 else n.kwargs.get("keepdim", False))
        if cx.dim in dims or (cx.sub is not None and cx.sub in dims) or cx.outer:
            if cx.dim in dims:
                return None, set()  # reduced over channels (a norm's statistics): nothing carried
            raise _Block(f"reduces part of a head {where}")
        mv = (lambda d: d) if keep else (lambda d: d - sum(1 for r in dims if r < d))
        return Chan(mv(cx.dim), cx.pieces, cx.unit, None), set()
    if op in ("select", "slice"):
        if cx is None:
            return None, set()
        nd_in = len(_shape(x))
        d = args[1] % nd_in
        if cx.outer and d == cx.outer[0] and op == "select":
            idx = args[2] % len(cx.outer[1])
            mv = lambda k: k - (1 if k > d else 0)  # noqa: E731
            return Chan(mv(cx.dim), [(cx.outer[1][idx], cx.pieces[0][1])], cx.unit, mv(cx.sub) if cx.sub is not None else None), set()
        if d in (cx.dim, cx.sub) or (cx.outer and d == cx.outer[0]):
            raise _Block(f"{op} on the channel axis {where}")
        if op == "slice":
            return cx, set()
        mv = lambda k: k - (1 if k > d else 0)  # noqa: E731
        return Chan(mv(cx.dim), cx.pieces, cx.unit, mv(cx.sub) if cx.sub is not None else None,
                    (mv(cx.outer[0]), cx.outer[1]) if cx.outer else None), set()
    if op == "unbind":
        if cx is None:
            return None, set()
        d = (args[1] if len(args) > 1 else 0) % len(_shape(x))
        if cx.outer and d == cx.outer[0]:
            mv = lambda k: k - (1 if k > d else 0)  # noqa: E731
            return tuple(Chan(mv(cx.dim), [(s, cx.pieces[0][1])], cx.unit, mv(cx.sub) if cx.sub is not None else None)
                         for s in cx.outer[1]), set()
        raise _Block(f"unbind {where}")
    if op in ("split", "split_with_sizes", "chunk"):
        if cx is None:
            return None, set()
        d = (args[2] if len(args) > 2 else 0) % len(_shape(x))
        vals = n.meta.get("val")
        if d != cx.dim or cx.sub is not None or cx.outer:
            if d in (cx.dim, cx.sub):
                raise _Block(f"{op} on the channel axis {where}")
            return tuple(cx for _ in vals), set()
        sizes = [int(v.shape[d]) for v in vals]
        parts = _split_space(g, cx, sizes, where)
        return tuple(Chan(cx.dim, [(s, sz)]) for s, sz in zip(parts, sizes)), set()
    if op == "cat":
        tensors = args[0]
        d = (args[1] if len(args) > 1 else 0) % len(out_shape)
        cs = [chan(t) for t in tensors]
        if any(c is None for c in cs) or any(c.sub is not None or c.outer for c in cs):
            raise _Block(f"concatenated with a tensor not produced by a layer {where}")
        if all(c.dim == d for c in cs):
            return Chan(d, [p for c in cs for p in c.pieces]), set()
        if all(c.dim == cs[0].dim for c in cs):
            _unite_pieces(g, cs, f"cat {where}")
            return cs[0], set()
        raise _Block(f"cat {where}")
    if op in ("_assert_tensor_metadata", "sym_size", "_assert_scalar"):
        return None, set()
    raise _Block(f"{op} {where}")


def _unite_pieces(g: Graph, cs: list, why: str) -> None:
    first = cs[0]
    for c in cs[1:]:
        if [n for _, n in c.pieces] != [n for _, n in first.pieces] or c.unit != first.unit:
            for cc in cs:
                g.block_chan(cc, f"{why}: channel layouts differ")
            return
        for (a, _), (b, _) in zip(first.pieces, c.pieces):
            g.union(a, b)


def _elementwise(g: Graph, n, args, out_shape, chan, pfqn, where):
    nd = len(out_shape)
    carriers, params = [], []
    for a in args:
        if not isinstance(a, torch.fx.Node):
            continue
        c = chan(a)
        shp = _shape(a)
        if c is not None:
            shift = nd - len(shp)
            if shp[c.dim] == 1:
                continue
            carriers.append(Chan(c.dim + shift, c.pieces, c.unit, c.sub + shift if c.sub is not None else None,
                                 (c.outer[0] + shift, c.outer[1]) if c.outer else None))
        elif pfqn(a) or shp:
            params.append(a)
    if not carriers:
        return None, set()
    first = carriers[0]
    if any(c.dim != first.dim or c.sub != first.sub or c.outer for c in carriers) or first.outer:
        raise _Block(f"element-wise op on differently laid out channels {where}")
    if len(carriers) > 1:
        _unite_pieces(g, carriers, f"element-wise op {where}")
    used = set()
    for a in params:
        shp = _shape(a)
        if shp is None:
            continue
        axis = first.dim - (nd - len(shp))
        if axis < 0 or shp[axis] == 1:
            continue
        if pfqn(a) is None or first.sub is not None:
            raise _Block(f"element-wise op with a tensor vitc cannot trace to a layer {where}")
        g.add_members(pfqn(a), axis, first)
        used.add(a)
    return first, used


def _split_space(g: Graph, c: Chan, sizes: list[int], where: str) -> list[int]:
    """Split a fresh single space (a fused projection's output) into consecutive spaces of ``sizes``."""
    if len(c.pieces) != 1:
        raise _Block(f"splits concatenated channels {where}")
    root = g.find(c.pieces[0][0])
    sp = g.spaces[root]
    if not sp.fresh or sp.blocked:
        raise _Block(f"splits channels that other layers share {where}")
    sp.blocked = f"split into parts {where}"
    parts, off = [], 0
    for sz in sizes:
        s = g.new(sz)
        new = g.spaces[s]
        new.members = [(f, ax, off + o, sz) for f, ax, o, _ in sp.members]
        new.producers, new.gates = list(sp.producers), []
        parts.append(s)
        off += sz
    sp.members = []
    g.split[root] = parts
    return parts


def _reshape(g: Graph, c: Chan, ins: tuple, outs: tuple, where: str) -> Chan:
    if ins == outs:
        return c
    if c.outer:
        raise _Block(f"reshapes stacked q/k/v {where}")
    pre = math.prod(ins[:c.dim])
    if c.sub is None:
        width = ins[c.dim]
        for j in range(len(outs)):
            if math.prod(outs[:j]) == pre and outs[j] == width:
                return Chan(j, c.pieces, c.unit)
        if c.unit != 1:
            raise _Block(f"reshape {where}")
        for j in range(len(outs) - 2):  # (..., 3C) -> (..., 3, heads, head_dim): a fused qkv
            if math.prod(outs[:j]) == pre and outs[j] * outs[j + 1] * outs[j + 2] == width and min(outs[j:j + 3]) > 1 \
                    and outs[j] <= 4 and math.prod(outs[j + 3:]) == math.prod(ins[c.dim + 1:]):
                parts = _split_space(g, c, [width // outs[j]] * outs[j], where)
                hd = outs[j + 2]
                for s in parts:
                    g.spaces[s].unit = math.lcm(g.spaces[s].unit, hd)
                return Chan(j + 1, [(parts[0], outs[j + 1])], hd, j + 2, (j, parts))
        for j in range(len(outs) - 1):  # (..., C) -> (..., heads, head_dim)
            if math.prod(outs[:j]) == pre and outs[j] * outs[j + 1] == width and outs[j + 1] > 1 \
                    and math.prod(outs[j + 2:]) == math.prod(ins[c.dim + 1:]):
                hd = outs[j + 1]
                if any(nn_ % hd for _, nn_ in c.pieces):
                    raise _Block(f"head split across channel pieces {where}")
                for s, _ in c.pieces:
                    sp = g.spaces[g.find(s)]
                    sp.unit = math.lcm(sp.unit, hd)
                return Chan(j, [(s, k // hd) for s, k in c.pieces], hd, j + 1)
        raise _Block(f"reshape {tuple(ins)} -> {tuple(outs)} {where}")
    if c.sub == c.dim + 1:
        for j in range(len(outs)):  # (..., heads, head_dim) -> (..., C)
            if math.prod(outs[:j]) == pre and outs[j] == ins[c.dim] * ins[c.sub] \
                    and math.prod(outs[j + 1:]) == math.prod(ins[c.sub + 1:]):
                return Chan(j, [(s, k * c.unit) for s, k in c.pieces], 1)
    raise _Block(f"reshape of heads {tuple(ins)} -> {tuple(outs)} {where}")


def _finalize(g: Graph) -> None:
    """Block spaces whose parameters are used elsewhere, or whose members overlap another space's."""
    by_axis: dict = {}
    for i, sp in enumerate(g.spaces):
        if g.find(i) != i:
            continue
        for fqn, axis, off, n in sp.members:
            if fqn in g.pinned:
                g.block(i, f"parameter {fqn} is also used by {g.pinned[fqn]}")
            by_axis.setdefault((fqn, axis), []).append((off, n, i))
    for key, items in by_axis.items():
        items = sorted(set(items))
        for (o1, n1, s1), (o2, n2, s2) in zip(items, items[1:]):
            if o2 < o1 + n1 and g.find(s1) != g.find(s2):
                g.block(s1, f"parameter {key[0]} is shared")
                g.block(s2, f"parameter {key[0]} is shared")
