"""Block reconstruction on the graph path (``vitc quantize --reconstruct`` for any captured model).

The module path (``reconstruct.py``) learns each transformer block as the ``nn.Module`` it is.
The graph path has one flat ATen graph with its quantizers as nodes, so here a unit is a
stretch of that graph: the ops whose ``nn_module_stack`` (recorded by ``torch.export``) lies
inside one block or conv stage of ``backbone.structure``, and the stretches between them (the
patch embedding, the head) as units of their own. Each unit becomes a ``GraphModule`` of its
own over the same parameters and quantizer modules (``cut``): its inputs are the values it
reads from earlier units, its outputs the values later units read.

The learning itself is the module path's, shared from ``reconstruct.py``: AdaRound on every
weight of the unit (from the float weight, on the calibrated per-channel scales), LSQ step
sizes with QDrop on every uniform activation quantizer (the prefix+patches grids learn both
steps), BRECQ's loss on the unit's outputs against the float model's (plain or output-weighted,
``record_sensitivity``), the unit's input from
the already-reconstructed predecessors. A unit whose learned error is not lower keeps its
calibrated state. Finished units are checkpointed; a rerun with the same key resumes.

Why cut the graph instead of running the whole graph per step: a step of block k would
then cost k blocks of forward (6.5x the work on average over a 12-block ViT).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from vitc.errors import VitcError

from . import reconstruct as R
from .modules import ActQuant, WeightFakeQuant

aten = torch.ops.aten
CHUNK = 32  # images per pass when running whole units over the calibration images


@dataclass
class GraphUnit:
    path: str  # the block's module path, or "(ops before <first block>)" / "(ops after <last block>)" ...
    kind: str  # "block" | "conv-stage" | "span" (ops outside every block)
    nodes: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # values from earlier units (or the model input)
    outputs: list[str] = field(default_factory=list)  # values read by later units or returned


def _innermost_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else None


def _is_batch_size(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is aten.sym_size.int and len(node.args) > 1 and node.args[1] == 0


def _is_param(node: fx.Node) -> bool:
    """A parameter read, or a quantizer applied to one (``install`` puts weight quantizers right after
    the parameter reads at the top of the graph): copied into every unit that reads it."""
    return node.op == "get_attr" or (node.op == "call_module" and bool(node.all_input_nodes)
                                     and all(a.op == "get_attr" for a in node.all_input_nodes))


def partition(gm: fx.GraphModule, structure, quant_prefix: str) -> list[GraphUnit]:
    """The graph's compute nodes as units in execution order (see the module docstring).

    Nodes with no module stack take their first user's unit (the quantizer nodes ``install``
    inserted sit right before the op they feed); the batch-size reads (``sym_size(x, 0)``) belong
    to no unit: each unit reads the batch size off its own first input."""
    regions = [(b.path, "block") for b in structure.blocks] + [(s.path, "conv-stage") for s in structure.conv_stages]

    def region_of(path: str | None):
        if path is None:
            return None
        for p, kind in regions:
            if path == p or path.startswith(p + "."):
                return p, kind
        return None

    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and not _is_param(n) and not _is_batch_size(n)]
    label: dict[str, tuple | None] = {}
    for n in reversed(nodes):
        own = _innermost_path(n)
        if (n.op == "call_module" and str(n.target).startswith(quant_prefix)) or own is None:
            users = [u for u in n.users if u.name in label]
            label[n.name] = label[users[0].name] if users else None
        else:
            label[n.name] = region_of(own)
    units: list[GraphUnit] = []
    seen_regions: set[str] = set()
    for n in nodes:
        lab = label[n.name]
        key = lab[0] if lab else None
        if units and (units[-1].kind != "span") == (key is not None) and (key is None or units[-1].path == key):
            units[-1].nodes.append(n.name)
            continue
        if key is not None:
            if key in seen_regions:
                raise VitcError(f"the ops of {key} are not one stretch of the captured graph, so it cannot be reconstructed as a unit",
                                "quantize without --reconstruct, or pass --sites modules")
            seen_regions.add(key)
            units.append(GraphUnit(key, lab[1], [n.name]))
        else:
            units.append(GraphUnit("", "span", [n.name]))
    _name_spans(units)
    where = {name: k for k, u in enumerate(units) for name in u.nodes}
    by_name = {n.name: n for n in gm.graph.nodes}
    for k, u in enumerate(units):
        ins, outs = [], []
        for name in u.nodes:
            node = by_name[name]
            for a in node.all_input_nodes:
                if _is_param(a) or _is_batch_size(a) or where.get(a.name) == k or a.name in ins:
                    continue
                ins.append(a.name)
            if any(u2.op == "output" or where.get(u2.name, k) != k for u2 in node.users):
                outs.append(name)
        u.inputs, u.outputs = ins, outs
    return units


def _name_spans(units: list[GraphUnit]) -> None:
    for k, u in enumerate(units):
        if u.kind != "span":
            continue
        before = next((v.path for v in reversed(units[:k]) if v.kind != "span"), None)
        after = next((v.path for v in units[k + 1:] if v.kind != "span"), None)
        u.path = f"(ops before {after})" if before is None and after else f"(ops after {before})" if before else "(all ops)"


def cut(gm: fx.GraphModule, unit: GraphUnit) -> fx.GraphModule:
    """``unit`` as a GraphModule of its own: one placeholder per input, a tuple of its outputs.
    Parameters and quantizer modules are the same objects as ``gm``'s, so learning here changes ``gm``."""
    by_name = {n.name: n for n in gm.graph.nodes}
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name in unit.inputs:
        env[name] = g.placeholder(name)
    batch_from = env[unit.inputs[0]] if unit.inputs else None

    def lookup(a: fx.Node) -> fx.Node:
        if a.name in env:
            return env[a.name]
        if _is_param(a):
            env[a.name] = g.node_copy(a, lookup)
            return env[a.name]
        if _is_batch_size(a) and batch_from is not None:
            env[a.name] = g.call_function(aten.sym_size.int, (batch_from, 0))
            return env[a.name]
        raise VitcError(f"the captured graph's op {a.name} feeds {unit.path} from outside it", "quantize without --reconstruct")

    for name in unit.nodes:
        env[name] = g.node_copy(by_name[name], lookup)
    g.output(tuple(env[o] for o in unit.outputs))
    return fx.GraphModule(gm, g)


