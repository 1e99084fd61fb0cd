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
    mapping = label_map(source, labels)
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
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(-1).sum().item()
        n += len(y)
        if keep_logits:
            all_logits.append(logits)
        if task is not None:
            progress.advance(task, len(y))
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
    return {
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "max_abs_logit_error": diff.max().item() if diff.numel() else 0.0,
        "mean_abs_logit_error": diff.mean().item() if diff.numel() else 0.0,
    }
