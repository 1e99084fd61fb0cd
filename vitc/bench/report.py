"""Rendering bench documents: rich tables for the terminal, markdown for a PR comment."""
from __future__ import annotations

import math


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def ms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return f"{seconds * 1e3:.3f}" if seconds < 0.01 else f"{seconds * 1e3:.2f}"


def ms_ci(q: dict) -> str:
    if not _finite(q.get("lo")):  # NaN in memory, null once read back from --out JSON
        return f"{ms(q['value'])} (n too small for a CI)"
    return f"{ms(q['value'])} [{ms(q['lo'])}, {ms(q['hi'])}]"


def size(nbytes: int | None) -> str:
    if not nbytes:
        return "-"
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def pct_interval(d: dict | None) -> str:
    if not d:
        return "-"
    if not (_finite(d["lo"]) and _finite(d["hi"])):
        return f"{d['value']:+.1%} (too few units for a CI)"
    return f"{d['value']:+.1%} [{d['lo']:+.1%}, {d['hi']:+.1%}]"


def bench_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    has_top1 = any("top1" in r for r in doc["results"])
    header = ["target", "precision", "size", "batch", "p50 ms [95% CI]", "p90 ms", "p99 ms", "images/s", "cv"]
    header += ["top-1"] if has_top1 else []
    header += ["runtime"]
    rows = []
    for r in doc["results"]:
        s = r["stats"]
        row = [r["label"], str(r["precision"]), size(r["size_bytes"]), str(r["batch"]), ms_ci(s["p50"]), ms(s["p90"]["value"]),
               ms(s["p99"]["value"]), f"{r['throughput_ips']:.1f}", f"{s['cv']:.1%}"]
        row += [f"{100 * r['top1']:.2f}%" if "top1" in r else "-"] if has_top1 else []
        device = str(r["session"].get("device", ""))
        row += [r["session"]["runtime"] + ("" if device.upper().startswith("CPU") else f" {device}")]
        rows.append(row)
    return header, rows


def gate_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    check = doc["kind"] == "check"
    header = ["comparison", "batch", "baseline p50 ms" if check else "base p50 ms", "candidate p50 ms",
              "slowdown [CI]", "rounds" if not check else "units", "decision"]
    rows = []
    for c in doc["comparisons"]:
        rows.append([c["name"], str(c["batch"]), ms(c.get("baseline_p50_s", c.get("base_p50_s"))), ms(c["candidate_p50_s"]),
                     pct_interval(c["slowdown"]), "10+10 blocks" if check else str(c["rounds"]), c["decision"]])
    return header, rows


def peak_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    header = ["runtime", "M x K x N", "int8 GOP/s", "bf16 GOP/s", "f32 GOP/s", "notes"]
    fmt = lambda v: f"{v:.0f}" if v else "-"
    return header, [[rt, " x ".join(map(str, p["shape"])), fmt(p.get("int8")), fmt(p.get("bf16")), fmt(p.get("f32")),
                     "; ".join(p.get("notes", []))] for rt, p in doc["peaks"].items()]


def rows_for(doc: dict):
    if doc["kind"] == "peak":
        return peak_rows(doc)
    return bench_rows(doc) if doc["kind"] == "bench" else gate_rows(doc)


def title(doc: dict) -> str:
    s = doc["settings"]
    if doc["kind"] == "bench":
        return f"vitc bench: {s['spec']}"
    if doc["kind"] == "peak":
        return f"vitc bench --peak: GEMM peaks at {s['threads']} threads (best call of one large MatMul in each runtime's kernels)"
    if doc["kind"] == "compare":
        return f"vitc bench compare (max slowdown {s['gate']['max_slowdown']:.0%}): {doc['decision'].upper()}"
    return f"vitc bench check against {s['baseline']} (max slowdown {s['max_slowdown']:.0%}): {doc['decision'].upper()}"


def print_doc(doc: dict, console) -> None:
    from rich.table import Table

    header, rows = rows_for(doc)
    table = Table(title=title(doc))
    for col in header:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    fpr = doc["fingerprint"]
    console.print(f"[dim]{fpr['cpu_model']}, {fpr['cpus_allowed']} CPUs allowed, {fpr['memory_gib']} GiB, {fpr['os']}, "
                  f"{doc['settings'].get('threads', '?')} threads, fingerprint {fpr['id']}[/dim]")
    for w in doc.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}")


def markdown(doc: dict) -> str:
    header, rows = rows_for(doc)
    fpr = doc["fingerprint"]
    lines = [f"### {title(doc)}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines += ["", f"<sub>{fpr['cpu_model']}, {fpr['cpus_allowed']} CPUs allowed, {fpr['memory_gib']} GiB, {fpr['os']}, "
                  f"{doc['settings'].get('threads', '?')} threads, "
                  f"versions {', '.join(f'{k} {v}' for k, v in fpr['versions'].items())}; fingerprint `{fpr['id']}`</sub>"]
    if doc.get("warnings"):
        lines += [""] + [f"> :warning: {w}" for w in doc["warnings"]]
    return "\n".join(lines) + "\n"
