"""The latency-regression gate: interleaved A/B rounds (``compare``) and stored baselines (``check``).

``compare`` runs base and candidate in the same process, in rounds. In each round both see the
same inputs, call by call in pairs, and exactly half the pairs, drawn at random, run the base
first, so whatever the machine does (a CI neighbour, thermal drift, cache and scheduler
position effects) lands on both arms alike and an A/A round's log ratio is symmetric around zero. The round is the unit: the slowdown is estimated
from paired per-round medians, its confidence interval comes from order statistics and the
decision from sign tests with Holm's correction across comparisons. The rounds are looked at
a fixed number of times (``max_looks``) with the error rate split across the looks, so stopping
early when the answer is clear does not inflate false alarms.

Exit codes: 0 pass (slowdown's upper bound within the threshold), 1 regression (lower bound
above it), 2 inconclusive, 3 harness error (``BenchError``).
"""
from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vitc.bench import fingerprint as fp
from vitc.bench import stats
from vitc.bench.errors import BenchError
from vitc.bench.harness import HarnessConfig, calls_per_window, first_inference, measure, warm_up, yield_cpu
from vitc.bench.report import pct_interval
from vitc.bench.runner import PoolCache, with_sessions
from vitc.bench.schema import document
from vitc.bench.subjects import ARTIFACT_SUFFIXES, Subject, check_batch, resolve

EXIT_CODES = {"pass": 0, "regression": 1, "inconclusive": 2}


@dataclass(frozen=True)
class GateConfig:
    max_slowdown: float = 0.05
    alpha: float = 0.05  # family-wise rate of false alarms (and of false passes), one-sided
    max_time_s: float = 60.0
    min_rounds: int = 12
    max_looks: int = 6  # looks at rounds min_rounds * growth**k; alpha is split across them
    look_growth: float = 1.5
    round_s: float = 0.2  # time per arm in one round
    warmup_max_s: float = 3.0
    seed: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def alpha_per_look(self) -> float:
        return self.alpha / self.max_looks

    def look_schedule(self) -> list[int]:
        return [math.ceil(self.min_rounds * self.look_growth**k) for k in range(self.max_looks)]


def overall(decisions: list[str]) -> str:
    if "regression" in decisions:
        return "regression"
    if "inconclusive" in decisions or not decisions:
        return "inconclusive"
    return "pass"


