"""Parity: run an artifact's session and the PyTorch backbone on the same real images.

The reference is ``backbone(x)``: for a quantized backbone that is its PyTorch simulation,
so an int8 artifact is held to what the quantization pass promised, not to FP32.

Two bounds, per precision (docs/export.md): top-1 agreement (``MIN_AGREEMENT``) and the logit
error relative to the reference logits' spread (``MAX_LOGIT_ERROR``: mean and max of
``|artifact - reference| / std(reference)``), so an artifact whose logits drift without
flipping the argmax still fails. Without ``--eval-size`` the image count is sized by cost: as
many images as fit ``TIME_BUDGET_S`` (at least ``MIN_IMAGES``), and the result says so.
"""
from __future__ import annotations

import time

import torch

from vitc.errors import VitcError

# Minimum top-1 agreement with PyTorch, by the artifact's precision.
MIN_AGREEMENT = {"fp32": 0.995, "fp16": 0.99, "bf16": 0.99, "int8": 0.98, "fp8": 0.98}
# Largest (mean, max) logit error relative to std(reference logits), by precision. fp32 runtimes
# measure ~1e-6 on the zoo; fp16 rounding ~1e-3; int8 artifacts vs their simulation ~3e-3 mean,
# ~5e-2 max (benchmarks/results_export_parity_2026-11-21.json); each bound leaves 10-100x headroom.
MAX_LOGIT_ERROR = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 5e-2), "bf16": (2e-2, 1e-1), "int8": (5e-2, 1.0), "fp8": (5e-2, 1.0)}
# A model whose token passes make discrete choices (ToMe's bipartite matching, EViT's top-k keep)
# is not continuous in its input: where two candidate merges score within float rounding of each
# other, the runtime's summation order can pick the other one, and that image's logits move by
# far more than fp32 rounding (zoo:dinov2s-c10, ToMe r=4, FP32 ONNX Runtime: the median image
# 5e-7 of the spread, 61 of 200 images above 1e-3, up to 0.08, and 2 of 200 top-1s flipped,
# after ties were broken by index in both; CIFAR upsampled to 224 px has many near-identical
# patches). For such artifacts the mean bound holds the median image (a wrong op moves every
# image) and the max bound and top-1 agreement are int8's: a flipped merge moves an image about
# as far as int8 rounding does.
DECISION_MAX_LOGIT_ERROR = MAX_LOGIT_ERROR["int8"][1]
# The rounding floor of a quantized model. Its simulation rounds activations to a grid at every
# quantizer, so float differences far below any tolerance (a runtime's summation order, a fused
# kernel's erf) move a few values across a rounding boundary, and each flip can move more values
# across boundaries downstream. How far that carries is a property of the model, not of the
# runtime: on zoo:dinov2s-c10 W8A8 (300 test images), jittering every activation quantizer's
# input by 2^-22 relative (two float32 ulps) left the simulation agreeing with itself on 97.7% of
# top-1s at a mean logit error of 3.9% of the spread, where ONNX Runtime with every graph
# optimization off (the Q/DQ graph computed literally) gave 98.3% / 3.9% and OpenVINO f32
# 98.3% / 4.0%; on zoo:vit-c10 the same jitter gave 100% / 0.5%. No artifact can be held closer to
# the simulation than the simulation is to itself, so for quantized precisions the check measures
# this floor on the same images (one more reference pass) and loosens a bound only where the
# floor itself is past it: where the floor flips top-1s, agreement down to the floor's minus two
# standard errors of the difference of two such rates; logit errors up to FLOOR_FACTOR times the floor's. A model whose
# floor is within the fixed bounds (every CIFAR zoo model at W8A8) keeps them unchanged.
FLOOR_JITTER = 2.0 ** -22
FLOOR_FACTOR = 1.5
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
TIME_BUDGET_S = 60.0  # default parity cost when --eval-size is not given
MIN_IMAGES = 200  # ... but never fewer images than this (1 flip = 0.5 point)
PROBE_IMAGES = 16


