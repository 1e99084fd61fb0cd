"""2:4 sparsity: ``SparsityConfig`` and ``apply(backbone, config, data) -> Backbone``.

Layers are sparsified one at a time in forward order; each one's calibration inputs come
from the model as already sparsified up to it (the sequential scheme of SparseGPT and Wanda),
so later layers see, and compensate for, the errors of earlier ones.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitc.errors import VitcError

from . import masks

METHODS = ("magnitude", "wanda", "sparsegpt")
# PyTorch's semi-structured kernels (CUTLASS and cuSPARSELt) take fp16 weights whose rows are a
# multiple of 32 and columns a multiple of 64; TensorRT's sparse convs group input channels.
ROWS_MULTIPLE, COLS_MULTIPLE = 32, 64
# shapes="any": every layer whose groups of 4 inputs lie within one kernel position (inputs a multiple
# of 4). For narrow models no sparse kernel runs (they stay as fast as dense); the pattern is kept for
# accuracy studies, for runtimes that take unstructured sparsity at any shape, and for later widening.
SHAPES = ("kernel", "any")


@dataclass
class SparsityConfig:
    method: str = "sparsegpt"  # magnitude | wanda | sparsegpt
    layers: list[str] | None = None  # module paths to sparsify; None: every eligible layer
    exclude: list[str] = field(default_factory=list)  # module paths left dense
    damp: float = 0.01  # SparseGPT: Hessian dampening, as a fraction of its mean diagonal
    block_size: int = 128  # SparseGPT: columns per lazy-update block
    batch_size: int = 32
    shapes: str = "kernel"  # kernel: the shapes GPU sparse kernels run; any: inputs a multiple of 4

    def validate(self) -> None:
        if self.shapes not in SHAPES:
            raise VitcError(f"unknown --shapes '{self.shapes}'", f"use one of: {', '.join(SHAPES)}")
        if self.method not in METHODS:
            raise VitcError(f"unknown 2:4 method '{self.method}'", f"use one of: {', '.join(METHODS)}")
        if not 0 <= self.damp < 1:
            raise VitcError(f"--damp {self.damp} is outside [0, 1)", "pass a small fraction such as 0.01")
        if self.block_size <= 0 or self.block_size % masks.M:
            raise VitcError(f"--block-size {self.block_size} is not a positive multiple of 4", "pass e.g. 128")


def _graph_layer(m: nn.Module) -> bool:
    """A weight holder of a ``torch.export`` program's module (its convs/linears are graph ops, not layers)."""
    w = getattr(m, "weight", None)
    return type(m) is nn.Module and isinstance(w, nn.Parameter) and w.dim() in (2, 4)


def ineligibility(layer: nn.Module, shapes: str = "kernel") -> str | None:
    """Why a layer cannot be 2:4 (None when it can); ``shapes`` as in ``SparsityConfig``."""
    if isinstance(layer, nn.Linear):
        rows, cols = layer.out_features, layer.in_features
    elif isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return "grouped or depthwise conv"
        rows, cols = layer.out_channels, layer.in_channels
    elif _graph_layer(layer):
        rows, cols = layer.weight.shape[0], layer.weight.shape[1]
        if layer.weight.dim() == 4 and cols == 1:
            return "depthwise conv"
    else:
        return "not a Linear or Conv2d"
    if shapes == "any":
        return f"{rows}x{cols} (inputs must be a multiple of {masks.M})" if cols % masks.M else None
    if rows % ROWS_MULTIPLE or cols % COLS_MULTIPLE:
        return f"{rows}x{cols} (outputs must be a multiple of {ROWS_MULTIPLE}, inputs of {COLS_MULTIPLE})"
    return None


def eligible_layers(root: nn.Module, shapes: str = "kernel") -> tuple[list[str], dict[str, str]]:
    """(eligible Linear/Conv2d paths, {ineligible path: reason}), in module order."""
    ok, skipped = [], {}
    program = any(isinstance(m, torch.fx.GraphModule) for m in root.modules())
    for name, m in root.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) or (program and _graph_layer(m)):
            why = ineligibility(m, shapes)
            if why is None:
                ok.append(name)
            else:
                skipped[name] = why
    return ok, skipped


def is_24(layer: nn.Module) -> bool:
    return masks.violations(masks.conv_to_2d(layer.weight.detach())) == 0


