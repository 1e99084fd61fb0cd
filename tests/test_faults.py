"""Fault injection (issue 19): bad inputs through every command, SIGKILL mid-write, concurrent
writers on one path, a full disk, and the silent-wrong-result cases.

The table of bad inputs runs in this process (``vitc.cli.run``), so torch and the tiny models load
once; the kills, the concurrent writers and the full disk need real processes. Every bad input must
give its exit code, exactly one non-blank line on stderr (``error: ...`` naming the problem),
nothing on stdout, and leave its output path as it was (absent, or a file with the same bytes), with
no hidden staging or lock beside it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vitc.cli import run

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_EVAL = ROOT / "vitc" / "data" / "cifar10-slice" / "eval.tar"


# ----------------------------------------------------------------------------- the bad-input world

def _labels(path: Path, rows) -> Path:
    path.write_text("index\tfile\n" + "".join(f"{a}\t{b}\n" for a, b in rows))
    return path


def _tiny_onnx(path: Path, opset: int, input_name: str = "images", output_name: str = "scores") -> Path:
    """A hand-made classifier graph (mean-pool then MatMul) with its own input/output names."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
    nodes = [helper.make_node("ReduceMean", [input_name, "axes"], ["pooled"], keepdims=0) if opset >= 18 else
             helper.make_node("ReduceMean", [input_name], ["pooled"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["pooled", "w"], [output_name])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", 10])],
                              [w] + ([axes] if opset >= 18 else []))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_vit_dir):
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("faults")
    w = {"root": root, "vit": f"hf:{tiny_vit_dir}"}
    nan = root / "nanvit"
    shutil.copytree(tiny_vit_dir, nan)
    state = load_file(str(nan / "model.safetensors"))
    key = next(k for k in state if re.search(r"layers?\.1\.(mlp\.fc1|intermediate\.dense)\.weight$", k))  # v5 or v4 names
    state[key][0, 0] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    w["nan"], w["nan_key"] = f"hf:{nan}", key
    flat = root / "flat"
    flat.mkdir()
    names = []
    with tarfile.open(BUNDLED_EVAL) as tar:
        for m in tar:
            if m.isfile() and len(names) < 10:
                names.append(f"img{len(names)}.png")
                (flat / names[-1]).write_bytes(tar.extractfile(m).read())
    w["flat"] = flat
    lab = lambda name, rows: str(_labels(root / name, rows))  # noqa: E731
    w["lab_ok"] = lab("ok.tsv", [(i, n) for i, n in enumerate(names)])
    w["lab_neg"] = lab("neg.tsv", [(-1 if i == 3 else i, n) for i, n in enumerate(names)])
    w["lab_big"] = lab("big.tsv", [(99999 if i == 3 else i, n) for i, n in enumerate(names)])
    w["lab_missing"] = lab("missing.tsv", [(i, n) for i, n in enumerate(names)] + [(1, "nothere.png")])
    w["lab_unlabelled"] = lab("unl.tsv", [(i, n) for i, n in enumerate(names[:8])])
    w["lab_dup"] = lab("dup.tsv", [(i, n) for i, n in enumerate(names)] + [(5, names[0])])
    w["lab_word"] = lab("word.tsv", [("cat" if i == 2 else i, n) for i, n in enumerate(names)])
    (root / "empty.tsv").write_text("")
    w["lab_empty"] = str(root / "empty.tsv")
    (root / "nocols.tsv").write_text("a\tb\n1\timg0.png\n")
    w["lab_nocols"] = str(root / "nocols.tsv")
    (root / "short.tsv").write_text("index\tfile\n1\n")
    w["lab_short"] = str(root / "short.tsv")
    junk = root / "junkdata"
    (junk / "cat").mkdir(parents=True)
    (junk / "cat" / "a.png").write_bytes((flat / names[0]).read_bytes())
    (junk / "cat" / "notes.txt").write_text("hello")
    w["junkdata"] = junk
    brokenimg = root / "brokenimg"
    (brokenimg / "cat").mkdir(parents=True)
    (brokenimg / "cat" / "a.png").write_bytes(b"\x89PNG not really")
    w["brokenimg"] = brokenimg
    (root / "zero.onnx").write_bytes(b"")
    (root / "text.onnx").write_text("this is not a protobuf")
    (root / "bad.pt2").write_bytes(b"PK\x03\x04garbage" * 50)
    (root / "garbage.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(300))
    (root / "zero.safetensors").write_bytes(b"")
    w["old_opset"] = str(_tiny_onnx(root / "old14.onnx", 14))
    w["named_io"] = str(_tiny_onnx(root / "named.onnx", 18))
    # an ONNX graph with a NaN weight
    import onnx
    from onnx import numpy_helper

    m = onnx.load(w["named_io"])
    arr = numpy_helper.to_array(m.graph.initializer[0]).copy()
    arr[0, 0] = np.nan
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(arr, m.graph.initializer[0].name))
    onnx.save(m, str(root / "nan.onnx"))
    recipes = {
        "r500": "vitc_recipe: 1\npasses:\n  - merge: {r: 500}\nexport: {targets: []}\n",
        "badsection": "vitc_recipe: 1\nnonsense: 3\n",
        "badyaml": "passes: [merge: {r: 4}\n  - bad\n",
        "badpass": "passes:\n  - squeeze: {}\n",
        "calib0": "calibration: {size: 0}\n",
    }
    for name, text in recipes.items():
        (root / f"{name}.yaml").write_text(text)
    (root / "space_bad.yaml").write_text("base: {}\nparams: 3\n")
    (root / "space_ok.yaml").write_text("base:\n  calibration: {size: 8}\n  passes:\n    - quantize: {bits: 8}\nparams:\n"
                                        "  passes.0.quantize.calibrator: [minmax]\n")
    (root / "baseline_bad.json").write_text("{not json")
    (root / "existing.onnx").write_bytes(b"precious bytes")
    w["existing"] = root / "existing.onnx"
    w.update({k: str(root / f) for k, f in (("zero", "zero.onnx"), ("text", "text.onnx"), ("pt2", "bad.pt2"),
                                            ("tgz", "garbage.tar.gz"), ("zero_st", "zero.safetensors"), ("nan_onnx", "nan.onnx"))})
    return w


