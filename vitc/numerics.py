"""Non-finite values (NaN, Inf) in weights, activations and outputs, found and named.

A model with a NaN weight does not crash: its logits are NaN, argmax returns 0 for every image
and an evaluation reports chance accuracy with exit 0. Every path that evaluates or exports asks
here first, and the error names the first tensor or layer that went non-finite, so the user
knows where to look.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from vitc.errors import VitcError

FIX = "check the weights file (an fp16 overflow, a diverged training run, a corrupted copy?)"


class NonFiniteError(VitcError):
    """Weights, activations or outputs hold NaN or Inf."""


def _kind(t: torch.Tensor) -> str:
    return "NaN" if torch.isnan(t).any() else "Inf"


def first_nonfinite_tensor(module: nn.Module) -> tuple[str, str] | None:
    """(name, "NaN"|"Inf") of the first floating-point parameter or buffer that is not finite."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t.detach()).all()):
            return name, _kind(t.detach())
    return None


def first_nonfinite_layer(module: nn.Module, x: torch.Tensor) -> tuple[str, str] | None:
    """(module path, "NaN"|"Inf") of the first module, in execution order, whose output is not finite
    on ``x``; the innermost one when a layer and its parents all fail at once."""
    found: list[tuple[str, str]] = []
    hooks = []

    def hook(name):
        def fn(mod, args, out):
            if found:
                return
            tensors = [out] if isinstance(out, torch.Tensor) else \
                [t for t in (out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [])
                 if isinstance(t, torch.Tensor)]
            inputs_finite = all(bool(torch.isfinite(a).all()) for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
            for t in tensors:
                if t.is_floating_point() and not bool(torch.isfinite(t).all()) and inputs_finite:
                    found.append((name or type(mod).__name__, _kind(t)))
                    return
        return fn

    for name, mod in module.named_modules():
        hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            module(x)
    except Exception:  # locating is best effort; the caller reports the non-finite output either way
        pass
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


def first_nonfinite_initializer(onnx_path: Path) -> tuple[str, str] | None:
    """(initializer name, "NaN"|"Inf") of the first non-finite float initializer of an ONNX graph."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            try:
                arr = numpy_helper.to_array(init)
            except Exception:
                continue
            arr = np.asarray(arr, dtype=np.float32)
            if not np.isfinite(arr).all():
                return init.name, "NaN" if np.isnan(arr).any() else "Inf"
    return None


def check_weights(backbone) -> None:
    """Refuse a model whose weights hold NaN/Inf, naming the first such tensor."""
    if backbone.module is not None:
        bad = first_nonfinite_tensor(backbone.module)
    elif getattr(backbone, "onnx_path", None) is not None:
        bad = first_nonfinite_initializer(backbone.onnx_path)
    else:
        bad = None
    if bad is not None:
        raise NonFiniteError(f"{backbone.source} has {bad[1]} values in its weights, first in {bad[0]}", FIX)


def check_outputs(outputs: torch.Tensor, run, x: torch.Tensor, what: str) -> None:
    """Refuse non-finite ``outputs`` of ``run`` (a Backbone or a session) on ``x``, naming the first
    layer (PyTorch) or weight (ONNX) that produced them."""
    outputs = torch.as_tensor(outputs)
    if not outputs.is_floating_point() or bool(torch.isfinite(outputs).all()):
        return
    kind = _kind(outputs)
    rows = int((~torch.isfinite(outputs.reshape(outputs.shape[0], -1))).any(1).sum()) if outputs.dim() else 1
    module = getattr(run, "module", None)
    where = None
    if isinstance(module, nn.Module):
        weight = first_nonfinite_tensor(module)
        where = f"the weight {weight[0]} holds {weight[1]}" if weight else None
        if where is None:
            layer = first_nonfinite_layer(module, x)
            where = f"first at layer {layer[0]}" if layer else None
    else:
        path = getattr(run, "path", None) or getattr(run, "onnx_path", None)
        if path is not None and Path(path).suffix == ".onnx":
            weight = first_nonfinite_initializer(Path(path))
            where = f"the initializer {weight[0]} holds {weight[1]}" if weight else None
    raise NonFiniteError(f"{what} returns {kind} outputs for {rows} of {outputs.shape[0] if outputs.dim() else 1} images"
                         + (f" ({where})" if where else ""), FIX)
