"""The sweep report: one self-contained HTML file (the Pareto plot embedded as a base64 PNG,
no external resources) and a markdown twin, from a results folder.

Sections: settings and the single-technique verdict, the plot (top-1 against latency per
target, marker area by artifact size, the front joined), the table of every point, and per
point its recipe, parity figures per target and the quantize pass's per-layer sensitivity
(the layers with the worst output SQNR).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path


def plot_png(summary: dict) -> bytes:
    """The Pareto plot as PNG bytes (matplotlib, Agg backend: no display needed)."""
    from vitc.errors import require

    require("matplotlib", "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = summary["settings"]["targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.2), squeeze=False)
    by_id = {r["id"]: r for r in summary["points"]}
    for ax, t in zip(axes[0], targets):
        pts = [r for r in summary["points"] if r["latency"].get(t) and r["top1"] is not None]
        front = [by_id[i] for i in summary["fronts"][t]["front_2d"] if i in by_id]
        biggest = max([p["size"].get(t) or 0 for p in pts] + [1])
        sizes = [max(12.0, 90.0 * (p["size"].get(t) or 0) / biggest) for p in pts]
        ax.scatter([r["latency"][t]["p50_ms"] for r in pts], [100 * r["top1"] for r in pts], s=sizes, c="#9aa5b1",
                   label="points (area: size)", zorder=2)
        for r in pts:
            lo, hi = r["latency"][t]["ci_ms"]
            ax.plot([lo, hi], [100 * r["top1"]] * 2, color="#c5ccd3", lw=1, zorder=1)
        if front:
            ax.plot([r["latency"][t]["p50_ms"] for r in front], [100 * r["top1"] for r in front], "-o", color="#d1495b",
                    label="Pareto front", zorder=3)
            for r in front:
                ax.annotate("+".join(r["passes"]) or "base", (r["latency"][t]["p50_ms"], 100 * r["top1"]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(f"{t} latency p50 (ms, batch {pts[0]['latency'][t]['batch'] if pts else 1})")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{summary['settings']['model']} on {t}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _params(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items())


def point_details(folder: Path, records: list[dict]) -> dict:
    """Per evaluated point: its recipe, parity per target and sensitivity, from the eval records."""
    out = {}
    for r in records:
        if r["kind"] == "eval":
            out[r["id"]] = {"recipe": r["recipe"], "parity": {t: a.get("parity") for t, a in r["artifacts"].items()},
                            "status": {t: a.get("status") for t, a in r["artifacts"].items()},
                            "sensitivity": r.get("sensitivity") or []}
    return out


def render_html(summary: dict, details: dict, png: bytes) -> str:
    s = summary["settings"]
    targets = s["targets"]
    e = html.escape
    head = ("<!doctype html><html><head><meta charset='utf-8'><title>vitc sweep report</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccd;padding:3px 6px;text-align:right}th{background:#eef}td.l{text-align:left}"
            "tr.front td{background:#fff1f1}pre{background:#f6f8fa;padding:6px;font-size:12px;overflow:auto}"
            "</style></head><body>")
    parts = [head, f"<h1>Sweep report: {e(s['model'])}</h1>",
             f"<p>{len(summary['points'])} points, targets {e(', '.join(targets))}, device {e(s['device'])}, "
             f"data {e(str(s['data']))} ({e(str(s['eval_size'] or 'all'))} images), strategy {e(s['space']['strategy'])}.</p>"]
    for t in targets:
        parts.append(f"<p><b>{e(t)}</b>: front {e(', '.join(summary['fronts'][t]['front_2d']) or '-')}. "
                     f"Beats the best single technique? {e(summary['single_technique'][t]['answer'])}</p>")
    parts.append(f"<img id='pareto' alt='Pareto plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    parts.append("<p id='plot-check'>plot not checked (scripts off)</p>")
    parts.append("<h2>All points</h2><table id='points'><thead><tr><th>point</th><th>passes</th><th>params</th><th>top-1</th>"
                 "<th>top-5</th><th>MFLOPs</th>" + "".join(f"<th>{e(t)} p50 ms [CI]</th><th>{e(t)} MiB</th><th>{e(t)} parity agree</th>"
                                                        for t in targets) + "</tr></thead><tbody>")
    on_front = set().union(*(set(summary["fronts"][t]["front_2d"]) for t in targets)) if targets else set()
    for r in sorted(summary["points"], key=lambda r: -(r["top1"] or 0)):
        cells = [f"<td class='l'><a href='#p-{r['id']}'>{r['id']}</a></td>", f"<td class='l'>{e('+'.join(r['passes']) or 'none')}</td>",
                 f"<td class='l'>{e(_params(r['params']))}</td>", f"<td>{_pct(r['top1'])}</td>", f"<td>{_pct(r['top5'])}</td>",
                 f"<td>{r['flops'] / 1e6:.1f}</td>" if r["flops"] else "<td>-</td>"]
        for t in targets:
            lat = r["latency"].get(t)
            cells.append(f"<td>{lat['p50_ms']:.3f} [{lat['ci_ms'][0]:.3f}, {lat['ci_ms'][1]:.3f}]</td>" if lat else "<td>-</td>")
            cells.append(f"<td>{r['size'][t] / 2**20:.2f}</td>" if r["size"].get(t) else "<td>-</td>")
            p = r["parity"].get(t) or {}
            cells.append(f"<td>{_pct(p.get('top1_agreement'))}</td>")
        cls = "point front" if r["id"] in on_front else "point"
        parts.append(f"<tr class='{cls}' data-id='{r['id']}'>{''.join(cells)}</tr>")
    parts.append("</tbody></table><p>Rows shaded: on the accuracy/latency front of at least one target.</p>")
    if summary["errors"]:
        parts.append("<h2>Points that failed</h2><ul>" + "".join(
            f"<li>{e(x['id'])} ({e(_params(x['params']))}): {e(x['error'])}</li>" for x in summary["errors"]) + "</ul>")
    parts.append("<h2>Per point: recipe, parity, sensitivity</h2>")
    for r in summary["points"]:
        d = details.get(r["id"], {})
        parts.append(f"<h3 id='p-{r['id']}'>{r['id']}: {e('+'.join(r['passes']) or 'no pass')}</h3>")
        rows = []
        for t, p in (d.get("parity") or {}).items():
            p = p or {}
            if "top1_agreement" in p:
                rows.append(f"<tr><td class='l'>{e(t)}</td><td class='l'>{e(str(d['status'].get(t)))}</td><td>{p.get('images')}</td>"
                            f"<td>{_pct(p['top1_agreement'])}</td><td>{p['max_abs_logit_error']:.2e}</td><td>{p['mean_abs_logit_error']:.2e}</td></tr>")
            else:
                rows.append(f"<tr><td class='l'>{e(t)}</td><td class='l' colspan='5'>{e(str(p.get('skipped', 'no parity check')))}</td></tr>")
        if rows:
            parts.append("<table class='parity'><tr><th>target</th><th>status</th><th>images</th><th>top-1 agreement</th>"
                         "<th>max |Δlogit|</th><th>mean |Δlogit|</th></tr>" + "".join(rows) + "</table>")
        sens = d.get("sensitivity") or []
        if sens:
            parts.append("<p>Quantize pass, layers with the worst output SQNR:</p><table class='sensitivity'><tr><th>layer</th>"
                         "<th>SQNR (dB)</th></tr>" + "".join(f"<tr><td class='l'>{e(x['layer'])}</td><td>{x['sqnr_db']:.1f}</td></tr>"
                                                              for x in sens) + "</table>")
        if d.get("recipe"):
            parts.append(f"<details><summary>recipe</summary><pre>{e(json.dumps(d['recipe'], indent=2))}</pre></details>")
    parts.append("<script>window.addEventListener('load',function(){var i=document.getElementById('pareto');"
                 "document.getElementById('plot-check').textContent=(i.complete&&i.naturalWidth>0)?"
                 "'plot loaded: '+i.naturalWidth+'x'+i.naturalHeight:'plot failed to load';});</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(summary: dict, details: dict, png_name: str) -> str:
    s = summary["settings"]
    targets = s["targets"]
    lines = [f"# Sweep report: {s['model']}", "",
             f"{len(summary['points'])} points, targets {', '.join(targets)}, device {s['device']}, data {s['data']} "
             f"({s['eval_size'] or 'all'} images), strategy {s['space']['strategy']}.", ""]
    for t in targets:
        lines.append(f"- **{t}**: front {', '.join(summary['fronts'][t]['front_2d']) or '-'}; beats the best single technique? "
                     f"{summary['single_technique'][t]['answer']}")
    lines += ["", f"![Pareto plot]({png_name})", "",
              "| point | passes | params | top-1 | MFLOPs | " + " | ".join(f"{t} p50 ms | {t} MiB | {t} parity agree" for t in targets) + " |",
              "| --- " * (5 + 3 * len(targets)) + "|"]
    for r in sorted(summary["points"], key=lambda r: -(r["top1"] or 0)):
        cells = [r["id"], "+".join(r["passes"]) or "none", _params(r["params"]), _pct(r["top1"]),
                 f"{r['flops'] / 1e6:.1f}" if r["flops"] else "-"]
        for t in targets:
            lat = r["latency"].get(t)
            cells.append(f"{lat['p50_ms']:.3f}" if lat else "-")
            cells.append(f"{r['size'][t] / 2**20:.2f}" if r["size"].get(t) else "-")
            cells.append(_pct((r["parity"].get(t) or {}).get("top1_agreement")))
        lines.append("| " + " | ".join(cells) + " |")
    for r in summary["points"]:
        sens = details.get(r["id"], {}).get("sensitivity") or []
        if sens:
            lines += ["", f"### {r['id']} ({'+'.join(r['passes'])}): worst-SQNR layers", "",
                      ", ".join(f"{x['layer']} {x['sqnr_db']:.1f} dB" for x in sens)]
    return "\n".join(lines) + "\n"


def write_report(folder: Path | str, out: Path | str, md: Path | str | None = None, force: bool = True) -> dict:
    """Write the HTML report to ``out`` and the markdown (with a PNG beside it) to ``md``."""
    from vitc.artifacts import atomic_path

    from .runner import summarize
    from .store import load_results

    summary = summarize(folder)
    _, records = load_results(folder)
    if not summary["points"]:
        from vitc.errors import VitcError

        raise VitcError(f"{folder} holds no evaluated point yet", "run the sweep (or let it finish a point) first")
    details = point_details(Path(folder), records)
    png = plot_png(summary)
    out = Path(out)
    with atomic_path(out, force=force) as tmp:
        tmp.write_text(render_html(summary, details, png))
    written = {"html": str(out)}
    if md is not None:
        md = Path(md)
        png_path = md.with_suffix(".png")
        with atomic_path(png_path, force=force) as tmp:
            tmp.write_bytes(png)
        with atomic_path(md, force=force) as tmp:
            tmp.write_text(render_markdown(summary, details, png_path.name))
        written.update(md=str(md), png=str(png_path))
    return {**written, "points": len(summary["points"])}
