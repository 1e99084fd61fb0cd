"""``vitc merge`` end to end (in process): table, --out JSON, --viz PNG, -o description, bad input."""
from __future__ import annotations

import json

import pytest

from vitc.cli import run


def test_merge_command_writes_figures_drawing_and_description(tiny_vit_dir, tmp_path, capsys):
    out, viz, desc = tmp_path / "m.json", tmp_path / "m.png", tmp_path / "merged.json"
    rc = run(["merge", "--model", f"hf:{tiny_vit_dir}", "--method", "transform", "--r", "8", "--eval-size", "16",
              "--threads", "1", "--out", str(out), "--viz", str(viz), "--viz-images", "2", "-o", str(desc)])
    assert rc == 0, capsys.readouterr().err
    assert "merged" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["removals"] == [8, 8] and result["tokens"] == [65, 57, 49]
    assert 0 < result["flops"]["ratio"] < 1 and result["images"] == 16
    assert result["top1_drop"] == pytest.approx(result["original"]["top1"] - result["merged"]["top1"])
    assert viz.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = run(["eval", "--model", str(desc), "--eval-size", "16", "--threads", "1", "--out", str(tmp_path / "e.json")])
    assert rc == 0
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == pytest.approx(result["merged"]["top1"])


@pytest.mark.parametrize("args, message", [
    (["--r", "99"], "largest valid value is 21"),
    (["--flops", "1.5"], "outside (0, 1]"),
    (["--flops", "0"], "outside (0, 1]"),
    (["--r", "4", "--flops", "0.5"], "exactly one of --r and --flops"),
    (["--r", "4", "--method", "magic"], "unknown merge method"),
    (["--r", "4,4,4"], "3 entries but the model has 2 blocks"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tiny_vit_dir, tmp_path, capsys, args, message):
    desc = tmp_path / "merged.json"
    rc = run(["merge", "--model", f"hf:{tiny_vit_dir}", *args, "--eval-size", "4", "-o", str(desc)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not desc.exists()


def test_cnn_and_hybrid_are_refused(tiny_resnet_dir, tiny_mobilevit_dir, capsys):
    assert run(["merge", "--model", f"hf:{tiny_resnet_dir}", "--r", "4"]) == 2
    assert "is a CNN" in capsys.readouterr().err
    assert run(["merge", "--model", f"hf:{tiny_mobilevit_dir}", "--r", "4"]) == 2
    assert "grid" in capsys.readouterr().err
