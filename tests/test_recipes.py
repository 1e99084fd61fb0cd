"""Recipes: schema validation with line numbers, composition of the passes, and bit-for-bit
reproduction from the manifest a recipe wrote."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitc.cli import run

RECIPE = """\
calibration: {data: "bundled:calib", size: 16}
passes:
  - merge: {r: 4}
  - prune: {importance: magnitude, mlp: 0.5}
  - sparsify: {method: magnitude}
  - quantize: {bits: 8, calibrator: minmax}
export:
  targets: [onnx]
  parity_size: 8
evaluate: {data: "bundled:eval", size: 16}
bench: {max_time_s: 0.3, min_time_s: 0.1, min_samples: 10}
"""


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_recipe_runs_every_pass_and_reproduces_bit_for_bit(tiny_vit_dir, tmp_path, capsys):
    recipe = _write(tmp_path, RECIPE)
    first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run(["compress", "--recipe", str(recipe), "--model", f"hf:{tiny_vit_dir}", "--out-dir", str(first)]) == 0
    m1 = json.loads((first / "manifest.json").read_text())
    assert [t["pass"] for t in m1["transforms"]] == ["merge", "prune", "sparsify", "quantize"]
    assert m1["recipe"]["model"] == f"hf:{tiny_vit_dir}"
    assert m1["recipe"]["passes"][3]["quantize"]["wbits"] == 8 and m1["recipe"]["passes"][3]["quantize"]["abits"] == 8
    assert m1["artifacts"]["onnx"]["status"] == "passed"
    assert m1["evaluate"]["images"] == 16
    # scored again from the exported int8 graph on the same 16 images: the simulation's top-1 and the
    # artifact's may differ by at most one image (int8 parity promises 98% agreement)
    ev = tmp_path / "onnx_eval.json"
    assert run(["eval", "--model", str(first / "onnx" / "model.onnx"), "--eval-size", "16", "--out", str(ev)]) == 0
    assert abs(json.loads(ev.read_text())["top1"] - m1["evaluate"]["top1"]) <= 1 / 16 + 1e-9
    assert m1["sensitivity"] and all("sqnr_db" in s for s in m1["sensitivity"])
    (lat,) = m1["bench"]  # timed through vitc's harness: one row per target and batch
    assert lat["target"] == "onnx" and lat["batch"] == 1 and lat["ci_ms"][0] <= lat["p50_ms"] <= lat["ci_ms"][1]
    # the export manifest embeds the same resolved recipe
    onnx_manifest = json.loads((first / "onnx" / "model.onnx.manifest.json").read_text())
    assert onnx_manifest["recipe"] == m1["recipe"] and onnx_manifest["recipe_sha256"] == m1["recipe_sha256"]

    # from the folder's manifest, with no --model: same weights and ONNX, byte for byte
    assert run(["compress", "--recipe", str(first / "manifest.json"), "--out-dir", str(second)]) == 0
    m2 = json.loads((second / "manifest.json").read_text())
    assert m2["weights"]["sha256"] == m1["weights"]["sha256"]
    assert m2["artifacts"]["onnx"]["files"] == m1["artifacts"]["onnx"]["files"]
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    # and from the export manifest too
    assert run(["compress", "--recipe", str(first / "onnx" / "model.onnx.manifest.json"), "--out-dir", str(third)]) == 0
    m3 = json.loads((third / "manifest.json").read_text())
    assert m3["weights"]["sha256"] == m1["weights"]["sha256"] and m3["evaluate"]["top1"] == m1["evaluate"]["top1"]
    # an existing output is refused, not overwritten
    capsys.readouterr()
    assert run(["compress", "--recipe", str(recipe), "--model", f"hf:{tiny_vit_dir}", "--out-dir", str(first)]) == 2
    assert "already exists" in capsys.readouterr().err


BAD = [
    ("passes: [merge: {r: 4}\n  - bad\n", "line 2: the recipe does not parse"),
    ("passes:\n  - squeeze: {}\n", "line 2: unknown pass 'squeeze'"),
    ("passes:\n  - quantize: {bits: 5}\n", "line 2: quantize: --wbits 5 is not supported"),
    ("passes:\n  - merge:\n      r: many\n", "line 3: merge setting r: 'many' is not int | list[int]"),
    ("passes:\n  - integer: {}\n  - merge: {r: 4}\n", "line 3: 'merge' cannot come after integer-only quantization"),
    ("passes:\n  - quantize: {}\n  - prune: {mlp: 0.5}\n", "line 3: 'prune' cannot come after quantization"),
    ("passes:\n  - sparsify: {}\n  - prune: {mlp: 0.5}\n", "line 3: 'prune' cannot come after 'sparsify'"),
    ("passes:\n  - merge: {r: 4}\n  - merge: {r: 2}\n", "line 3: pass 'merge' appears twice"),
    ("passes: []\nexport:\n  targets: [onnx, tflite]\n", "line 3: unknown export target 'tflite'"),
    ("passes: []\nexport:\n  targets: [onnx]\n  parity_images: 3\n", "line 4: unknown export setting 'parity_images'"),
    ("passes: []\ncalibrate: {size: 3}\n", "line 2: unknown recipe section 'calibrate'"),
    ("passes:\n  - prune:\n      importance: magnitude\n      mlp: 1.5\n", "line 4: prune: --mlp 1.5 is outside (0, 1)"),
]


@pytest.mark.parametrize("text,expected", BAD, ids=[b[1].split(": ", 1)[1][:30] for b in BAD])
def test_bad_recipes_fail_in_one_line_naming_the_line(tiny_vit_dir, tmp_path, capsys, text, expected):
    recipe = _write(tmp_path, text)
    out = tmp_path / "out"
    code = run(["compress", "--recipe", str(recipe), "--model", f"hf:{tiny_vit_dir}", "--out-dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert f"{recipe} {expected}" in err
    assert not out.exists()


def test_manifest_errors_name_the_manifest_line(tmp_path, capsys):
    manifest = {"format": "vitc-compressed/1", "recipe": {"model": "zoo:vit-c10", "passes": [{"quantize": {"wbits": 3}}]}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if '"wbits"' in l)
    assert run(["compress", "--recipe", str(path), "--out-dir", str(tmp_path / "o")]) == 2
    assert f"{path} line {line}: quantize: --wbits 3 is not supported" in capsys.readouterr().err
    # an export manifest vitc export wrote (no recipe) is refused by name
    path.write_text(json.dumps({"manifest_version": 1, "target": "onnx"}))
    assert run(["compress", "--recipe", str(path), "--out-dir", str(tmp_path / "o")]) == 2
    assert "artifact manifest without a recipe" in capsys.readouterr().err


def test_pass_not_installed_is_named(tmp_path, capsys, monkeypatch):
    from vitc.recipes import schema

    monkeypatch.setitem(schema.PASSES, "merge", ("vitc.compress.tokens_not_here", "MergeConfig", "token merging"))
    recipe = _write(tmp_path, "model: zoo:vit-c10\npasses:\n  - merge: {r: 4}\n")
    assert run(["compress", "--recipe", str(recipe), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "line 3: the merge pass is not installed in this vitc" in err and len(err.strip().splitlines()) == 1


def test_bench_target_without_runtime_is_refused_before_work(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here, so its target has a runtime")
    recipe = _write(tmp_path, "model: zoo:vit-c10\npasses: []\nexport: {targets: [tensorrt]}\nbench: {batch: [1]}\n")
    assert run(["compress", "--recipe", str(recipe), "--out-dir", str(tmp_path / "o")]) == 2
    assert "target tensorrt cannot be timed here: its runtime (tensorrt) is not installed" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_yaml_floats_in_exponent_form_are_numbers(tmp_path):
    from vitc.recipes import load_recipe

    r = load_recipe(_write(tmp_path, "model: zoo:vit-c10\npasses:\n  - sparsify: {method: sparsegpt, damp: 1e-3}\n"))
    assert r.passes[0][1].damp == pytest.approx(1e-3)
    assert r.to_dict()["passes"][0]["sparsify"]["damp"] == pytest.approx(1e-3)
