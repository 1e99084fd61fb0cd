"""The sweep report: self-contained HTML rendered in headless Chromium (plot loaded, table rows
present), and its markdown twin."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vitc.cli import run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _results(folder: Path) -> list[dict]:
    """A results folder in the sweep's own format, written through its Store (three points, one
    quantized with sensitivity, one that failed)."""
    from vitc.sweep.store import Store

    store = Store(folder)
    space = {"vitc_space": 1, "base": {}, "params": {"merge.r": [None, 4], "quantize.bits": [None, 8]}, "strategy": "grid"}
    store.open({"model": "zoo:vit-c10", "space_sha256": "x", "space": space, "targets": ["onnx", "openvino"],
                "device": "cpu-x86", "data": "bundled:eval", "eval_size": 100})
    points = [("p-base", [], {"merge.r": None, "quantize.bits": None}, 0.75, {"onnx": 1.00, "openvino": 0.90}, 3.2e6),
              ("p-q8", ["quantize"], {"merge.r": None, "quantize.bits": 8}, 0.74, {"onnx": 0.80, "openvino": 0.60}, 0.9e6),
              ("p-m4q8", ["merge", "quantize"], {"merge.r": 4, "quantize.bits": 8}, 0.745, {"onnx": 0.55, "openvino": 0.45}, 0.9e6)]
    for pid, passes, params, top1, lat, size in points:
        parity = {"passed": True, "images": 64, "top1_agreement": 0.98, "max_abs_logit_error": 0.05, "mean_abs_logit_error": 0.01}
        store.append({"kind": "eval", "id": pid, "params": params, "passes": passes, "top1": top1, "top5": 0.97, "images": 100,
                      "flops": 116e6, "params_count": 810000, "recipe": {"model": "zoo:vit-c10", "passes": [{p: {}} for p in passes]},
                      "artifacts": {t: {"path": f"points/{pid}/{t}/model", "precision": "int8" if passes else "fp32", "status": "passed",
                                        "size_bytes": size, "parity": parity} for t in ("onnx", "openvino")},
                      "sensitivity": [{"layer": "vit.encoder.layer.5.output.dense", "sqnr_db": 18.5},
                                      {"layer": "classifier", "sqnr_db": 24.1}] if "quantize" in passes else []})
        for t, ms in lat.items():
            store.append({"kind": "latency", "id": pid, "target": t, "batch": 1, "threads": 1, "p50_ms": ms,
                          "ci_ms": [ms * 0.98, ms * 1.02], "cv": 0.02, "samples": 100, "device": "cpu-x86"})
    store.append({"kind": "error", "id": "p-bad", "params": {"merge.r": 40}, "error": "r=40 removes every token"})
    return store.records()


def test_report_renders_in_headless_chromium(tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (CI installs it: apt-get install -y chromium)")
    _results(tmp_path / "res")
    html_path, md = tmp_path / "report.html", tmp_path / "report.md"
    assert run(["report", str(tmp_path / "res"), "--out", str(html_path), "--md", str(md)]) == 0
    text = html_path.read_text()
    assert not re.search(r"(src|href)=['\"](https?:|//)", text)  # self-contained: no external resource
    profile = tmp_path / "chromium-profile"
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                          "--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=90).stdout
    m = re.search(r"plot loaded: (\d+)x(\d+)", dom)
    assert m, "the page's script did not see the Pareto plot load: " + dom[:300]
    assert int(m.group(1)) > 400 and int(m.group(2)) > 200
    rows = re.findall(r"<tr class=\"point[^\"]*\" data-id=\"([^\"]+)\"", dom)
    assert sorted(rows) == ["p-base", "p-m4q8", "p-q8"]
    front_rows = re.findall(r"<tr class=\"point front\" data-id=\"([^\"]+)\"", dom)
    assert set(front_rows) == {"p-base", "p-m4q8"}  # p-q8 is slower and less accurate than p-m4q8
    assert "vit.encoder.layer.5.output.dense" in dom and "18.5" in dom  # the quantize pass's sensitivity
    assert "98.00%" in dom  # parity agreement per target
    assert "r=40 removes every token" in dom
    assert "yes: p-m4q8 (merge+quantize)" in dom  # faster than the best single technique at no worse accuracy


def test_markdown_report_and_bad_folders(tmp_path, capsys):
    _results(tmp_path / "res")
    md = tmp_path / "r.md"
    assert run(["report", str(tmp_path / "res"), "--out", str(tmp_path / "r.html"), "--md", str(md)]) == 0
    text = md.read_text()
    assert "![Pareto plot](r.png)" in text and (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [l for l in text.splitlines() if l.startswith("| p-")]
    assert len(table) == 3 and table[0].startswith("| p-base | none |")
    # existing outputs are refused without --force; a folder with no sweep is one line
    assert run(["report", str(tmp_path / "res"), "--out", str(tmp_path / "r.html"), "--md", str(md)]) == 2
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "x.html")]) == 2
    assert "holds no sweep" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()
