"""vitc bench: the harness on real sessions and real images, the A/B gate, check, and every bad input."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vitc.bench.errors import BenchError
from vitc.bench.gate import GateConfig, compare
from vitc.bench.harness import HarnessConfig, build_pool, harness_overhead_s, steady_state, timed_calls
from vitc.bench.runner import run
from vitc.bench.schema import SCHEMA, SCHEMA_VERSION
from vitc.cli import run as cli

FAST = HarnessConfig(min_samples=20, min_time_s=0.1, max_time_s=0.6, warmup_max_s=0.5, window_s=0.02)
FAST_GATE = GateConfig(round_s=0.01, warmup_max_s=0.3, max_time_s=20, seed=0)


def _export(module: torch.nn.Module, size: int, path: Path, dynamic: bool = True) -> Path:
    torch.onnx.export(module.eval(), (torch.randn(1, 3, size, size),), str(path), input_names=["pixels"], output_names=["logits"],
                      dynamic_axes={"pixels": {0: "n"}, "logits": {0: "n"}} if dynamic else None, dynamo=False)
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_vit_dir, tiny_resnet_dir):
    import transformers as T

    from vitc.models.intake import load_model

    root = tmp_path_factory.mktemp("bench")
    vit = load_model(f"hf:{tiny_vit_dir}")
    resnet = load_model(f"hf:{tiny_resnet_dir}")
    torch.manual_seed(0)
    # Same width, four times the blocks: a candidate that honestly does about 4x the work.
    cfg = T.ViTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                      intermediate_size=128, num_labels=10)
    deep = T.ViTForImageClassification(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(pixel_values=x).logits

    return {
        "vit": _export(vit.module, 32, root / "vit.onnx"),
        "vit_static": _export(vit.module, 32, root / "vit_static.onnx", dynamic=False),
        "deep": _export(Logits(deep), 32, root / "deep.onnx"),
        "resnet": _export(resnet.module, 64, root / "resnet.onnx"),
        "root": root,
    }


class CountingSession:
    def __init__(self):
        self.runs, self.syncs, self.seen = 0, 0, []

    def run(self, batch):
        self.runs += 1
        self.seen.append(id(batch))
        return batch

    def synchronize(self):
        self.syncs += 1


def test_pool_rotates_distinct_real_batches(eval_images, tiny_vit):
    from vitc.bench.runner import load_images

    images = load_images("bundled:eval", tiny_vit.preprocess, 16)
    assert images.shape == (16, 3, 32, 32) and images.dtype == np.float32
    # normalised CIFAR pixels, not noise: per-channel means near 0, values within the normalised [0, 1] range
    assert np.all(np.abs(images.mean(axis=(0, 2, 3))) < 1.0) and images.min() >= -2.1 and images.max() <= 2.2
    pool = build_pool(images, 8, 4)  # 32 slots from 16 images: batches start at different offsets
    assert len(pool) == 4 and all(p.flags["C_CONTIGUOUS"] for p in pool)
    assert all(not np.array_equal(pool[i], pool[j]) for i in range(4) for j in range(i + 1, 4))
    session = CountingSession()
    times = timed_calls(session, pool, 8)
    assert len(times) == 8 and session.runs == 8 and session.syncs == 8  # every timed call synchronises
    assert len(set(session.seen)) == 4  # cycles through the pool, not one cached tensor


class SpinSession:
    """A session whose calls take ``seconds(now)``: a machine whose speed changes over time."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def run(self, batch):
        t0 = time.perf_counter()
        self.calls.append(t0)
        end = t0 + self.seconds(t0)
        while time.perf_counter() < end:
            pass

    def synchronize(self):
        pass

    def fallbacks(self):
        return []


