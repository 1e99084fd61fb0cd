"""The latency harness: phases, a rotating pool of real images, adaptive stopping.

One measurement of one session at one batch size goes through four phases, timed apart:
load (done by the caller, who opens the session), the first inference, a warm-up that runs
windows of calls until three consecutive window medians agree within 2% (capped), and the
steady state, which keeps sampling until it has a minimum count and time and the confidence
interval of the median is within 1% of it (or ``max_time_s`` is reached). That interval is
drift-aware (``stats.median_ci_blocked``: from the medians of 20 consecutive blocks), so on a
machine whose speed wanders it widens and the run goes on to ``max_time_s`` with a warning.

Each timed call reads a monotonic clock around ``run`` + ``synchronize``; the inputs rotate
through several distinct batches of preprocessed real images, so caches see what they see in
production rather than one hot tensor.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from vitc.bench import stats
from vitc.bench.errors import BenchError
from vitc.bench.fingerprint import allowed_cpus, available_memory_bytes


@dataclass(frozen=True)
class HarnessConfig:
    min_samples: int = 50
    min_time_s: float = 1.0
    max_time_s: float = 30.0
    target_rel_ci: float = 0.01  # stop once the median's CI half-width is within this share of it
    confidence: float = 0.95
    warmup_tolerance: float = 0.02  # three consecutive window medians within this of each other
    warmup_max_s: float = 10.0
    window_s: float = 0.1  # target duration of one warm-up window / steady-state chunk
    cv_warn: float = 0.05
    pool_batches: int = 4  # distinct batches in the rotating input pool

    def to_dict(self) -> dict:
        return asdict(self)


def build_pool(images: np.ndarray, batch: int, batches: int = 4) -> list[np.ndarray]:
    """Distinct, contiguous float32 batches cut from preprocessed ``images`` (N, 3, H, W).

    When there are fewer images than ``batch * batches``, each batch starts at another offset
    of the cycled image list, so batches still differ.
    """
    n = len(images)
    if n == 0:
        raise BenchError("no images to build the input pool from", "pass --data with at least one image")
    need = batch * batches * int(np.prod(images.shape[1:])) * 4
    free = available_memory_bytes()
    if free is not None and need > free // 2:
        raise BenchError(f"batch {batch} does not fit in memory: its input pool alone needs {need / 2**30:.1f} GiB "
                         f"and {free / 2**30:.1f} GiB is available", "pass smaller --batch sizes")
    pool = []
    for b in range(batches):
        start = (b * max(1, n // batches)) % n if n < batch * batches else b * batch
        idx = (start + np.arange(batch)) % n
        pool.append(np.ascontiguousarray(images[idx], dtype=np.float32))
    return pool


def _no_yield() -> None:
    return None


# Yielding before each timed call (outside the clock) lets the scheduler run whoever is waiting
# first, so the call starts on a fresh time slice, as a serving thread does when a request wakes
# it. Back to back, every second call on a busy machine overran its slice and waited for the
# other runnable tasks: a position effect of 30x here, under training load.
yield_cpu = getattr(os, "sched_yield", _no_yield)


def timed_calls(session, pool: list[np.ndarray], count: int, offset: int = 0, deadline_ns: int | None = None,
                yield_first: bool = True) -> list[int]:
    """Nanoseconds of up to ``count`` calls, each run + synchronize, inputs rotating through ``pool``.

    Stops early once a call ends after ``deadline_ns`` (perf_counter_ns), so a stalled machine
    cannot stretch a chunk far past --max-time.
    """
    run, sync, clock = session.run, session.synchronize, time.perf_counter_ns
    yield_ = yield_cpu if yield_first else _no_yield
    k = len(pool)
    deadline = deadline_ns if deadline_ns is not None else 1 << 62
    out = []
    append = out.append
    for i in range(count):
        x = pool[(offset + i) % k]
        yield_()
        t0 = clock()
        run(x)
        sync()
        t1 = clock()
        append(t1 - t0)
        if t1 > deadline:
            break
    return out


class _NullSession:
    """A session that does nothing: timing it measures what the harness itself adds per call."""

    def run(self, batch):
        return batch

    def synchronize(self):
        return None


def harness_overhead_s(pool: list[np.ndarray], calls: int = 1000) -> float:
    """Median seconds the timing loop adds inside the clock (reads, dispatch); the yield sits outside it."""
    return float(np.median(timed_calls(_NullSession(), pool, calls, yield_first=False))) / 1e9


def first_inference(session, pool, batch: int, label: str) -> float:
    t0 = time.perf_counter()
    try:
        session.run(pool[0])
        session.synchronize()
    except BenchError:
        raise
    except MemoryError as exc:
        raise BenchError(f"batch {batch} does not fit in memory for {label}", "pass smaller --batch sizes") from exc
    except Exception as exc:
        text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if any(w in text.lower() for w in ("memory", "alloc", "oom")):
            raise BenchError(f"batch {batch} does not fit in memory for {label} ({text})", "pass smaller --batch sizes") from exc
        raise BenchError(f"{label} fails on a batch of shape {tuple(pool[0].shape)} ({text})",
                         "check the batch size and input size the artifact was exported for") from exc
    return time.perf_counter() - t0


def calls_per_window(session, pool, window_s: float, lo: int = 3, hi: int = 500) -> int:
    """Calls that fill about ``window_s`` of wall time, waits after yielding included (long on a busy machine)."""
    t0 = time.perf_counter()
    timed_calls(session, pool, 3)
    per_call = max((time.perf_counter() - t0) / 3, 1e-7)
    return int(min(hi, max(lo, round(window_s / per_call))))


def warm_up(session, pool, config: HarnessConfig, window: int) -> dict:
    """Run windows of ``window`` calls until the last three medians agree within the tolerance (or the cap)."""
    medians: list[float] = []
    calls = 0
    t0 = time.perf_counter()
    converged = False
    last: list[int] = []
    deadline = time.perf_counter_ns() + int(config.warmup_max_s * 1e9)
    while time.perf_counter() - t0 < config.warmup_max_s:
        last = timed_calls(session, pool, window, calls, deadline)
        calls += len(last)
        if len(last) < window:
            break  # a cut-short window would not be comparable with the others
        medians.append(float(np.median(last)))
        if len(medians) >= 3:
            recent = medians[-3:]
            if max(recent) / min(recent) - 1 <= config.warmup_tolerance:
                converged = True
                break
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "calls": calls, "windows": len(medians), "window_calls": window,
            "converged": converged, "window_medians_s": [m / 1e9 for m in medians],
            "last_median_s": float(np.median(last)) / 1e9 if last else None,
            # wall time per call including the wait after yielding: what sizes work to a time budget
            "wall_per_call_s": seconds / calls if calls else None}


def steady_state(session, pool, config: HarnessConfig, window: int, on_progress=None) -> tuple[np.ndarray, dict]:
    """Sample until min count and time are met and the median's CI is within the target, or max time."""
    samples: list[int] = []
    t0 = time.perf_counter()
    deadline = time.perf_counter_ns() + int(config.max_time_s * 1e9)
    stopped_by = "max_time"
    rel = math.inf
    while True:
        samples.extend(timed_calls(session, pool, window, len(samples), deadline))
        elapsed = time.perf_counter() - t0
        if on_progress is not None:
            on_progress(min(elapsed, config.max_time_s))
        if len(samples) >= config.min_samples and elapsed >= config.min_time_s:
            rel = stats.relative_half_width(stats.median_ci_blocked(samples, config.confidence))
            if rel <= config.target_rel_ci:
                stopped_by = "ci"
                break
        if elapsed >= config.max_time_s:
            if len(samples) >= 2:
                rel = stats.relative_half_width(stats.median_ci_blocked(samples, config.confidence))
            break
    x = np.asarray(samples, dtype=float) / 1e9
    return x, {"seconds": time.perf_counter() - t0, "calls": len(samples), "stopped_by": stopped_by,
               "median_ci_rel_half_width": rel}


