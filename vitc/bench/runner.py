"""``vitc.bench.run``: benchmark a model across targets and batch sizes, the Python API behind ``vitc bench``."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from vitc.bench import fingerprint as fp
from vitc.bench.errors import BenchError
from vitc.bench.harness import HarnessConfig, build_pool, measure
from vitc.bench.schema import document
from vitc.bench.subjects import Subject, check_batch, resolve
from vitc.errors import VitcError


def load_images(data: str | None, preprocess, count: int, seed: int = 0) -> np.ndarray:
    """``count`` preprocessed real images (fewer if the source is smaller) as float32 NCHW."""
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source

    try:
        source = open_source(data or "bundled:eval").select(count, seed)
        x, _ = load_tensors(source, preprocess, convert_rgb=True)
    except BenchError:
        raise
    except VitcError as exc:
        raise BenchError(exc.problem, exc.fix) from exc
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


class PoolCache:
    """Input pools per (preprocessing, batch), so every subject with the same inputs times the same images."""

    def __init__(self, data: str | None, pool_batches: int, max_batch: int):
        self.data, self.pool_batches, self.max_batch = data, pool_batches, max_batch
        self._images: dict = {}
        self._pools: dict = {}

    def get(self, preprocess, batch: int) -> list[np.ndarray]:
        key = (preprocess, batch)
        if key not in self._pools:
            if preprocess not in self._images:
                # Pool memory is checked before decoding, so an impossible batch fails fast.
                build_pool(np.zeros((1, 3, preprocess.input_size, preprocess.input_size), np.float32), self.max_batch, self.pool_batches)
                self._images[preprocess] = load_images(self.data, preprocess, min(256, self.max_batch * self.pool_batches))
            self._pools[key] = build_pool(self._images[preprocess], batch, self.pool_batches)
        return self._pools[key]


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or any(b <= 0 for b in batches):
        raise BenchError(f"--batch '{text}' is not a list of positive integers", "pass e.g. --batch 1,8,32")
    return batches


def top1(session, subject: Subject, data: str, batch: int) -> float:
    from vitc.calibration.sources import open_source
    from vitc.evaluate import evaluate

    try:
        source = open_source(data)
        return float(evaluate(session, source, subject.preprocess, subject.labels, batch, convert_rgb=True)["top1"])
    except VitcError as exc:
        raise BenchError(exc.problem, exc.fix) from exc


def run(spec: str, targets: list[str] | None = None, runtime: str | None = None, batches=(1,), threads: int | None = None,
        device: str = "cpu", data: str | None = None, accuracy: bool = False, config: HarnessConfig = HarnessConfig(),
        flags=None, weights=None, progress=None, workdir: Path | None = None, profile: bool = False,
        profile_runs: int = 20) -> dict:
    """Benchmark ``spec`` (model spec or artifact) on each target and batch size; returns the JSON document.

    ``accuracy`` adds top-1 on ``data`` per target (after timing, so it does not disturb it).
    ``profile`` adds, per target and batch, the per-op profile by kind (``vitc.bench.profile``)
    from a separate profiling session opened after the timing, and the runtime's GEMM peaks.
    """
    from vitc.models.intake import PreprocessFlags

    flags = flags or PreprocessFlags()
    threads = threads or fp.allowed_cpus()
    status = (lambda text: progress.console.print(f"[dim]{text}[/dim]")) if progress is not None else None
    with tempfile.TemporaryDirectory(prefix="vitc-bench-") as tmp:
        subjects = resolve(spec, targets, runtime, Path(workdir or tmp), flags, weights, status, max(batches))
        pools = PoolCache(data, config.pool_batches, max(batches))
        results, warnings, peaks = [], [], {}
        for subject in subjects:
            session, load_s = subject.open(threads, device)
            for batch in batches:
                check_batch(session, subject, batch)
                pool = pools.get(subject.preprocess, batch)
                task = progress.add_task(f"{subject.label} b={batch}", total=config.max_time_s) if progress is not None else None
                on_progress = (lambda done, task=task: progress.update(task, completed=done)) if task is not None else None
                result = measure(session, pool, batch, config, subject.label, threads, on_progress)
                if task is not None:
                    progress.remove_task(task)
                result["phases"] = {"load_s": load_s, **result["phases"]}
                results.append({**subject.describe(), "session": session.describe(), "threads": threads, **result})
                warnings.extend(result["warnings"])
                if profile:
                    results[-1]["profile"] = _profile(session, pool, profile_runs, threads, peaks, status)
                    if not results[-1]["profile"]["available"]:
                        warnings.append(results[-1]["profile"]["note"])
            if accuracy:
                static_batch = session.input_shape[0] if session.input_shape else None
                acc = top1(session, subject, data or "bundled:eval", static_batch or 64)
                for r in results:
                    if r["label"] == subject.label:
                        r["top1"] = acc
            del session
    settings = {"spec": spec, "targets": targets, "runtime": runtime, "batches": list(batches), "threads": threads,
                "device": device, "data": data or "bundled:eval", "harness": config.to_dict(), "profile": profile}
    body = {"peaks": peaks} if profile else {}
    return document("bench", with_sessions(fp.fingerprint(), results), settings, results=results,
                    warnings=list(dict.fromkeys(warnings)), **body)


def _profile(session, pool, runs: int, threads: int, peaks: dict, status=None) -> dict:
    """The profile of ``session`` at this pool's batch, the runtime's peaks measured once per run (cached in ``peaks``)."""
    from vitc.bench.profile import has_profiler, measure_peaks, profile

    runtime = session.describe()["runtime"].split("+")[0]
    if has_profiler(runtime) and runtime not in peaks:
        if status is not None:
            status(f"measuring {runtime} GEMM peaks at {threads} threads")
        peaks[runtime] = measure_peaks(runtime, threads)
    if status is not None and has_profiler(runtime):
        status(f"profiling {runtime}, batch {pool[0].shape[0]}, {runs} calls")
    return profile(session, pool, runs, peaks.get(runtime))


def run_peaks(runtimes: list[str], threads: int | None = None) -> dict:
    """``vitc bench --peak``: int8/bf16/f32 GEMM peaks of each runtime at ``threads``."""
    from vitc.bench.profile import measure_peaks

    threads = threads or fp.allowed_cpus()
    peaks = {r: measure_peaks(r, threads) for r in runtimes}
    return document("peak", fp.fingerprint(), {"runtimes": runtimes, "threads": threads}, peaks=peaks, results=[], warnings=[])


def with_sessions(fingerprint: dict, results: list[dict]) -> dict:
    """The fingerprint plus each session's precision hint, device and threads, as measured."""
    sessions = {}
    for r in results:
        s = r.get("session") or {}
        sessions[r["label"]] = {k: s.get(k) for k in ("runtime", "version", "device", "precision", "threads")}
    return {**fingerprint, "sessions": sessions}
