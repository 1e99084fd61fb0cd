"""``vitc quantize --integer-only`` end to end on the tiny ViT and real bundled images, and its bad inputs."""
from __future__ import annotations

import json

from vitc.cli import run


def test_integer_only_command_writes_a_bit_exact_graph(tiny_vit_dir, tmp_path, capsys):
    out_dir, report = tmp_path / "int", tmp_path / "r.json"
    code = run(["quantize", "--integer-only", "-m", f"hf:{tiny_vit_dir}", "--calib-size", "32", "--calib", "minmax",
                "--eval-size", "40", "-o", str(out_dir), "--out", str(report), "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    r = json.loads(report.read_text())
    assert (out_dir / "model.onnx").exists() and (out_dir / "integer.json").exists()
    assert r["exact_images"] == 40 and r["exact_mismatches"] == 0
    assert r["eval_images"] == 40 and r["calibration_images"] == 32
    assert "bit-exact" in capsys.readouterr().out


def test_integer_only_keeps_the_int8_promise_on_the_trained_vit(tmp_path, capsys):
    """Agreement is held to the product's int8 promise (98%) on the trained zoo ViT; a random-weight
    tiny ViT has near-tied logits, so it only checks the mechanics above."""
    report = tmp_path / "r.json"
    code = run(["quantize", "--integer-only", "-m", "zoo:vit-c10", "--calib-size", "32", "--calib", "minmax",
                "--eval-size", "200", "-o", str(tmp_path / "int"), "--out", str(report), "--threads", "1"])
    assert code == 0, capsys.readouterr().err
    r = json.loads(report.read_text())
    assert r["eval_images"] == 200 and r["top1_agreement"] >= 0.98 and r["exact_mismatches"] == 0
    assert abs(r["top1_drop"]) <= 0.01  # a fraction (docs/json.md): within one point of FP32


def test_integer_only_refuses_widths_above_8(tiny_vit_dir, tmp_path, capsys):
    out_dir = tmp_path / "int"
    assert run(["quantize", "--integer-only", "-m", f"hf:{tiny_vit_dir}", "--abits", "16", "-o", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --integer-only needs --abits between 2 and 8") and err.count("\n") == 1
    assert not out_dir.exists()


def test_integer_only_names_the_layer_without_an_integer_version(tiny_mobilevit_dir, tmp_path, capsys):
    out_dir = tmp_path / "int"
    code = run(["quantize", "--integer-only", "-m", f"hf:{tiny_mobilevit_dir}", "--calib-size", "8", "-o", str(out_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "conv_stem" in err and "without --integer-only" in err and err.count("\n") == 1
    assert not out_dir.exists()