class _Recorder(fx.Interpreter):
    """Runs the graph, keeping the ``keep`` values; with ``grads``, only those autograd reaches, each with
    ``retain_grad()`` (``record_sensitivity``)."""
    def __init__(self, gm, keep: set[str], grads: bool = False):
        super().__init__(gm)
        self.keep, self.values, self.grads = keep, {}, grads

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.keep:
            if not self.grads:
                self.values[n.name] = out
            elif isinstance(out, torch.Tensor) and out.is_floating_point() and out.requires_grad:
                out.retain_grad()
                self.values[n.name] = out
        return out


@torch.no_grad()
def record_values(gm: fx.GraphModule, names: set[str], x: torch.Tensor, chunk: int = CHUNK, mapped: bool = False) -> dict:
    """The values of the nodes ``names`` over all images: batch-first tensors (the batch in every chunk)
    written chunk by chunk into one tensor each, other values (shapes, constants) from the first chunk.
    With ``mapped``, those tensors are memory-mapped from unlinked temp files (``R.mapped_tensor``), so the
    float targets of every unit boundary (3.3 GB for the real ViT-S at 512 images, twice that at 1,024)
    need not all sit in memory at once."""
    n = x.shape[0]
    first: dict = {}
    stores: dict[str, torch.Tensor] = {}
    batch_first: dict[str, bool] = {}
    folder = tempfile.mkdtemp(prefix="vitc-float-values-") if mapped else None
    try:
        for i in range(0, n, chunk):
            b = min(chunk, n - i)
            rec = _Recorder(gm, names)
            rec.run(x[i:i + chunk])
            for nm, v in rec.values.items():
                first.setdefault(nm, v)
                fits = (isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b
                        and (nm not in stores or v.shape[1:] == stores[nm].shape[1:]))
                batch_first[nm] = batch_first.get(nm, True) and fits
                if not batch_first[nm]:
                    continue
                if nm not in stores:
                    shape = (n, *v.shape[1:])
                    stores[nm] = (R.mapped_tensor(folder, len(stores), shape, v.dtype) if mapped
                                  else torch.empty(shape, dtype=v.dtype))
                stores[nm][i:i + b] = v
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    return {nm: stores[nm] if batch_first[nm] else v for nm, v in first.items()}


def record_sensitivity(gm: fx.GraphModule, names: set[str], x: torch.Tensor, chunk: int = CHUNK) -> dict:
    """``R.sensitivity`` of the float graph (quantizers off) at the nodes ``names``."""
    def run(xb):
        rec = _Recorder(gm, names, grads=True)
        return rec.run(xb), rec.values

    return R.sensitivity(run, list(gm.parameters()), x, chunk)


