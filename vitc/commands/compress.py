"""``vitc compress --recipe``: run a recipe (passes in order, exports, evaluation, bench) into a folder.

JSON (``--out``): the manifest written as ``OUT/manifest.json`` (``recipe``, ``recipe_sha256``,
``weights``, ``artifacts`` with parity per target, ``evaluate``, ``bench``, ``sensitivity``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import ForceOpt, OutOpt, console, pct, progress

def compress_cmd(
    recipe: Path = typer.Option(..., "--recipe", "-r", help="a recipe (YAML), or the manifest.json of an artifact a recipe made (reproduces it)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model spec; overrides the recipe's model"),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="labelled images to evaluate on; overrides the recipe's evaluate.data"),
    out_dir: Path = typer.Option(..., "--out-dir", help="folder to write (weights, manifest.json, one folder per export target)"),
    force: ForceOpt = False,
    out: OutOpt = None,
) -> None:
    """Compress a model as a recipe says, export and check it, and record the recipe in every manifest."""
    from vitc.artifacts import hold, write_json
    from vitc.recipes import compress, load_recipe
    from vitc.recipes.runner import describe_passes

    r = load_recipe(recipe)
    hold(out_dir, force)  # a concurrent run on this --out-dir fails now, not after the passes
    with progress() as prog:
        manifest = compress(r, out_dir, model=model, data=data, force=force, progress=prog)
    table = Table(title=f"compress: {manifest['source']['model']} by {recipe}")
    table.add_column("step")
    table.add_column("result", overflow="fold")
    for i, text in enumerate(describe_passes(r), 1):
        table.add_row(f"pass {i}", text)
    table.add_row("weights", f"{out_dir / manifest['weights']['file']} (sha256 {manifest['weights']['sha256'][:12]})")
    for target, a in manifest["artifacts"].items():
        p = a.get("parity") or {}
        agree = f", top-1 agreement {pct(p['top1_agreement'])} on {p['images']} images" if "top1_agreement" in p else ""
        table.add_row(f"export {target}", f"{a['path']} ({a['precision']}, {a['size_bytes'] / 2**20:.2f} MiB): {a['status']}{agree}")
    if manifest["evaluate"]:
        ev = manifest["evaluate"]
        table.add_row("top-1", f"{pct(ev['top1'])} on {ev['images']} images of {ev['data']}")
    for b in manifest["bench"]:
        table.add_row(f"latency {b['target']} b={b['batch']}", f"{b['p50_ms']:.3f} ms p50 (CI {b['ci_ms'][0]:.3f}-{b['ci_ms'][1]:.3f})")
    console.print(table)
    console.print(f"wrote {out_dir} (reproduce with: vitc compress --recipe {out_dir / 'manifest.json'} --out-dir OTHER)")
    if out:
        write_json(out, manifest)