# Each case: (id, argv with {placeholders}, exit code, regex the one error line must match).
# {out} is a fresh path per case that must still be absent afterwards; {existing} a file that must keep its bytes.
E = ["eval", "--model", "{vit}", "--eval-size", "20", "--out", "{out}"]
FLAT = ["eval", "--model", "{vit}", "--data", "{flat}", "--out", "{out}", "--labels"]
X = ["export", "--model", "{vit}", "--eval-size", "20"]
Q = ["quantize", "--model", "{vit}", "--calib-size", "16", "--eval-size", "16", "--no-latency"]
M = ["merge", "--model", "{vit}", "--eval-size", "16"]
CASES = [
    # eval: silent wrong results that are now refused
    ("eval-nan-weights", E[:2] + ["{nan}"] + E[3:], 2, r"NaN outputs .*the weight \S*layers?\.1\.(mlp\.fc1|intermediate\.dense)\.weight holds NaN"),
    ("eval-nan-onnx", ["eval", "--model", "{nan_onnx}", "--eval-size", "20", "--out", "{out}"], 2, r"returns NaN outputs for 20 of 20 images \(the initializer w holds NaN\)"),
    ("eval-label-negative", FLAT + ["{lab_neg}"], 2, r"neg\.tsv line 5: class id -1 is negative"),
    ("eval-label-out-of-range", FLAT + ["{lab_big}"], 2, r"big\.tsv line 5: class id 99999 of img3\.png is out of range .*10 classes"),
    ("eval-label-missing-file", FLAT + ["{lab_missing}"], 2, r"missing\.tsv line 12 lists nothere\.png, which is not in"),
    ("eval-unlabelled-images", FLAT + ["{lab_unlabelled}"], 2, r"2 of 10 images .* have no line in .*--allow-unlabelled"),
    ("eval-label-duplicate", FLAT + ["{lab_dup}"], 2, r"dup\.tsv line 12: img0\.png is listed again \(first on line 2\)"),
    ("eval-label-not-a-number", FLAT + ["{lab_word}"], 2, r"word\.tsv line 4: class id 'cat' is not a whole number"),
    ("eval-labels-empty", FLAT + ["{lab_empty}"], 2, r"labels file .*empty\.tsv is empty"),
    ("eval-labels-no-columns", FLAT + ["{lab_nocols}"], 2, r"has no 'index' and 'file' columns"),
    ("eval-labels-short-row", FLAT + ["{lab_short}"], 2, r"short\.tsv line 2 has no 'file' value"),
    ("eval-labels-absent", FLAT + ["{root}/nolabels.tsv"], 2, r"cannot read labels file .*nolabels\.tsv"),
    # eval: numeric flags
    ("eval-std-zero", E + ["--std", "0,0,0"], 2, r"--std '0,0,0' has a value that is not positive"),
    ("eval-std-negative", E + ["--std", "0.2,-0.2,0.2"], 2, r"--std .* not positive"),
    ("eval-mean-words", E + ["--mean", "a,b,c"], 2, r"--mean 'a,b,c' is not three numbers"),
    ("eval-mean-two", E + ["--mean", "0.5,0.5"], 2, r"--mean '0.5,0.5' is not three numbers"),
    ("eval-threads-zero", E + ["--threads", "0"], 2, r"--threads 0 is not positive"),
    ("eval-threads-negative", E + ["--threads", "-2"], 2, r"--threads -2 is not positive"),
    ("eval-input-size-zero", E + ["--input-size", "0"], 2, r"--input-size 0 is not positive"),
    ("eval-input-size-7", E + ["--input-size", "7"], 2, r"cannot take 7x7 inputs"),
    ("eval-resize-zero", E + ["--resize", "0"], 2, r"--resize 0 is not positive"),
    ("eval-batch-zero", E + ["--batch-size", "0"], 2, r"--batch-size 0 is not positive"),
    ("eval-eval-size-zero", ["eval", "--model", "{vit}", "--eval-size", "0", "--out", "{out}"], 2, r"--eval-size 0 is not positive"),
    ("eval-interpolation", E + ["--interpolation", "nearest"], 2, r"--interpolation 'nearest' is not supported"),
    ("eval-fit", E + ["--fit", "stretch"], 2, r"--fit 'stretch' is not supported"),
    # eval: models and data
    ("eval-zero-byte-onnx", ["eval", "--model", "{zero}", "--out", "{out}"], 2, r"zero\.onnx is empty \(0 bytes\)"),
    ("eval-text-onnx", ["eval", "--model", "{text}", "--out", "{out}"], 2, r"text\.onnx is not a readable ONNX model"),
    ("eval-corrupt-pt2", ["eval", "--model", "{pt2}", "--out", "{out}"], 2, r"bad\.pt2 is not a readable torch\.export program"),
    ("eval-garbage-tgz", E + ["--data", "{tgz}"], 2, r"cannot read archive .*garbage\.tar\.gz"),
    ("eval-data-missing", E + ["--data", "{root}/nowhere"], 2, r"data path .*nowhere does not exist"),
    ("eval-bundled-split", E + ["--data", "bundled:test"], 2, r"unknown bundled split 'bundled:test'"),
    ("eval-data-non-image", E + ["--data", "{junkdata}"], 2, r"not an image: cat/notes\.txt"),
    ("eval-data-broken-image", E + ["--data", "{brokenimg}"], 2, r"cat/a\.png is not a readable image"),
    ("eval-model-unknown-form", ["eval", "--model", "what", "--out", "{out}"], 2, r"cannot tell what kind of model 'what' is"),
    ("eval-zoo-unknown", ["eval", "--model", "zoo:nope", "--out", "{out}"], 2, r"unknown zoo model 'nope'"),
    ("eval-hf-missing", ["eval", "--model", "hf:{root}/nohf", "--out", "{out}"], 2, r"is not a folder"),
    ("eval-weights-zero-byte", ["eval", "--model", "torch.nn:Identity", "--weights", "{zero_st}", "--input-size", "8", "--out", "{out}"],
     2, r"weights file .*zero\.safetensors is empty \(0 bytes\)"),
    # export
    ("export-nan-weights", ["export", "--model", "{nan}", "-t", "onnx", "-o", "{out}.onnx"], 2, r"NaN values in its weights, first in \S*layers?\.1\.(mlp\.fc1|intermediate\.dense)\.weight"),
    ("export-unknown-target", X + ["-t", "tflite", "-o", "{out}.onnx"], 2, r"unknown export target 'tflite'"),
    ("export-no-output", X + ["-t", "onnx"], 2, r"vitc export needs -o/--output"),
    ("export-existing", X + ["-t", "onnx", "-o", "{existing}"], 2, r"existing\.onnx already exists"),
    ("export-wrong-suffix", X + ["-t", "onnx", "-o", "{out}.txt"], 2, r"does not end in \.onnx"),
    ("export-old-opset-flag", X + ["-t", "onnx", "--opset", "13", "-o", "{out}.onnx"], 2, r"opset 13 is older than vitc exports"),
    ("export-fp16-onnx", X + ["-t", "onnx", "--precision", "fp16", "-o", "{out}.onnx"], 2, r"fp32 graphs, not fp16"),
    ("export-eval-size-zero", X[:3] + ["--eval-size", "0", "-t", "onnx", "-o", "{out}.onnx"], 2, r"--eval-size 0 is not positive"),
    ("export-max-batch-zero", X + ["-t", "onnx", "--max-batch", "0", "-o", "{out}.onnx"], 2, r"--max-batch 0 is not positive"),
    ("export-zero-byte-model", ["export", "--model", "{zero}", "-t", "onnx", "-o", "{out}.onnx"], 2, r"zero\.onnx is empty"),
    # an old-opset ONNX file is upgraded, not refused (issue 15): tests/test_onnx_in.py covers it
    ("export-trt-file", X + ["-t", "tensorrt", "-o", "{out}.engine"], 2, r"writes a folder, not"),
    ("export-threads-zero", X + ["-t", "onnx", "--threads", "0", "-o", "{out}.onnx"], 2, r"--threads 0 is not positive"),
    # quantize
    ("quantize-bits-3", Q + ["--bits", "3", "-o", "{out}"], 2, r"--wbits 3 is not supported"),
    ("quantize-calibrator", Q + ["--calib", "magic", "-o", "{out}"], 2, r"calibrator 'magic' is not supported"),
    ("quantize-calib-size-too-big", Q[:2] + ["{vit}", "--calib-size", "100000", "--eval-size", "16", "--no-latency", "-o", "{out}"], 2,
     r"--calib-size 100000 is more than the 500 images in"),
    ("quantize-calib-size-zero", Q[:2] + ["{vit}", "--calib-size", "0", "-o", "{out}"], 2, r"--calib-size 0 is not positive"),
    ("quantize-existing", Q + ["-o", "{existing}"], 2, r"existing\.onnx already exists"),
    ("quantize-integer-calib-size-zero", ["quantize", "--integer-only", "--model", "{vit}", "--calib-size", "0", "-o", "{out}"], 2,
     r"--calib-size 0 is not positive"),
    ("quantize-softmax", Q + ["--softmax", "cubic", "-o", "{out}"], 2, r"softmax 'cubic' is not supported"),
    ("quantize-threads-zero", Q + ["--threads", "0", "-o", "{out}"], 2, r"--threads 0 is not positive"),
    ("quantize-nan-model", ["quantize", "--model", "{nan}", "--calib-size", "16", "--eval-size", "16", "--no-latency", "-o", "{out}"], 2,
     r"NaN values in its weights, first in \S*layers?\.1\.(mlp\.fc1|intermediate\.dense)\.weight"),
    ("quantize-label-negative", Q + ["--data", "{flat}", "--labels", "{lab_neg}", "-o", "{out}"], 2, r"line 5: class id -1 is negative"),
    # merge
    ("merge-r-and-flops", M + ["--r", "2", "--flops", "0.5", "--out", "{out}"], 2, r"exactly one of --r and --flops"),
    ("merge-neither", M + ["--out", "{out}"], 2, r"exactly one of --r and --flops"),
    ("merge-r-500", M + ["--r", "500", "--out", "{out}"], 2, r"r=500 is too large for 64 patch tokens"),
    ("merge-flops-2", M + ["--flops", "2", "--out", "{out}"], 2, r"--flops 2.0 is outside \(0, 1\]"),
    ("merge-output-suffix", M + ["--r", "2", "-o", "{out}.txt"], 2, r"does not end in one of"),
    ("merge-viz-suffix", M + ["--r", "2", "--viz", "{out}.jpg"], 2, r"is not a \.png path"),
    ("merge-method", M + ["--r", "2", "--method", "squash", "--out", "{out}"], 2, r"unknown merge method 'squash'"),
    ("merge-label-dup", M + ["--r", "2", "--data", "{flat}", "--labels", "{lab_dup}", "--out", "{out}"], 2, r"listed again"),
    # prune / sparsify
    ("prune-importance", ["prune", "--model", "{vit}", "--importance", "psychic", "--mlp", "0.5", "-o", "{out}"], 2, r"unknown importance 'psychic'"),
    ("prune-mlp-above-1", ["prune", "--model", "{vit}", "--mlp", "1.5", "-o", "{out}"], 2, r"--mlp 1\.5 is outside \(0, 1\)"),
    ("prune-calib-size-too-big", ["prune", "--model", "{vit}", "--mlp", "0.5", "--importance", "taylor", "--calib-size", "100000",
                                  "-o", "{out}"], 2, r"--calib-size 100000 is more than the"),
    ("prune-existing", ["prune", "--model", "{vit}", "--mlp", "0.5", "-o", "{existing}"], 2, r"already exists"),
    ("sparsify-method", ["sparsify", "--model", "{vit}", "--method", "random", "-o", "{out}"], 2, r"unknown 2:4 method 'random'"),
    ("sparsify-layer", ["sparsify", "--model", "{vit}", "--layers", "no.such.layer", "-o", "{out}"], 2, r"layer 'no\.such\.layer' does not exist in the model"),
    ("sparsify-threads-zero", ["sparsify", "--model", "{vit}", "--threads", "0", "-o", "{out}"], 2, r"--threads 0 is not positive"),
    # compress (recipes)
    ("compress-merge-r-500", ["compress", "--recipe", "{root}/r500.yaml", "--model", "{vit}", "--out-dir", "{out}"], 2,
     r"r500\.yaml line 3: merge does not fit .*r=500 is too large"),
    ("compress-unknown-section", ["compress", "--recipe", "{root}/badsection.yaml", "--model", "{vit}", "--out-dir", "{out}"], 2,
     r"line 2: unknown recipe section 'nonsense'"),
    ("compress-bad-yaml", ["compress", "--recipe", "{root}/badyaml.yaml", "--model", "{vit}", "--out-dir", "{out}"], 2,
     r"line 2: the recipe does not parse"),
    ("compress-unknown-pass", ["compress", "--recipe", "{root}/badpass.yaml", "--model", "{vit}", "--out-dir", "{out}"], 2,
     r"line 2: unknown pass 'squeeze'"),
    ("compress-calib-zero", ["compress", "--recipe", "{root}/calib0.yaml", "--model", "{vit}", "--out-dir", "{out}"], 2,
     r"calibration size 0 is not positive"),
    ("compress-missing-recipe", ["compress", "--recipe", "{root}/none.yaml", "--model", "{vit}", "--out-dir", "{out}"], 2, r"cannot read the recipe .*none\.yaml"),
    # sweep / report
    ("sweep-jobs-zero", ["sweep", "--model", "{vit}", "--space", "{root}/space_ok.yaml", "--jobs", "0", "--out-dir", "{out}"], 2,
     r"--jobs 0 is not positive"),
    ("sweep-eval-size-negative", ["sweep", "--model", "{vit}", "--space", "{root}/space_ok.yaml", "--eval-size", "-1",
                                  "--out-dir", "{out}"], 2, r"--eval-size -1 is not positive"),
    ("sweep-bad-space", ["sweep", "--model", "{vit}", "--space", "{root}/space_bad.yaml", "--out-dir", "{out}"], 2, r"space_bad\.yaml line 2: 'params' must map"),
    ("report-missing", ["report", "{root}/noresults", "--out", "{out}.html"], 2, r"noresults is not a folder"),
    # bench (harness errors exit 3, as docs/bench.md says)
    ("bench-zero-byte", ["bench", "--model", "{zero}", "--out", "{out}"], 3, r"zero\.onnx is empty"),
    ("bench-missing", ["bench", "--model", "{root}/nothing.onnx", "--out", "{out}"], 3, r"nothing\.onnx does not exist"),
    ("bench-window", ["bench", "--model", "{named_io}", "--min-time", "5", "--max-time", "1", "--out", "{out}"], 3, r"do not make a window"),
    ("bench-check-baseline-missing", ["bench", "check", "--baseline", "{root}/nobase.json", "--out", "{out}"], 3, r"nobase\.json does not exist"),
    ("bench-check-baseline-garbage", ["bench", "check", "--baseline", "{root}/baseline_bad.json", "--out", "{out}"], 3, r"baseline_bad\.json is not readable JSON"),
    ("bench-compare-slowdown", ["bench", "compare", "{named_io}", "{named_io}", "--max-slowdown", "lots", "--out", "{out}"], 3,
     r"--max-slowdown 'lots' is not a fraction"),
    # info
    ("info-zoo-unknown", ["info", "--model", "zoo:nope", "--out", "{out}"], 2, r"unknown zoo model 'nope'"),
    ("info-zero-byte", ["info", "--model", "{zero}", "--out", "{out}"], 2, r"zero\.onnx is empty"),
]


