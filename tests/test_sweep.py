"""Sweeps: points, parallel compression, one measuring worker, resumable JSONL, Pareto fronts,
successive halving, Ray, and the bad inputs of the issue."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from vitc.cli import run

SPACE = """\
base:
  calibration: {size: 16}
  passes:
    - quantize: {calibrator: minmax}
  export: {parity_size: 8}
  bench: {max_time_s: 0.3, min_time_s: 0.1, min_samples: 10}
params:
  merge.r: [null, 4]
  quantize.bits: [8]
"""
EVAL = 16


@pytest.fixture(scope="module")
def local_sweep(tiny_vit_dir, tmp_path_factory):
    """A 2-point sweep run by the CLI with a process pool of 2."""
    folder = tmp_path_factory.mktemp("sweep")
    space = folder / "space.yaml"
    space.write_text(SPACE)
    out = folder / "res"
    code = run(["sweep", "--model", f"hf:{tiny_vit_dir}", "--space", str(space), "--eval-size", str(EVAL),
                "--targets", "onnx", "--out-dir", str(out), "--jobs", "2", "--out", str(folder / "summary.json")])
    assert code == 0
    return {"space": space, "out": out, "summary": json.loads((folder / "summary.json").read_text())}


def _records(folder: Path) -> list[dict]:
    return [json.loads(l) for l in (folder / "results.jsonl").read_text().splitlines() if l.strip()]


def test_sweep_records_points_latency_and_front(local_sweep):
    recs = _records(local_sweep["out"])
    assert all(r["schema"] == 1 for r in recs)
    evals = [r for r in recs if r["kind"] == "eval"]
    lats = [r for r in recs if r["kind"] == "latency"]
    assert len(evals) == 2 and len(lats) == 2
    assert sorted(tuple(r["passes"]) for r in evals) == [("merge", "quantize"), ("quantize",)]
    for r in evals:
        assert r["images"] == EVAL
        # the point's top-1 (its PyTorch simulation) against its own exported int8 graph on the same images:
        # at most one image apart (int8 parity promises 98% agreement)
        from vitc.evaluate import evaluate
        from vitc.calibration.data import DataSpec
        from vitc.models.intake import load_model
        from vitc.runtimes import open_session

        art = load_model(str(local_sweep["out"] / r["artifacts"]["onnx"]["path"]))
        source = DataSpec("bundled:eval", None, EVAL, 0).open()
        top1 = evaluate(open_session(art.onnx_path), source, art.preprocess, art.labels)["top1"]
        assert abs(top1 - r["top1"]) <= 1 / EVAL + 1e-9
        assert (local_sweep["out"] / r["artifacts"]["onnx"]["path"]).exists()
        assert r["artifacts"]["onnx"]["parity"]["top1_agreement"] >= 0.98  # the int8 parity promise
        assert r["artifacts"]["onnx"]["status"] == "passed"
    merged = next(r for r in evals if "merge" in r["passes"])
    plain = next(r for r in evals if "merge" not in r["passes"])
    assert merged["flops"] < plain["flops"]  # r=4 removes tokens
    for r in lats:
        assert r["target"] == "onnx" and r["batch"] == 1 and r["ci_ms"][0] <= r["p50_ms"] <= r["ci_ms"][1]
    s = local_sweep["summary"]
    front = s["fronts"]["onnx"]["front_2d"]
    assert front and set(front) <= {r["id"] for r in evals}
    # the front is exactly the non-dominated set of (top-1 up, latency down)
    pts = {p["id"]: (p["top1"], p["latency"]["onnx"]["p50_ms"]) for p in s["points"]}
    for pid, (acc, lat) in pts.items():
        dominated = any(a >= acc and l <= lat and (a, l) != (acc, lat) for q, (a, l) in pts.items() if q != pid)
        assert (pid in front) == (not dominated)


def test_sweep_resumes_where_it_stopped(local_sweep, tiny_vit_dir):
    out = local_sweep["out"]
    before = _records(out)
    args = ["sweep", "--model", f"hf:{tiny_vit_dir}", "--space", str(local_sweep["space"]), "--eval-size", str(EVAL),
            "--targets", "onnx", "--out-dir", str(out), "--jobs", "1"]
    assert run(args) == 0
    assert _records(out) == before  # nothing redone
    # interrupted while writing the last latency: a torn line; the rerun measures only that point
    lines = (out / "results.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert last["kind"] == "latency"
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    assert run(args) == 0
    after = _records(out)
    assert [r["kind"] for r in after].count("eval") == 2
    redone = [r for r in after if r["kind"] == "latency" and r["id"] == last["id"]]
    assert len(redone) == 1 and len([r for r in after if r["kind"] == "latency"]) == 2


def test_ray_sweep_matches_local_point_for_point(local_sweep, tiny_vit_dir, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'vitc[ray]'")
    from vitc.sweep import load_space, run_sweep
    from vitc.sweep.executors import local_device

    device = local_device()
    ray.init(num_cpus=2, resources={f"device:{device}": 1}, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_sweep(f"hf:{tiny_vit_dir}", load_space(local_sweep["space"]), ["onnx"], "bundled:eval",
                            tmp_path / "ray", eval_size=EVAL, jobs=2, ray="auto")
    finally:
        ray.shutdown()
    local = {r["id"]: r for r in _records(local_sweep["out"]) if r["kind"] == "eval"}
    remote = {r["id"]: r for r in _records(tmp_path / "ray") if r["kind"] == "eval"}
    assert set(remote) == set(local)
    for pid, r in remote.items():
        assert r["top1"] == local[pid]["top1"] and r["top5"] == local[pid]["top5"]
        assert r["weights_sha256"] == local[pid]["weights_sha256"]  # same compressed weights, bit for bit
    lats = [r for r in _records(tmp_path / "ray") if r["kind"] == "latency"]
    assert len(lats) == 2 and all(r["executor"] == "ray" and r["device"] == device for r in lats)
    assert len(summary["points"]) == 2


def test_pareto_functions():
    from vitc.sweep import pareto

    pts = [{"id": "a", "top1": 0.80, "lat": 3.0}, {"id": "b", "top1": 0.78, "lat": 2.0},
           {"id": "c", "top1": 0.77, "lat": 2.5}, {"id": "d", "top1": 0.70, "lat": 1.0}, {"id": "e", "top1": 0.70, "lat": 1.0}]
    obj = [("top1", 1), ("lat", -1)]
    assert {p["id"] for p in pareto.front(pts, obj)} == {"a", "b", "d", "e"}  # c is dominated by b; ties both kept
    assert [sorted(p["id"] for p in f) for f in pareto.layers(pts, obj)] == [["a", "b", "d", "e"], ["c"]]
    assert {p["id"] for p in pareto.keep_best(pts, obj, 2)} == {"a", "b"}  # last front cut by top-1
    flat = [{"id": "base", "passes": [], "top1": 0.80, "latency_ms": 3.0},
            {"id": "q", "passes": ["quantize"], "top1": 0.795, "latency_ms": 2.0},
            {"id": "m", "passes": ["merge"], "top1": 0.70, "latency_ms": 1.0},
            {"id": "mq", "passes": ["merge", "quantize"], "top1": 0.796, "latency_ms": 1.5}]
    f = pareto.front(flat, [("top1", 1), ("latency_ms", -1)])
    v = pareto.beats_single_technique(flat, f, top1_budget=0.01)
    assert v["single"] == "q" and v["better"] == "mq"  # m is outside the 1-point budget
    v = pareto.beats_single_technique(flat[:3], pareto.front(flat[:3], [("top1", 1), ("latency_ms", -1)]), 0.01)
    assert v["better"] is None and v["answer"].startswith("no")


def test_halving_keeps_the_best_fraction_on_growing_subsets(monkeypatch, tmp_path):
    """Successive halving with a stand-in executor (the compress job itself is covered above)."""
    from vitc.recipes.schema import Source
    from vitc.sweep import runner
    from vitc.sweep.space import parse_space
    from vitc.sweep.store import Store

    space = parse_space({"params": {"merge.r": [None, 2, 4, 6]}, "strategy": "halving",
                         "halving": {"eta": 2, "rungs": 3, "min_images": 8}}, Source("space"))
    seen = []

    class Fake:
        def compress(self, jobs):
            for j in jobs:
                r = j["params"]["merge.r"] or 0
                seen.append((j["rung"], j["recipe"]["evaluate"]["size"], r))
                # more merging: fewer FLOPs, lower accuracy; r=6 is dominated by nothing but is least accurate
                yield {"id": j["id"], "params": j["params"], "rung": j["rung"], "kind": j["kind"],
                       "top1": 0.9 - 0.02 * r, "flops": 100 - 5 * r, "params_count": 1000,
                       "recipe": j["recipe"], "passes": ["merge"] if r else []}

    store = Store(tmp_path / "h")
    store.open({"model": "m", "space_sha256": space.digest(), "targets": ["onnx"], "device": "d", "data": "x", "eval_size": 64})
    finals = runner._select(space, "m", ["onnx"], "x", 64, 0, store, Fake(), None, lambda t: None)
    assert [(rung, size) for rung, size, _ in seen] == [(0, 8)] * 4 + [(1, 16)] * 2
    assert len(finals) == 1 and all(j["kind"] == "eval" and j["recipe"]["evaluate"]["size"] == 64 for j in finals)
    proxies = [r for r in store.records() if r["kind"] == "proxy"]
    assert len(proxies) == 6  # stored as they arrived, so an interrupted halving resumes


# ------------------------------------------------------------------------------ bad inputs

def _sweep(tiny_vit_dir, space: Path, out: Path, *extra) -> int:
    return run(["sweep", "--model", f"hf:{tiny_vit_dir}", "--space", str(space), "--targets", "onnx",
                "--eval-size", "8", "--out-dir", str(out), *extra])


@pytest.mark.parametrize("text,expected", [
    ("params: {merge.r: [4\n", "line 2: the space does not parse"),
    ("params:\n  squeeze.r: [1, 2]\n", "line 2: parameter 'squeeze.r' names no pass"),
    ("params:\n  quantize.bits: [8, 5]\n", "line 2: the point quantize.bits=5 is not a valid recipe"),
    ("params:\n  prune.mlp: [0.5, 1.5]\n", "line 2: the point prune.mlp=1.5 is not a valid recipe"),
    ("params:\n  merge.r: [4]\nstrategy: bayes\n", "line 3: unknown strategy 'bayes'"),
])
def test_bad_space_is_one_line(tiny_vit_dir, tmp_path, capsys, text, expected):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    assert _sweep(tiny_vit_dir, space, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{space} {expected}" in err, err
    assert not (tmp_path / "out").exists()


def test_results_of_another_schema_or_sweep_are_not_touched(local_sweep, tiny_vit_dir, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"schema": 99, "model": "x"}))
    (out / "results.jsonl").write_text('{"schema": 99, "kind": "eval"}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _sweep(tiny_vit_dir, local_sweep["space"], out) == 2
    assert "holds sweep results of schema version 99, not 1" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the same folder asked for another model
    res = local_sweep["out"]
    snapshot = (res / "results.jsonl").read_bytes()
    assert run(["sweep", "--model", "zoo:vit-c10", "--space", str(local_sweep["space"]), "--targets", "onnx",
                "--eval-size", str(EVAL), "--out-dir", str(res)]) == 2
    assert "holds another sweep (its model differ)" in capsys.readouterr().err
    assert (res / "results.jsonl").read_bytes() == snapshot
    # a report of that folder of another version is refused as well
    assert run(["report", str(out), "--out", str(tmp_path / "r.html")]) == 2
    assert "schema version 99" in capsys.readouterr().err


def test_target_without_runtime_and_device_elsewhere(local_sweep, tiny_vit_dir, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        assert run(["sweep", "--model", f"hf:{tiny_vit_dir}", "--space", str(local_sweep["space"]), "--targets", "onnx,tensorrt",
                    "--out-dir", str(tmp_path / "t")]) == 2
        assert "target tensorrt cannot be timed here: its runtime (tensorrt) is not installed" in capsys.readouterr().err
    assert _sweep(tiny_vit_dir, local_sweep["space"], tmp_path / "d", "--device", "jetson-orin") == 2
    assert "latency for device:jetson-orin cannot be measured on this machine" in capsys.readouterr().err
    assert not (tmp_path / "t").exists() and not (tmp_path / "d").exists()


def test_ray_address_that_does_not_answer_fails_fast(local_sweep, tiny_vit_dir, tmp_path, capsys):
    import socket

    pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'vitc[ray]'")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    assert _sweep(tiny_vit_dir, local_sweep["space"], tmp_path / "r", "--ray", f"127.0.0.1:{port}") == 2
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: the Ray cluster at 127.0.0.1:{port} does not answer")
    assert not (tmp_path / "r").exists()


def test_grid_and_random_points_and_their_recipes():
    from vitc.recipes.schema import Source
    from vitc.sweep.space import parse_space, point_id, point_recipe, sample_points

    doc = {"base": {"passes": [{"quantize": {"calibrator": "minmax"}}, {"merge": {"method": "tome"}}]},
           "params": {"merge.r": [None, 2, 4], "quantize.bits": [8, 6], "sparsify": ["off", "on"]}}
    grid = parse_space(doc, Source("s"))
    assert len(sample_points(grid)) == 12
    rnd = parse_space({**doc, "strategy": "random", "samples": 5, "seed": 3}, Source("s"))
    a, b = sample_points(rnd), sample_points(rnd)
    assert a == b and len(a) == 5 and len({json.dumps(p, sort_keys=True) for p in a}) == 5
    assert all(p in sample_points(grid) for p in a)
    r = point_recipe(grid, {"merge.r": 4, "quantize.bits": 6, "sparsify": "on"}, "zoo:vit-c10")
    # canonical order whatever the base lists; the point's values over the base's
    assert r["passes"] == [{"merge": {"method": "tome", "r": 4}}, {"sparsify": {}}, {"quantize": {"calibrator": "minmax", "bits": 6}}]
    off = point_recipe(grid, {"merge.r": None, "quantize.bits": 8, "sparsify": "off"}, "zoo:vit-c10")
    assert off["passes"] == [{"quantize": {"calibrator": "minmax", "bits": 8}}]
    assert point_id(r) != point_id(off) and point_id(r) == point_id(json.loads(json.dumps(r)))
