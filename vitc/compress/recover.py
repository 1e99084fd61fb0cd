"""Recovery after pruning or 2:4 sparsity: distil the compressed model from the dense one.

The student learns the teacher's softened logits (KL at temperature T, Hinton et al.) on
training images with light augmentation (horizontal flips, small shifts). 2:4 masks stay
fixed: after every optimiser step the masked weights are set back to zero, so the pattern
the sparse kernels need survives and the record's ``sparse_layers`` stay true.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from vitc.errors import VitcError


@dataclass
class RecoverConfig:
    steps: int = 100
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.01
    temperature: float = 2.0
    seed: int = 0

    def validate(self) -> None:
        if self.steps <= 0:
            raise VitcError(f"--recover-steps {self.steps} is not positive", "pass a number of steps, e.g. 200")
        if self.batch_size <= 0 or self.lr <= 0 or self.temperature <= 0:
            raise VitcError("recovery batch size, learning rate and temperature must be positive", "check --recover-* options")


def augment(x: torch.Tensor, generator: torch.Generator, shift: int) -> torch.Tensor:
    """Random horizontal flips per image and one random shift of up to ``shift`` pixels per batch."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift:
        dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=generator))
        x = torch.roll(x, (dy, dx), (2, 3))
    return x


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def recover(student, teacher, images: torch.Tensor, config: RecoverConfig, masks: dict[str, torch.Tensor] | None = None,
            progress=None):
    """A copy of ``student`` distilled from ``teacher`` on ``images`` (preprocessed, N x 3 x H x W)."""
    config.validate()
    if images is None or len(images) == 0:
        raise VitcError("recovery needs training images", "pass --train-data (a folder or archive of training images)")
    out = student.copy()
    model = out.require_module("recovery")
    teacher_module = teacher.require_module("recovery")
    teacher_module.eval()
    masks = masks or {}
    masked = {path: (model.get_submodule(path).weight, m) for path, m in masks.items()}
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = max(1, config.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, config.steps - warmup))))
    gen = torch.Generator().manual_seed(config.seed)
    shift = max(1, images.shape[-1] // 8)
    order = torch.randperm(len(images), generator=gen)
    cursor = 0
    task = progress.add_task("recovering", total=config.steps) if progress is not None else None
    losses = []
    model.train()
    t0 = time.perf_counter()
    try:
        for _ in range(config.steps):
            if cursor + config.batch_size > len(order):
                order, cursor = torch.randperm(len(images), generator=gen), 0
            idx = order[cursor:cursor + config.batch_size]
            cursor += config.batch_size
            x = augment(images[idx], gen, shift)
            with torch.no_grad():
                target = teacher_module(x)
            loss = distillation_loss(model(x), target, config.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for weight, keep in masked.values():
                    weight.mul_(keep)
            losses.append(loss.item())
            if task is not None:
                progress.advance(task)
    finally:
        model.eval()
        for p in params:
            p.requires_grad_(False)
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10):]
    record = {"pass": "recover", "config": asdict(config), "masked_layers": sorted(masks),
              "loss_first": losses[0], "loss_last": sum(tail) / len(tail), "seconds": seconds,
              "seconds_per_step": seconds / config.steps}
    return out.with_module(model, record)
