"""Range widening after calibration (``compress/quantize/range_search.py``): the search itself, and
both graph backends leaving the chosen grids in the model they return."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitc.compress.quantize import QuantConfig
from vitc.compress.quantize import range_search as rs
from vitc.compress.quantize.plan import Site, TensorQuant, WeightQuant


def test_output_error_is_the_per_sample_normalised_squared_error():
    ref = np.array([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 5.0]])
    q = ref + np.array([[0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]])
    err = rs.output_error([ref], [q])
    assert err == pytest.approx([0.01 / 5.0, 1.0 / 12.0])
    assert rs.search_error([ref], [q]) == pytest.approx(1.0 / 12.0)  # the worst sample
    assert rs.search_error([ref], [q], "mean") == pytest.approx((0.01 / 5.0 + 1.0 / 12.0) / 2)
    assert (rs.search_images("worst"), rs.search_images("mean")) == (rs.SEARCH_IMAGES, rs.MEAN_SEARCH_IMAGES) == (16, 64)


def test_search_keeps_the_best_factor_per_group_in_order():
    groups = {"post-gelu linear inputs": ["a", "b"], "attention logits": ["c"], "plain linear inputs": ["d"]}
    best = {"a": 1.3, "b": 1.3, "c": 1.0, "d": 1.75}
    seen = []

    def evaluate(factors):
        seen.append(dict(factors))
        return sum((factors.get(k, 1.0) - f) ** 2 for k, f in best.items())

    chosen, before, after = rs.search(groups, evaluate)
    assert chosen == {"post-gelu linear inputs": 1.3, "attention logits": 1.0, "plain linear inputs": 1.75}
    assert after == pytest.approx(0.0) and before > after
    assert len(seen) == rs.evaluations(groups) == 1 + 3 * (len(rs.WIDENINGS) - 1)
    # each group's factor applies to all its tensors at once, the earlier groups' choices kept
    assert {"a": 1.3, "b": 1.3, "d": 1.5} in seen


def test_site_groups_follow_the_pattern_and_role():
    lin = Site("fc2", "linear", 1, [TensorQuant(pattern="post-gelu")], WeightQuant())
    ln = Site("qkv", "linear", 1, [TensorQuant(pattern="post-layernorm")], WeightQuant())
    logits = Site("qk", "matmul", 1, [TensorQuant(operand=0), TensorQuant(operand=1)])
    probs = Site("pv", "matmul", 1, [TensorQuant(pattern="post-softmax"), TensorQuant(operand=1)])
    conv = Site("c", "conv", 1, [TensorQuant()], WeightQuant())
    assert [rs.site_group(s) for s in (lin, ln, logits, probs, conv)] == [
        "post-gelu linear inputs", "post-layernorm linear inputs", "attention logits", None, "conv inputs"]


def _images(base, calib_images, n):
    from vitc.calibration.data import load_tensors

    return load_tensors(calib_images.select(n, seed=0), base.preprocess)[0]


def test_graph_path_leaves_the_chosen_grids_in_the_model(calib_images):
    from vitc.compress.quantize.torch_graph import apply_graph
    from vitc.models.intake import load_model

    base = load_model("tests.generality_models:functional_vit")
    x = _images(base, calib_images, 24)
    q = apply_graph(base, QuantConfig(sites="graph"), x)
    w = q.transforms[-1]["range_widening"]
    assert set(w["groups"]) >= {"post-layernorm linear inputs", "post-gelu linear inputs", "attention logits"}
    assert all(f in rs.WIDENINGS for f in w["groups"].values()) and w["images"] == rs.SEARCH_IMAGES
    assert w["output_error_after"] <= w["output_error_before"]
    # the model returned computes what the search measured for the chosen factors
    measured = rs.search_error(rs.model_outputs(base.module, x[:rs.SEARCH_IMAGES]), rs.model_outputs(q.module, x[:rs.SEARCH_IMAGES]))
    assert measured == pytest.approx(w["output_error_after"], rel=1e-3, abs=1e-7)
    off = apply_graph(base, QuantConfig(sites="graph", range_search="off"), x).transforms[-1]
    assert off["range_widening"] is None


def test_mean_objective_searches_more_images_and_records_it(calib_images):
    """``--range-search mean``: the search minimises the mean output error over up to 64 images (the
    model returned computes it), the config turns it on for the module path too, and the record says
    which objective ran."""
    from vitc.compress.quantize.torch_graph import apply_graph
    from vitc.models.intake import load_model

    base = load_model("tests.generality_models:functional_vit")
    x = _images(base, calib_images, 40)
    config = QuantConfig(sites="graph", range_search="mean").validate()
    assert config.range_objective == "mean" and config.range_search_in("modules")
    w = apply_graph(base, config, x).transforms[-1]["range_widening"]
    assert w["objective"] == "mean" and w["images"] == 40  # all 40: fewer than MEAN_SEARCH_IMAGES
    assert w["output_error_after"] <= w["output_error_before"]
    q = apply_graph(base, config, x)
    measured = rs.search_error(rs.model_outputs(base.module, x), rs.model_outputs(q.module, x), "mean")
    assert measured == pytest.approx(w["output_error_after"], rel=1e-3, abs=1e-7)
    worst = apply_graph(base, QuantConfig(sites="graph"), x).transforms[-1]["range_widening"]
    assert worst["objective"] == "worst" and worst["images"] == rs.SEARCH_IMAGES


def test_onnx_backend_leaves_the_chosen_scales_in_the_graph(calib_images, tmp_path):
    import onnxruntime as ort
    from onnx import numpy_helper

    from vitc.compress.quantize.onnx_graph import quantize_model
    from vitc.models import onnx_source
    from vitc.models.intake import load_model

    base = load_model("tests.generality_models:functional_vit")
    x = _images(base, calib_images, 24)
    path = tmp_path / "vit.onnx"
    torch.onnx.export(base.module, x[:1], str(path), input_names=["image"], output_names=["out"], opset_version=17,
                      dynamo=False, dynamic_axes={"image": {0: "batch"}, "out": {0: "batch"}})
    model, record = quantize_model(onnx_source.read(path, x.shape[-1]), QuantConfig(), x)
    w = record["range_widening"]
    assert w["output_error_after"] <= w["output_error_before"] and w["groups"]
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = base.module(x[:rs.SEARCH_IMAGES]).detach().numpy()
    got = s.run(None, {"image": x[:rs.SEARCH_IMAGES].numpy()})[0]
    assert rs.search_error([ref], [got]) == pytest.approx(w["output_error_after"], rel=1e-2, abs=1e-6)
    baseline, _ = quantize_model(onnx_source.read(path, x.shape[-1]), QuantConfig(range_search="off"), x)
    scales = {i.name: numpy_helper.to_array(i) for i in baseline.graph.initializer if i.name.endswith("/vitc/scale")}
    widened = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("/vitc/scale")}
    ratios = {round(float(widened[n] / scales[n]), 3) for n in scales if scales[n].size == 1}
    assert ratios <= {round(f, 3) for f in rs.WIDENINGS}


def test_module_path_widens_only_when_asked(calib_images):
    from conftest import zoo_or_skip

    from vitc.compress.quantize import apply

    base = zoo_or_skip("vit-c10")
    x = _images(base, calib_images, 24)
    auto = apply(base, QuantConfig(sites="modules"), x).transforms[-1]
    assert auto["range_widening"] is None  # "auto" leaves the module path out (QuantConfig.range_search_in)
    on = apply(base, QuantConfig(sites="modules", range_search="on"), x).transforms[-1]["range_widening"]
    assert {"post-layernorm linear inputs", "post-gelu linear inputs", "attention logits"} <= set(on["groups"])
    assert on["output_error_after"] <= on["output_error_before"]


def test_cli_refuses_an_unknown_range_search_value(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vitc.cli", "quantize", "--range-search", "maybe", "-o", str(tmp_path / "q"),
                        "--no-latency"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("error: range_search 'maybe' is not supported") and "auto, on, off" in r.stderr
    assert not (tmp_path / "q").exists()
