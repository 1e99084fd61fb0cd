"""The CLI of the foundation: info, eval, --out JSON, one-line errors, --debug, start-up time."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from vitc.cli import run


def test_help_starts_fast_without_heavy_imports():
    code = ("import sys, vitc.cli; heavy = [m for m in ('transformers', 'onnx', 'onnxruntime', 'openvino', 'nncf', "
            "'coremltools', 'matplotlib', 'torch') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"vitc.cli imports heavy modules at start-up: {out}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "vitc.cli", "--help"], capture_output=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 1.0, f"vitc --help took {cpu:.2f} s of CPU"


def test_info_lists_the_zoo_as_json(tmp_path, capsys):
    out = tmp_path / "zoo.json"
    assert run(["info", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {m["kind"] for m in data["models"]} == {"vit", "hybrid", "cnn"}
    assert all(m["spec"].startswith("zoo:") for m in data["models"])
    assert "vit-c10" in capsys.readouterr().out


def test_info_model_prints_params_flops_structure(tiny_mobilevit_dir, tmp_path, capsys):
    out = tmp_path / "info.json"
    assert run(["info", "--model", f"hf:{tiny_mobilevit_dir}", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "hybrid" and data["parameters"] > 0 and data["flops"] > 0
    assert len(data["structure"]["bridges"]) == 3
    text = capsys.readouterr().out
    assert "FLOPs" in text and "bridge:" in text


def test_eval_reports_top1_top5_and_writes_json(tiny_vit_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert run(["eval", "--model", f"hf:{tiny_vit_dir}", "--eval-size", "50", "--batch-size", "25", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["images"] == 50 and r["images_per_s"] > 0
    assert r["data"].endswith("eval.tar") and r["runtime"] == "torch"
    # the same 50 images scored independently of vitc.evaluate: top-1/top-5 must match to the image
    import torch

    from vitc.calibration.data import iter_batches, label_map
    from vitc.calibration.sources import open_source
    from vitc.models.intake import load_model

    model = load_model(f"hf:{tiny_vit_dir}")
    src = open_source("bundled:eval").select(50, 0)
    mapping = label_map(src, model.labels)
    hit1 = hit5 = 0
    for x, y in iter_batches(src, model.preprocess, 50):
        y = torch.as_tensor(mapping[y.numpy()]) if mapping is not None else y
        with torch.no_grad():
            top5 = model(x).topk(5, -1).indices
        hit1 += int((top5[:, 0] == y).sum())
        hit5 += int((top5 == y[:, None]).any(-1).sum())
    assert r["top1"] == hit1 / 50 and r["top5"] == hit5 / 50


def test_eval_on_onnx_file_matches_torch(tiny_resnet, tmp_path):
    import torch

    path = tmp_path / "m.onnx"
    torch.onnx.export(tiny_resnet.module, (tiny_resnet.example_input(1),), str(path), dynamo=False,
                      input_names=["pixel_values"], output_names=["logits"],
                      dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
    outs = []
    for model in (f"hf:{tiny_resnet.source[3:]}", str(path)):
        o = tmp_path / f"{len(outs)}.json"
        assert run(["eval", "--model", model, "--eval-size", "40", "--out", str(o)]) == 0
        outs.append(json.loads(o.read_text()))
    assert outs[1]["runtime"] == "onnxruntime"
    # class names of the ONNX file are unknown, but the count and order match the CIFAR folders
    assert outs[0]["top1"] == pytest.approx(outs[1]["top1"], abs=0.026)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "vitc.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_errors_are_one_line_without_traceback(tmp_path):
    r = _cli("info", "--model", "zoo:not-a-model")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: unknown zoo model 'not-a-model'")
    assert "Traceback" not in r.stderr
    r = _cli("eval", "--model", "zoo:not-a-model", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("eval", "--model", "missing.onnx", "--data", str(empty))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_eval_bad_data_folder(tiny_vit_dir, tmp_path):
    (tmp_path / "d").mkdir()
    r = _cli("eval", "--model", f"hf:{tiny_vit_dir}", "--data", str(tmp_path / "d"))
    assert r.returncode == 2 and "no images in" in r.stderr and "Traceback" not in r.stderr


def test_sigterm_leaves_no_half_artifact(tiny_vit_dir, tmp_path):
    """A CI timeout's SIGTERM unwinds the export: the staging folder goes, nothing is left."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "vitc.cli", "export", "--model", f"hf:{tiny_vit_dir}", "--target", "all",
                             "-o", str(out / "m")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(p.name.startswith(".") for p in out.iterdir()):
        time.sleep(0.01)
    assert proc.poll() is None, "the export finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(out.iterdir()) == []


def test_a_swallowed_sigterm_still_publishes_nothing(tmp_path, monkeypatch):
    """A SIGTERM whose exception Python drops (it landed in a finalizer, as one did in regex's
    Group.__del__) is still recorded: the next atomic publish raises instead of renaming."""
    import pytest

    from vitc import artifacts

    monkeypatch.setattr(artifacts, "_TERMINATING", [])

    class Finalized:
        def __del__(self):
            artifacts.terminate(15)  # raised inside __del__: Python prints it and carries on

    Finalized()
    assert artifacts.terminated() == 143
    with pytest.raises(SystemExit) as exc:
        with artifacts.atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text("{}")
    assert exc.value.code == 143 and list(tmp_path.iterdir()) == []
