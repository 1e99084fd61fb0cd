"""``vitc report``: the HTML (self-contained) and markdown report of a sweep's results folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import ForceOpt, console


def report_cmd(
    results: Path = typer.Argument(..., help="the --out-dir of a vitc sweep"),
    out: Path = typer.Option(Path("report.html"), "--out", help="HTML report to write (one file, the plot embedded)"),
    md: Optional[Path] = typer.Option(None, "--md", help="markdown report to write (default: beside --out, .md; its plot as .png beside it)"),
    force: ForceOpt = False,
) -> None:
    """Write the Pareto plot, the table of all points, each point's recipe, parity and quantization sensitivity."""
    from vitc.artifacts import check_writable
    from vitc.sweep.report import write_report

    md = md or out.with_suffix(".md")
    for path in (out, md, md.with_suffix(".png")):
        check_writable(path, force)
    written = write_report(results, out, md, force=force)
    console.print(f"wrote {written['html']} and {written['md']} ({written['points']} points)")
