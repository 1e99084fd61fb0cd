"""``vitc bench``: latency per target, ``vitc bench compare`` (A/B gate) and ``vitc bench check`` (against a baseline).

Exit codes are the gate's contract with CI: 0 pass, 1 regression, 2 inconclusive, 3 harness
error. Every failure here, usage errors included, exits 3, so a typo never reads as a verdict.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .common import (InputSizeOpt, InterpOpt, MeanOpt, OutOpt, ResizeOpt, StdOpt, ThreadsOpt, WeightsOpt,
                     console, progress)

HARNESS_ERROR = 3


class _UsageExit3:
    """Usage errors inside ``vitc bench`` become BenchErrors (exit 3), like any other harness error.

    Caught by shape, not class: typer vendors its own click, whose exceptions are not click's.
    """

    @staticmethod
    def _as_bench_error(exc: Exception):
        from vitc.bench.errors import BenchError

        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            return BenchError(exc.format_message().rstrip("."), "see vitc bench --help")
        return None

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            converted = self._as_bench_error(exc)
            if converted is None:
                raise
            raise converted from exc

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except Exception as exc:
            converted = self._as_bench_error(exc)
            if converted is None:
                raise
            raise converted from exc


class BenchGroup(_UsageExit3, TyperGroup):
    pass


class BenchCommand(_UsageExit3, TyperCommand):
    pass


bench_app = typer.Typer(cls=BenchGroup, invoke_without_command=True, no_args_is_help=False, add_completion=False,
                        help="Latency per target with sound statistics; compare and check gate regressions in CI.")

TargetsOpt = typer.Option(None, "--targets", help="comma list of torch, compile, pt2e (PyTorch x86 int8), onnx, openvino, tensorrt, coreml (exports as needed)")
RuntimeOpt = typer.Option(None, "--runtime", help="override the runtime the artifact's type picks: torch, onnxruntime, openvino, tensorrt, coreml")
BatchListOpt = typer.Option("1", "--batch", help="batch sizes, e.g. 1,8,32")
DeviceOpt = typer.Option("cpu", "--device", help="cpu, cuda, tensorrt (ONNX Runtime providers), GPU/NPU (OpenVINO)")
MdOpt = typer.Option(None, "--md", help="also write the table as markdown (for a PR comment) to this file")
SlowdownOpt = typer.Option("5%", "--max-slowdown", help="largest acceptable slowdown of the candidate, e.g. 5% or 0.05")
AlphaOpt = typer.Option(0.05, "--alpha", help="family-wise rate of false alarms the gate allows")


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _fraction(text: str) -> float:
    from vitc.bench.errors import BenchError

    try:
        value = float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 10:
        raise BenchError(f"--max-slowdown '{text}' is not a fraction or percentage", "pass e.g. 5% or 0.05")
    return value


def _flags(input_size, resize, mean, std, interpolation):
    from vitc.commands.common import _triple
    from vitc.models.intake import PreprocessFlags

    return PreprocessFlags(input_size, resize, _triple(mean, "--mean"), _triple(std, "--std"), interpolation)


def _guarded(work):
    """Run ``work``; every failure becomes a BenchError (exit 3), so it never reads as regression (1) or inconclusive (2)."""
    from vitc.bench.errors import BenchError
    from vitc.errors import VitcError

    try:
        return work()
    except BenchError:
        raise
    except VitcError as exc:
        raise BenchError(exc.problem, exc.fix) from exc
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise BenchError(f"harness error: {type(exc).__name__}: {first}", "run again with --debug for the traceback") from exc


def _emit(doc: dict, out: Path | None, md: Path | None, png: Path | None = None) -> None:
    from vitc.artifacts import atomic_path, write_json
    from vitc.bench.report import markdown, print_doc

    print_doc(doc, console)
    _emit_profiles(doc, png)
    if out:
        write_json(out, doc)
    if md:
        with atomic_path(Path(md), force=True) as tmp:
            tmp.write_text(markdown(doc))


def _emit_profiles(doc: dict, png: Path | None) -> None:
    from vitc.artifacts import atomic_path
    from vitc.bench.profile import peak_table, profile_table, stacked_png

    entries = []
    for r in doc.get("results", []):
        prof = r.get("profile")
        if prof and prof.get("available"):
            console.print(profile_table(f"{r['label']} b={r['batch']}", prof))
            entries.append((f"{r['label']} b={r['batch']}", prof))
        elif prof:
            console.print(prof["note"])
    if doc.get("peaks") and doc["kind"] != "peak":
        console.print(peak_table(doc["peaks"]))
    if png is not None and entries:
        with atomic_path(Path(png), force=True) as tmp:
            stacked_png(entries, tmp)


@bench_app.callback()
def bench(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="a model spec (zoo:, hf:, ...) or an artifact (.onnx, .xml, .engine, .mlpackage)"),
    targets: Optional[str] = TargetsOpt,
    runtime: Optional[str] = RuntimeOpt,
    batch: str = BatchListOpt,
    threads: ThreadsOpt = None,
    device: str = DeviceOpt,
    data: Optional[str] = typer.Option(None, "--data", "-d", help="images for the input pool and top-1 (default: the bundled eval slice, no top-1)"),
    max_time: float = typer.Option(30.0, "--max-time", help="seconds of steady state per target and batch at most"),
    min_time: float = typer.Option(1.0, "--min-time", help="seconds of steady state per target and batch at least"),
    max_warmup: float = typer.Option(10.0, "--max-warmup", help="seconds of warm-up at most (it ends earlier once three windows agree within 2%)"),
    weights: WeightsOpt = None,
    out: OutOpt = None,
    md: Optional[Path] = MdOpt,
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    interpolation: InterpOpt = None,
    profile: bool = typer.Option(False, "--profile", help="add a per-op profile by op kind (runtime's own profiler) and GEMM GOP/s against the measured peak"),
    profile_runs: int = typer.Option(20, "--profile-runs", help="calls averaged in each profile"),
    peak: bool = typer.Option(False, "--peak", help="measure int8/bf16/f32 GEMM peaks (one large MatMul in each runtime's kernels); without --model, only that"),
    png: Optional[Path] = typer.Option(None, "--png", help="with --profile: write a stacked bar per artifact and batch (ms by op kind) to this PNG"),
) -> None:
    """Latency of a model or artifact per target and batch size: p50/p90/p99 with confidence bounds, throughput, warnings."""
    if ctx.invoked_subcommand is not None:
        return
    from vitc.bench.errors import BenchError

    def work():
        from vitc.bench.harness import HarnessConfig
        from vitc.bench.runner import parse_batches, run, run_peaks

        if png is not None and not profile:
            raise BenchError("--png draws the profile", "add --profile")
        if png is not None and png.suffix.lower() != ".png":
            raise BenchError(f"--png {png} does not end in .png", "pass a path ending in .png")
        if profile_runs < 1:
            raise BenchError(f"--profile-runs {profile_runs} is not a positive count", "pass e.g. --profile-runs 20")
        if model is None and peak:
            runtimes = [r for r in (_split(runtime) or ["onnxruntime", "openvino", "torch"])]
            return run_peaks(runtimes, threads)
        if model is None:
            raise BenchError("vitc bench needs --model", "pass --model MODEL_OR_ARTIFACT, or use vitc bench compare / check")
        if min_time < 0 or max_time <= 0 or min_time > max_time:
            raise BenchError(f"--min-time {min_time} and --max-time {max_time} do not make a window", "pass 0 <= --min-time <= --max-time")
        config = HarnessConfig(min_time_s=min_time, max_time_s=max_time, warmup_max_s=max(0.0, max_warmup))
        with progress() as prog:
            doc = run(model, _split(targets), runtime, parse_batches(batch), threads, device, data, data is not None,
                      config, _flags(input_size, resize, mean, std, interpolation), weights, prog,
                      profile=profile or peak, profile_runs=profile_runs)
            if not profile:  # --peak with a model: the peaks, not the per-op profiles
                for r in doc["results"]:
                    r.pop("profile", None)
            return doc

    doc = _guarded(work)
    _emit(doc, out, md, png)


@bench_app.command("compare", cls=BenchCommand)
def compare_cmd(
    specs: List[str] = typer.Argument(..., help="BASE CAND [BASE2 CAND2 ...]: artifacts or model specs"),
    targets: Optional[str] = TargetsOpt,
    runtime: Optional[str] = RuntimeOpt,
    batch: str = BatchListOpt,
    threads: ThreadsOpt = None,
    device: str = DeviceOpt,
    data: Optional[str] = typer.Option(None, "--data", "-d", help="images for the input pool (default: the bundled eval slice)"),
    max_slowdown: str = SlowdownOpt,
    max_time: float = typer.Option(60.0, "--max-time", help="seconds for the whole decision (loading, warm-up, A/B rounds) before answering inconclusive"),
    alpha: float = AlphaOpt,
    max_warmup: float = typer.Option(3.0, "--max-warmup", help="seconds of warm-up per arm at most"),
    round_time: float = typer.Option(0.2, "--round-time", help="seconds per arm in one A/B round (its median is one unit)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the round order (default: random)"),
    weights: WeightsOpt = None,
    out: OutOpt = None,
    md: Optional[Path] = MdOpt,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
) -> None:
    """A/B gate: interleaved randomised rounds of BASE and CAND; exit 0 pass, 1 regression, 2 inconclusive, 3 error."""
    def work():
        from vitc.bench.errors import BenchError
        from vitc.bench.gate import GateConfig, compare
        from vitc.bench.runner import parse_batches

        if not 0 < alpha < 0.5 or max_time <= 0:
            raise BenchError(f"--alpha {alpha} / --max-time {max_time} out of range", "pass 0 < --alpha < 0.5 and a positive --max-time")
        config = GateConfig(max_slowdown=_fraction(max_slowdown), alpha=alpha, max_time_s=max_time, seed=seed,
                            warmup_max_s=max(0.0, max_warmup), round_s=max(1e-4, round_time))
        with progress() as prog:
            return compare(specs, _split(targets), runtime, parse_batches(batch), threads, device, data, config,
                           _flags(input_size, None, mean, std, None), weights, prog)

    doc = _guarded(work)
    _emit(doc, out, md)
    raise typer.Exit(doc["exit_code"])


@bench_app.command("check", cls=BenchCommand)
def check_cmd(
    baseline: Path = typer.Option(..., "--baseline", help="results JSON written by vitc bench --out on this machine"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="measure this instead of what the baseline measured"),
    max_slowdown: str = SlowdownOpt,
    max_time: Optional[float] = typer.Option(None, "--max-time", help="seconds of steady state per entry (default: the baseline's)"),
    alpha: float = AlphaOpt,
    device: str = DeviceOpt,
    weights: WeightsOpt = None,
    out: OutOpt = None,
    md: Optional[Path] = MdOpt,
    input_size: InputSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
) -> None:
    """Measure again and compare against stored results; refuses when the environment differs (use compare then)."""
    def work():
        from vitc.bench.gate import check

        with progress() as prog:
            return check(baseline, model, _fraction(max_slowdown), alpha, max_time, device,
                         _flags(input_size, None, mean, std, None), weights, prog)

    doc = _guarded(work)
    _emit(doc, out, md)
    raise typer.Exit(doc["exit_code"])
