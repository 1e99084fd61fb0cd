"""Which float precision runs the float remainder of an int8 OpenVINO IR: measured, parity-checked, recorded.

An int8 IR still has float ops (LayerNorm, softmax, GELU, residual adds, the dequantize
scales). OpenVINO runs them in the precision its hint says; on a CPU with AVX-512 BF16 or AMX
the default is bf16, which can be faster or slower than f32 for a mostly-int8 graph (bf16
adds reorders between int8 and float layers). So vitc measures instead of assuming: each
precision the device executes (f32 always; bf16 / f16 where ``OPTIMIZATION_CAPABILITIES``
lists them) is timed in interleaved rounds at batch 1 and checked against the f32 output on
real images; the fastest one whose outputs agree wins only if it beats f32 by ``min_gain``.
The choice goes into the IR's ``runtime_options`` (sessions read it; an explicit
``precision=`` still overrides) and into the manifest.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

CANDIDATES = {"bf16": "BF16", "f16": "FP16"}  # hint -> OPTIMIZATION_CAPABILITIES entry


@dataclass(frozen=True)
class PolicyConfig:
    rounds: int = 5
    calls: int = 5  # timed calls per candidate per round (the median of them is the round's figure)
    min_gain: float = 0.03  # leave f32 only for at least this speedup
    min_cosine: float = 0.999  # per-sample cosine to the f32 output, worst sample
    threads: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def device_precisions(core, device: str = "CPU") -> tuple[list[str], list[str]]:
    """(precisions to try, notes on those the device does not execute)."""
    try:
        caps = set(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # pragma: no cover - a plugin without the property
        caps = set()
    tried, notes = ["f32"], []
    for hint, cap in CANDIDATES.items():
        if cap in caps:
            tried.append(hint)
        else:
            notes.append(f"{hint}: {device} does not execute it here (no {cap} in its capabilities), so it was not tried")
    return tried, notes


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def choose(model, images: np.ndarray, config: PolicyConfig = PolicyConfig(), device: str = "CPU") -> dict:
    """Measure each precision on ``model`` (an ``ov.Model``) with ``images`` (N,3,H,W); returns the decision record."""
    import openvino as ov

    core = ov.Core()
    tried, notes = device_precisions(core, device)
    compiled, outputs = {}, {}
    x1 = np.ascontiguousarray(images[:1], dtype=np.float32)
    for p in tried:
        cfg = {"INFERENCE_PRECISION_HINT": p, "PERFORMANCE_HINT": "LATENCY"}
        if config.threads:
            cfg["INFERENCE_NUM_THREADS"] = config.threads
        compiled[p] = core.compile_model(model, device, cfg)
        applied = compiled[p].get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if p != "f32" and applied != {"bf16": "bf16", "f16": "f16"}[p]:
            notes.append(f"{p}: asked for it, the device applies {applied}; not used")
            del compiled[p]
    requests = {p: c.create_infer_request() for p, c in compiled.items()}
    times: dict[str, list[float]] = {p: [] for p in compiled}
    order = list(compiled)
    for k in range(config.rounds):
        for p in (order if k % 2 == 0 else order[::-1]):  # alternate the order so drift hits both
            if k == 0:
                requests[p].infer({0: x1})  # warm-up
            samples = []
            for _ in range(config.calls if k else 1):
                t = time.perf_counter()
                requests[p].infer({0: x1})
                samples.append(time.perf_counter() - t)
            times[p].append(float(np.median(samples)))
        if k == 0:  # a precision the CPU only emulates (f16 here ran ~190x slower) is dropped after one call
            for p in [p for p in order if p != "f32" and times[p][0] > 3 * times["f32"][0]]:
                notes.append(f"{p}: {times[p][0] / times['f32'][0]:.0f}x slower than f32 on its first call; dropped")
                order.remove(p)
                del compiled[p], times[p]
    for p in compiled:
        outputs[p] = np.concatenate([compiled[p]({0: images[i:i + 1]})[0] for i in range(len(images))]) \
            if model.inputs[0].get_partial_shape()[0].is_static else compiled[p]({0: images})[0]
    base = np.array(times["f32"])
    record = {"measured": {}, "notes": notes, "config": config.to_dict()}
    for p in compiled:
        cos = _cosines(outputs[p], outputs["f32"])
        agree = float((outputs[p].reshape(len(images), -1).argmax(1) == outputs["f32"].reshape(len(images), -1).argmax(1)).mean())
        record["measured"][p] = {"ms_b1": 1e3 * float(np.median(times[p])),
                                 "speedup_vs_f32": float(np.median(base / np.array(times[p]))),
                                 "worst_cosine_vs_f32": float(cos.min()), "argmax_agreement_vs_f32": agree,
                                 "parity": bool(cos.min() >= config.min_cosine)}
    ok = [p for p in compiled if p != "f32" and record["measured"][p]["parity"]
          and record["measured"][p]["speedup_vs_f32"] >= 1 + config.min_gain]
    chosen = max(ok, key=lambda p: record["measured"][p]["speedup_vs_f32"]) if ok else "f32"
    record["chosen"] = chosen
    record["reason"] = (f"{chosen} ran {record['measured'][chosen]['speedup_vs_f32']:.2f}x f32 with outputs within parity"
                        if chosen != "f32" else
                        f"no other precision beat f32 by {config.min_gain:.0%} with outputs within parity")
    return record


def record_in_ir(model, chosen: str) -> None:
    """Store the chosen hint where OpenVINO (and vitc's session) read it when no hint is passed."""
    from vitc.runtimes.openvino_session import RT_HINT

    model.set_rt_info(chosen, RT_HINT)
