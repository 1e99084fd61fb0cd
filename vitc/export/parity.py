"""Parity: run an artifact's session and the PyTorch backbone on the same real images.

The reference is ``backbone(x)``: for a quantized backbone that is its PyTorch simulation,
so an int8 artifact is held to what the quantization pass promised, not to FP32.
"""
from __future__ import annotations

import torch

from vitc.errors import VitcError

# Minimum top-1 agreement with PyTorch, by the artifact's precision.
MIN_AGREEMENT = {"fp32": 0.995, "fp16": 0.99, "bf16": 0.99, "int8": 0.98, "fp8": 0.98}


def check(backbone, session, precision: str, data: str = "bundled:eval", eval_size: int | None = None,
          batch_size: int = 64, progress=None, extra_checks=None, seed: int = 0,
          session_batch: int | None = None) -> dict:
    """Compare ``session`` with ``backbone`` on ``data``; the result says whether it passed and why not."""
    from vitc.calibration.data import DataSpec, iter_batches, label_map
    from vitc.evaluate import agreement

    if backbone.module is not None:
        reference, reference_name = backbone, "pytorch (backbone.module, fp32 eager)"
    elif _onnx_quantized(backbone):  # quantized by the ONNX backend: its Q/DQ graph computed literally, as the simulation
        from vitc.models.onnx_source import simulation_session

        reference = simulation_session(backbone.onnx_path)
        reference_name = f"the Q/DQ graph of {backbone.source} on onnxruntime without graph optimizations (simulation)"
    else:  # a model given as an ONNX file: the file itself is the reference
        from vitc.runtimes import open_session

        reference, reference_name = open_session(backbone.onnx_path, runtime="onnxruntime"), f"{backbone.source} on onnxruntime"
    source = DataSpec(data, None, eval_size, seed).open()
    if len(source) == 0:
        raise VitcError(f"no images in {source.location} for the parity check", "pass --data with images")
    try:
        mapping = label_map(source, backbone.labels)
        labelled = True
    except VitcError:
        mapping, labelled = None, False
    refs, outs, ys = [], [], []
    task = progress.add_task(f"parity ({session.name})", total=len(source)) if progress is not None else None
    for x, y in iter_batches(source, backbone.preprocess, batch_size):
        refs.append(torch.as_tensor(reference(x)).float())
        rows = [x] if session_batch is None else x.split(session_batch)  # a static-batch artifact takes its own batch only
        outs.append(torch.cat([torch.as_tensor(session(r)).float() for r in rows]))
        ys.append(torch.from_numpy(mapping[y.numpy()]) if mapping is not None else y)
        if task is not None:
            progress.advance(task, len(y))
    if task is not None:
        progress.remove_task(task)
    ref, out, y = torch.cat(refs), torch.cat(outs), torch.cat(ys)
    if not (ref.dim() == 2 and ref.shape[-1] == backbone.num_classes):
        return _fidelity_result(ref, out, precision, source, seed, reference_name, session, extra_checks)
    if out.shape != ref.shape:
        raise VitcError(f"the artifact returns logits of shape {tuple(out.shape)}, PyTorch {tuple(ref.shape)}",
                        "re-export the model; check that it has one output, the logits")
    result = {"data": source.location, "images": len(y), "seed": seed, "reference": reference_name,
              "runtime": session.describe(), **agreement(out, ref)}
    if labelled and (y >= 0).all():
        result["reference_top1"] = (ref.argmax(-1) == y).float().mean().item()
        result["artifact_top1"] = (out.argmax(-1) == y).float().mean().item()
    result["min_agreement"] = MIN_AGREEMENT.get(precision, MIN_AGREEMENT["int8"])
    failures = []
    if not torch.isfinite(out).all():
        failures.append("the artifact returns non-finite logits")
    if result["top1_agreement"] < result["min_agreement"]:
        failures.append(f"top-1 agreement {100 * result['top1_agreement']:.2f}% is below {100 * result['min_agreement']:.1f}% "
                        f"for {precision}")
    if extra_checks is not None:
        extra = extra_checks(session)
        failures += extra.pop("failures", [])
        result.update(extra)
    result["passed"] = not failures
    if failures:
        result["failure"] = "; ".join(failures)
    return result


def _onnx_quantized(backbone) -> bool:
    return any(t.get("pass") == "quantize" and t.get("backend") == "onnx" for t in backbone.transforms)


def _fidelity_result(ref, out, precision: str, source, seed: int, reference_name: str, session, extra_checks) -> dict:
    """Parity of an output that is not class logits (a dense map, an embedding): the task's
    fidelity metrics (``vitc.tasks``) and their thresholds for ``precision``, not top-1."""
    from vitc import tasks

    if out.shape != ref.shape:
        raise VitcError(f"the artifact returns an output of shape {tuple(out.shape)}, the reference {tuple(ref.shape)}",
                        "re-export the model")
    task = tasks.detect(ref, False)
    result = {"data": source.location, "images": int(ref.shape[0]), "seed": seed, "reference": reference_name,
              "runtime": session.describe(), "task": task, **tasks.fidelity(out, ref),
              "min_worst_cosine": tasks.MIN_WORST_COSINE.get(precision, tasks.MIN_WORST_COSINE["int8"]),
              "min_mean_pearson": tasks.MIN_MEAN_PEARSON.get(precision, tasks.MIN_MEAN_PEARSON["int8"])}
    failures = tasks.passes(result, precision)
    if extra_checks is not None:
        extra = extra_checks(session)
        failures += extra.pop("failures", [])
        result.update(extra)
    result["passed"] = not failures
    if failures:
        result["failure"] = "; ".join(failures)
    return result