def measure(session, pool: list[np.ndarray], batch: int, config: HarnessConfig, label: str = "model",
            threads: int | None = None, on_progress=None) -> dict:
    """All phases after loading for one session and batch size: phases, statistics, samples, warnings."""
    first_s = first_inference(session, pool, batch, label)
    window = calls_per_window(session, pool, config.window_s)
    warm = warm_up(session, pool, config, window)
    samples, steady = steady_state(session, pool, config, window, on_progress)
    return _result(session, pool, batch, config, label, threads, first_s, warm, steady, samples)


def _result(session, pool, batch: int, config: HarnessConfig, label: str, threads: int | None, first_s: float,
            warm: dict, steady: dict, samples: np.ndarray) -> dict:
    """One measurement's record: phases, statistics, samples and the warnings they call for."""
    summary = stats.summarize(samples, config.confidence)
    overhead = harness_overhead_s(pool)
    warnings: list[str] = []
    if not warm["converged"]:
        warnings.append(f"{label} b={batch}: warm-up did not settle within {config.warmup_max_s:g} s "
                        f"(window medians kept moving by more than {config.warmup_tolerance:.0%})")
    if steady["stopped_by"] == "max_time":
        warnings.append(f"{label} b={batch}: the median's CI is ±{steady['median_ci_rel_half_width']:.1%} after "
                        f"{config.max_time_s:g} s, not within {config.target_rel_ci:.0%} (noisy machine; raise --max-time)")
    if summary["cv"] > config.cv_warn:
        warnings.append(f"{label} b={batch}: coefficient of variation {summary['cv']:.1%} is over {config.cv_warn:.0%}; "
                        "the machine is noisy, so treat the tails with care")
    if threads is not None and threads > allowed_cpus():
        warnings.append(f"{label}: {threads} threads on {allowed_cpus()} allowed CPUs; threads will contend")
    warnings.extend(f"{label}: {w}" for w in session.fallbacks())
    p50 = summary["p50"]["value"]
    return {
        "batch": batch,
        "phases": {"first_inference_s": first_s, "warmup": warm, "steady": steady},
        "stats": summary,
        "throughput_ips": batch / summary["mean"] if summary["mean"] > 0 else float("nan"),
        "harness_overhead_s": overhead,
        "harness_overhead_share_of_p50": overhead / p50 if p50 > 0 else float("nan"),
        "samples_s": samples.tolist(),
        "warnings": warnings,
    }


