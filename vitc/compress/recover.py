"""Recovery after pruning or 2:4 sparsity: distil the compressed model from the dense one.

The student learns the teacher's softened logits (KL at temperature T, Hinton et al.) on
training images with light augmentation; with ``feature_weight > 0`` also the output of every
transformer block (or conv stage) the two models share by position (MSE relative to the
teacher's energy, averaged over them): a classifier's 10 logits carry little of what a pruned
block lost, the block outputs carry all of it (a linear probe on intermediate blocks, as
``zoo:dinov2s-c10``, reads exactly those). 2:4 masks stay fixed: after every optimiser step
the masked weights are set back to zero, so the pattern the sparse kernels need survives and
the record's ``sparse_layers`` stay true.

Cost on CPU (the step is matmul-bound; measured on zoo:vit-c10, batch 64, 1 thread): the
student's forward + backward is ~3/4 of a step, the teacher's forward ~1/4. With
``augment="flip"`` the teacher's logits of every training image and of its mirror are
computed once (``teacher_targets``, reusable across recoveries from the same teacher) and
looked up per step, so a step costs only the student; ``"flip-shift"`` adds random shifts
and runs the teacher on every batch; ``"auto"`` (default) caches when that is cheaper (the
samples drawn, steps x batch, are at least twice the images). Images may be kept as uint8 (N, 3, H, W) and are
normalised per batch, so a whole training set fits in memory (50,000 CIFAR images: 150 MB).
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
    augment: str = "auto"  # flip (teacher logits cached per image and mirror) | flip-shift (teacher on every batch) | auto
    feature_weight: float = 0.0  # > 0: also distil every shared block's output (the teacher then runs on every batch)

    def validate(self) -> None:
        if not 0 <= self.feature_weight <= 1000:
            raise VitcError(f"--recover-features {self.feature_weight} is out of range", "pass 0 (logits only) to 1000, e.g. 1")
        if self.steps <= 0:
            raise VitcError(f"--recover-steps {self.steps} is not positive", "pass a number of steps, e.g. 200")
        if self.batch_size <= 0 or self.lr <= 0 or self.temperature <= 0:
            raise VitcError("recovery batch size, learning rate and temperature must be positive", "check --recover-* options")
        if self.augment not in AUGMENTS:
            raise VitcError(f"unknown recovery augmentation '{self.augment}'", f"use one of: {', '.join(AUGMENTS)}")


AUGMENTS = ("auto", "flip", "flip-shift")


def resolve_augment(config: RecoverConfig, images: int, cached: bool) -> str:
    """``auto``: cached flips when the cache is given or costs less than the teacher on every batch
    (two forwards per image once vs. one per sample drawn), else online flips and shifts; with feature
    distillation the teacher runs on every batch anyway, so flips and shifts."""
    if config.augment != "auto":
        return config.augment
    if config.feature_weight > 0:
        return "flip-shift"
    return "flip" if cached or config.steps * config.batch_size >= 2 * images else "flip-shift"


def block_paths(backbone) -> list[str]:
    """The modules whose outputs feature distillation matches: every transformer block, else every conv stage."""
    s = backbone.structure
    return [b.path for b in s.blocks] or [c.path for c in s.conv_stages]


class _Outputs:
    """Forward hooks that keep the outputs of ``paths`` of ``module`` (the first element of a tuple output)."""

    def __init__(self, module, paths: list[str]):
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [module.get_submodule(p).register_forward_hook(self._keep(p)) for p in paths]

    def _keep(self, path: str):
        def hook(_module, _inputs, output):
            self.values[path] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Mean over the block pairs of ``||s - t||^2 / ||t||^2`` (each block's error relative to its own energy)."""
    terms = [(student[sp] - teacher[tp]).pow(2).sum() / teacher[tp].pow(2).sum().clamp_min(1e-12) for sp, tp in pairs]
    return torch.stack(terms).mean()


def as_inputs(images: torch.Tensor, preprocess) -> torch.Tensor:
    """A batch as model inputs: uint8 images are normalised here, float ones are taken as preprocessed."""
    return preprocess.uint8_batch(images) if images.dtype == torch.uint8 else images