def _expand(argv, w, out):
    return [a.format(**{**{k: str(v) for k, v in w.items()}, "out": str(out)}) for a in argv]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.exists() else []


def test_the_table_is_large_enough():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1][0] for c in CASES} >= {"eval", "export", "quantize", "merge", "prune", "sparsify", "compress", "sweep",
                                        "report", "bench", "info"}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, world, tmp_path, capsys):
    name, argv, code, pattern = case
    out = tmp_path / "out" / "result"
    existing = world["existing"]
    before = existing.read_bytes()
    args = _expand(argv, world, out)
    capsys.readouterr()
    got = run(args)
    stdout, stderr = capsys.readouterr()
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert got == code, f"{name}: exit {got}, stderr: {stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: not one error line:\n{stderr[-2000:]}"
    assert re.search(pattern, lines[0]), f"{name}: {lines[0]!r} does not match {pattern!r}"
    assert "unexpected" not in lines[0] and not stdout.strip(), f"{name}: stdout {stdout[-500:]!r}"
    # the output path is untouched: nothing written, nothing staged, no lock left behind
    parent = out.parent
    assert not parent.exists() or not any(parent.iterdir()), f"{name}: left {list(parent.iterdir())}"
    assert existing.read_bytes() == before and _hidden(existing.parent) == [], f"{name}: debris {_hidden(existing.parent)}"