def _join(values: list, n: int):
    v0 = values[0]
    if isinstance(v0, torch.Tensor) and v0.dim() > 0 and sum(v.shape[0] for v in values) == n:
        return torch.cat([v.detach() for v in values])
    return v0


def _pick(v, idx: torch.Tensor, n: int):
    return v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v


@torch.no_grad()
def run_unit(sub: fx.GraphModule, inputs: list, n: int, chunk: int = CHUNK) -> list:
    """The unit's outputs over all ``n`` images, chunk by chunk."""
    parts = None
    for i in range(0, n, chunk):
        idx = torch.arange(i, min(i + chunk, n))
        outs = sub(*[_pick(v, idx, n) for v in inputs])
        parts = [[o] for o in outs] if parts is None else [p + [o] for p, o in zip(parts, outs)]
    return [_join(p, n) for p in parts]


def _unit_quantizers(sub: fx.GraphModule):
    acts, weights = {}, {}
    for node in sub.graph.nodes:
        if node.op != "call_module":
            continue
        m = sub.get_submodule(node.target)
        if isinstance(m, ActQuant):
            acts[node.target] = m
        elif isinstance(m, WeightFakeQuant) and node.args[0].op == "get_attr":
            weights[node.args[0].target] = m
    return acts, weights


def _codes(weight: torch.Tensor, wq: WeightFakeQuant) -> torch.Tensor:
    """The integer codes of a weight on its grid, output channels first."""
    w = weight.detach().movedim(wq.axis, 0).float()
    return torch.round(w / wq.weight_scale.reshape(-1, *[1] * (w.dim() - 1)))