@torch.inference_mode()
def teacher_targets(teacher, images: torch.Tensor, batch: int = 256, progress=None) -> torch.Tensor:
    """The teacher's logits of every image and of its mirror: (N, 2, classes), index 1 = flipped."""
    module = teacher.require_module("recovery")
    module.eval()
    task = progress.add_task("teacher logits", total=len(images)) if progress is not None else None
    out = []
    for i in range(0, len(images), batch):
        x = as_inputs(images[i:i + batch], teacher.preprocess)
        out.append(torch.stack([module(x), module(x.flip(-1))], 1).float())
        if task is not None:
            progress.advance(task, len(x))
    return torch.cat(out)


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
            progress=None, targets: torch.Tensor | None = None):
    """A copy of ``student`` distilled from ``teacher`` on ``images`` (N x 3 x H x W, uint8 or preprocessed).

    ``targets``: ``teacher_targets(teacher, images)`` when already computed (used with ``augment`` flip or auto).
    """
    config.validate()
    if images is None or len(images) == 0:
        raise VitcError("recovery needs training images", "pass --train-data (a folder or archive of training images)")
    mode = resolve_augment(config, len(images), targets is not None)
    t_teacher = time.perf_counter()
    if mode == "flip" and targets is None:
        targets = teacher_targets(teacher, images, progress=progress)
    t_teacher = time.perf_counter() - t_teacher
    if targets is not None and targets.shape[:2] != (len(images), 2):
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not belong to {len(images)} images")
    out = student.copy()
    model = out.require_module("recovery")
    teacher_module = teacher.require_module("recovery")
    teacher_module.eval()
    masks = masks or {}
    masked = {path: (model.get_submodule(path).weight, m) for path, m in masks.items()}
    pairs: list[tuple[str, str]] = []
    if config.feature_weight > 0:
        pairs = _feature_pairs(student, teacher, as_inputs(images[:2], student.preprocess))
        s_out, t_out = _Outputs(model, [p for p, _ in pairs]), _Outputs(teacher_module, [p for _, p in pairs])
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
            x = as_inputs(images[idx], student.preprocess)
            if mode == "flip":
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                target = targets[idx, flip.long()]
                if pairs:  # the block outputs are not cached: the teacher runs for its hooks
                    with torch.no_grad():
                        teacher_module(x)
            else:
                x = augment(x, gen, shift)
                with torch.no_grad():
                    target = teacher_module(x)
            loss = distillation_loss(model(x), target, config.temperature)
            if pairs:
                loss = loss + config.feature_weight * feature_loss(s_out.values, t_out.values, pairs)
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
        if pairs:
            s_out.close()
            t_out.close()
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10):]
    record = {"pass": "recover", "config": asdict(config), "masked_layers": sorted(masks),
              "loss_first": losses[0], "loss_last": sum(tail) / len(tail), "seconds": seconds,
              "seconds_per_step": seconds / config.steps, "teacher_cache_seconds": t_teacher, "images": len(images),
              "augment": mode, "feature_blocks": len(pairs),
              "feature_blocks_of": len(block_paths(student)) if pairs else 0}
    return out.with_module(model, record)


def _feature_pairs(student, teacher, x: torch.Tensor) -> list[tuple[str, str]]:
    """(student path, teacher path) of the blocks the two share by position, checked on a real batch to
    have outputs of one shape; a one-line error where none do (a pruned residual width, merged tokens)."""
    sp, tp = block_paths(student), block_paths(teacher)
    if not sp or len(sp) != len(tp):
        raise VitcError(f"feature distillation needs the student and the teacher to have the same blocks "
                        f"({len(sp)} and {len(tp)} found)", "recover without --recover-features")
    s_hooks = _Outputs(student.require_module("recovery"), sp)
    t_hooks = _Outputs(teacher.require_module("recovery"), tp)
    try:
        with torch.no_grad():
            student.require_module("recovery")(x)
            teacher.require_module("recovery")(x)
    finally:
        s_hooks.close()
        t_hooks.close()
    pairs = [(a, b) for a, b in zip(sp, tp) if a in s_hooks.values and b in t_hooks.values
             and s_hooks.values[a].shape == t_hooks.values[b].shape]
    if not pairs:
        raise VitcError("feature distillation found no block whose output has the same shape in the compressed and "
                        "the dense model (the residual width was pruned, or tokens were merged)",
                        "recover without --recover-features")
    return pairs