def sparse_layers(backbone) -> list[str]:
    """Layers recorded as 2:4 by a sparsify pass that still hold a 2:4 pattern (for the TensorRT
    sparse-weights flag and the export manifest)."""
    if backbone.module is None:
        return []
    recorded = [p for t in backbone.transforms if t.get("pass") == "sparsify" for p in t["sparse_layers"]]
    names = dict(backbone.module.named_modules())
    return [p for p in dict.fromkeys(recorded) if p in names and hasattr(names[p], "weight") and is_24(names[p])]


def _inputs_2d(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows of its weight's columns (conv: unfolded, in (kh, kw, in) order)."""
    if isinstance(layer, nn.Linear):
        return x.detach().float().reshape(-1, x.shape[-1])
    x, padding = x.detach().float(), layer.padding
    if isinstance(padding, str):  # padding="same"/"valid" (EfficientNet ports): unfold takes numbers only
        padding = (0, 0)
        if layer.padding == "same":
            pads = []
            for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation)):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
    cols = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)
    cin, (kh, kw) = layer.in_channels, layer.kernel_size
    perm = torch.arange(cin * kh * kw).reshape(cin, kh, kw).permute(1, 2, 0).reshape(-1)
    return cols.transpose(1, 2).reshape(-1, cin * kh * kw)[:, perm]


class _Reached(Exception):
    """Raised by the input hook: nothing after the layer being calibrated needs to run."""


@torch.no_grad()
def _input_stats(root: nn.Module, layer: nn.Module, images: torch.Tensor, batch: int, full: bool) -> torch.Tensor:
    """X^T X (``full``) or its diagonal over the calibration images, at ``layer``'s input."""
    acc = {}

    def hook(mod, args):
        x2 = _inputs_2d(mod, args[0])
        s = x2.T @ x2 if full else x2.pow(2).sum(0)
        acc["s"] = acc["s"] + s if "s" in acc else s
        raise _Reached

    h = layer.register_forward_pre_hook(hook)
    try:
        for i in range(0, len(images), batch):
            try:
                root(images[i:i + batch])
            except _Reached:
                pass
    finally:
        h.remove()
    if "s" not in acc:
        path = next(n for n, m in root.named_modules() if m is layer)
        raise VitcError(f"layer {path} is not used in the model's forward pass", f"leave it out with --exclude {path}")
    return acc["s"]


def selected_layers(root: nn.Module, config: SparsityConfig) -> tuple[list[str], dict[str, str]]:
    eligible, skipped = eligible_layers(root, config.shapes)
    names = dict(root.named_modules())
    for path in (config.layers or []) + config.exclude:
        if path not in names:
            raise VitcError(f"layer '{path}' does not exist in the model",
                            "use module paths as vitc info --model ... --out lists them, e.g. model.vit.layers.0.mlp.fc1")
    if config.layers:
        bad = [p for p in config.layers if p not in eligible]
        if bad:
            raise VitcError(f"layer '{bad[0]}' cannot be 2:4: {skipped.get(bad[0], 'not a Linear or Conv2d')}",
                            "name only eligible layers, or leave out --layers to take every eligible one")
        chosen = list(config.layers)
    else:
        chosen = eligible
    chosen = [p for p in chosen if p not in config.exclude]
    skipped.update({p: "excluded" for p in config.exclude})
    if not chosen and eligible:
        raise VitcError("every layer 2:4 sparsity could take is excluded (--exclude)", "exclude fewer layers")
    if not chosen and config.shapes == "kernel":
        raise VitcError(f"the model has no layer that GPU 2:4 kernels run "
                        f"(Linear/Conv2d with outputs a multiple of {ROWS_MULTIPLE} and inputs of {COLS_MULTIPLE})",
                        "prune channels instead (vitc prune), or pass --shapes any to apply the pattern to every layer "
                        "whose inputs are a multiple of 4 (accuracy studies; no speed-up from sparse kernels)")
    if not chosen:
        raise VitcError("the model has no Linear/Conv2d layer whose inputs are a multiple of 4", "prune channels instead (vitc prune)")
    return chosen, skipped