# ----------------------------------------------------------------------------- processes: kills and races

def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
    env.pop("VITC_DEBUG", None)
    return env


def _vitc(args: list[str], **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitc.cli", *args], env=_env(**env), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _export_args(vit_dir, out: Path) -> list[str]:
    return ["export", "--model", f"hf:{vit_dir}", "-t", "onnx", "-o", str(out), "--eval-size", "32", "--threads", "1"]


def _quantize_args(vit_dir, out: Path) -> list[str]:
    return ["quantize", "--model", f"hf:{vit_dir}", "--calib-size", "16", "--eval-size", "16", "--batch-size", "8",
            "--calib", "minmax", "--no-latency", "--threads", "1", "-o", str(out)]


def _killed_at(args: list[str], point: str) -> None:
    p = _vitc(args, VITC_FAULT_KILL=point)
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, f"not killed at {point} (exit {p.returncode}): {err[-1500:]}"


EXPORT_KILLS = ["claim:held", "export:staged", "parity:batch", "export:manifest", "export:moving"]
QUANTIZE_KILLS = ["claim:held", "evaluate:batch", "atomic:staged"]


@pytest.fixture(scope="module")
def killed_runs(tiny_vit_dir, tmp_path_factory):
    """Every kill point at once, one process each, two at a time (each is a cold start)."""
    root = tmp_path_factory.mktemp("kills")
    jobs = [("export", pt, root / f"export-{pt.replace(':', '-')}" / "model.onnx") for pt in EXPORT_KILLS] + \
           [("quantize", pt, root / f"quantize-{pt.replace(':', '-')}" / "q") for pt in QUANTIZE_KILLS]
    results = {}
    for i in range(0, len(jobs), 2):
        procs = []
        for verb, point, out in jobs[i:i + 2]:
            out.parent.mkdir(parents=True)
            args = _export_args(tiny_vit_dir, out) if verb == "export" else _quantize_args(tiny_vit_dir, out)
            procs.append((verb, point, out, _vitc(args, VITC_FAULT_KILL=point)))
        for verb, point, out, p in procs:
            _, err = p.communicate(timeout=300)
            results[(verb, point)] = (out, p.returncode, err, sorted(x.name for x in out.parent.iterdir()))
    return results


@pytest.mark.parametrize("verb,point", [("export", p) for p in EXPORT_KILLS] + [("quantize", p) for p in QUANTIZE_KILLS])
def test_sigkill_leaves_no_artifact_and_the_next_run_cleans_up(verb, point, killed_runs, tiny_vit_dir, capsys):
    out, code, err, left = killed_runs[(verb, point)]
    assert code == -signal.SIGKILL, f"{verb} was not killed at {point} (exit {code}): {err[-1500:]}"
    if point == "export:moving":
        # killed between moving the artifact and its manifest: a file without its manifest is there
        # until the next run on the path, which reads the dead run's journal and rolls the move back
        assert out.name in left and f"{out.name}.manifest.json" not in left
    elif point == "evaluate:batch":
        # quantize saves the calibrated model before it evaluates (issue 14): killed while evaluating,
        # the artifact is there and complete, never half-written
        assert out.name in left and (out / "model.safetensors").exists() and (out / "vitc_quant.json").stat().st_size > 0
    else:
        assert out.name not in left and f"{out.name}.manifest.json" not in left, left
    assert any(n.startswith(f".{out.name}.") for n in left), f"no staging or lock recognisable as {out.name}'s: {left}"
    # the next run on the same path (no --force) removes the dead run's debris and succeeds
    args = _export_args(tiny_vit_dir, out) if verb == "export" else _quantize_args(tiny_vit_dir, out)
    if point == "evaluate:batch":
        args = args + ["--force"]  # a complete artifact is the user's to replace, not debris
    capsys.readouterr()
    assert run(args) == 0, capsys.readouterr().err[-2000:]
    assert _hidden(out.parent) == [], _hidden(out.parent)
    if verb == "export":
        manifest = json.loads((out.parent / f"{out.name}.manifest.json").read_text())
        assert manifest["status"] == "passed"
    else:
        assert (out / "model.safetensors").exists() and (out / "vitc_quant.json").stat().st_size > 0


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the first writer ended early: {proc.communicate()[1][-1500:]}"
        assert time.monotonic() < deadline, "the first writer never reached its pause point"
        time.sleep(0.05)


@pytest.mark.parametrize("verb", ["export", "quantize"])
def test_two_concurrent_writers_cannot_both_succeed(verb, tiny_vit_dir, tiny_resnet_dir, tmp_path):
    """Writer A pauses mid-work holding its claim; writer B (another model, same -o, no --force)
    must fail at once with exit 2 before loading anything, and A's artifact is what stays."""
    out = tmp_path / ("m.onnx" if verb == "export" else "q")
    flag = tmp_path / "go"
    a_args = (_export_args if verb == "export" else _quantize_args)(tiny_vit_dir, out)
    pause = "export:staged" if verb == "export" else "evaluate:batch"
    a = _vitc(a_args, VITC_FAULT_WAIT=f"{pause}:{flag}")
    try:
        _wait_for(Path(f"{flag}.reached"), a)
        b_args = (_export_args if verb == "export" else _quantize_args)(tiny_resnet_dir, out)
        t0 = time.monotonic()
        b = _vitc(b_args)
        b_out, b_err = b.communicate(timeout=120)
        b_seconds = time.monotonic() - t0
        lines = [l for l in b_err.splitlines() if l.strip()]
        assert b.returncode == 2 and len(lines) == 1, b_err[-1500:]
        assert re.search(rf"{out.name} is being written by another vitc run \(pid {a.pid}\)", lines[0]), lines[0]
        assert "passed" not in b_out and "wrote" not in b_out
    finally:
        flag.write_text("go")
    _, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err[-1500:]
    if verb == "export":
        manifest = json.loads((tmp_path / "m.onnx.manifest.json").read_text())
        assert manifest["source"]["model"] == f"hf:{tiny_vit_dir}" and manifest["status"] == "passed"
    else:
        assert json.loads((out / "vitc_quant.json").read_text())["base"]["spec"] == f"hf:{tiny_vit_dir}"
    assert _hidden(tmp_path) == []
    # B failed before its model was loaded: faster than A's start-up to its pause point
    assert b_seconds < 60


def test_a_stale_staging_folder_is_recognised_by_its_dead_pid(tiny_vit, tmp_path):
    from vitc.artifacts import stale_entries
    from vitc.export import export_artifact

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".m.onnx.{dead.pid}.abcd"
    stale.mkdir()
    (stale / "m.onnx").write_bytes(b"trunc")
    alive = tmp_path / f".m.onnx.{os.getppid()}.efgh"  # pytest's parent is alive: not ours to remove
    alive.mkdir()
    assert stale_entries(tmp_path / "m.onnx") == [stale]
    export_artifact(tiny_vit, "onnx", tmp_path / "m.onnx", check=False)
    assert not stale.exists() and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "m.onnx", "m.onnx.manifest.json"]