class Comparison:
    """One base/candidate pair at one batch size, and its rounds so far."""

    def __init__(self, name: str, base: Subject, cand: Subject, base_session, cand_session, pool, batch: int):
        self.name, self.base, self.cand, self.batch = name, base, cand, batch
        self.base_session, self.cand_session, self.pool = base_session, cand_session, pool
        self.base_medians: list[float] = []
        self.cand_medians: list[float] = []
        self.base_first: list[str] = []  # per round, per pair: "b" when the base ran first
        self.base_samples: list[int] = []
        self.cand_samples: list[int] = []
        self.calls_per_round = 3
        self.decision = "inconclusive"
        self.decided_at: int | None = None
        self.p_regression = self.p_pass = 1.0
        self.warmup: dict = {}

    def prepare(self, config: GateConfig, warmup_cap_s: float | None = None) -> None:
        label = f"{self.name} b={self.batch}"
        warmup_s = config.warmup_max_s if warmup_cap_s is None else min(config.warmup_max_s, warmup_cap_s)
        first_inference(self.base_session, self.pool, self.batch, f"base {label}")
        first_inference(self.cand_session, self.pool, self.batch, f"candidate {label}")
        # Windows short enough that the capped warm-up still sees several of them.
        harness = HarnessConfig(warmup_max_s=warmup_s, window_s=min(0.1, warmup_s / 6))
        for arm, session in (("base", self.base_session), ("candidate", self.cand_session)):
            window = calls_per_window(session, self.pool, harness.window_s)
            self.warmup[arm] = warm_up(session, self.pool, harness, window)
        per_call = max(self.warmup[a]["wall_per_call_s"] or 0.0 for a in ("base", "candidate"))
        calls = int(min(200, max(6, round(config.round_s / max(per_call, 1e-7)))))
        self.calls_per_round = calls + calls % 2  # even, so the order can be balanced

    def round(self, rng: random.Random) -> None:
        """One round: pairs of calls on the same input; exactly half the pairs, at random, run the base first.

        Balancing the order inside the round cancels position effects (cache, scheduler) from
        each round's medians; drawing it at random keeps an A/A round's log ratio symmetric.
        """
        clock, yield_ = time.perf_counter_ns, yield_cpu
        m, k, pool = self.calls_per_round, len(self.pool), self.pool
        order = [True] * (m // 2) + [False] * (m - m // 2)
        rng.shuffle(order)
        base_run, base_sync = self.base_session.run, self.base_session.synchronize
        cand_run, cand_sync = self.cand_session.run, self.cand_session.synchronize
        offset = len(self.base_medians) * m
        base_t, cand_t = [0] * m, [0] * m
        for j in range(m):
            x = pool[(offset + j) % k]
            for base_turn in ((True, False) if order[j] else (False, True)):
                run, sync = (base_run, base_sync) if base_turn else (cand_run, cand_sync)
                yield_()
                t0 = clock()
                run(x)
                sync()
                t1 = clock()
                if base_turn:
                    base_t[j] = t1 - t0
                else:
                    cand_t[j] = t1 - t0
        self.base_first.append("".join("b" if o else "c" for o in order))
        self.base_medians.append(float(np.median(base_t)) / 1e9)
        self.cand_medians.append(float(np.median(cand_t)) / 1e9)
        self.base_samples.extend(base_t)
        self.cand_samples.extend(cand_t)

    def to_dict(self, config: GateConfig) -> dict:
        confidence = 1 - 2 * config.alpha_per_look
        d = stats.paired_slowdown(self.base_medians, self.cand_medians, config.max_slowdown, confidence) \
            if self.base_medians else None
        base_s, cand_s = np.asarray(self.base_samples) / 1e9, np.asarray(self.cand_samples) / 1e9
        return {
            "name": self.name, "batch": self.batch, "base": self.base.describe(), "candidate": self.cand.describe(),
            "decision": self.decision, "decided_at_round": self.decided_at,
            "slowdown": d.slowdown.to_dict() if d else None, "slowdown_confidence": confidence,
            "p_regression": self.p_regression, "p_pass": self.p_pass,
            "rounds": len(self.base_medians), "calls_per_round": self.calls_per_round,
            "base_p50_s": float(np.median(base_s)) if len(base_s) else None,
            "candidate_p50_s": float(np.median(cand_s)) if len(cand_s) else None,
            "round_medians_s": {"base": self.base_medians, "candidate": self.cand_medians},
            "pair_order": self.base_first,
            "samples_s": {"base": base_s.tolist(), "candidate": cand_s.tolist()},
            "warmup": self.warmup,
        }


def look(comparisons: list[Comparison], config: GateConfig, rounds: int) -> None:
    """Test every undecided comparison now; Holm across all comparisons at this look's alpha."""
    for c in comparisons:
        if c.decided_at is None and c.base_medians:
            log_ratios = np.log(np.asarray(c.cand_medians) / np.asarray(c.base_medians))
            c.p_regression, c.p_pass = stats.paired_p_values(log_ratios, config.max_slowdown)
    adj_reg = stats.holm([c.p_regression for c in comparisons])
    adj_pass = stats.holm([c.p_pass for c in comparisons])
    for c, pr, pp in zip(comparisons, adj_reg, adj_pass):
        if c.decided_at is None:
            c.decision = stats.decide(pr, pp, config.alpha_per_look)
            if c.decision != "inconclusive":
                c.decided_at = rounds


def run_rounds(comparisons: list[Comparison], config: GateConfig, progress=None, started: float | None = None) -> dict:
    """Warm up, then rounds and looks until every comparison is decided, the looks run out, or
    ``config.max_time_s`` after ``started`` (perf_counter; default now) would pass."""
    rng = random.Random(config.seed)
    schedule = config.look_schedule()
    t0 = time.perf_counter() if started is None else started
    for c in comparisons:
        # Warm-up may take at most a quarter of what loading left of the budget, so rounds get the rest.
        remaining = config.max_time_s - (time.perf_counter() - t0)
        c.prepare(config, max(0.5, remaining / (4 * len(comparisons))))
    task = progress.add_task("A/B rounds", total=schedule[-1]) if progress is not None else None
    rounds = looks = 0
    round_cost = 0.0
    while looks < len(schedule):
        pending = [c for c in comparisons if c.decided_at is None]
        if not pending:
            break
        out_of_time = time.perf_counter() - t0 + round_cost > config.max_time_s
        if out_of_time or rounds == schedule[looks]:
            if rounds:
                look(comparisons, config, rounds)
                looks += 1
            if out_of_time:
                break
            continue
        r0 = time.perf_counter()
        for c in pending:
            c.round(rng)
        round_cost = time.perf_counter() - r0
        rounds += 1
        if task is not None:
            progress.update(task, completed=rounds)
    return {"rounds": rounds, "looks": looks, "seconds": time.perf_counter() - t0, "schedule": schedule}


def _pairs(specs: list[str]) -> list[tuple[str, str]]:
    if len(specs) < 2 or len(specs) % 2:
        raise BenchError(f"compare takes BASE CAND pairs, got {len(specs)} argument(s)", "pass BASE CAND [BASE2 CAND2 ...]")
    return [(specs[i], specs[i + 1]) for i in range(0, len(specs), 2)]


def _check_same_inputs(base: Subject, cand: Subject, base_session, cand_session) -> None:
    if base.preprocess.input_size != cand.preprocess.input_size:
        raise BenchError(f"input shapes differ: {base.artifact} takes {base.preprocess.input_size} px, "
                         f"{cand.artifact} takes {cand.preprocess.input_size} px", "compare models that take the same input")
    a, b = base_session.input_shape, cand_session.input_shape
    if a and b and len(a) == len(b) and any(x is not None and y is not None and x != y for x, y in zip(a[1:], b[1:])):
        raise BenchError(f"input shapes differ: {base.artifact} takes {a}, {cand.artifact} takes {b}",
                         "compare models that take the same input")


def compare(specs: list[str], targets: list[str] | None = None, runtime: str | None = None, batches=(1,),
            threads: int | None = None, device: str = "cpu", data: str | None = None, config: GateConfig = GateConfig(),
            flags=None, weights=None, progress=None) -> dict:
    """Interleaved A/B comparison of BASE CAND pairs (artifacts or models); returns the JSON document."""
    from vitc.models.intake import PreprocessFlags

    started = time.perf_counter()  # --max-time bounds the whole decision: loading, warm-up and rounds
    flags = flags or PreprocessFlags()
    threads = threads or fp.allowed_cpus()
    status = (lambda text: progress.console.print(f"[dim]{text}[/dim]")) if progress is not None else None
    warnings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vitc-compare-") as tmp:
        pools = PoolCache(data, HarnessConfig().pool_batches, max(batches))
        comparisons = []
        for i, (base_spec, cand_spec) in enumerate(_pairs(specs)):
            base_subjects = resolve(base_spec, targets, runtime, Path(tmp) / f"base{i}", flags, weights, status, max(batches))
            cand_subjects = resolve(cand_spec, targets, runtime, Path(tmp) / f"cand{i}", flags, weights, status, max(batches))
            for base, cand in zip(base_subjects, cand_subjects):
                if base.runtime != cand.runtime:
                    warnings.append(f"{base.label} runs on {base.runtime}, {cand.label} on {cand.runtime}")
                base_session, _ = base.open(threads, device)
                cand_session, _ = cand.open(threads, device)
                _check_same_inputs(base, cand, base_session, cand_session)
                for s in (base_session, cand_session):
                    warnings.extend(s.fallbacks())
                name = f"{base.label} vs {cand.label}" if base.label != cand.label else base.label
                for batch in batches:
                    check_batch(base_session, base, batch)
                    check_batch(cand_session, cand, batch)
                    comparisons.append(Comparison(name, base, cand, base_session, cand_session,
                                                  pools.get(base.preprocess, batch), batch))
        if threads > fp.allowed_cpus():
            warnings.append(f"{threads} threads on {fp.allowed_cpus()} allowed CPUs; threads will contend")
        summary = run_rounds(comparisons, config, progress, started)
    results = [c.to_dict(config) for c in comparisons]
    for r in results:
        if r["decision"] == "inconclusive":
            warnings.append(f"{r['name']} b={r['batch']}: inconclusive after {r['rounds']} rounds "
                            f"(slowdown {pct_interval(r['slowdown'])}); raise --max-time or quiet the machine")
    decision = overall([r["decision"] for r in results])
    settings = {"specs": specs, "targets": targets, "runtime": runtime, "batches": list(batches), "threads": threads,
                "device": device, "data": data or "bundled:eval", "gate": config.to_dict()}
    sessions = [{"label": f"{c.name} {arm}", "session": s.describe()} for c in comparisons
                for arm, s in (("base", c.base_session), ("candidate", c.cand_session))]
    return document("compare", with_sessions(fp.fingerprint(), sessions), settings, comparisons=results, decision=decision,
                    exit_code=EXIT_CODES[decision], run=summary, warnings=list(dict.fromkeys(warnings)))


def check(baseline: str | Path, model: str | None = None, max_slowdown: float = 0.05, alpha: float = 0.05,
          max_time_s: float | None = None, device: str = "cpu", flags=None, weights=None, progress=None) -> dict:
    """Measure again what ``baseline`` (a ``vitc bench --out`` JSON) measured and test for a slowdown.

    Refuses when this environment's fingerprint differs from the baseline's: a number from
    another machine or library version says nothing about a regression here.
    """
    from vitc.bench import schema
    from vitc.models.intake import PreprocessFlags

    stored = schema.load(baseline, "bench")
    current = fp.fingerprint()
    diffs = fp.differences(stored.get("fingerprint", {}), current)
    if diffs:
        raise BenchError(f"{baseline} was measured in another environment ({'; '.join(diffs[:3])}"
                         f"{'; ...' if len(diffs) > 3 else ''})",
                         "stored latencies only compare on the same machine and versions: run vitc bench compare BASE CAND in one job")
    flags = flags or PreprocessFlags()
    settings = stored.get("settings", {})
    harness = HarnessConfig(**{**settings.get("harness", {}), **({"max_time_s": max_time_s} if max_time_s else {})})
    entries = stored.get("results", [])
    if not entries:
        raise BenchError(f"{baseline} holds no results", "write it with vitc bench --out")
    results, warnings = [], []
    with tempfile.TemporaryDirectory(prefix="vitc-check-") as tmp:
        pools = PoolCache(settings.get("data"), harness.pool_batches, max(e["batch"] for e in entries))
        opened: dict = {}
        for e in entries:
            spec = model or e.get("spec") or e["artifact"]
            key = (spec, e["target"])
            if key not in opened:
                is_artifact = Path(spec).suffix in ARTIFACT_SUFFIXES
                subject = resolve(spec, None if is_artifact else [e["target"]], e["runtime"] if is_artifact else None,
                                  Path(tmp) / str(len(opened)), flags, weights)[0]
                opened[key] = (subject, *subject.open(e["threads"], device))
            subject, session, load_s = opened[key]
            check_batch(session, subject, e["batch"])
            new = measure(session, pools.get(subject.preprocess, e["batch"]), e["batch"], harness, subject.label, e["threads"])
            warnings.extend(new["warnings"])
            base_units = stats.block_medians(e["samples_s"], 10)
            cand_units = stats.block_medians(new["samples_s"], 10)
            ratio, dist = stats.bootstrap_ratio(base_units, cand_units, 1 - 2 * alpha)
            limit = 1 + max_slowdown
            results.append({
                "name": e["label"], "batch": e["batch"], "artifact": spec, "runtime": e["runtime"],
                "slowdown": {"value": ratio.value - 1, "lo": ratio.lo - 1, "hi": ratio.hi - 1},
                "p_regression": stats.bootstrap_p_greater(dist, limit),
                "p_pass": stats.bootstrap_p_greater(-dist, -limit),
                "baseline_p50_s": e["stats"]["p50"]["value"], "candidate_p50_s": new["stats"]["p50"]["value"],
                "candidate": {k: v for k, v in new.items() if k != "warnings"},
            })
    adj_reg = stats.holm([r["p_regression"] for r in results])
    adj_pass = stats.holm([r["p_pass"] for r in results])
    for r, pr, pp in zip(results, adj_reg, adj_pass):
        r["decision"] = stats.decide(pr, pp, alpha)
    decision = overall([r["decision"] for r in results])
    then, now = (stored.get("fingerprint", {}).get("load_average") or [None])[0], (current.get("load_average") or [None])[0]
    if then is not None and now is not None and abs(now - then) > 0.5 * current["cpus_allowed"]:
        # Unpaired runs cannot cancel a change in background load; compare can.
        warnings.append(f"the 1-minute load average was {then:.1f} for the baseline and is {now:.1f} now; "
                        "the check may mistake load for speed (vitc bench compare interleaves and does not)")
    out_settings = {"baseline": str(baseline), "model": model, "max_slowdown": max_slowdown, "alpha": alpha,
                    "harness": harness.to_dict(), "device": device, "threads": entries[0]["threads"]}
    return document("check", current, out_settings, comparisons=results, decision=decision,
                    exit_code=EXIT_CODES[decision], warnings=list(dict.fromkeys(warnings)))
