"""Options and helpers shared by every CLI command, so flags have one name and one meaning."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

import sys

# Outside a terminal (CI logs, pipes) rich would wrap tables at 80 columns; module paths need more.
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="zoo:<name>, hf:<dir>, timm:<name>, pkg.module:factory, FILE.pt2, FILE.pt, FILE.onnx")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="weights for timm: and module:factory models (safetensors or state dict)")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="folder, .tar/.tar.gz archive, flat folder + labels.tsv, or bundled:calib / bundled:eval")]
LabelsOpt = Annotated[Optional[Path], typer.Option("--labels", help="labels file (index and file columns) for a flat folder of images")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="write the figures as JSON to this file")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="where to write the artifact")]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite an existing output")]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed of the deterministic image subset")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: the CPUs this process may use)")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="images per batch")]
ConvertOpt = Annotated[bool, typer.Option("--convert-rgb", help="convert grayscale/RGBA images to RGB instead of refusing them")]
InputSizeOpt = Annotated[Optional[int], typer.Option("--input-size", help="model input side in pixels (overrides the model's config)")]
ResizeOpt = Annotated[Optional[int], typer.Option("--resize", help="short side before the center crop")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="normalisation mean, e.g. 0.485,0.456,0.406")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="normalisation std, e.g. 0.229,0.224,0.225")]
InterpOpt = Annotated[Optional[str], typer.Option("--interpolation", help="bilinear or bicubic")]
AllowUnlabelledOpt = Annotated[bool, typer.Option("--allow-unlabelled", help="leave out images the labels file does not list (default: refuse them)")]
FitOpt = Annotated[Optional[str], typer.Option("--fit", help="crop (short side to --resize, center crop) or letterbox (long side to --input-size, zero-pad)")]


def allowed_cpus() -> int:
    """CPUs this process may run on (its affinity), never the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def positive(value, flag: str, minimum: int = 1):
    """Refuse a numeric flag below ``minimum`` (0 and negatives never silently mean "default")."""
    from vitc.errors import VitcError

    if value is not None and value < minimum:
        raise VitcError(f"{flag} {value} is {'not positive' if minimum == 1 else f'below {minimum}'}",
                        f"pass {flag} {minimum} or more, or leave it out for the default")
    return value


def set_threads(threads: int | None) -> int:
    import torch

    positive(threads, "--threads")
    n = threads or allowed_cpus()
    torch.set_num_threads(n)
    return n


def _triple(text: str | None, flag: str):
    from vitc.errors import VitcError

    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise VitcError(f"{flag} '{text}' is not three numbers", f"pass {flag} as R,G,B, e.g. 0.5,0.5,0.5")
    if flag == "--std" and min(vals) <= 0:  # dividing by 0 makes every pixel Inf/NaN
        raise VitcError(f"--std '{text}' has a value that is not positive", "pass three positive numbers, e.g. 0.229,0.224,0.225")
    return vals


def load_backbone(model: str, weights: Path | None = None, input_size: int | None = None, resize: int | None = None,
                  mean: str | None = None, std: str | None = None, interpolation: str | None = None,
                  fit: str | None = None):
    from vitc.errors import VitcError
    from vitc.models.intake import PreprocessFlags, load_model

    if interpolation not in (None, "bilinear", "bicubic"):
        raise VitcError(f"--interpolation '{interpolation}' is not supported", "use bilinear or bicubic")
    if fit not in (None, "crop", "letterbox"):
        raise VitcError(f"--fit '{fit}' is not supported", "use crop or letterbox")
    positive(input_size, "--input-size")
    positive(resize, "--resize")
    flags = PreprocessFlags(input_size, resize, _triple(mean, "--mean"), _triple(std, "--std"), interpolation, fit)
    backbone = load_model(model, str(weights) if weights else None, flags)
    if input_size is not None:
        probe_input_size(backbone, input_size)
    return backbone


def probe_input_size(backbone, size: int) -> None:
    """Run one blank image at ``--input-size``: a model that cannot take that size fails here, in
    one line, instead of deep inside the first batch."""
    import torch

    from vitc.errors import VitcError

    if backbone.module is None:
        return
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, size, size))
    except Exception as exc:
        raise VitcError(f"{backbone.source} cannot take {size}x{size} inputs (--input-size {size}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})",
                        "pass the input size the model was built for, or leave --input-size out") from None


def progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # off a terminal (CI logs, pipes) a transient bar shows nothing useful and leaves a blank line before an error
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=True, disable=not err_console.is_terminal)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"