def check(backbone, session, precision: str, data: str = "bundled:eval", eval_size: int | None = None,
          batch_size: int = 64, progress=None, extra_checks=None, seed: int = 0,
          session_batch: int | None = None) -> dict:
    """Compare ``session`` with ``backbone`` on ``data``; the result says whether it passed and why not."""
    from vitc.calibration.data import DataSpec, iter_batches, label_map

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
    sized_by = None
    jitter = RoundingJitter(backbone.module, seed) if precision not in FLOAT_PRECISIONS and reference is backbone else None
    if eval_size is None and len(source) > MIN_IMAGES:  # the rounding floor's pass counts in the budget
        source, sized_by = _size_by_cost(source, reference, session, backbone, batch_size, seed, session_batch,
                                         reference_passes=2 if jitter else 1)
    try:
        mapping = label_map(source, backbone.labels)
        labelled = True
    except VitcError:
        mapping, labelled = None, False
    refs, outs, ys, floors = [], [], [], []
    task = progress.add_task(f"parity ({session.name})", total=len(source)) if progress is not None else None
    from vitc.artifacts import fault_point
    from vitc.numerics import check_outputs

    for x, y in iter_batches(source, backbone.preprocess, batch_size):
        refs.append(torch.as_tensor(reference(x)).float())
        check_outputs(refs[-1], reference, x, f"{backbone.source} (the parity reference)")  # the model, not the artifact, is broken
        if jitter:
            with jitter:
                floors.append(torch.as_tensor(reference(x)).float())
        rows = [x] if session_batch is None else x.split(session_batch)  # a static-batch artifact takes its own batch only
        outs.append(torch.cat([torch.as_tensor(session(r)).float() for r in rows]))
        ys.append(torch.from_numpy(mapping[y.numpy()]) if mapping is not None else y)
        if task is not None:
            progress.advance(task, len(y))
        fault_point("parity:batch")
    if task is not None:
        progress.remove_task(task)
    ref, out, y = torch.cat(refs), torch.cat(outs), torch.cat(ys)
    floor = torch.cat(floors) if floors else None
    if not (ref.dim() == 2 and ref.shape[-1] == backbone.num_classes):
        return _fidelity_result(ref, out, precision, source, seed, reference_name, session, extra_checks, floor)
    if out.shape != ref.shape:
        raise VitcError(f"the artifact returns logits of shape {tuple(out.shape)}, PyTorch {tuple(ref.shape)}",
                        "re-export the model; check that it has one output, the logits")
    result = {"data": source.location, "images": len(y), "seed": seed, "reference": reference_name,
              "runtime": session.describe()}
    if sized_by:
        result["images_chosen"] = sized_by
    if labelled and (y >= 0).all():
        result["reference_top1"] = (ref.argmax(-1) == y).float().mean().item()
        result["artifact_top1"] = (out.argmax(-1) == y).float().mean().item()
    verdict, failures = logit_verdict(out, ref, precision, floor, token_decisions(backbone))
    return _verdict({**result, **verdict}, failures, session, extra_checks)


def logit_verdict(out: torch.Tensor, ref: torch.Tensor, precision: str, floor: torch.Tensor | None = None,
                  decisions: bool = False) -> tuple[dict, list[str]]:
    """The parity rule for class logits, as a pure function of the artifact's logits ``out``, the
    reference's ``ref`` and (quantized models) the reference's jittered ``floor``: (figures and
    bounds, failures). ``decisions``: the model makes token decisions (``token_decisions``)."""
    from vitc.evaluate import agreement

    out, ref = torch.as_tensor(out).float(), torch.as_tensor(ref).float()
    result = {**agreement(out, ref), **relative_error(out, ref),
              "min_agreement": MIN_AGREEMENT.get(precision, MIN_AGREEMENT["int8"])}
    mean_bound, max_bound = MAX_LOGIT_ERROR.get(precision, MAX_LOGIT_ERROR["int8"])
    # (result key, label in the failure, bound)
    checked = [("mean_rel_logit_error", "mean", mean_bound), ("max_rel_logit_error", "max", max_bound)]
    rules = []
    if decisions:
        per_image = (out - ref).abs().amax(-1) / result["logit_scale"]
        result["median_image_rel_logit_error"] = per_image.median().item() if per_image.numel() else 0.0
        result["images_over_max_bound"] = int((per_image > max_bound).sum())
        rules.append("token decisions: the mean bound holds the median image; the max bound and top-1 agreement are int8's")
        result["min_agreement"] = min(result["min_agreement"], MIN_AGREEMENT["int8"])
        checked = [("median_image_rel_logit_error", "median image", mean_bound),
                   ("max_rel_logit_error", "max", max(max_bound, DECISION_MAX_LOGIT_ERROR))]
    if floor is not None:
        result["rounding_floor"] = logit_floor(torch.as_tensor(floor).float(), ref)
        result["min_agreement"] = min(result["min_agreement"], result["rounding_floor"]["min_agreement"])
        checked = [(key, label, max(bound, FLOOR_FACTOR * result["rounding_floor"][key])) for key, label, bound in checked]
        rules.append("quantized: a bound is loosened only where this model's rounding floor (its simulation with "
                     f"activation-quantizer inputs jittered by {FLOOR_JITTER:.1e} relative) is past it")
    if rules:
        result["rule"] = "; ".join(rules)
    result["max_logit_error"] = {key.replace("_logit_error", ""): bound for key, _, bound in checked}
    failures = []
    at_floor = " at this model's rounding floor" if floor is not None else ""
    if not torch.isfinite(out).all():
        failures.append("the artifact returns non-finite logits")
    if result["top1_agreement"] < result["min_agreement"]:
        failures.append(f"top-1 agreement {100 * result['top1_agreement']:.2f}% is below {100 * result['min_agreement']:.1f}% "
                        f"for {precision}{at_floor}")
    for key, label, bound in checked:
        if not result[key] <= bound:  # NaN fails too
            failures.append(f"{label} logit error {result[key]:.2e} of the logits' spread is above {bound:.0e} for {precision}{at_floor}")
    return result, failures


