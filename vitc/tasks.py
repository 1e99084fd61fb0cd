"""Output tasks and fidelity metrics: how a model's output is compared with a reference.

A model's output is one of:

* ``classify``: class logits (N, C) with labels: top-1/top-5 and top-1 agreement;
* ``embed``: one vector per image (N, D) without labels: cosine / Pearson / SQNR per sample;
* ``dense``: maps (N, C, H, W) (saliency, segmentation, depth): the same per-sample metrics
  over each image's whole map;
* ``multi``: several outputs (a tuple/dict, e.g. detection heads): the metrics per output,
  the worst one deciding.

``fidelity(out, ref)`` is the one place these metrics are computed: per-sample cosine
similarity, Pearson correlation, SQNR in dB and max abs error, reported as mean and worst
sample. Every path that compares two models (parity, eval against FP32, benchmarks) uses it.
"""
from __future__ import annotations

import math

import torch

from vitc.errors import VitcError

TASKS = ("auto", "classify", "dense", "embed", "multi")

# Parity thresholds per task kind and precision: the worst sample must reach these.
# classify keeps top-1 agreement (export/parity.py MIN_AGREEMENT); the others bound the output.
MIN_WORST_COSINE = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.995, "int8": 0.98, "fp8": 0.98}
MIN_MEAN_PEARSON = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.995, "int8": 0.99, "fp8": 0.99}


def detect(output, has_labels: bool, num_labels: int | None = None) -> str:
    """The task of a model output (a tensor, or a tuple/list/dict of them)."""
    if isinstance(output, (tuple, list, dict)):
        return "multi"
    if output.dim() == 2:
        if has_labels and (num_labels is None or output.shape[-1] == num_labels):
            return "classify"
        return "embed"
    return "dense"


def check_task(task: str, output, has_labels: bool, num_labels: int | None = None) -> str:
    """Resolve ``task`` ("auto" or a kind) against a sample output; refuse a mismatch in one line."""
    if task not in TASKS:
        raise VitcError(f"--task {task} is not known", f"use one of: {', '.join(TASKS)}")
    found = detect(output, has_labels, num_labels)
    if task == "auto":
        return found
    if task == "classify" and found != "classify":
        shape = "several outputs" if found == "multi" else f"an output of shape {tuple(output.shape)}"
        raise VitcError(f"--task classify needs class logits (N, classes), but the model returns {shape}",
                        "use --task auto (or dense/embed), which compares outputs with FP32 instead of top-1")
    return task


def flatten_outputs(output) -> list[torch.Tensor]:
    if isinstance(output, dict):
        return [torch.as_tensor(v) for v in output.values()]
    if isinstance(output, (tuple, list)):
        return [torch.as_tensor(v) for v in output]
    return [torch.as_tensor(output)]


def per_sample(out: torch.Tensor, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample cosine, Pearson, SQNR (dB) and max abs error of ``out`` against ``ref`` (first axis = sample)."""
    a = out.reshape(out.shape[0], -1).double()
    b = ref.reshape(ref.shape[0], -1).double()
    if a.shape != b.shape:
        raise VitcError(f"outputs of shape {tuple(out.shape)} and {tuple(ref.shape)} cannot be compared",
                        "compare outputs of the same model")
    eps = 1e-30
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)
    ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    pearson = (ac * bc).sum(1) / (ac.norm(dim=1) * bc.norm(dim=1)).clamp_min(eps)
    noise = (a - b).pow(2).sum(1)
    sqnr = 10 * torch.log10(b.pow(2).sum(1).clamp_min(eps) / noise.clamp_min(eps))
    finite = torch.isfinite(a).all(1)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return {
        "cosine": torch.where(finite, cos, nan),
        "pearson": torch.where(finite, pearson, nan),
        "sqnr_db": torch.where(finite, sqnr, nan),
        "max_abs_error": torch.where(finite, (a - b).abs().amax(1), torch.tensor(math.inf, dtype=torch.float64)),
    }


def fidelity(out, ref) -> dict:
    """Mean and worst-sample fidelity of ``out`` against ``ref`` (tensors or matching tuples/dicts).

    Non-finite samples count as the worst possible (NaN metrics, infinite error), never as agreement."""
    outs, refs = flatten_outputs(out), flatten_outputs(ref)
    if len(outs) != len(refs):
        raise VitcError(f"the model returns {len(outs)} outputs, the reference {len(refs)}", "compare outputs of the same model")
    metrics = [per_sample(o.float(), r.float()) for o, r in zip(outs, refs)]
    result = {"samples": int(outs[0].shape[0]), "outputs": len(outs), "finite": all(bool(torch.isfinite(o).all()) for o in outs)}
    for key in ("cosine", "pearson", "sqnr_db"):
        vals = torch.stack([m[key] for m in metrics])  # (outputs, samples)
        worst_per_sample = vals.min(0).values if not torch.isnan(vals).any() else torch.full_like(vals[0], float("nan"))
        result[f"{key}_mean"] = float(vals.mean()) if torch.isfinite(vals).all() else float("nan")
        result[f"{key}_worst"] = float(worst_per_sample.min()) if torch.isfinite(worst_per_sample).all() else float("nan")
    err = torch.stack([m["max_abs_error"] for m in metrics])
    result["max_abs_error"] = float(err.max())
    return result


def passes(result: dict, precision: str, cos_min: float | None = None, r_min: float | None = None) -> list[str]:
    """Failures of a fidelity result against the documented thresholds for ``precision`` (or the
    ones given: parity's rounding floor can loosen them, ``vitc.export.parity``)."""
    failures = []
    if not result.get("finite", True):
        failures.append("the output has non-finite values")
        return failures
    cos_min = MIN_WORST_COSINE.get(precision, MIN_WORST_COSINE["int8"]) if cos_min is None else cos_min
    r_min = MIN_MEAN_PEARSON.get(precision, MIN_MEAN_PEARSON["int8"]) if r_min is None else r_min
    if not result["cosine_worst"] >= cos_min:
        failures.append(f"worst-sample cosine {result['cosine_worst']:.5f} is below {cos_min} for {precision}")
    if not result["pearson_mean"] >= r_min:
        failures.append(f"mean Pearson {result['pearson_mean']:.5f} is below {r_min} for {precision}")
    return failures