def test_interleaved_rounds_give_sessions_the_same_machine_states():
    from vitc.bench.harness import measure_interleaved

    start = time.perf_counter()
    slow_after = start + 0.6  # the machine halves its speed part-way through the measurement
    factor = lambda t: 2.0 if t > slow_after else 1.0
    sessions = {"a": SpinSession(lambda t: 2e-4 * factor(t)), "b": SpinSession(lambda t: 4e-4 * factor(t))}
    pool = build_pool(np.zeros((4, 3, 8, 8), np.float32), 1, 4)
    config = HarnessConfig(min_samples=40, min_time_s=0.6, warmup_max_s=0.2)
    out = measure_interleaved(sessions, {"a": pool, "b": pool}, 1, config, rounds=20)
    # both sessions were sampled across the whole period, before and after the change
    for s in sessions.values():
        assert min(s.calls) < slow_after < max(s.calls)
    ratio = out["b"]["stats"]["p50"]["value"] / out["a"]["stats"]["p50"]["value"]
    assert 1.6 < ratio < 2.5  # the true 2x survives the change; timed one after the other it would read ~1x or ~4x
    for r in out.values():
        assert r["phases"]["steady"]["stopped_by"] == "rounds" and r["stats"]["n"] >= 40
        p50 = r["stats"]["p50"]
        assert p50["lo"] <= p50["value"] <= p50["hi"]


def test_harness_overhead_is_tiny(eval_images):
    pool = build_pool(np.zeros((4, 3, 8, 8), np.float32), 1, 4)
    # a few hundred ns on this machine; 50 us would be 2% of a 2.5 ms call
    assert harness_overhead_s(pool) < 50e-6


def test_steady_state_stops_on_the_confidence_interval(artifacts, tiny_vit):
    from vitc.runtimes import open_session

    session = open_session(artifacts["vit"], threads=1)
    pool = build_pool(np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32), 2, 4)
    lenient = HarnessConfig(min_samples=20, min_time_s=0.05, max_time_s=5, target_rel_ci=0.5)
    samples, info = steady_state(session, pool, lenient, window=10)
    assert info["stopped_by"] == "ci" and len(samples) >= 20 and info["median_ci_rel_half_width"] <= 0.5
    capped = HarnessConfig(min_samples=10**9, min_time_s=0.0, max_time_s=0.3)
    samples, info = steady_state(session, pool, capped, window=10)
    assert info["stopped_by"] == "max_time" and info["seconds"] < 0.3 + 0.5  # deadline cuts chunks short


def test_bench_run_on_an_onnx_artifact(artifacts):
    doc = run(str(artifacts["vit"]), batches=[1, 2], threads=1, config=FAST)
    assert doc["schema"] == SCHEMA and doc["schema_version"] == SCHEMA_VERSION and doc["kind"] == "bench"
    fp = doc["fingerprint"]
    assert fp["cpus_allowed"] >= 1 and fp["cpu_model"] and "onnxruntime" in fp["versions"] and fp["id"]
    assert [r["batch"] for r in doc["results"]] == [1, 2]
    for r in doc["results"]:
        s = r["stats"]
        assert r["runtime"] == "onnxruntime" and r["threads"] == 1 and r["session"]["threads"] == 1
        assert s["min"] <= s["p50"]["value"] <= s["p90"]["value"] <= s["p99"]["value"] <= s["max"]
        assert s["p50"]["lo"] <= s["p50"]["value"] <= s["p50"]["hi"]
        assert len(r["samples_s"]) == s["n"] == r["phases"]["steady"]["calls"]
        assert r["throughput_ips"] == pytest.approx(r["batch"] / np.mean(r["samples_s"]), rel=1e-9)
        assert set(r["phases"]) == {"load_s", "first_inference_s", "warmup", "steady"} and r["phases"]["load_s"] > 0
        assert r["harness_overhead_share_of_p50"] < 0.02


def test_bench_targets_torch_and_top1(tiny_vit_dir, tiny_vit, eval_images, tmp_path):
    from vitc.calibration.sources import open_source
    from vitc.evaluate import evaluate

    folder = tmp_path / "images"
    for sample, data in eval_images.iter_bytes():  # 64 real CIFAR-10 images in <class>/<image> layout
        dest = folder / eval_images.classes[sample.label] / Path(sample.key).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    doc = run(f"hf:{tiny_vit_dir}", targets=["torch"], batches=[4], threads=1, config=FAST, accuracy=True, data=str(folder))
    r = doc["results"][0]
    assert r["target"] == "torch" and r["precision"] == "fp32" and r["size_bytes"] > 0
    assert doc["settings"]["data"] == str(folder)
    # top-1 through the bench session equals vitc eval's on the same images (same model, same pixels)
    expected = evaluate(tiny_vit, open_source(folder), tiny_vit.preprocess, tiny_vit.labels, 16)["top1"]
    assert r["top1"] == pytest.approx(expected, abs=1e-9)