def measure_interleaved(sessions: dict, pools: dict, batch: int, config: HarnessConfig, rounds: int = stats.CI_BLOCKS,
                        threads: int | None = None, seed: int = 0) -> dict:
    """Several sessions timed in alternating slices: after each one's first inference and warm-up,
    ``rounds`` rounds give every session one slice of about ``min_time_s / rounds`` seconds, in a
    shuffled order. Returns, per key, what ``measure`` returns.

    Why: this machine's speed wanders in states that last 10-30 s (measured: one session moving
    between 2.1 and 3.4 ms at batch 1 in about 20-second episodes), so sessions timed one after
    another are ranked by the state each happened to meet. Slices spread every session's samples
    over the whole measuring period, so all of them meet the same states; with ``rounds`` equal to
    the blocks of the p50 interval, each block is one slice and the interval carries the drift.
    """
    import random

    warm: dict = {}
    for key, session in sessions.items():
        first_s = first_inference(session, pools[key], batch, str(key))
        window = calls_per_window(session, pools[key], config.window_s)
        warm[key] = (first_s, warm_up(session, pools[key], config, window))
    slice_s = max(config.min_time_s / rounds, 1e-3)
    min_calls = max(1, -(-config.min_samples // rounds))
    samples: dict = {k: [] for k in sessions}
    t0 = time.perf_counter()
    order = list(sessions)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            per_call = warm[key][1]["last_median_s"] or slice_s
            calls = max(min_calls, int(round(slice_s / max(per_call, 1e-7))))
            samples[key].extend(timed_calls(sessions[key], pools[key], calls, len(samples[key])))
    seconds = time.perf_counter() - t0
    out = {}
    for key, session in sessions.items():
        x = np.asarray(samples[key], dtype=float) / 1e9
        steady = {"seconds": seconds, "calls": len(x), "stopped_by": "rounds", "rounds": rounds,
                  "interleaved_with": len(sessions) - 1,
                  "median_ci_rel_half_width": stats.relative_half_width(stats.median_ci_blocked(x, config.confidence))}
        out[key] = _result(session, pools[key], batch, config, str(key), threads, warm[key][0], warm[key][1], steady, x)
    return out
