"""Optional recovery: a short fine-tune of the float ViT with the integer model's rounding simulated.

The integer model's quantization points are simulated in float with straight-through
rounding (weights per output channel at ``weight_bits``; every tap at its calibrated range
and width; attention probabilities on the 1/255 grid; the MLP activation as the integer
model's ``x * sigmoid(lambda x)``), and the weights learn to absorb that error by
distillation from the FP32 model's logits, so no labels are needed. The calibrated ranges
stay fixed, so ``build`` afterwards produces the model the fine-tune simulated.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .convert import activation_floor, activation_grid, activation_slope, is_act_input, is_residual, \
    is_unsigned
from .reference import FloatViT


def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    dims = tuple(range(1, w.dim()))
    s = (w.detach().abs().amax(dims, keepdim=True) / qmax).clamp_min(1e-12)
    return _ste(w, torch.round(w / s).clamp(-qmax - 1, qmax) * s)


def _tap(ranges: dict[str, float], act_bits: int, residual_bits: int, act_grids: dict[str, tuple[float, int]],
         act_input_bits: int, prob_levels: int):
    def tap(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith(".probs"):
            return _ste(t, torch.round(t * prob_levels) / prob_levels)
        if name in act_grids:  # the MLP activation's unsigned grid with a zero point
            s, z = act_grids[name]
            return _ste(t, torch.round(t / s).clamp(-z, 2 ** act_bits - 1 - z) * s)
        if is_unsigned(name):
            qmax = 2 ** act_bits - 1
            s = ranges[name] / qmax
            return _ste(t, torch.round(t / s).clamp(0, qmax) * s)
        bits = residual_bits if is_residual(name) else act_input_bits if is_act_input(name) else act_bits
        qmax = 2 ** (bits - 1) - 1
        s = ranges[name] / qmax
        return _ste(t, torch.round(t / s).clamp(-qmax - 1, qmax) * s)
    return tap


def _slopes(model: FloatViT, ranges: dict[str, float], gelu: str) -> list[float | None]:
    """The sigmoid slope of each block's integer GELU, as ``build`` picks it (None: not a GELU)."""
    return [activation_slope(b.activation, gelu, ranges[f"{i}.fc1"]) if b.activation == "gelu" else None
            for i, b in enumerate(model.blocks)]


def _act_grids(model: FloatViT, ranges: dict[str, float], gelu: str, act_bits: int) -> dict[str, tuple[float, int]]:
    """Each block's MLP activation output grid, as ``build`` makes it."""
    return {f"{i}.act": activation_grid(ranges[f"{i}.act"], activation_floor(
        b.activation, activation_slope(b.activation, gelu, ranges[f"{i}.fc1"])), act_bits)
            for i, b in enumerate(model.blocks)}


def _simulated(model: FloatViT, slopes: list[float | None], weight_bits: int) -> FloatViT:
    """A view of ``model`` with fake-quantized weights and the integer model's activation."""
    fq = lambda lin: (fake_quant_weight(lin[0], weight_bits), lin[1])  # noqa: E731
    blocks = []
    for b, lam in zip(model.blocks, slopes):
        act = b.act_fn
        if lam is not None:
            act = lambda x, lam=lam: x * torch.sigmoid(lam * x)  # noqa: E731
        blocks.append(replace(b, q=fq(b.q), k=fq(b.k), v=fq(b.v), o=fq(b.o), fc1=fq(b.fc1), fc2=fq(b.fc2), act_fn=act))
    stem = [replace(c, weight=fake_quant_weight(c.weight, weight_bits)) for c in model.stem]
    return replace(model, patch_weight=fake_quant_weight(model.patch_weight, weight_bits), blocks=blocks,
                   classifier=fq(model.classifier), stem=stem)


def _params(model: FloatViT) -> list[torch.Tensor]:
    out = [model.patch_weight, model.patch_bias, model.cls, model.pos, *model.final_norm[:2], *model.classifier]
    for b in model.blocks:
        for key in ("q", "k", "v", "o", "fc1", "fc2"):
            out.extend(getattr(b, key))
        out.extend(b.norm1[:2])
        out.extend(b.norm2[:2])
    for c in model.stem:
        out.extend((c.weight, c.bias))
    return out


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 1/8 of the side (reflect padding)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = max(1, h // 8)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    return xp[:, :, dy:dy + h, dx:dx + w]


def recover(model: FloatViT, ranges: dict[str, float], images: torch.Tensor, steps: int, weight_bits: int = 8,
            act_bits: int = 8, residual_bits: int = 16, gelu: str = "lambda", lr: float = 1e-5, batch_size: int = 32,
            seed: int = 0, progress=None, act_input_bits: int = 8, prob_bits: int = 8) -> FloatViT:
    """Fine-tune a copy of ``model`` for ``steps`` steps; return the copy (``model`` is untouched)."""
    student = replace(model, blocks=[replace(b) for b in model.blocks], stem=[replace(c) for c in model.stem])
    params = [p.detach().clone().requires_grad_(True) for p in _params(model)]
    _assign(student, params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    g = torch.Generator().manual_seed(seed)
    tap = _tap(ranges, act_bits, residual_bits, _act_grids(model, ranges, gelu, act_bits), act_input_bits,
               2 ** prob_bits - 1)
    slopes = _slopes(model, ranges, gelu)
    task = progress.add_task("recovering", total=steps) if progress is not None else None
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=g)
        x = images[idx]
        x = _augment(x, g)
        with torch.inference_mode():
            target = model.forward(x)
        target = target.clone()  # an inference tensor cannot be saved for the backward pass
        logits = _simulated(student, slopes, weight_bits).forward(x, tap)
        loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if task is not None:
            progress.advance(task)
    done = [p.detach() for p in params]
    _assign(student, done)
    return student


def _assign(model: FloatViT, params: list[torch.Tensor]) -> None:
    it = iter(params)
    model.patch_weight, model.patch_bias, model.cls, model.pos = next(it), next(it), next(it), next(it)
    model.final_norm = (next(it), next(it), model.final_norm[2])
    model.classifier = (next(it), next(it))
    for b in model.blocks:
        for key in ("q", "k", "v", "o", "fc1", "fc2"):
            setattr(b, key, (next(it), next(it)))
        b.norm1 = (next(it), next(it), b.norm1[2])
        b.norm2 = (next(it), next(it), b.norm2[2])
    for c in model.stem:
        c.weight, c.bias = next(it), next(it)
