"""Graph-captured quantization on models vitc has no adapter for (issue 14's generality matrix).

Random weights, tiny configs, real images (the bundled CIFAR-10 slice, resized by each model's
preprocessing). Each model: at least 95% of its matmul/conv FLOPs quantized (what is left is
listed with a reason), the QDQ ONNX export matches the simulation (int8 fidelity thresholds of
``vitc.tasks``), and the saved folder reloads to the same outputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.generality_models import HAND_WRITTEN, HF_FACTORIES, hf_yolos
from vitc.compress.quantize import QuantConfig, apply
from vitc.errors import VitcError
from vitc.tasks import MIN_WORST_COSINE, fidelity, passes

MODELS = HAND_WRITTEN + HF_FACTORIES
CONFIG = QuantConfig(calibrator="minmax", sites="graph")


def _images(backbone, source, n=8):
    from vitc.calibration.data import load_tensors

    return load_tensors(source.select(n, seed=0), backbone.preprocess)[0]


def _onnx_outputs(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]


@pytest.mark.parametrize("name", MODELS)
def test_graph_quantization_covers_exports_and_reloads(name, calib_images, eval_images, tmp_path):
    from vitc.compress.quantize.saved import load_quantized, save_quantized
    from vitc.export.qdq import export_qdq_onnx
    from vitc.models.intake import load_model

    base = load_model(f"tests.generality_models:{name}")
    q = apply(base, CONFIG, _images(base, calib_images))
    cov = q.transforms[-1]["coverage"]
    # the figure: at least 95% of all matmul/conv FLOPs, attention matmuls included (these
    # models' attentions have few tokens, so the probabilities' uint8 grid keeps their mass and
    # probabilities x V is quantized; plan.PROBS_MASS_LOSS_MAX)
    assert cov["flops_share"] >= 0.95, cov["left_float"]
    assert all(s["reason"] for s in cov["left_float"])
    assert cov["bit_widths"] and all(w.endswith("A8") for w in cov["bit_widths"])

    x = _images(base, eval_images)
    with torch.no_grad():
        sim, ref = q(x), base(x)
    # the simulation stays within the documented int8 tolerance of FP32 on real images
    assert fidelity(sim, ref)["cosine_mean"] >= MIN_WORST_COSINE["int8"]

    onnx_path = export_qdq_onnx(q, tmp_path / "m.onnx")
    import onnx

    ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    parity = fidelity(_onnx_outputs(onnx_path, x)[0], sim)
    assert passes(parity, "int8") == [], parity

    save_quantized(q, tmp_path / "saved")
    back = load_quantized(tmp_path / "saved")
    with torch.no_grad():
        again = back(x)
    assert torch.allclose(again, sim, atol=1e-5, rtol=0), (again - sim).abs().max()


def test_multi_output_model_keeps_every_output(calib_images, eval_images):
    """YOLOS returns logits and boxes: both are compared, the worst deciding."""
    from vitc.backbone import Backbone
    from vitc.compress.quantize.torch_graph import apply_graph

    m = hf_yolos()
    base = Backbone(module=m, preprocess=m.vitc_preprocess, labels=[], source="yolos")
    q = apply_graph(base, CONFIG, _images(base, calib_images))
    x = _images(base, eval_images)
    with torch.no_grad():
        f = fidelity(q(x), base(x))
    assert f["outputs"] == 2 and f["cosine_worst"] > 0.98, f


def test_vit_patterns_found_by_graph(calib_images):
    """LayerNorm -> linear is considered for RepQ, softmax -> matmul log-sqrt(2) below 8 bits, in a ViT written with F.linear/einsum."""
    from vitc.models.intake import load_model

    base = load_model("tests.generality_models:functional_vit")
    q = apply(base, QuantConfig(wbits=4, abits=4, calibrator="minmax", sites="graph"), _images(base, calib_images, 16))
    rec = q.transforms[-1]
    plan = rec["plan"]
    # every norm1/norm2 of both blocks was considered; RepQ folded where it lowered the product error
    assert plan["reparameterised_norms"] and len(plan["reparameterised_norms"]) + len(plan["norms_kept_plain"]) == 4
    kinds = {(i["pattern"], i["kind"]) for s in rec["quant_plan"]["sites"] for i in s["inputs"]}
    assert ("post-softmax", "logsqrt2") in kinds
    assert any(p == "post-gelu" for p, _ in kinds)
    assert "W8A8" in rec["coverage"]["bit_widths"] and "W4A4" in rec["coverage"]["bit_widths"]  # ends stay 8-bit, said


def test_uncapturable_model_is_refused_in_one_line(calib_images):
    from vitc.models.intake import load_model

    base = load_model("tests.generality_models:branchy")
    with pytest.raises(VitcError) as err:
        apply(base, CONFIG, _images(base, calib_images))
    msg = str(err.value)
    assert "generality_models.py" in msg and "h.mean() > 0" in msg and "\n" not in msg


def _cli(args, tmp_path):
    from vitc.cli import run

    return run(["quantize", "-m", "tests.generality_models:mha_vit", "--calib", "minmax", "--calib-size", "8",
                "--eval-size", "16", "--no-latency", "--threads", "1", *args])


def test_cli_dense_model_is_saved_and_compared_with_fp32(tmp_path, capsys):
    import json

    out, model = tmp_path / "r.json", tmp_path / "q"
    assert _cli(["-o", str(model), "--out", str(out)], tmp_path) == 0
    r = json.loads(out.read_text())
    assert r["task"] == "dense" and r["fp32_top1"] is None and r["sites"] == "graph"
    # probs x V stays float at 8 bits (a tenth of this tiny ViT's FLOPs); everything else is quantized
    assert r["coverage"]["flops_share_without_attention"] >= 0.95 and r["fidelity"]["samples"] == 16
    assert r["fidelity"]["pearson_mean"] > 0.99
    saved = json.loads((model / "vitc_quant.json").read_text())
    assert saved["coverage"]["flops_share"] == r["coverage"]["flops_share"] and saved["sites"] == "graph"
    assert "coverage (torch.export" in capsys.readouterr().out
    from vitc.cli import run

    # the reloaded folder is evaluated by fidelity against its FP32 base, on the same images
    assert run(["eval", "-m", str(model), "--eval-size", "16", "--threads", "1", "--out", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())["fidelity"]
    assert e["pearson_mean"] == pytest.approx(r["fidelity"]["pearson_mean"], abs=1e-6)


def test_cli_classify_on_a_map_is_refused_before_calibration(tmp_path, capsys):
    model = tmp_path / "q"
    assert _cli(["--task", "classify", "-o", str(model)], tmp_path) == 2
    err = capsys.readouterr().err
    assert "--task classify needs class logits" in err and len(err.strip().splitlines()) == 1
    assert not model.exists()


def test_cli_strict_coverage_fails_before_saving(tmp_path, capsys):
    """The module path misses nn.MultiheadAttention's in-projection (F.linear) and its matmuls."""
    model = tmp_path / "q"
    assert _cli(["--sites", "modules", "--strict-coverage", "-o", str(model)], tmp_path) == 2
    captured = capsys.readouterr()
    assert "of the matmul/conv FLOPs are quantized" in captured.err and not model.exists()
    assert "largest ops left in float" in captured.out