# ----------------------------------------------------------------------------- disk full

@pytest.fixture()
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; this run is not root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs ({r.stderr.strip()[:120]})")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_blames_the_disk_in_one_line(small_disk, tiny_vit_dir, tiny_vit):
    """A 160 KiB tmpfs: the tiny ViT's ONNX (~330 KiB) cannot fit, nor its quantized weights."""
    p = _vitc(_export_args(tiny_vit_dir, small_disk / "m.onnx"))
    out, err = p.communicate(timeout=300)
    lines = [l for l in err.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1, err[-2000:]
    assert re.match(r"error: no space left on the device while writing .*m\.onnx", lines[0]), lines[0]
    assert "torch cannot export" not in err and list(small_disk.iterdir()) == []
    # the quantized tiny ViT (~100 KiB) fits in 160 KiB: leave it 24 KiB
    st = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - 24 * 1024))
    p = _vitc(_quantize_args(tiny_vit_dir, small_disk / "q"))
    out, err = p.communicate(timeout=300)
    lines = [l for l in err.splitlines() if l.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "no space left on the device while writing" in lines[0], err[-2000:]
    assert list(small_disk.iterdir()) == [filler]
    filler.unlink()
    # a --out JSON that does not fit
    from vitc.artifacts import write_json
    from vitc.errors import VitcError

    with pytest.raises(VitcError, match="no space left on the device while writing .*big.json"):
        write_json(small_disk / "big.json", {"x": "y" * 400_000})
    assert list(small_disk.iterdir()) == []


# ----------------------------------------------------------------------------- artifacts and JSON

def test_quantized_weights_honour_the_umask(tiny_vit, tmp_path):
    from vitc.compress.quantize.config import QuantConfig
    from vitc.compress.quantize.ptq import apply
    from vitc.compress.quantize.saved import save_quantized

    q = apply(tiny_vit, QuantConfig(calibrator="minmax"), data="bundled:calib")
    old = os.umask(0o022)
    try:
        save_quantized(q, tmp_path / "q")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "q").iterdir()}
    assert modes == {"model.safetensors": 0o644, "vitc_quant.json": 0o644}  # safetensors alone wrote 0600
    assert (tmp_path / "q").stat().st_mode & 0o777 == 0o755


