"""Top-1/top-5 accuracy and throughput of a model over an image source."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from vitc.calibration.data import iter_batches, label_map
from vitc.calibration.sources import ImageSource
from vitc.models.preprocess import Preprocess


def evaluate(run: Callable[[torch.Tensor], torch.Tensor], source: ImageSource, preprocess: Preprocess,
             labels: list[str], batch_size: int = 100, convert_rgb: bool = False, progress=None,
             keep_logits: bool = False) -> dict:
    """Evaluate ``run`` (a batch -> logits callable: a Backbone or a runtime session).

    ``images_per_s`` counts model time only (decoding and preprocessing are excluded).
    """
    from vitc.artifacts import fault_point
    from vitc.numerics import check_outputs

    mapping = label_map(source, labels)
    if mapping is None:  # labels from a labels file are the model's indices: refuse ones it cannot predict
        source.check_label_range(len(labels), getattr(run, "source", "the model"))
    correct1 = correct5 = n = 0
    model_seconds = 0.0
    all_logits = []
    task = progress.add_task("evaluating", total=len(source)) if progress is not None else None
    for x, y in iter_batches(source, preprocess, batch_size, convert_rgb):
        if mapping is not None:
            y = torch.from_numpy(mapping[y.numpy()])
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = run(x)
        model_seconds += time.perf_counter() - t0
        logits = torch.as_tensor(logits).float()
        # NaN logits argmax to class 0: without this a broken model reports chance accuracy, exit 0
        check_outputs(logits, run, x, getattr(run, "source", None) or getattr(run, "name", "the model"))
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(-1).sum().item()
        n += len(y)
        if keep_logits:
            all_logits.append(logits)
        if task is not None:
            progress.advance(task, len(y))
        fault_point("evaluate:batch")
    out = {
        "images": n,
        "top1": correct1 / n if n else float("nan"),
        "top5": correct5 / n if n else float("nan"),
        "images_per_s": n / model_seconds if model_seconds > 0 else float("nan"),
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
    }
    if keep_logits:
        out["logits"] = torch.cat(all_logits) if all_logits else torch.empty(0)
    return out


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Top-1 agreement and logit errors between two logit tensors for the same images."""
    a, b = a.float(), b.float()
    diff = (a - b).abs()
    # a row with a NaN/Inf in either tensor never agrees (argmax of NaN rows is meaningless)
    finite = torch.isfinite(a).all(-1) & torch.isfinite(b).all(-1)
    return {
        "top1_agreement": ((a.argmax(-1) == b.argmax(-1)) & finite).float().mean().item(),
        "max_abs_logit_error": diff.max().item() if diff.numel() else 0.0,
        "mean_abs_logit_error": diff.mean().item() if diff.numel() else 0.0,
    }


@torch.no_grad()
def fidelity_against(run: Callable, reference: Callable, source: ImageSource, preprocess: Preprocess, batch_size: int = 100,
                     convert_rgb: bool = False, progress=None) -> dict:
    """``vitc.tasks.fidelity`` of ``run`` against ``reference`` over ``source`` (outputs that are not class logits)."""
    from vitc.tasks import fidelity, flatten_outputs

    outs, refs = [], []
    task = progress.add_task("comparing with the reference", total=len(source)) if progress is not None else None
    for x, _ in iter_batches(source, preprocess, batch_size, convert_rgb):
        outs.append([torch.as_tensor(t).float() for t in flatten_outputs(run(x))])
        refs.append([torch.as_tensor(t).float() for t in flatten_outputs(reference(x))])
        if task is not None:
            progress.advance(task, x.shape[0])
    cat = lambda rows: [torch.cat([r[i] for r in rows]) for i in range(len(rows[0]))]  # noqa: E731
    return fidelity(cat(outs), cat(refs))