def test_weight_only_names_what_it_leaves_float_and_takes_linear_subclasses(tmp_path, capsys):
    """Weight-only on nn.MultiheadAttention: its output projection (a Linear subclass whose forward
    never runs) is quantized, with nearest rounding said; the packed in-projection, a raw parameter,
    is named as left float with the share of weights covered; the folder reloads and exports."""
    import json

    from vitc.cli import run

    out, model = tmp_path / "r.json", tmp_path / "q"
    assert _cli(["--wbits", "4", "--abits", "16", "--group-size", "32", "-o", str(model), "--out", str(out)], tmp_path) == 0
    printed = capsys.readouterr().out
    wo = json.loads(out.read_text())["weight_only"]
    assert wo["layers"]["model.attns.0.out_proj"] == {"wbits": 4, "group_size": 32}
    assert wo["nearest_rounding"]["layers"] == ["model.attns.0.out_proj", "model.attns.1.out_proj"]
    left = {(r["module"], r["parameter"]) for r in wo["coverage"]["left_float"]}
    assert left == {("model.attns.0", "in_proj_weight"), ("model.attns.1", "in_proj_weight")}
    cov = wo["coverage"]
    assert cov["params_quantized"] + 2 * 3 * 64 * 64 == cov["params_total"] and 0.70 < cov["share"] < 0.72  # 71.3%
    assert "left float: model.attns.0.in_proj_weight (MultiheadAttention" in printed
    assert "warning: only 71.3% of the weight-matrix parameters are quantized" in printed.replace("\n", " ")
    assert "coverage unknown" not in printed
    assert run(["export", "-m", str(model), "--target", "onnx", "-o", str(tmp_path / "onnx"), "--eval-size", "16"]) == 0
    manifest = json.loads(next((tmp_path / "onnx").glob("*.manifest.json")).read_text())
    assert manifest["status"] == "passed"
    capsys.readouterr()
    assert _cli(["--wbits", "4", "--abits", "16", "--strict-coverage", "-o", str(tmp_path / "s")], tmp_path) == 2
    err = capsys.readouterr().err
    assert "only 71.3% of the weight-matrix parameters are quantized (below 90%); nothing was saved" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
