"""Block reconstruction after calibration (``vitc quantize --reconstruct``): BRECQ / QDrop.

For each unit of the model in execution order (a transformer block, a conv stage, or a single
weighted layer that belongs to neither: the patch embedding, the classifier), learn

* the rounding of every weight of the unit (AdaRound: ``W_q = s * clamp(floor(W/s) + h(V))``
  with the rectified sigmoid ``h`` and the regulariser ``1 - |2h - 1|^beta``, ``beta``
  annealed from 20 to 2 after a warm-up without it), the per-channel scales ``s`` kept from
  calibration;
* the step size of every uniform activation quantizer of the unit (LSQ, on ``log s`` so that
  one learning rate fits every range; zero points stay),
* with ``--recon-affine`` also the unit's per-channel affine parameters: each weight's per-channel
  scale ``s`` (on ``log s``, the integer codes' base fixed) and its 1-D float parameters (biases,
  norm affines, layer scales), each moving by the same relative amount per step (``affine_groups``),

by minimising the squared error of the unit's output against the FP32 model's output of the
same unit (``--recon-loss fisher``: each element's error weighted by how much that element moves
the model's output, BRECQ's Fisher-weighted variant made task-free, see ``output_weights``). The
unit's input comes from the quantized predecessors (already reconstructed), as BRECQ does, and QDrop drops each activation quantization element with probability 0.5
during learning, so the learned grids do not overfit one noisy input.

A unit's output is invariant under the exact rewrites of calibration (BatchNorm folding and
the RepQ-ViT LayerNorm reparameterisation change weights inside a block, never what a block
or a Linear returns), so the FP32 targets come from the float model after those rewrites.

After each unit the soft rounding is hardened and folded into the weight (it lies on its
integer grid again), so the result saves, reloads and exports like any calibrated model.
Each finished unit is checkpointed in a staging folder keyed by the model, the calibration
images and the settings; a rerun with the same key resumes after the last finished unit.

Hybrid bridges: the conv that hands over to attention is reconstructed inside its conv stage
(against the stage's FP32 output), and the first attention Linear after it inside the first
block, so the bridge is matched at both ends.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from vitc.errors import VitcError

from . import quantizers as Q
from .modules import ActQuant, QuantConv2d, QuantLinear, act_quantizers, set_mode, weighted_layers

LOSSES = ("mse", "fisher")
# share of the "fisher" loss weighted by the output sensitivity; the rest is the plain error. Why not all of
# it: the weights are the diagonal of the sensitivity, which ignores errors that add up across tokens (the
# mean of 256 patch tokens the DINOv2 head reads moves with their shared error, not their independent ones),
# so the patch tokens keep at least half their plain weight
FISHER_MIX = 0.5
MIN_IMAGES = 64  # two learning batches: fewer and the learned rounding fits the few images, not the model
ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


@dataclass
class ReconstructOptions:
    iters: int = 150  # learning steps per unit (the mean over units with iters_ramp)
    # steps growing with depth at the same total (unit_steps): on the real ViT-S the learned block errors
    # grow tenfold from the first blocks to the last and reconstruction removes less of them late
    # (W4A4: 56-77% in blocks 1-4, 19-44% in blocks 5-10). Measured at W6A6, 512 images, 0.5: the head
    # unit's error -11%, blocks 1-5 +5-14%, output KL -7% (docs/quantize.md); opt-in, one run per width
    iters_ramp: float = 0.0
    batch: int = 16
    # Adam on the rounding variables V: AdaRound's 1e-3 is for 10-20k steps; at a few hundred
    # steps V would barely leave its start and the regulariser would settle on nearest rounding
    weight_lr: float = 2e-2
    act_lr: float = 4e-3  # Adam on log step sizes
    reg: float = 0.01  # weight of the rounding regulariser (per weight), AdaRound's lambda
    warmup: float = 0.2  # share of steps without the regulariser
    beta: tuple[float, float] = (20.0, 2.0)
    drop_prob: float = 0.5  # QDrop: probability of keeping an activation element in float
    learn_act: bool = True
    float_bias: bool = False  # start from the float bias instead of the bias-corrected one
    seed: int = 0
    # "mse": BRECQ's plain squared error of each unit's output; "fisher": each element's error weighted by how
    # much it moves the model's output (output_weights), half plain and half weighted (FISHER_MIX)
    loss: str = "mse"
    # also learn each unit's per-channel affine parameters: the weights' per-channel scales and the 1-D float
    # parameters (biases, norm affines, layer scales); see affine_groups
    affine: bool = False
    affine_lr: float = 1e-3  # Adam, relative: on log weight scales, and times each float parameter's RMS
    # torch threads while learning: a step works on small tensors (16 images of one unit), where
    # threading costs more than it gains; on the shared 2-core machine a zoo ViT step took
    # 267 ms on one thread and 2,639 ms on two (load average 7.7)
    threads: int = 1

    def validate(self) -> "ReconstructOptions":
        if self.iters < 1:
            raise VitcError(f"--iters {self.iters} is not a positive number of steps", "pass --iters 1 or more (e.g. 400)")
        if not 0.0 <= self.iters_ramp < 1.0:
            raise VitcError(f"--iters-ramp {self.iters_ramp} is out of range",
                            "use a value in [0, 1): 0.5 gives the first unit half the steps and the last one and a half")
        if self.threads < 1:
            raise VitcError(f"reconstruction threads {self.threads} is not positive", "use 1 thread")
        if self.batch < 1:
            raise VitcError(f"reconstruction batch {self.batch} is not positive", "use a batch of 32")
        if not 0.0 <= self.drop_prob < 1.0:
            raise VitcError(f"drop probability {self.drop_prob} is out of range", "use a value in [0, 1)")
        if self.loss not in LOSSES:
            raise VitcError(f"--recon-loss {self.loss} is not one of {', '.join(LOSSES)}",
                            "pass --recon-loss mse (BRECQ's plain error) or fisher (weighted by the effect on the output)")
        return self


@dataclass
class Unit:
    path: str
    kind: str  # "block" | "conv-stage" | "layer"
    layers: list[str] = field(default_factory=list)


def unit_steps(options: ReconstructOptions, k: int, count: int) -> int:
    """Learning steps of the k-th of ``count`` learnable units: ``iters`` each, or with ``iters_ramp`` r
    a linear ramp from (1 - r) to (1 + r) times ``iters`` over depth (the total stays about count * iters)."""
    if count < 2 or not options.iters_ramp:
        return options.iters
    r = options.iters_ramp
    return max(1, round(options.iters * (1.0 - r + 2.0 * r * k / (count - 1))))


def check_count(images: int, options: ReconstructOptions | None = None) -> None:
    need = max(MIN_IMAGES, 2 * (options.batch if options else 32))
    if images < need:
        raise VitcError(f"--reconstruct needs at least {need} calibration images, got {images}",
                        f"pass --calib-size {need} or more (512 recommended)")


# ---------------------------------------------------------------- units

def find_units(module: nn.Module, structure, example: torch.Tensor) -> list[Unit]:
    """Units in execution order: transformer blocks and conv stages from the structure, then
    every weighted layer in none of them on its own (the generic fallback for unknown families)."""
    layers = weighted_layers(module)
    candidates = [(b.path, "block") for b in structure.blocks] + [(s.path, "conv-stage") for s in structure.conv_stages]
    units, claimed = [], set()
    for path, kind in candidates:
        try:
            m = module.get_submodule(path)
        except AttributeError:
            continue
        inside = [n for n in layers if n.startswith(path + ".") and n not in claimed]
        if not inside or isinstance(m, (nn.ModuleList, nn.ModuleDict)):
            continue  # a container that is never called as a whole: its layers fall back to their own units
        units.append(Unit(path, kind, inside))
        claimed.update(inside)
    units += [Unit(n, "layer", [n]) for n in layers if n not in claimed]
    order = _call_order(module, [u.path for u in units], example)
    called = [u for u in units if u.path in order]
    # a unit whose module never ran as a whole (an unused wrapper): its layers on their own
    for u in units:
        if u.path not in order and u.kind != "layer":
            called += [Unit(n, "layer", [n]) for n in u.layers]
    order = _call_order(module, [u.path for u in called], example)
    return sorted((u for u in called if u.path in order), key=lambda u: order[u.path])


@torch.no_grad()
def _call_order(module: nn.Module, paths: list[str], example: torch.Tensor) -> dict[str, int]:
    order: dict[str, int] = {}
    def seen(path):
        def pre(m, args):
            order.setdefault(path, len(order))  # returns None: a pre-hook's return value would replace the input
        return pre

    hooks = [module.get_submodule(p).register_forward_pre_hook(seen(p)) for p in paths]
    try:
        module(example)
    finally:
        for h in hooks:
            h.remove()
    return order


# ---------------------------------------------------------------- capture

class _Stop(Exception):
    pass


@dataclass
class Captured:
    """A unit's inputs (positional and keyword) and output over all images, batch-first tensors concatenated."""

    args: list
    kwargs: dict
    output: torch.Tensor | None
    n: int

    def inputs(self, idx: torch.Tensor) -> tuple[list, dict]:
        pick = lambda v: v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.n else v
        return [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    if hasattr(out, "values"):
        return first_tensor(list(out.values()))
    raise VitcError(f"a reconstruction unit returns {type(out).__name__}, not a tensor", "report the model")


@torch.no_grad()
def capture(module: nn.Module, path: str, x: torch.Tensor, batch: int = 64, want_inputs: bool = True) -> Captured:
    """Run ``module`` on ``x`` up to the unit at ``path`` (stopping there) and keep its inputs and output."""
    target = module.get_submodule(path)
    chunks: list[tuple] = []

    def hook(m, args, kwargs, out):
        chunks.append((args if want_inputs else (), kwargs if want_inputs else {}, first_tensor(out).detach()))
        raise _Stop

    h = target.register_forward_hook(hook, with_kwargs=True)
    try:
        for i in range(0, x.shape[0], batch):
            try:
                module(x[i:i + batch])
            except _Stop:
                pass
    finally:
        h.remove()
    n = x.shape[0]

    def cat(values):
        v0 = values[0]
        if isinstance(v0, torch.Tensor) and v0.dim() > 0 and sum(v.shape[0] for v in values) == n:
            return torch.cat([v.detach() for v in values])
        return v0

    args = [cat([c[0][j] for c in chunks]) for j in range(len(chunks[0][0]))]
    kwargs = {k: cat([c[1][k] for c in chunks]) for k in chunks[0][1]}
    return Captured(args, kwargs, torch.cat([c[2] for c in chunks]), n)


TARGETS_MAX_BYTES = 1 << 30  # all units' FP32 outputs kept at once up to this; beyond it, one capture per unit


@torch.no_grad()
def capture_outputs(reference: nn.Module, paths: list[str], x: torch.Tensor, batch: int = 64,
                    max_bytes: int = TARGETS_MAX_BYTES) -> dict[str, torch.Tensor]:
    """Every unit's FP32 output in one pass of ``reference`` over ``x`` (``{}`` when they would not fit
    in ``max_bytes``): one pass instead of one partial pass per unit, whose cost grows with its depth."""
    probe = _probe(reference, paths, x[:1])
    if sum(first_tensor(out).numel() * 4 for _, _, out in probe.values()) * x.shape[0] > max_bytes:
        return {}
    chunks: dict[str, list] = {p: [] for p in paths}
    hooks = [reference.get_submodule(p).register_forward_hook(
        lambda m, a, out, p=p: chunks[p].append(first_tensor(out).detach())) for p in paths]
    try:
        for i in range(0, x.shape[0], batch):
            reference(x[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    return {p: torch.cat(c) for p, c in chunks.items() if c}


@torch.no_grad()
def _probe(module: nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, tuple]:
    """{path: (args, kwargs, output)} of each unit's first call on ``x``."""
    seen: dict[str, tuple] = {}

    def hook(p):
        def fn(m, args, kwargs, out):
            seen.setdefault(p, (args, kwargs, out))
        return fn

    hooks = [module.get_submodule(p).register_forward_hook(hook(p), with_kwargs=True) for p in paths]
    try:
        module(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@dataclass
class Link:
    """Unit k+1 takes unit k's output as its one tensor argument, at ``position`` among ``args``."""

    position: int
    args: list
    kwargs: dict

    def inputs(self, outputs: torch.Tensor) -> Captured:
        args = list(self.args)
        args[self.position] = outputs
        return Captured(args, dict(self.kwargs), None, outputs.shape[0])


def chain_links(module: nn.Module, units: list[Unit], probe: torch.Tensor) -> dict[int, Link]:
    """{k: Link} for each unit k whose output is, unchanged, the only tensor input of unit k+1
    (consecutive transformer blocks), checked on ``probe`` images: there the next unit's quantized
    input is the learned unit's output on the previous one's inputs, and no partial pass of the
    model from its input is needed."""
    seen = _probe(module, [u.path for u in units], probe)
    links = {}
    for k in range(len(units) - 1):
        here, nxt = seen.get(units[k].path), seen.get(units[k + 1].path)
        if here is None or nxt is None:
            continue
        args, kwargs, _ = nxt
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        if len(tensors) != 1 or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            continue
        out = first_tensor(here[2])
        arg = args[tensors[0]]
        if arg.shape == out.shape and torch.equal(arg, out):
            links[k] = Link(tensors[0], list(args), dict(kwargs))
    return links


# ---------------------------------------------------------------- AdaRound

def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_rounding(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(floor(w/s), V) with ``h(V)`` equal to the fractional part, so learning starts at the float weight."""
    s = scale.reshape(-1, *[1] * (w.dim() - 1))
    ws = w / s
    floor = torch.floor(ws)
    rest = (ws - floor).clamp(1e-4, 1 - 1e-4)
    v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
    return floor, v


def init_rounding_at(w: torch.Tensor, scale: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(floor, V) whose hard rounding is ``codes`` (the integer weight calibration chose, e.g. by
    GPTQ) and whose soft weight starts at the float weight where that rounding is the nearest
    one (elsewhere at most 0.4 of a step from the chosen code's side). Learning then starts from
    the calibrated model instead of nearest rounding: at a few hundred steps AdaRound from the
    float weights ends near nearest rounding, which below 8 bits is worse than GPTQ's."""
    s = scale.reshape(-1, *[1] * (w.dim() - 1))
    ws = w / s
    floor = torch.floor(ws)
    floor = torch.where(codes > floor + 1, codes - 1, torch.where(codes < floor, codes, floor))
    rest = ws - floor
    up = codes == floor + 1
    h = torch.where(up, rest.clamp(0.6, 1 - 1e-4), rest.clamp(1e-4, 0.4))
    v = -torch.log((ZETA - GAMMA) / (h - GAMMA) - 1)
    return floor, v


def round_regulariser(v: torch.Tensor, beta: float) -> torch.Tensor:
    return (1 - (2 * rectified_sigmoid(v) - 1).abs().pow(beta)).sum()


def hard_weight(floor: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = Q.int_range(bits, True, restricted=True)
    s = scale.reshape(-1, *[1] * (floor.dim() - 1))
    return torch.clamp(floor + (v >= 0).float(), qmin, qmax) * s


def soft_weight(floor: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = Q.int_range(bits, True, restricted=True)
    s = scale.reshape(-1, *[1] * (floor.dim() - 1))
    return torch.clamp(floor + rectified_sigmoid(v), qmin, qmax) * s


def beta_at(step: int, total: int, options: ReconstructOptions) -> float | None:
    """The annealed exponent, None during the warm-up (no regulariser then)."""
    start = int(options.warmup * total)
    if step < start:
        return None
    t = (step - start) / max(1, total - start)
    hi, lo = options.beta
    return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------- learning one unit

def _learnable_act(q: ActQuant, drop_prob: float, learn: bool, gen: torch.Generator):
    """Replace ``q``'s forward by an LSQ fake-quant with a learnable log step size and QDrop."""
    log_scale = nn.Parameter(q.scale.detach().clamp_min(1e-8).log().clone()) if learn else None
    zero = q.zero_point.detach().float()
    qmin, qmax = q.qrange
    axis = q.channel_axis

    def forward(self, x):
        if self.kind != "uniform" or self.mode != "quant":
            return ActQuant.forward(self, x)
        if log_scale is None:
            xq = ActQuant.forward(self, x)
        else:
            scale = log_scale.exp()
            grad_factor = 1.0 / math.sqrt(max(1, x.numel() // max(1, scale.numel())) * qmax)
            if self.prefix_tokens:  # the graph path's split grid: the prefix tokens' step, then the patches'
                p = self.prefix_tokens
                pmin, pmax = self.prefix_qrange
                xq = torch.cat([torch._fake_quantize_learnable_per_tensor_affine(x[:, :p], scale[:1], zero[:1], pmin, pmax, grad_factor),
                                torch._fake_quantize_learnable_per_tensor_affine(x[:, p:], scale[1:], zero[1:], qmin, qmax, grad_factor)], 1)
            elif self.per_channel:
                xq = torch._fake_quantize_learnable_per_channel_affine(x, scale, zero, axis % x.dim(), qmin, qmax, grad_factor)
            else:
                xq = torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero, qmin, qmax, grad_factor)
        if self.training_drop and drop_prob > 0:
            keep_float = torch.rand(x.shape, generator=gen) < drop_prob
            return torch.where(keep_float, x, xq)
        return xq

    q.training_drop = True
    q.forward = types.MethodType(forward, q)
    return log_scale


def _restore_act(q: ActQuant, log_scale) -> None:
    if log_scale is not None:
        q.scale = log_scale.detach().exp().clone()
    del q.forward
    del q.training_drop


def _unit_loss(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    # summed over a sample's elements, averaged over samples (BRECQ's reconstruction loss); ``weight``
    # (the sample's shape without the batch) weighs each element (output_weights)
    err = (out - target).pow(2)
    if weight is not None:
        err = err * weight
    return err.flatten(1).sum(1).mean()


def sensitivity(run, params, x: torch.Tensor, chunk: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """``E[g^2]`` per element of each value that ``run(xb)`` hands back (averaged over the images, so shaped
    like one sample), ``g`` the gradient of ``<model output, e>`` with ``e`` standard normal per image: the
    diagonal of ``J J^T``, the Gauss-Newton matrix of the output's squared error (``J`` the output's Jacobian
    with respect to the value), the same for every task. ``run(xb)`` runs the float model on a chunk with
    autograd and returns ``(output, {name: value})``, each value with ``retain_grad()`` called; ``params``
    are the model's parameters, whose gradients are dropped afterwards (nothing is learned here)."""
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, torch.Tensor] = {}
    with torch.enable_grad():
        for i in range(0, x.shape[0], chunk):
            xb = x[i:i + chunk].detach().clone().requires_grad_(True)
            out, values = run(xb)
            leaves = [o for o in torch.utils._pytree.tree_leaves(out)
                      if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
            if not leaves:
                return {}
            sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in leaves).backward()
            for name, v in values.items():
                if v.grad is not None and v.dim() > 0 and v.shape[0] == xb.shape[0]:
                    g2 = v.grad.detach().double().pow(2).sum(0)
                    sums[name] = sums[name] + g2 if name in sums else g2
            del out, values, leaves
    for p in params:
        p.grad = None
    return {name: (v / x.shape[0]).float() for name, v in sums.items()}


def mapped_tensor(folder: str, index: int, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed tensor backed by a file in ``folder`` that is unlinked at once: the mapping keeps its pages,
    the page cache holds what fits and the disk the rest, and nothing is left behind when it is freed (or the
    process dies). For the calibration images' float values, which grow with the images and not the model."""
    path = os.path.join(folder, f"{index}.bin")
    t = torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
    os.unlink(path)
    return t


def module_sensitivity(reference: nn.Module, paths: list[str], x: torch.Tensor, chunk: int = 32) -> dict[str, torch.Tensor]:
    """``sensitivity`` at each unit's output (``first_tensor`` of the module at each path) of ``reference``."""
    values: dict[str, torch.Tensor] = {}

    def keep(p):
        def hook(m, a, out):
            t = first_tensor(out)
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.retain_grad()
                values[p] = t
        return hook

    def run(xb):
        values.clear()
        return reference(xb), dict(values)

    hooks = [reference.get_submodule(p).register_forward_hook(keep(p)) for p in paths]
    try:
        return sensitivity(run, list(reference.parameters()), x, chunk)
    finally:
        for h in hooks:
            h.remove()


def output_weights(sensitivity: torch.Tensor, mix: float = FISHER_MIX) -> torch.Tensor:
    """Per-element weights of a unit output's error from its sensitivity ``E[g^2]`` (one value per element
    of a sample, averaged over images; ``g`` the gradient of the model output, projected on a random
    direction, with respect to this value): ``(1 - mix) + mix * S`` with ``S`` the sensitivity
    normalised to mean 1.

    ``S`` is smoothed to a product of a per-position and a per-channel factor (tokens x channels for a
    (T, C) value, channels x pixels for (C, H, W)): one image's gradient is noisy per element, and the
    structure that matters is by position (the CLS token, which the head reads, against the patches:
    180x per element in the real ViT-S's first block, 58,000x in its last) and by channel (the residual
    stream's large channels, which the next LayerNorm divides away: a channel 5.5-39x the mean;
    benchmarks/recon_loss_sensitivity.py). Measured: it helps CLS-token heads (the zoo's ViTs) and hurts a
    head that also averages the patch tokens (the DINOv2 probe), where an error shared by every patch
    token counts up to 254x what this diagonal says (docs/quantize.md), hence opt-in."""
    s = sensitivity.double()
    m = s.mean()
    if not torch.isfinite(m) or m <= 0:
        return torch.ones_like(sensitivity)
    s = s / m
    if s.dim() == 2:  # (positions, channels)
        s = s.mean(1, keepdim=True) * s.mean(0, keepdim=True)
    elif s.dim() == 3:  # (channels, H, W)
        s = s.mean((1, 2), keepdim=True) * s.mean(0, keepdim=True)
    s = s / s.mean()
    return ((1.0 - mix) + mix * s).to(sensitivity.dtype)


def affine_groups(log_scales: list, floats: list, lr: float) -> list[dict]:
    """Adam parameter groups for a unit's affine parameters (``--recon-affine``): the log per-channel weight
    scales at ``lr``, and each 1-D float parameter (bias, norm weight or bias, layer scale) at ``lr`` times its
    own RMS, so that a LayerScale of 1e-2 and a LayerNorm weight of 1 move by the same share per step."""
    groups = [{"params": log_scales, "lr": lr}] if log_scales else []
    for p in floats:
        rms = float(p.detach().pow(2).mean().sqrt())
        groups.append({"params": [p], "lr": lr * max(rms, 1e-6)})
    return groups


def affine_floats(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 1-D floating-point tensors among ``tensors`` (a unit's parameters): what ``--recon-affine`` learns besides
    the weight scales."""
    return {n: t for n, t in tensors.items() if t.dim() == 1 and t.is_floating_point()}


def optimise(batch_loss, params_w: list, params_a: list, options: ReconstructOptions, progress=None, task=None,
             groups_f: list | None = None) -> None:
    """The learning loop of both paths: ``batch_loss()`` is the unit's loss on one sampled batch;
    Adam on the rounding variables (plus the annealed rounding regulariser after the warm-up),
    Adam with a cosine schedule on the log step sizes and on the affine parameters (``groups_f``)."""
    opt_w = torch.optim.Adam(params_w, lr=options.weight_lr) if params_w else None
    opt_a = torch.optim.Adam(params_a, lr=options.act_lr) if params_a else None
    opt_f = torch.optim.Adam(groups_f) if groups_f else None
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, options.iters, eta_min=0.0) for o in (opt_a, opt_f) if o is not None]
    opts = [o for o in (opt_w, opt_a, opt_f) if o is not None]
    with torch.enable_grad():
        for step in range(options.iters):
            loss = batch_loss()
            beta = beta_at(step, options.iters, options)
            if beta is not None and params_w:
                loss = loss + options.reg * sum(round_regulariser(v, beta) for v in params_w)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
            for sched in scheds:
                sched.step()
            if progress is not None and task is not None:
                progress.advance(task)


def learn_unit(module: nn.Module, unit: Unit, reference: nn.Module, quant_in: Captured, target: torch.Tensor,
               options: ReconstructOptions, progress=None, task=None, keep_outputs: bool = False,
               weight: torch.Tensor | None = None):
    """Learn the rounding and step sizes of one unit in place; return its before/after output error
    (and, with ``keep_outputs``, the unit's final outputs on ``quant_in``: the next unit's input).
    ``weight``: the element weights of the output's error (``output_weights``), or None."""
    gen = torch.Generator().manual_seed(options.seed)
    unit_module = module.get_submodule(unit.path)
    layers = {n: module.get_submodule(n) for n in unit.layers}
    ref_layers = {n: reference.get_submodule(n) for n in unit.layers}
    # the calibrated unit's error, before the soft rounding starts at the float weights
    before, _ = _unit_error(unit_module, quant_in, target, {}, options, weight=weight)
    state, log_scales = {}, {}
    for name, layer in layers.items():
        w = ref_layers[name].weight.detach().float()
        floor, v = init_rounding(w, layer.weight_scale)
        v = nn.Parameter(v)
        state[name] = (floor, v)
        if options.float_bias and ref_layers[name].bias is not None:
            with torch.no_grad():
                layer.bias.copy_(ref_layers[name].bias.detach())
        if options.affine:
            log_scales[name] = nn.Parameter(layer.weight_scale.detach().log().clone())
        layer._weight = (lambda f=floor, v=v, l=layer, ls=log_scales.get(name):
                         soft_weight(f, v, ls.exp() if ls is not None else l.weight_scale, l.wbits))
    acts = {n: q for n, q in act_quantizers(unit_module).items()}
    scales = {n: _learnable_act(q, options.drop_prob, options.learn_act, gen) for n, q in acts.items()}
    params_w = [v for _, v in state.values()]
    params_a = [p for p in scales.values() if p is not None]
    floats = affine_floats({f"{unit.path}.{n}": p for n, p in unit_module.named_parameters()}) if options.affine else {}
    grad_was = {n: p.requires_grad for n, p in floats.items()}
    # the calibrated state, kept when learning does not lower the unit's error on the calibration images
    snapshot = {k: v.detach().clone() for k, v in unit_module.state_dict().items()}
    n = quant_in.n

    def batch_loss():
        idx = torch.randint(0, n, (min(options.batch, n),), generator=gen)
        args, kwargs = quant_in.inputs(idx)
        return _unit_loss(first_tensor(unit_module(*args, **kwargs)), target[idx], weight)

    try:
        for p in floats.values():
            p.requires_grad_(True)
        optimise(batch_loss, params_w, params_a, options, progress, task,
                 affine_groups(list(log_scales.values()), list(floats.values()), options.affine_lr))
    finally:
        for name, p in floats.items():
            p.requires_grad_(grad_was[name])
        for p in unit_module.parameters():  # what the backward passes reached (norms, tokens, learned floats)
            p.grad = None
        for name, layer in layers.items():
            del layer._weight
            floor, v = state[name]
            if name in log_scales:
                layer.weight_scale = log_scales[name].detach().exp().clone()
            with torch.no_grad():
                layer.weight.copy_(hard_weight(floor, v.detach(), layer.weight_scale, layer.wbits))
        for name, q in acts.items():
            _restore_act(q, scales[name])
    after, outputs = _unit_error(unit_module, quant_in, target, {}, options, keep_outputs, weight)
    kept = after > before
    if kept:
        unit_module.load_state_dict(snapshot)
        if keep_outputs:
            outputs = _unit_error(unit_module, quant_in, target, {}, options, True, weight)[1]
    flips = sum(int(((v.detach() >= 0).float() != (torch.round(ref_layers[n].weight.detach() / layers[n].weight_scale.reshape(
        -1, *[1] * (v.dim() - 1))) - state[n][0])).sum()) for n, (_, v) in state.items())
    record = {"unit": unit.path, "kind": unit.kind, "layers": len(unit.layers), "mse_before": before, "mse_after": min(after, before),
              "learned_mse": after, "kept_calibration": kept, "rounding_changed_from_nearest": 0 if kept else flips,
              "steps": options.iters}
    if options.affine:
        record["affine"] = {"weight_scales": len(log_scales), "floats": sorted(floats)}
    return (record, outputs) if keep_outputs else record


@torch.no_grad()
def _unit_error(unit_module: nn.Module, quant_in: Captured, target: torch.Tensor, acts: dict, options,
                keep_outputs: bool = False, weight: torch.Tensor | None = None):
    """(mean (weighted) squared error of the unit's output on all images, the outputs with ``keep_outputs`` else None)."""
    for q in acts.values():
        q.training_drop = False
    total, count, outs = 0.0, 0, []
    for i in range(0, quant_in.n, 128):
        idx = torch.arange(i, min(i + 128, quant_in.n))
        args, kwargs = quant_in.inputs(idx)
        out = first_tensor(unit_module(*args, **kwargs))
        err = (out - target[idx]).pow(2)
        total += float((err * weight).sum() if weight is not None else err.sum())
        count += out.numel()
        if keep_outputs:
            outs.append(out)
    for q in acts.values():
        q.training_drop = True
    return total / max(1, count), (torch.cat(outs) if keep_outputs else None)


# ---------------------------------------------------------------- the pass step

def staging_key(source_hash: str, config: dict, x: torch.Tensor, options: ReconstructOptions) -> str:
    h = hashlib.sha256()
    h.update(source_hash.encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(json.dumps(asdict(options), sort_keys=True, default=str).encode())
    h.update(x.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def estimate_seconds(module: nn.Module, x: torch.Tensor, units: list[Unit], options: ReconstructOptions) -> float:
    """Time one forward+backward of the quantized model on a learning batch and one calibration pass:
    the units together cost about one whole model per step, plus two partial passes per unit to capture."""
    xb = x[:options.batch].clone().requires_grad_(True)
    with torch.enable_grad():
        t = time.perf_counter()
        first_tensor(module(xb)).sum().backward()
        step = time.perf_counter() - t
    for param in module.parameters():  # the timing's gradients, not the model's
        param.grad = None
    t = time.perf_counter()
    module(x[:64])
    fwd = (time.perf_counter() - t) * x.shape[0] / min(64, x.shape[0])
    # learned quantizers and rounding roughly double a plain step's cost (measured on the zoo ViT)
    return 2.0 * step * options.iters + len(units) * fwd * 1.2


def reconstruct(reference: nn.Module, module: nn.Module, structure, x: torch.Tensor, options: ReconstructOptions,
                key: str, staging: Path | None = None, progress=None, say=print) -> dict:
    """Reconstruct ``module`` (calibrated, quantizers in "quant" mode) unit by unit against ``reference``
    (the float model after the exact rewrites, quantizers off), on ``options.threads`` torch threads.
    Returns the record's ``reconstruction`` entry."""
    options = options.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)
    try:
        return _reconstruct(reference, module, structure, x, options, key, staging, progress, say)
    finally:
        torch.set_num_threads(threads)


def _reconstruct(reference: nn.Module, module: nn.Module, structure, x: torch.Tensor, options: ReconstructOptions,
                 key: str, staging: Path | None, progress, say) -> dict:
    check_count(x.shape[0], options)
    torch.manual_seed(options.seed)
    set_mode(module, "quant")
    set_mode(reference, "off")
    units = find_units(module, structure, x[:1])
    estimate = estimate_seconds(module, x, units, options)
    done: list[dict] = []
    if staging is not None:
        staging = Path(staging) / key
        done = load_checkpoint(staging, module)
        if done:
            set_mode(module, "quant")
            estimate *= max(0.0, 1 - len(done) / max(1, len(units)))
    steps = [unit_steps(options, k, len(units)) for k in range(len(units))]
    say(f"reconstruction: {len(units)} units ({_kinds(units)}) x {_steps_text(steps)} on {x.shape[0]} images, "
        f"about {_fmt_s(estimate)}" + (f" (resuming after {len(done)} finished units)" if done else ""))
    start = time.perf_counter()
    task = progress.add_task("reconstructing", total=sum(steps),
                             completed=sum(steps[:len(done)])) if progress is not None else None
    targets = capture_outputs(reference, [u.path for u in units[len(done):]], x)
    sens = module_sensitivity(reference, [u.path for u in units[len(done):]], x) if options.loss == "fisher" else {}
    links = chain_links(module, units, x[:2])
    next_in = None
    for k, unit in enumerate(units):
        if k < len(done):
            continue
        if progress is not None:
            progress.update(task, description=f"reconstructing {unit.path} ({k + 1}/{len(units)})")
        target = targets.pop(unit.path, None)
        if target is None:
            target = capture(reference, unit.path, x, want_inputs=False).output
        quant_in = next_in if next_in is not None else capture(module, unit.path, x)
        weight = output_weights(sens.pop(unit.path)) if unit.path in sens else None
        result = learn_unit(module, unit, reference, quant_in, target, replace(options, iters=steps[k]), progress, task,
                            keep_outputs=k in links, weight=weight)
        if k in links:
            result, outputs = result
            next_in = links[k].inputs(outputs)
        else:
            next_in = None
        if options.loss == "fisher":
            result["output_weights"] = weights_summary([weight])
        done.append(result)
        if staging is not None:
            save_checkpoint(staging, module, key, done)
    if progress is not None and task is not None:
        progress.remove_task(task)
    seconds = time.perf_counter() - start
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    return {"options": asdict(options), "units": done, "estimate_s": round(estimate, 1), "seconds": round(seconds, 2),
            "images": int(x.shape[0])}


def save_checkpoint(staging: Path, owner: nn.Module, key: str, done: list[dict]) -> None:
    """The model state after the finished units ``done`` (written to a temp name, then renamed)."""
    staging.mkdir(parents=True, exist_ok=True)
    torch.save(owner.state_dict(), staging / "state.tmp")
    (staging / "state.tmp").replace(staging / "state.pt")
    (staging / "progress.json").write_text(json.dumps({"key": key, "units": done}, indent=1))


def load_checkpoint(staging: Path, owner: nn.Module) -> list[dict]:
    """The finished units' records of a checkpoint in ``staging``, its state loaded into ``owner``; [] when none."""
    meta = staging / "progress.json"
    if not (meta.exists() and (staging / "state.pt").exists()):
        return []
    owner.load_state_dict(torch.load(staging / "state.pt", weights_only=True))
    return json.loads(meta.read_text())["units"]


def weights_summary(weights: list) -> dict:
    """Of the first weighted (positions, channels) output: the first position's weight (a ViT's CLS token)
    over the mean of the others', and the spread of the channel weights (the record says what was learned)."""
    for w in weights:
        if w is not None and w.dim() == 2 and w.shape[0] > 1:
            pos, ch = w.mean(1), w.mean(0)
            return {"first_position_vs_rest": round(float(pos[0] / pos[1:].mean()), 2),
                    "channel_max_vs_mean": round(float(ch.max() / ch.mean()), 2)}
    return {}


def _steps_text(steps: list[int]) -> str:
    if not steps or min(steps) == max(steps):
        return f"{steps[0] if steps else 0} steps"
    return f"{steps[0]}..{steps[-1]} steps (growing with depth, {sum(steps)} in all)"


def _kinds(units: list[Unit]) -> str:
    counts: dict[str, int] = {}
    for u in units:
        counts[u.kind] = counts.get(u.kind, 0) + 1
    return ", ".join(f"{n} {k}{'s' if n > 1 else ''}" for k, n in counts.items())


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min"