def apply(backbone, config: SparsityConfig, data=None, progress=None):
    """A copy of ``backbone`` whose selected layers hold 2:4 weights; ``data``: calibration images
    (a preprocessed tensor or an ImageSource)."""
    from vitc.compress.prune.api import images_of

    config.validate()
    backbone.require_module("2:4 sparsity")
    data = images_of(data, backbone)
    out = backbone.copy()
    root = out.module.eval()
    chosen, skipped = selected_layers(root, config)
    if config.method != "magnitude" and (data is None or len(data) == 0):
        raise VitcError(f"{config.method} needs calibration images", "pass --data, or use --method magnitude")
    names = dict(root.named_modules())
    if config.method != "magnitude" and any(_graph_layer(names[p]) for p in chosen):
        raise VitcError(f"{config.method} reads each layer's inputs, which a torch.export program does not expose per layer",
                        "use --method magnitude, or load the model from its Python code (pkg.module:factory --weights)")
    if config.method != "magnitude":
        for path in _not_called(root, chosen, data[:1]):
            chosen.remove(path)
            skipped[path] = (f"{config.method} needs its inputs, but the forward never calls it as a layer "
                             "(its parent reads the weight directly, as nn.MultiheadAttention does with out_proj)")
        if not chosen:
            raise VitcError(f"no eligible layer is called as a layer in the forward, so {config.method} sees no inputs",
                            "use --method magnitude")
    task = progress.add_task(f"2:4 by {config.method}", total=len(chosen)) if progress is not None else None
    for path in chosen:
        layer = root.get_submodule(path)
        w2d = masks.conv_to_2d(layer.weight.detach())
        if config.method == "magnitude":
            keep = masks.magnitude_mask(w2d)
            new = w2d * keep
        elif config.method == "wanda":
            keep = masks.wanda_mask(w2d, _input_stats(root, layer, data, config.batch_size, full=False))
            new = w2d * keep
        else:
            hessian = _input_stats(root, layer, data, config.batch_size, full=True)
            new, keep = masks.sparsegpt(w2d, hessian, config.damp, config.block_size)
            new = new * keep
        layer.weight.data.copy_(masks.conv_from_2d(new, layer.weight))
        if not is_24(layer):  # pragma: no cover - guards the invariant every consumer relies on
            raise RuntimeError(f"{path} is not 2:4 after masking")
        if task is not None:
            progress.advance(task)
    record = {"pass": "sparsify", "config": asdict(config), "pattern": "2:4", "sparse_layers": chosen, "dense_layers": skipped,
              "coverage": coverage(backbone, chosen, skipped)}
    return out.with_module(root, record)


@torch.no_grad()
def _not_called(root: nn.Module, paths: list[str], x: torch.Tensor) -> list[str]:
    """The layers among ``paths`` whose forward the model never calls (one image)."""
    called = set()
    hooks = [root.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: called.add(p)) for p in paths]
    try:
        root(x)
    finally:
        for h in hooks:
            h.remove()
    return [p for p in paths if p not in called]


def layer_masks(backbone) -> dict[str, torch.Tensor]:
    """Keep-masks (weight != 0) of the 2:4 layers, for recovery with fixed masks."""
    names = dict(backbone.module.named_modules())
    return {p: names[p].weight.detach() != 0 for p in sparse_layers(backbone)}


def coverage(backbone, chosen: list[str], skipped: dict[str, str]) -> dict:
    """Share of the weighted ops' FLOPs (every Linear/Conv2d, subclasses included) that run 2:4; the rest with why."""
    flops = _op_flops(backbone)
    modules = dict(backbone.module.named_modules())
    done = sum(flops.get(p, 0) for p in chosen)
    total = sum(flops.values())
    left = [{"name": p, "op": "linear" if isinstance(modules.get(p), nn.Linear) else "conv", "flops": flops.get(p, 0),
             "reason": why} for p, why in skipped.items()]
    left += [{"name": p, "op": "linear" if isinstance(modules.get(p), nn.Linear) else "conv", "flops": f,
              "reason": "not a Linear/Conv2d vitc can mask"} for p, f in flops.items() if p not in skipped and p not in chosen]
    return {"ops_sparsified": len(chosen), "ops_total": len(flops), "flops_sparsified": done, "flops_total": total,
            "flops_share": done / total if total else 0.0, "capture": "Linear/Conv2d modules, subclasses included",
            "left_alone": sorted(left, key=lambda d: -d["flops"])}


def _op_flops(backbone) -> dict[str, int]:
    """FLOPs per image of every weighted layer: by forward hooks on Linear/Conv2d (subclasses
    included), or from the captured graph where the layers are graph ops (a torch.export program)."""
    from vitc.compress.prune.api import layer_flops

    if not any(isinstance(m, torch.fx.GraphModule) for m in backbone.module.modules()):
        return layer_flops(backbone)
    from vitc.compress.prune.graph import analyse

    g, _ = analyse(backbone.module, backbone.example_input(2))
    out: dict[str, int] = {}
    for op in g.ops:
        if op.module is not None:
            out[op.module] = out.get(op.module, 0) + op.flops
    return out