def token_decisions(backbone) -> bool:
    """Whether a token pass (merge/prune, ``vitc.compress.tokens``) makes discrete per-image choices
    in this model: then parity takes ``DECISION_MAX_LOGIT_ERROR`` (see above)."""
    return any(t.get("pass") == "merge" and any(t.get("removals") or [0]) for t in backbone.transforms)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Mean and max |out - ref| in units of std(ref): comparable across models whatever their logit scale."""
    scale = ref.float().std().item() if ref.numel() > 1 else 0.0
    scale = scale if scale > 0 and torch.isfinite(torch.tensor(scale)) else 1.0
    diff = (out.float() - ref.float()).abs()
    if not torch.isfinite(diff).all():
        return {"logit_scale": scale, "mean_rel_logit_error": float("nan"), "max_rel_logit_error": float("nan")}
    return {"logit_scale": scale, "mean_rel_logit_error": diff.mean().item() / scale if diff.numel() else 0.0,
            "max_rel_logit_error": diff.max().item() / scale if diff.numel() else 0.0}


def _size_by_cost(source, reference, session, backbone, batch_size: int, seed: int, session_batch,
                  reference_passes: int = 1):
    """The parity subset when no --eval-size was given: time both models on a few images and keep
    as many as fit TIME_BUDGET_S (at least MIN_IMAGES); say how the count was chosen.
    ``reference_passes``: 2 when the rounding floor runs the reference once more per batch."""
    from vitc.calibration.data import iter_batches

    probe = source.select(PROBE_IMAGES, seed)
    batches = [x for x, _ in iter_batches(probe, backbone.preprocess, batch_size)]

    def run_both():
        for x in batches:
            for _ in range(reference_passes):
                reference(x)
            for r in ([x] if session_batch is None else x.split(session_batch)):
                session(r)

    run_both()  # first calls pay for session set-up and allocation, not for images
    start = time.perf_counter()
    run_both()
    per_image = (time.perf_counter() - start) / max(len(probe), 1)
    fit = int(TIME_BUDGET_S / per_image) if per_image > 0 else len(source)
    n = min(len(source), max(MIN_IMAGES, fit))
    if n >= len(source):
        return source, None
    note = (f"{n} of {len(source)} images: the default parity budget is {TIME_BUDGET_S:.0f} s at "
            f"{1000 * per_image:.1f} ms per image (both models{', the reference twice for the rounding floor' if reference_passes > 1 else ''}); "
            "pass --eval-size to choose")
    return source.select(n, seed), note


def _onnx_quantized(backbone) -> bool:
    return any(t.get("pass") == "quantize" and t.get("backend") == "onnx" for t in backbone.transforms)


def _fidelity_result(ref, out, precision: str, source, seed: int, reference_name: str, session, extra_checks,
                     floor=None) -> dict:
    """Parity of an output that is not class logits (a dense map, an embedding): the task's
    fidelity metrics (``vitc.tasks``) and their thresholds for ``precision``, not top-1."""
    from vitc import tasks

    if out.shape != ref.shape:
        raise VitcError(f"the artifact returns an output of shape {tuple(out.shape)}, the reference {tuple(ref.shape)}",
                        "re-export the model")
    task = tasks.detect(ref, False)
    cos_min = tasks.MIN_WORST_COSINE.get(precision, tasks.MIN_WORST_COSINE["int8"])
    r_min = tasks.MIN_MEAN_PEARSON.get(precision, tasks.MIN_MEAN_PEARSON["int8"])
    result = {"data": source.location, "images": int(ref.shape[0]), "seed": seed, "reference": reference_name,
              "runtime": session.describe(), "task": task, **tasks.fidelity(out, ref)}
    if floor is not None:  # a bound loosens only where the floor's own shortfall from 1 is past it
        own = tasks.fidelity(floor, ref)
        result["rounding_floor"] = {"jitter": FLOOR_JITTER, "cosine_worst": own["cosine_worst"], "pearson_mean": own["pearson_mean"]}
        if own.get("finite", True):
            cos_min = min(cos_min, 1 - FLOOR_FACTOR * (1 - own["cosine_worst"]))
            r_min = min(r_min, 1 - FLOOR_FACTOR * (1 - own["pearson_mean"]))
    result.update(min_worst_cosine=cos_min, min_mean_pearson=r_min)
    failures = tasks.passes(result, precision, cos_min, r_min)
    return _verdict(result, failures, session, extra_checks)


class RoundingJitter:
    """While active (``with jitter:``), every activation quantizer of ``module`` that rounds sees its
    input times (1 + relative * N(0, 1)), FLOOR_JITTER by default: a float-rounding-sized change at every rounding point,
    as a different runtime makes. Falsy when the module has no such quantizer (then there is no floor)."""

    def __init__(self, module, seed: int = 0, relative: float = FLOOR_JITTER):
        from vitc.compress.quantize.modules import act_quantizers

        self.quantizers = [q for q in act_quantizers(module).values() if q.mode == "quant"] if module is not None else []
        self.generator = torch.Generator().manual_seed(seed)
        self.relative = relative
        self.hooks = []

    def __bool__(self) -> bool:
        return bool(self.quantizers)

    def _hook(self, _module, args):
        x = args[0]
        noise = torch.randn(x.shape, generator=self.generator).to(x.device, x.dtype)
        return (x * (1 + self.relative * noise),) + tuple(args[1:])

    def __enter__(self):
        self.hooks = [q.register_forward_pre_hook(self._hook) for q in self.quantizers]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks = []


def logit_floor(floor: torch.Tensor, ref: torch.Tensor) -> dict:
    """The jittered reference against the reference: its top-1 agreement and logit errors, and the
    agreement an artifact must reach given it (the floor's minus two standard errors of the
    difference of two rates of that size on these images; 1.0, i.e. no loosening, when the floor
    flips no top-1 or was measured on fewer than ``MIN_IMAGES`` images)."""
    from vitc.evaluate import agreement

    n = max(int(ref.shape[0]), 1)
    own = {**agreement(floor, ref), **relative_error(floor, ref)}
    per_image = (floor - ref).abs().amax(-1) / own["logit_scale"]
    flips = 1 - own["top1_agreement"]
    return {"jitter": FLOOR_JITTER, "top1_agreement": own["top1_agreement"],
            "mean_rel_logit_error": own["mean_rel_logit_error"], "max_rel_logit_error": own["max_rel_logit_error"],
            "median_image_rel_logit_error": per_image.median().item() if per_image.numel() else 0.0,
            # a floor that flips no top-1, or one measured on fewer than MIN_IMAGES images (a rate
            # of one or two flips), moves no agreement bar: the fixed one stands
            "min_agreement": own["top1_agreement"] - 2 * (2 * flips / n) ** 0.5 if flips > 0 and n >= MIN_IMAGES else 1.0}


def _verdict(result: dict, failures: list[str], session, extra_checks) -> dict:
    """Add the runtime's own checks (``extra_checks(session)``) and the pass/fail verdict to ``result``."""
    if extra_checks is not None:
        extra = extra_checks(session)
        failures = failures + extra.pop("failures", [])
        result.update(extra)
    result["passed"] = not failures
    if failures:
        result["failure"] = "; ".join(failures)
    return result