def test_bench_out_is_strict_json_with_the_graph_precision(world, tmp_path, capsys):
    out = tmp_path / "b.json"
    code = run(["bench", "--model", world["named_io"], "--batch", "1", "--min-time", "0", "--max-time", "0.01",
                "--max-warmup", "0", "--threads", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    doc = json.loads(out.read_text(), parse_constant=refuse)
    row = doc["results"][0]
    assert row["precision"] == "fp32"  # read from the graph; it said "graph"
    assert row["stats"]["p99"]["lo"] is None or isinstance(row["stats"]["p99"]["lo"], float)


def test_onnx_manifest_names_come_from_the_graph(world, tmp_path):
    assert run(["export", "--model", world["named_io"], "-t", "onnx", "-o", str(tmp_path / "n.onnx"), "--eval-size", "16"]) == 0
    m = json.loads((tmp_path / "n.onnx.manifest.json").read_text())
    assert m["input"]["name"] == "images" and m["output"]["name"] == "scores"
    # the written graph's own axes (the ONNX path names its dynamic batch axis "batch")
    import onnx

    g = onnx.load(str(tmp_path / "n.onnx")).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert m["input"]["shape"] == dims(g.input[0]) and m["output"]["shape"] == dims(g.output[0])
    assert m["input"]["shape"][1:] == [3, 8, 8] and m["output"]["shape"][1:] == [10]


def test_json_units_are_one_convention(tiny_vit_dir, tmp_path, capsys):
    """top1_drop is a fraction in quantize, merge and prune alike (docs/json.md)."""
    q, m, p = tmp_path / "q.json", tmp_path / "m.json", tmp_path / "p.json"
    assert run(_quantize_args(tiny_vit_dir, tmp_path / "q") + ["--out", str(q)]) == 0
    assert run(["merge", "--model", f"hf:{tiny_vit_dir}", "--r", "2", "--eval-size", "16", "--out", str(m)]) == 0
    assert run(["prune", "--model", f"hf:{tiny_vit_dir}", "--mlp", "0.5", "--eval-data", "bundled:eval", "--eval-size", "16",
                "--out", str(p)]) == 0
    q, m, p = (json.loads(f.read_text()) for f in (q, m, p))
    assert q["top1_drop"] == pytest.approx(q["fp32_top1"] - q["quantized_top1"])  # was 100x this (points)
    assert m["top1_drop"] == pytest.approx(m["original"]["top1"] - m["merged"]["top1"])
    assert p["stages"][1]["top1_drop"] == pytest.approx(p["stages"][0]["top1"] - p["stages"][1]["top1"])
    assert abs(q["top1_drop"]) <= 1 and abs(m["top1_drop"]) <= 1


def test_allow_unlabelled_leaves_out_what_the_labels_file_does_not_list(world, tmp_path):
    out = tmp_path / "e.json"
    assert run(["eval", "--model", world["vit"], "--data", str(world["flat"]), "--labels", world["lab_unlabelled"],
                "--allow-unlabelled", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 8
    assert run(["eval", "--model", world["vit"], "--data", str(world["flat"]), "--labels", world["lab_ok"], "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 10


def test_parity_sizes_its_default_image_count_by_cost_and_says_so(tiny_vit, monkeypatch):
    """Without --eval-size parity fits a time budget (at least MIN_IMAGES), stated in the result;
    it used to run all 1,000 images whatever the model cost (7.5 minutes for a ViT-S on OpenVINO)."""
    from vitc.export import parity

    class Same:
        name = "same"

        def __call__(self, x):
            return tiny_vit(x)

        def describe(self):
            return {"runtime": "test"}

    monkeypatch.setattr(parity, "TIME_BUDGET_S", 1e-6)  # every model is "too slow" for this budget
    r = parity.check(tiny_vit, Same(), "fp32")
    assert r["images"] == parity.MIN_IMAGES == 200 and r["passed"]
    assert r["images_chosen"].startswith("200 of 1000 images: the default parity budget")
    r = parity.check(tiny_vit, Same(), "fp32", eval_size=64)  # an explicit count always wins, with no note
    assert r["images"] == 64 and "images_chosen" not in r