def _attr(gm: nn.Module, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _loss(outs: list, targets: list, weights: list) -> torch.Tensor:
    return sum(R._unit_loss(o, t, w) for o, t, w in zip(outs, targets, weights)
               if isinstance(o, torch.Tensor) and o.is_floating_point())


@torch.no_grad()
def _error(sub, inputs, targets, n, weights: list) -> tuple[float, list]:
    """The mean (weighted) squared error of the unit's outputs over every image: the learning's own measure."""
    outs = run_unit(sub, inputs, n)
    total, count = 0.0, 0
    for o, t, w in zip(outs, targets, weights):
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            e = (o - t).pow(2)
            total += float((e * w).sum() if w is not None else e.sum())
            count += o.numel()
    return total / max(1, count), outs


def learn_graph_unit(gm: fx.GraphModule, unit: GraphUnit, sub: fx.GraphModule, inputs: list, targets: list, n: int,
                     originals: dict[str, torch.Tensor], done_weights: set[str], options: R.ReconstructOptions,
                     progress=None, task=None, out_weights: list | None = None) -> tuple[dict, list]:
    """Learn one unit in place (see the module docstring); return its record and its outputs on ``inputs``.
    ``out_weights``: per output, the element weights of its error (``R.output_weights``) or None."""
    gen = torch.Generator().manual_seed(options.seed)
    out_weights = out_weights or [None] * len(targets)
    acts, weights = _unit_quantizers(sub)
    weights = {t: q for t, q in weights.items() if t in originals and t not in done_weights}
    before, _ = _error(sub, inputs, targets, n, out_weights)  # the calibrated unit, before the soft rounding starts at the float weights
    state, calibrated_codes, log_scales = {}, {}, {}
    for target, wq in weights.items():
        w = originals[target].movedim(wq.axis, 0).float()
        codes = _codes(_attr(gm, target), wq)
        calibrated_codes[target] = codes
        floor, v = R.init_rounding_at(w, wq.weight_scale, codes)
        v = nn.Parameter(v)
        state[target] = (floor, v)
        if options.affine:
            log_scales[target] = nn.Parameter(wq.weight_scale.detach().log().clone())
        wq.forward = (lambda w, f=floor, v=v, q=wq, ls=log_scales.get(target):
                      R.soft_weight(f, v, ls.exp() if ls is not None else q.weight_scale, q.wbits).movedim(0, q.axis))
    scales = {t: R._learnable_act(q, options.drop_prob, options.learn_act, gen) for t, q in acts.items()}
    params_w = [v for _, v in state.values()]
    params_a = [p for p in scales.values() if p is not None]
    # the unit's own 1-D float tensors (biases, norm affines, layer scales; not those of units already learned)
    floats = R.affine_floats({n.target: _attr(gm, n.target) for n in sub.graph.nodes if n.op == "get_attr"
                              and n.target not in done_weights and n.target not in originals}) if options.affine else {}
    grad_was = {t: p.requires_grad for t, p in floats.items()}
    snapshot = ({t: _attr(gm, t).detach().clone() for t in list(weights) + list(floats)}
                | {t: q.scale.clone() for t, q in acts.items()} | {f"{t}.weight_scale": q.weight_scale.clone() for t, q in weights.items()})
    learned = bool(params_w or params_a)

    def batch_loss():
        idx = torch.randint(0, n, (min(options.batch, n),), generator=gen)
        return _loss(list(sub(*[_pick(v, idx, n) for v in inputs])), [_pick(t, idx, n) for t in targets], out_weights)

    try:
        for p in floats.values():
            p.requires_grad_(True)
        if learned:
            R.optimise(batch_loss, params_w, params_a, options, progress, task,
                       R.affine_groups(list(log_scales.values()), list(floats.values()), options.affine_lr))
    finally:
        for t, p in floats.items():
            p.requires_grad_(grad_was[t])
        for p in sub.parameters():  # what the backward passes reached (norms, tokens, learned floats)
            p.grad = None
        for target, wq in weights.items():
            del wq.forward
            floor, v = state[target]
            if target in log_scales:
                wq.weight_scale = log_scales[target].detach().exp().clone()
            with torch.no_grad():
                _attr(gm, target).copy_(R.hard_weight(floor, v.detach(), wq.weight_scale, wq.wbits).movedim(0, wq.axis))
        for t, q in acts.items():
            R._restore_act(q, scales[t])
    after, outs = _error(sub, inputs, targets, n, out_weights) if learned else (before, None)
    kept = after > before
    if kept:
        with torch.no_grad():
            for t in list(weights) + list(floats):
                _attr(gm, t).copy_(snapshot[t])
            for t, q in weights.items():
                q.weight_scale = snapshot[f"{t}.weight_scale"]
            for t, q in acts.items():
                q.scale = snapshot[t]
        outs = None
    if outs is None:
        outs = run_unit(sub, inputs, n)
    done_weights.update(weights)
    changed = sum(int((_codes(_attr(gm, t), wq) != calibrated_codes[t]).sum()) for t, wq in weights.items())
    record = {"unit": unit.path, "kind": unit.kind, "weights": len(weights), "activation_grids": len(acts),
              "mse_before": before, "mse_after": min(after, before), "learned_mse": after, "kept_calibration": kept,
              "codes_changed": changed, "steps": options.iters}
    if options.affine:
        record["affine"] = {"weight_scales": len(log_scales), "floats": sorted(floats)}
    return record, outs


def reconstruct_graph(gm: fx.GraphModule, units: list[GraphUnit], x: torch.Tensor, float_values: dict,
                      originals: dict[str, torch.Tensor], options: R.ReconstructOptions, key: str,
                      staging: Path | None = None, progress=None, say=print, state_owner: nn.Module | None = None,
                      sensitivity: dict | None = None) -> dict:
    """Reconstruct the quantized graph ``gm`` (quantizers in "quant" mode) unit by unit.

    ``float_values``: every unit output of the float model (``record_values`` before the weights
    were quantized); ``originals``: the float weights by attribute target; ``state_owner``: the
    module whose state dict is checkpointed (the ``Captured`` wrapper); ``sensitivity``: with
    ``options.loss == "fisher"``, ``record_sensitivity`` of every unit output of the float model."""
    options = options.validate()
    R.check_count(x.shape[0], options)
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        return _reconstruct_graph(gm, units, x, float_values, originals, options, key, staging, progress, say,
                                  state_owner or gm, sensitivity or {})
    finally:
        torch.set_num_threads(threads)


def _reconstruct_graph(gm, units, x, float_values, originals, options, key, staging, progress, say, owner, sensitivity) -> dict:
    torch.manual_seed(options.seed)
    n = x.shape[0]
    subs = [cut(gm, u) for u in units]
    placeholder = next(p.name for p in gm.graph.nodes if p.op == "placeholder")
    learnable = [k for k, s in enumerate(subs) if any(_unit_quantizers(s))]
    done: list[dict] = []
    if staging is not None:
        staging = Path(staging) / key
        done = R.load_checkpoint(staging, owner)
    estimate = _estimate(subs, units, learnable, x, float_values, options) * max(0.0, 1 - len(done) / max(1, len(units)))
    steps = {k: R.unit_steps(options, j, len(learnable)) for j, k in enumerate(learnable)}
    say(f"reconstruction (graph): {len(units)} units ({R._kinds([R.Unit(u.path, u.kind) for u in units])}), "
        f"{len(learnable)} with quantizers, x {R._steps_text(list(steps.values()))} on {n} images, about {R._fmt_s(estimate)}"
        + (f" (resuming after {len(done)} finished units)" if done else ""))
    start = time.perf_counter()
    task = progress.add_task("reconstructing", total=sum(steps.values()),
                             completed=sum(s for k, s in steps.items() if k < len(done))) if progress is not None else None
    needed_later = {name: max(k for k, u in enumerate(units) if name in u.inputs) for u in units for name in u.inputs}
    if done:  # the resumed model's own values at the remaining units' inputs
        names = {nm for u in units[len(done):] for nm in u.inputs if nm != placeholder}
        quant_values = record_values(gm, names, x)
    else:
        quant_values = {}
    quant_values[placeholder] = x
    done_weights: set[str] = set()
    for k, (unit, sub) in enumerate(zip(units, subs)):
        if k < len(done):
            done_weights.update(_unit_quantizers(sub)[1])
            continue
        if progress is not None and task is not None:
            progress.update(task, description=f"reconstructing {unit.path} ({k + 1}/{len(units)})")
        unit_start = time.perf_counter()
        inputs = [quant_values[nm] for nm in unit.inputs]
        targets = [float_values[nm] for nm in unit.outputs]
        if k in learnable:
            out_weights = [R.output_weights(sensitivity[nm]) if nm in sensitivity else None for nm in unit.outputs]
            result, outs = learn_graph_unit(gm, unit, sub, inputs, targets, n, originals, done_weights,
                                            replace(options, iters=steps[k]), progress, task, out_weights)
            if options.loss == "fisher":
                result["output_weights"] = R.weights_summary(out_weights)
            done.append(result)
            done[-1]["seconds"] = round(time.perf_counter() - unit_start, 2)
        else:  # float ops between blocks: run, nothing to learn
            outs = run_unit(sub, inputs, n)
            done.append({"unit": unit.path, "kind": unit.kind, "float": True})
        for nm, v in zip(unit.outputs, outs):
            quant_values[nm] = v
        for nm in [nm for nm in quant_values if needed_later.get(nm, -1) <= k and nm != placeholder]:
            del quant_values[nm]
        if staging is not None:
            R.save_checkpoint(staging, owner, key, done)
    if progress is not None and task is not None:
        progress.remove_task(task)
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    return {"path": "graph", "options": asdict(options), "units": [u for u in done if not u.get("float")],
            "float_spans": [u["unit"] for u in done if u.get("float")], "estimate_s": round(estimate, 1),
            "seconds": round(time.perf_counter() - start, 2), "images": int(n)}


def _estimate(subs, units, learnable, x, float_values, options) -> float:
    """Seconds: one timed learning step of the largest learnable unit, times steps and units
    (the units of a ViT are alike), plus the passes that run each unit over every image."""
    if not learnable:
        return 0.0
    k = max(learnable, key=lambda j: len(units[j].nodes))
    n = x.shape[0]
    idx = torch.arange(min(options.batch, n))
    inputs = [_pick(float_values.get(nm, x), idx, n) for nm in units[k].inputs]
    for v in inputs:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v.requires_grad_(True)
    step = float("inf")
    for _ in range(2):  # the first call pays for allocation and kernel selection: keep the faster
        with torch.enable_grad():
            t = time.perf_counter()
            outs = subs[k](*inputs)
            sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()).backward()
            step = min(step, time.perf_counter() - t)
    for param in subs[k].parameters():  # the timing's gradients, not the model's
        param.grad = None
    # learned rounding and step sizes roughly double a plain step (the module path's measurement);
    # each unit runs forward over all images three times (errors before and after, outputs), a
    # forward being about a third of a step
    return 2.0 * step * options.iters * len(learnable) + step * n / len(idx) * len(units)


def check_cut(gm: fx.GraphModule, units: list[GraphUnit], values: dict, x: torch.Tensor) -> None:
    """Each unit, run on its recorded inputs, returns its recorded outputs: the cut is faithful."""
    placeholder = next(p.name for p in gm.graph.nodes if p.op == "placeholder")
    m = min(2, x.shape[0])
    idx = torch.arange(m)
    for u in units:
        sub = cut(gm, u)
        ins = [_pick(x if nm == placeholder else values[nm], idx, x.shape[0]) for nm in u.inputs]
        with torch.no_grad():
            outs = sub(*ins)
        for nm, o in zip(u.outputs, outs):
            ref = _pick(values[nm], idx, x.shape[0])
            if isinstance(o, torch.Tensor) and not torch.allclose(o, ref, rtol=1e-4, atol=1e-5):
                raise VitcError(f"the graph cut at {u.path} does not reproduce the model ({nm} differs)",
                                "quantize without --reconstruct, or pass --sites modules")
