"""``vitc quantize`` end to end on a tiny model, and its one-line errors with no partial output."""
from __future__ import annotations

import json

import pytest

from vitc.cli import run


def test_quantize_command_writes_model_and_json(tiny_vit_dir, tmp_path, capsys):
    out, model = tmp_path / "r.json", tmp_path / "q"
    code = run(["quantize", "-m", f"hf:{tiny_vit_dir}", "--calib-size", "32", "--eval-size", "64", "--no-latency",
                "--threads", "1", "-o", str(model), "--out", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    for key in ("fp32_top1", "quantized_top1", "top1_agreement", "top1_drop", "fp32_bytes", "quantized_bytes",
                "calibration_s", "worst_sqnr", "vit_quantizers", "latency"):
        assert key in r
    assert r["wbits"] == r["abits"] == 8 and r["calibration_images"] == 32 and r["eval_images"] == 64
    assert len(r["worst_sqnr"]) == 5 and r["top1_agreement"] >= 0.9
    assert r["quantized_bytes"] < 0.4 * r["fp32_bytes"]
    assert "top-1 agreement" in capsys.readouterr().out
    code = run(["eval", "-m", str(model), "--eval-size", "64", "--threads", "1", "--out", str(tmp_path / "e.json")])
    assert code == 0
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == pytest.approx(r["quantized_top1"])


@pytest.mark.parametrize("args, message", [
    (["--bits", "5"], "--wbits 5 is not supported"),
    (["--calib", "entropy", "--calib-size", "16"], "entropy calibrator needs at least 64"),
    (["--calib", "best"], "calibrator 'best' is not supported"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_vit_dir, tmp_path, capsys, args, message):
    model = tmp_path / "q"
    code = run(["quantize", "-m", f"hf:{tiny_vit_dir}", "--no-latency", "-o", str(model), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not model.exists()


def test_grayscale_calibration_images_are_refused(tiny_vit_dir, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "gray" / "cat"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.new("L", (32, 32), color=i * 20).save(folder / f"{i}.png")
    code = run(["quantize", "-m", f"hf:{tiny_vit_dir}", "--no-latency", "--calib", "minmax", "--calib-data",
                str(tmp_path / "gray"), "-o", str(tmp_path / "q")])
    assert code == 2 and "grayscale" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