def test_cli_bench_writes_json_and_markdown(artifacts, tmp_path, capsys):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = cli(["bench", "--model", str(artifacts["vit"]), "--batch", "1", "--threads", "1", "--max-time", "0.5",
              "--min-time", "0.1", "--max-warmup", "0.3", "--out", str(out), "--md", str(md)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["results"][0]["stats"]["p50"]["value"] > 0
    text = md.read_text()
    assert text.startswith("### vitc bench") and "| target |" in text and "p50 ms" in text
    assert "vitc bench" in capsys.readouterr().out


def test_compare_a_a_is_not_a_regression_and_4x_work_is(artifacts):
    from dataclasses import replace

    # A/A against a 50% budget: the interval of a zero difference sits well inside it, so the gate must pass
    same = compare([str(artifacts["vit"]), str(artifacts["vit"])], threads=1, config=replace(FAST_GATE, max_slowdown=0.5))
    c = same["comparisons"][0]
    assert same["kind"] == "compare" and c["decision"] == "pass" and same["exit_code"] == 0
    assert c["rounds"] >= FAST_GATE.min_rounds and len(c["round_medians_s"]["base"]) == c["rounds"]
    # in every round half the pairs run the base first, in an order drawn afresh
    assert all(o.count("b") == o.count("c") == c["calls_per_round"] // 2 for o in c["pair_order"])
    assert len(set(c["pair_order"])) > 1
    slow = compare([str(artifacts["vit"]), str(artifacts["deep"])], threads=1, config=FAST_GATE)
    c = slow["comparisons"][0]
    assert slow["decision"] == "regression" and slow["exit_code"] == 1
    assert c["slowdown"]["lo"] > 0.05 and c["slowdown"]["value"] > 0.5  # four times the blocks


def test_compare_several_batches_uses_holm(artifacts):
    doc = compare([str(artifacts["deep"]), str(artifacts["vit"])], batches=[1, 2], threads=1, config=FAST_GATE)
    assert [c["batch"] for c in doc["comparisons"]] == [1, 2]
    # the faster candidate passes at both batch sizes, each decided with Holm over the two
    assert doc["decision"] == "pass" and all(c["slowdown"]["hi"] < 0.05 for c in doc["comparisons"])


def test_cli_compare_exit_code_and_outputs(artifacts, tmp_path):
    out = tmp_path / "c.json"
    rc = cli(["bench", "compare", str(artifacts["vit"]), str(artifacts["deep"]), "--threads", "1", "--max-time", "20", "--max-warmup", "0.3",
              "--round-time", "0.02", "--seed", "1", "--out", str(out)])
    assert rc == 1 and json.loads(out.read_text())["decision"] == "regression"


def _baseline(artifacts, tmp_path) -> Path:
    out = tmp_path / "base.json"
    assert cli(["bench", "--model", str(artifacts["vit"]), "--threads", "1", "--max-time", "0.5", "--min-time", "0.2",
                "--max-warmup", "0.3", "--out", str(out)]) == 0
    return out


def test_check_against_a_baseline(artifacts, tmp_path):
    base = _baseline(artifacts, tmp_path)
    doc = json.loads(base.read_text())
    # A baseline three times faster than this artifact: the check must call it a regression...
    faster = tmp_path / "faster.json"
    doc["results"][0]["samples_s"] = [s / 3 for s in doc["results"][0]["samples_s"]]
    faster.write_text(json.dumps(doc))
    assert cli(["bench", "check", "--baseline", str(faster), "--max-time", "0.5"]) == 1
    # ...and one three times slower a pass.
    slower = tmp_path / "slower.json"
    doc["results"][0]["samples_s"] = [s * 9 for s in doc["results"][0]["samples_s"]]
    slower.write_text(json.dumps(doc))
    out = tmp_path / "check.json"
    assert cli(["bench", "check", "--baseline", str(slower), "--max-time", "0.5", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["kind"] == "check"


def _fails_with_3(argv, capsys, *words) -> str:
    rc = cli(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 3, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    for w in words:
        assert w in err
    return err


def test_bad_inputs_exit_3_with_one_line(artifacts, tmp_path, capsys):
    root = artifacts["root"]
    _fails_with_3(["bench", "--model", str(root / "nope.onnx")], capsys, "does not exist")
    _fails_with_3(["bench", "compare", str(artifacts["vit"]), str(root / "nope.onnx")], capsys, "does not exist")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    _fails_with_3(["bench", "--model", str(engine), "--input-size", "32"], capsys, "tensorrt")
    _fails_with_3(["bench", "compare", str(artifacts["vit"]), str(artifacts["resnet"])], capsys, "input shapes differ")
    _fails_with_3(["bench", "--model", str(artifacts["vit"]), "--batch", "100000000"], capsys, "does not fit in memory")
    _fails_with_3(["bench", "--model", str(artifacts["vit_static"]), "--batch", "2"], capsys, "batch 1 only")
    _fails_with_3(["bench", "--model", str(artifacts["vit"]), "--batch", "0"], capsys, "--batch")
    _fails_with_3(["bench", "compare", str(artifacts["vit"])], capsys, "pairs")
    _fails_with_3(["bench", "compare", "--no-such-flag", "a", "b"], capsys)
    _fails_with_3(["bench", "--model", str(artifacts["vit"]), "--runtime", "coreml"], capsys, "macOS")


def test_bad_baselines_exit_3_and_overwrite_nothing(artifacts, tmp_path, capsys):
    base = _baseline(artifacts, tmp_path)
    capsys.readouterr()
    out = tmp_path / "keep.json"
    out.write_text("keep")
    doc = json.loads(base.read_text())
    other_version = tmp_path / "v0.json"
    other_version.write_text(json.dumps({**doc, "schema_version": SCHEMA_VERSION + 1}))
    _fails_with_3(["bench", "check", "--baseline", str(other_version), "--out", str(out)], capsys, "schema version")
    other_machine = tmp_path / "elsewhere.json"
    other_machine.write_text(json.dumps({**doc, "fingerprint": {**doc["fingerprint"], "cpu_model": "Some Other CPU",
                                                                "versions": {**doc["fingerprint"]["versions"], "onnxruntime": "0.0"}}}))
    err = _fails_with_3(["bench", "check", "--baseline", str(other_machine), "--out", str(out)], capsys, "another environment", "compare")
    assert "Some Other CPU" in err and "onnxruntime" in err
    _fails_with_3(["bench", "check", "--baseline", str(tmp_path / "none.json"), "--out", str(out)], capsys, "does not exist")
    not_bench = tmp_path / "other.json"
    not_bench.write_text(json.dumps({"top1": 0.5}))
    _fails_with_3(["bench", "check", "--baseline", str(not_bench), "--out", str(out)], capsys, "not a vitc bench result")
    assert out.read_text() == "keep"


def test_bench_error_exit_code():
    assert BenchError("x").exit_code == 3


def test_cli_compare_exits_2_when_it_cannot_decide(artifacts, tmp_path, capsys):
    """A run that stops (--max-time) before the gate's minimum rounds cannot decide, whatever the
    two artifacts measure (an A/A on a quiet machine can show a tight 1% difference either way):
    the CLI must answer inconclusive with exit 2 and say so in --out."""
    out = tmp_path / "gate.json"
    code = cli(["bench", "compare", str(artifacts["vit"]), str(artifacts["vit"]), "--max-slowdown", "0%", "--alpha", "0.01",
                "--max-time", "0.05", "--round-time", "0.01", "--max-warmup", "0.2", "--seed", "0", "--threads", "1",
                "--out", str(out)])
    doc = json.loads(out.read_text())
    assert code == 2 and doc["decision"] == "inconclusive" and doc["exit_code"] == 2
