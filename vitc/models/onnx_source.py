"""ONNX files a user already has: read and check them, upgrade old opsets, and read their graph.

Every command that takes ``--model X.onnx`` (``info``, ``export``, ``quantize``) goes through
``read``: it refuses, in one line naming the user's file and what to do, what the runtimes
cannot run (an empty or garbled file, external data that is missing, several inputs, ops of a
custom domain, an opset outside what ONNX Runtime takes, dynamic spatial axes without
``--input-size``), loads external data that is present (the artifacts are then written as one
file), and upgrades opsets older than 13 with ``onnx.version_converter`` (per-channel
QuantizeLinear needs 13; the file itself is never changed).

The graph helpers here (``GraphIndex``: producers, consumers, constants; the patterns
LayerNorm, Softmax and GELU in front of a tensor; FLOPs of matmul-like ops from shapes) serve
``vitc info`` and the ONNX quantization backend (``compress/quantize/onnx_graph.py``) alike.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitc.errors import MissingExtraError, VitcError

MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear; older graphs are upgraded to it
OLDEST_OPSET = 7  # ONNX Runtime's oldest supported opset
KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")  # ONNX Runtime runs these
# Ops that move or relabel values without computing on them: a pattern seen through them still holds.
TRANSPARENT = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Dropout", "Cast")
MATMUL_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


@dataclass
class OnnxSource:
    """A checked ONNX file: the model in memory (opset >= 13, external data loaded) and its facts."""

    path: Path
    model: object  # onnx.ModelProto
    opset: int
    original_opset: int
    input_name: str
    input_shape: list  # ints, or dim names for dynamic axes
    input_dtype: str
    outputs: list[dict] = field(default_factory=list)  # [{"name", "shape", "dtype"}]
    external_data: bool = False
    input_size: int | None = None  # square side the model runs at (from the graph or --input-size)

    @property
    def upgraded(self) -> bool:
        return self.opset != self.original_opset

    @property
    def fixed_batch(self) -> int | None:
        b = self.input_shape[0] if self.input_shape else None
        return b if isinstance(b, int) and b > 0 else None


def _onnx():
    try:
        import onnx
    except ImportError as exc:
        raise MissingExtraError("onnx", "onnx") from exc
    return onnx


def default_opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def newest_runtime_opset() -> int:
    """The newest default-domain opset this ONNX release defines; ONNX Runtime refuses a newer one
    (its kernels are registered against the ONNX schemas it was built with)."""
    from onnx import defs

    return defs.onnx_opset_version()


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def _dtype(value_info) -> str:
    onnx = _onnx()
    t = value_info.type.tensor_type.elem_type
    return onnx.helper.tensor_dtype_to_np_dtype(t).name if t else "unknown"


def io_facts(value_info) -> dict:
    return {"name": value_info.name, "shape": _dims(value_info), "dtype": _dtype(value_info)}


def read(path, input_size: int | None = None) -> OnnxSource:
    """Load and check ``path`` (see the module docstring); every refusal names ``path``."""
    onnx = _onnx()
    path = Path(path)
    if not path.exists():
        raise VitcError(f"model file {path} does not exist", "check the path")
    if path.is_dir():
        raise VitcError(f"model path {path} is a folder, not an ONNX file", "pass the .onnx file")
    if path.stat().st_size == 0:
        raise VitcError(f"{path} is empty (0 bytes)", "export the model again; the file was cut off or never written")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise VitcError(f"{path} is not a readable ONNX model ({_first_line(exc)})",
                        "check that it is the .onnx file itself and not cut off; export it again") from exc
    if not model.graph.node:
        raise VitcError(f"{path} is not a readable ONNX model (it has no graph nodes)", "export the model again")
    external = _external_files(model)
    if external:
        missing = sorted(f for f in external if not (path.parent / f).exists())
        if missing:
            raise VitcError(f"{path} keeps its weights in external data ({', '.join(missing)}), which is not beside it",
                            f"put {missing[0]} in {path.parent or '.'} (the folder of the .onnx file)")
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise VitcError(f"the external data of {path} cannot be read ({_first_line(exc)})",
                            "export the model again with its external data files") from exc
    opset = default_opset(model)
    _check_domains(model, path)
    newest = newest_runtime_opset()
    if opset > newest:
        raise VitcError(f"{path} has opset {opset}, newer than ONNX Runtime here takes ({newest})",
                        f"export it with --opset {newest} or older (torch.onnx.export(..., opset_version={min(newest, 17)}))")
    if opset < OLDEST_OPSET:
        raise VitcError(f"{path} has opset {opset}, older than ONNX Runtime takes ({OLDEST_OPSET})",
                        "export the model again with opset 13 or newer")
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]  # IR < 4 lists weights as inputs too
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise VitcError(f"{path} has {len(inputs)} inputs ({names}); vitc takes image models with one image input",
                        "export the model with the image batch as its only input (fold the others in as constants)")
    inp = inputs[0]
    shape, dtype = _dims(inp), _dtype(inp)
    if len(shape) != 4:
        raise VitcError(f"{path}: input '{inp.name}' has shape {shape}, not an image batch (N, C, H, W)",
                        "export the model with an NCHW image input")
    if dtype not in ("float32", "float16"):
        raise VitcError(f"{path}: input '{inp.name}' is {dtype}, not float32 (normalised pixels)",
                        "export the model with a float32 NCHW input; vitc feeds normalised images")
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int):
        if h != w:
            raise VitcError(f"{path}: input '{inp.name}' is {h}x{w}; vitc runs square inputs", "export the model at a square size")
        if input_size is not None and input_size != h:
            raise VitcError(f"--input-size {input_size} does not match {path}, whose input '{inp.name}' is fixed at {h}x{w}",
                            f"drop --input-size or pass {h}")
        input_size = h
    elif input_size is None:
        raise VitcError(f"{path}: input '{inp.name}' has dynamic spatial axes {shape[2:]}, so its image size is unknown",
                        "pass --input-size N (the side the model was trained at, e.g. 224)")
    if opset < MIN_OPSET:
        model = upgrade(model, path, opset)
    outputs = [io_facts(o) for o in model.graph.output]
    return OnnxSource(path=path, model=model, opset=default_opset(model), original_opset=opset, input_name=inp.name,
                      input_shape=shape, input_dtype=dtype, outputs=outputs, external_data=bool(external),
                      input_size=input_size)


def upgrade(model, path: Path, opset: int):
    """``model`` converted to opset 13 (the file is not changed); refuses in one line naming ``path``."""
    from onnx import version_converter

    try:
        new = version_converter.convert_version(model, MIN_OPSET)
        _onnx().checker.check_model(new)
        return new
    except Exception as exc:
        raise VitcError(f"{path} has opset {opset}, and ONNX's version converter cannot upgrade it to {MIN_OPSET} "
                        f"({_first_line(exc)})", "export the model again with opset 13 or newer") from exc


def _external_files(model) -> list[str]:
    from onnx.external_data_helper import uses_external_data

    files = set()
    for t in model.graph.initializer:
        if uses_external_data(t):
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            files.add(loc)
    return sorted(files)


def _check_domains(model, path: Path) -> None:
    local = {(f.domain, f.name) for f in model.functions}  # model-local functions the runtimes inline
    for node in model.graph.node:
        if node.domain not in KNOWN_DOMAINS and (node.domain, node.op_type) not in local:
            raise VitcError(f"{path} uses op '{node.op_type}' of the custom domain '{node.domain}' (node {node.name or node.output[0]}), "
                            "which ONNX Runtime and OpenVINO do not run",
                            "export the model with standard ONNX ops, or register the op's kernel and convert it yourself")


def _first_line(exc: Exception) -> str:
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    return lines[0][:160] if lines else type(exc).__name__


# ---------------------------------------------------------------- the graph


class GraphIndex:
    """Producers, consumers and constant values of a graph (initializers and Constant nodes)."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.initializers = {i.name: i for i in graph.initializer}
        self.constants: dict[str, np.ndarray] = {}
        for n in graph.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.constants[n.output[0]] = numpy_helper.to_array(a.t)
        self._numpy_helper = numpy_helper
        self.graph_outputs = {o.name for o in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return self._numpy_helper.to_array(self.initializers[name])
        return self.constants.get(name)

    def is_const(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def node_name(self, node) -> str:
        return node.name or node.output[0]

    def through(self, tensor: str, limit: int = 6):
        """The first producer of ``tensor`` that computes (skipping TRANSPARENT ops)."""
        node = self.producer.get(tensor)
        for _ in range(limit):
            if node is None or node.op_type not in TRANSPARENT:
                return node
            node = self.producer.get(node.input[0])
        return node

    def ancestors(self, node, depth: int) -> list:
        out, frontier = [], [node]
        for _ in range(depth):
            nxt = []
            for n in frontier:
                for i in n.input:
                    p = self.producer.get(i)
                    if p is not None:
                        out.append(p)
                        nxt.append(p)
            frontier = nxt
        return out


@dataclass
class ScaledOutput:
    """A constant Mul scaling a MatMul's output columns: ``Mul(c)`` after ``MatMul(x, W)``, its bias
    ``Add`` if any, and (for a scalar ``c``) Reshape/Transpose nodes, each tensor on the way read by
    nothing else (Shape nodes aside: they read the shape, which folding keeps)."""
    mul: object
    matmul: object
    bias: str | None  # the bias initializer, read by nothing else
    chain: list  # matmul, [add], reshape/transpose..., the last one produces what the Mul read
    factor: np.ndarray  # per output column


def scaled_output(index: GraphIndex, mul, columns) -> ScaledOutput | None:
    """``mul`` as a ``ScaledOutput`` or None. ``columns(matmul)`` says how many output columns the
    MatMul's weight has, or None when its weight is not one the caller can scale."""
    if mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    consts = [i for i in mul.input if index.is_const(i)]
    if len(consts) != 1:
        return None
    c = index.const(consts[0]).astype(np.float64)
    node = index.producer.get(mul.input[0] if mul.input[1] == consts[0] else mul.input[1])
    through = []
    while node is not None and node.op_type in ("Reshape", "Transpose") and c.size == 1:
        through.append(node)
        node = index.producer.get(node.input[0])
    add = None
    if node is not None and node.op_type == "Add":
        add = node
        node = next((index.producer.get(i) for i in add.input if not index.is_const(i)), None)
    if node is None or node.op_type != "MatMul":
        return None
    n = columns(node)
    if n is None or (c.size != 1 and (c.size != n or c.shape[-1] != n)):
        return None
    bias = None
    if add is not None:
        bias = next((i for i in add.input if index.is_const(i)), None)
        if bias not in index.initializers or len(index.consumers.get(bias, [])) != 1 or index.const(bias).size != n:
            return None
    chain = [node] + ([add] if add is not None else []) + through[::-1]
    if any(len([u for u in index.consumers.get(x.output[0], []) if u.op_type != "Shape"]) != 1
           or x.output[0] in index.graph_outputs for x in chain):
        return None
    return ScaledOutput(mul, node, bias, chain, c.reshape(-1) if c.size != 1 else np.full(n, c.item()))


def drop_scaling(model, index: GraphIndex, found: ScaledOutput) -> None:
    """After the caller scaled the weight: scale the bias, let the chain produce what the Mul did,
    remove the Mul (and its factor's Constant node when nothing else reads it)."""
    from onnx import numpy_helper

    if found.bias is not None:
        b = index.const(found.bias).astype(np.float64)
        index.initializers[found.bias].CopyFrom(
            numpy_helper.from_array((b * found.factor.reshape(b.shape)).astype(np.float32), found.bias))
    last, out = found.chain[-1], found.mul.output[0]
    for reader in index.consumers.get(last.output[0], []):  # Shape nodes besides the Mul
        reader.input[:] = [out if i == last.output[0] else i for i in reader.input]
    last.output[0] = out
    model.graph.node.remove(found.mul)
    for name in found.mul.input:
        producer = index.producer.get(name)
        if producer is not None and producer.op_type == "Constant" and len(index.consumers.get(name, [])) == 1:
            model.graph.node.remove(producer)


def layernorm_at(index: GraphIndex, node) -> dict | None:
    """A LayerNorm ending at ``node``: the LayerNormalization op, or its decomposed form
    ``Add(Mul(Div(Sub(x, ReduceMean x), Sqrt(Add(ReduceMean(Pow(Sub, 2)), eps))), gamma), beta)``.
    Returns {"kind", "gamma", "beta", "scale_node", "bias_node"} (the names of the constant
    affine parameters, and for the decomposed form the Mul/Add nodes that apply them)."""
    if node is None:
        return None
    if node.op_type == "LayerNormalization":
        if len(node.input) < 3 or not node.input[2] or not index.is_const(node.input[1]) or not index.is_const(node.input[2]):
            return {"kind": "op", "gamma": None, "beta": None, "node": node}
        return {"kind": "op", "gamma": node.input[1], "beta": node.input[2], "node": node}
    add = node if node.op_type == "Add" else None
    mul = None
    beta = None
    if add is not None:
        c = [i for i in add.input if index.is_const(i)]
        v = [i for i in add.input if not index.is_const(i)]
        if len(c) != 1 or len(v) != 1:
            return None
        beta = c[0]
        mul = index.producer.get(v[0])
    else:
        mul = node
    if mul is None or mul.op_type != "Mul":
        div, gamma = mul, None
    else:
        c = [i for i in mul.input if index.is_const(i)]
        v = [i for i in mul.input if not index.is_const(i)]
        if len(c) != 1 or len(v) != 1:
            return None
        gamma = c[0]
        div = index.producer.get(v[0])
    if div is None or div.op_type != "Div":
        return None
    sub, sqrt = index.producer.get(div.input[0]), index.producer.get(div.input[1])
    if sub is None or sqrt is None or sub.op_type != "Sub" or sqrt.op_type != "Sqrt":
        return None
    mean = index.producer.get(sub.input[1])
    if mean is None or mean.op_type != "ReduceMean":
        return None
    return {"kind": "decomposed", "gamma": gamma, "beta": beta, "node": node, "scale_node": mul if gamma else None,
            "bias_node": add if beta else None}


def is_gelu(index: GraphIndex, node) -> bool:
    """GELU as one op, or its erf/tanh form ``x * 0.5 * (1 + erf(x / sqrt 2))`` ending at ``node``."""
    if node is None:
        return False
    if node.op_type in ("Gelu", "FastGelu", "BiasGelu", "QuickGelu"):
        return True
    if node.op_type != "Mul":
        return False
    return any(a.op_type in ("Erf", "Tanh") for a in index.ancestors(node, 4))


def pattern_of(index: GraphIndex, tensor: str) -> tuple[str, object]:
    """Which pattern produces ``tensor`` (plan.PATTERNS), and the node that ends it."""
    node = index.through(tensor)
    if node is None:
        return "plain", None
    if node.op_type == "Softmax":
        return "post-softmax", node
    if layernorm_at(index, node) is not None:
        return "post-layernorm", node
    if is_gelu(index, node):
        return "post-gelu", node
    return "plain", node


# ---------------------------------------------------------------- shapes and FLOPs


def with_fixed_input(model, input_name: str, batch: int, size: int):
    """A copy of ``model`` whose input is (batch, C, size, size)."""
    m = copy.deepcopy(model)
    for inp in m.graph.input:
        if inp.name == input_name:
            dims = inp.type.tensor_type.shape.dim
            for k, v in ((0, batch), (2, size), (3, size)):
                dims[k].Clear()
                dims[k].dim_value = v
    return m


def tensor_shapes(src: OnnxSource, names: list[str] | None = None) -> tuple[dict[str, tuple], str]:
    """Shapes of the graph's tensors at batch 1 (the fixed batch where the graph has one) and
    the model's size: ONNX shape inference first; the tensors it leaves unknown (shape
    arithmetic through Shape/Resize, e.g. DINOv2's interpolated position embedding) from one
    ONNX Runtime run on a zero image. Returns (shapes, how)."""
    from onnx import shape_inference

    batch = src.fixed_batch or 1
    fixed = with_fixed_input(src.model, src.input_name, batch, src.input_size)
    try:
        inferred = shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:
        inferred = fixed
    shapes = {}
    for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        dims = _dims(v)
        if dims and all(isinstance(d, int) for d in dims):
            shapes[v.name] = tuple(dims)
    for i in inferred.graph.initializer:
        shapes[i.name] = tuple(i.dims)
    for n in inferred.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    shapes[n.output[0]] = tuple(a.t.dims)
    wanted = names if names is not None else [t for n in src.model.graph.node if n.op_type in MATMUL_OPS
                                             for t in (*n.input[:2], n.output[0])]
    missing = sorted({t for t in wanted if t and t not in shapes})
    how = "onnx.shape_inference"
    if missing:
        shapes.update(run_shapes(fixed, src.input_name, batch, src.input_size, missing))
        how = "onnx.shape_inference, and one ONNX Runtime run for the shapes it leaves unknown"
    return shapes, how


def run_shapes(model, input_name: str, batch: int, size: int, names: list[str]) -> dict[str, tuple]:
    outs = zero_image_outputs(model, input_name, batch, size, names)
    return {n: tuple(o.shape) for n, o in zip(names, outs)}


def zero_image_outputs(model, input_name: str, batch: int, size: int, names: list[str],
                       optimize: bool = True) -> list:
    """The tensors ``names`` of ``model`` run by ONNX Runtime on a batch of zero images.
    ``optimize=False``: the graph's own arithmetic, without ORT's fusions."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(with_outputs(model, names).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    dtype = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
    return sess.run(names, {input_name: np.zeros((batch, 3, size, size), dtype)})


def image_input(model):
    """The graph's image input: its one input that is not also an initializer (IR < 4 lists weights as inputs)."""
    inits = {i.name for i in model.graph.initializer}
    return next(i for i in model.graph.input if i.name not in inits)


def replace_uses(graph, old: str, new: str) -> None:
    """Every node that reads tensor ``old`` reads ``new`` instead."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new


def drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def with_outputs(model, names: list[str]):
    """A copy of ``model`` that also returns the tensors ``names`` (calibration, shapes)."""
    from onnx import helper

    m = type(model)()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(helper.make_empty_tensor_value_info(n))
    return m


def op_flops(node, shapes: dict[str, tuple]) -> int | None:
    """FLOPs (2 per multiply-add) of one matmul-like node from its tensor shapes; None when unknown."""
    try:
        out = shapes[node.output[0]]
        if node.op_type == "MatMul":
            a = shapes[node.input[0]]
            return 2 * int(np.prod(out)) * int(a[-1])
        if node.op_type == "Gemm":
            a = shapes[node.input[0]]
            trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
            return 2 * int(np.prod(out)) * int(a[0] if trans_a else a[-1])
        if node.op_type == "Conv":
            w = shapes[node.input[1]]
            return 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        if node.op_type == "ConvTranspose":
            x, w = shapes[node.input[0]], shapes[node.input[1]]
            return 2 * int(np.prod(x)) * int(np.prod(w[1:]))
    except (KeyError, IndexError):
        return None
    return None


def parameter_count(model) -> int:
    """Elements of the float initializers (weights, biases, embeddings, norm parameters)."""
    count = 0
    for t in model.graph.initializer:
        if t.data_type in (1, 10, 11, 16):  # float, float16, double, bfloat16
            count += int(np.prod(t.dims)) if t.dims else 1
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in (1, 10, 11, 16) and len(a.t.dims) >= 1 and int(np.prod(a.t.dims)) > 1:
                    count += int(np.prod(a.t.dims))
    return count


def find_structure(src: OnnxSource, shapes: dict[str, tuple]) -> dict:
    """Transformer blocks (one per attention Softmax feeding a MatMul) and conv stages (convs
    grouped by output resolution) found in the graph."""
    index = GraphIndex(src.model)
    batch = src.fixed_batch or 1
    blocks = []
    for node in src.model.graph.node:
        if node.op_type != "Softmax":
            continue
        users = [u for t in node.output for u in _users_through(index, t)]
        if not any(u.op_type == "MatMul" for u in users):
            continue
        s = shapes.get(node.input[0])
        heads = s[1] if s and len(s) == 4 else None
        tokens = s[-1] if s else None
        blocks.append({"softmax": index.node_name(node), "heads": heads, "tokens": tokens})
    norms = [index.node_name(n) for n in src.model.graph.node if layernorm_at(index, n) is not None
             and (n.op_type == "LayerNormalization" or n.op_type == "Add" or n.op_type == "Mul")
             and not _feeds_layernorm(index, n)]
    dims = sorted({shapes[n.input[1]][0] for n in src.model.graph.node if n.op_type == "MatMul" and index.is_const(n.input[1])
                   and n.input[1] in shapes and len(shapes[n.input[1]]) == 2})
    gelus = [n for n in src.model.graph.node if is_gelu(index, n) and not any(is_gelu(index, u) for u in index.consumers.get(n.output[0], []))]
    mlp_hidden = sorted({shapes[n.output[0]][-1] for n in gelus if n.output[0] in shapes})
    stages: list[dict] = []
    for node in src.model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or node.output[0] not in shapes:
            continue
        out = shapes[node.output[0]]
        res = "x".join(map(str, out[2:]))
        if stages and stages[-1]["resolution"] == res:
            stages[-1]["convs"] += 1
            stages[-1]["channels"] = out[1]
        else:
            stages.append({"resolution": res, "convs": 1, "channels": out[1], "first": index.node_name(node),
                           "transposed": node.op_type == "ConvTranspose"})
    order = {id(n): k for k, n in enumerate(src.model.graph.node)}
    first_attention = min((order[id(n)] for n in src.model.graph.node if n.op_type == "Softmax"), default=None)
    convs = [n for n in src.model.graph.node if n.op_type in ("Conv", "ConvTranspose") and not _patchify(n)]
    before = [n for n in convs if first_attention is None or order[id(n)] < first_attention]
    if blocks:
        kind = "hybrid" if before else "vit with a conv head" if convs else "vit"
    else:
        kind = "cnn" if stages else "unknown"
    return {"kind": kind, "transformer_blocks": len(blocks), "heads": sorted({b["heads"] for b in blocks if b["heads"]}),
            "tokens": sorted({b["tokens"] for b in blocks if b["tokens"]}), "layernorms": len(norms),
            "linear_input_dims": dims, "mlp_hidden": mlp_hidden, "gelu": len(gelus), "conv_stages": stages, "batch": batch}


def _patchify(node) -> bool:
    """A conv whose stride equals its kernel: a ViT's patch embedding, not a conv stage."""
    attrs = {a.name: list(a.ints) for a in node.attribute}
    return node.op_type == "Conv" and attrs.get("kernel_shape") is not None and attrs.get("kernel_shape") == attrs.get("strides")


def _users_through(index: GraphIndex, tensor: str, depth: int = 4) -> list:
    out = []
    for u in index.consumers.get(tensor, []):
        out.append(u)
        if u.op_type in TRANSPARENT and depth > 0:
            out += _users_through(index, u.output[0], depth - 1)
    return out


def _feeds_layernorm(index: GraphIndex, node) -> bool:
    """Whether ``node`` is an inner piece (the Mul of gamma) of a LayerNorm that ends later."""
    return any(layernorm_at(index, u) is not None and u is not node for u in index.consumers.get(node.output[0], []))


def describe(src: OnnxSource) -> dict:
    """What ``vitc info`` prints for an ONNX file."""
    names = [t for n in src.model.graph.node if n.op_type in MATMUL_OPS for t in (*n.input[:2], n.output[0])]
    shapes, how = tensor_shapes(src, names + [o["name"] for o in src.outputs])
    outputs = []
    for o in src.outputs:  # declared dims; where the graph leaves them symbolic, the size they take at the model's input
        run = shapes.get(o["name"])
        shape = [d if isinstance(d, int) or run is None or k == 0 else run[k] for k, d in enumerate(o["shape"])]
        outputs.append({**o, "shape": shape, "declared_shape": o["shape"]})
    flops, unknown = 0, []
    per_op: dict[str, int] = {}
    for node in src.model.graph.node:
        if node.op_type in MATMUL_OPS:
            f = op_flops(node, shapes)
            if f is None:
                unknown.append(node.name or node.output[0])
                continue
            flops += f
            per_op[node.op_type] = per_op.get(node.op_type, 0) + f
    batch = src.fixed_batch or 1
    ops: dict[str, int] = {}
    for n in src.model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {
        "file": str(src.path),
        "opset": src.opset,
        "original_opset": src.original_opset,
        "upgraded_in_memory": src.upgraded,
        "external_data": src.external_data,
        "producer": " ".join(x for x in (src.model.producer_name, src.model.producer_version) if x) or None,
        "inputs": [{"name": src.input_name, "shape": src.input_shape, "dtype": src.input_dtype}],
        "outputs": outputs,
        "parameters": parameter_count(src.model),
        "flops": flops // batch,
        "flops_by_op": {k: v // batch for k, v in sorted(per_op.items())},
        "flops_unknown_ops": unknown,
        "flops_at": f"{src.input_size}x{src.input_size}, batch 1 (2 per multiply-add; matmul, gemm, conv ops; shapes from {how})",
        "nodes": len(src.model.graph.node),
        "op_types": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "structure": find_structure(src, shapes),
    }


class _Simulation:
    """The Q/DQ graph run by ONNX Runtime with graph optimizations off: every QuantizeLinear/
    DequantizeLinear pair computed as written, in float (the reference an int8 artifact is held to)."""

    name = "onnxruntime (no graph optimizations)"

    def __init__(self, path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x):
        import torch

        return torch.from_numpy(self.session.run(None, {self.input_name: np.ascontiguousarray(x.numpy(), np.float32)})[0])


def simulation_session(path) -> _Simulation:
    return _Simulation(path)
