"""Low-bit frontier: block reconstruction, mixed precision, weight-only int4/int8 (issue 18)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from vitc.calibration.data import load_tensors
from vitc.compress.quantize import QuantConfig, apply
from vitc.compress.quantize import mixed
from vitc.compress.quantize import quantizers as Q
from vitc.compress.quantize import reconstruct as R
from vitc.compress.quantize import weight_only as WO
from vitc.compress.quantize.modules import weighted_layers
from vitc.compress.quantize.saved import load_quantized, quant_record, save_quantized
from vitc.errors import VitcError


@pytest.fixture(scope="module")
def calib64():
    from vitc.calibration.sources import open_source

    return open_source("bundled:calib").select(64, seed=0)


def _x(backbone, source):
    return load_tensors(source, backbone.preprocess)[0]


# ---------------------------------------------------------------- reconstruction

def test_adaround_pieces():
    w = torch.tensor([[0.26, -0.74, 0.5]])
    s = torch.tensor([0.1])
    floor, v = R.init_rounding(w, s)
    # the soft weight starts at the float weight (up to the clamp of the fractional part)
    assert torch.allclose(R.soft_weight(floor, v, s, 8), w, atol=1e-4)
    # hardening picks floor or floor + 1, on the grid
    hard = R.hard_weight(floor, v, s, 8)
    assert torch.allclose(hard / s, torch.round(hard / s))
    assert torch.all((hard - w).abs() <= s + 1e-6)
    # the regulariser vanishes at hard 0/1 and is largest at h = 1/2
    assert R.round_regulariser(torch.tensor([20.0, -20.0]), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert R.round_regulariser(torch.tensor([0.0]), 2.0).item() == pytest.approx(1.0, abs=1e-6)


def test_reconstruction_lowers_block_error_and_folds_rounding_into_ints(tiny_vit, calib64, tmp_path):
    x = _x(tiny_vit, calib64)
    calibrated = apply(tiny_vit, QuantConfig(wbits=4, abits=4), x)
    q = apply(tiny_vit, QuantConfig(wbits=4, abits=4, reconstruct_iters=40), x, say=lambda *_: None)
    rec = quant_record(q)["reconstruction"]
    blocks = [u for u in rec["units"] if u["kind"] == "block"]
    assert len(blocks) == 2
    # no unit ends worse than its calibrated state (a unit whose learning did not help keeps it),
    # and learning lowers a block's output error against FP32 by 10% or more
    assert all(u["mse_after"] <= u["mse_before"] for u in rec["units"])
    assert any(u["learned_mse"] < 0.9 * u["mse_before"] and not u["kept_calibration"] for u in blocks), blocks
    assert any(u["rounding_changed_from_nearest"] > 0 for u in blocks)  # it is not nearest rounding
    # the model's output is closer to FP32 than calibration alone leaves it
    with torch.no_grad():
        ref = tiny_vit(x)
        assert (q(x) - ref).pow(2).mean() < (calibrated(x) - ref).pow(2).mean()
    # the learned rounding lies on the integer grid: codes * scale is the weight
    for name, layer in weighted_layers(q.module).items():
        s = layer.weight_scale.reshape(-1, *[1] * (layer.weight.dim() - 1))
        assert torch.allclose(layer.weight_codes().float() * s, layer.weight.detach(), atol=1e-7), name
    # so it saves and reloads to the same outputs
    save_quantized(q, tmp_path / "q")
    back = load_quantized(tmp_path / "q")
    assert torch.allclose(back(x[:8]), q(x[:8]), atol=1e-5)


def test_reconstruction_resumes_after_the_last_finished_unit(tiny_vit, calib64, tmp_path, monkeypatch):
    x = _x(tiny_vit, calib64)
    config = QuantConfig(wbits=4, abits=4, reconstruct_iters=5)
    full = apply(tiny_vit, config, x, say=lambda *_: None)
    calls = {"n": 0}
    real = R.learn_unit

    def dies_after_two(*a, **k):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(R, "learn_unit", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        apply(tiny_vit, config, x, reconstruct_staging=tmp_path, say=lambda *_: None)
    assert len(list(tmp_path.glob("*/state.pt"))) == 1
    monkeypatch.setattr(R, "learn_unit", real)
    said = []
    resumed = apply(tiny_vit, config, x, reconstruct_staging=tmp_path, say=said.append)
    assert "resuming after 2 finished units" in said[0]
    assert not any(tmp_path.iterdir())  # the staging folder is removed when done
    assert torch.allclose(resumed(x[:8]), full(x[:8]), atol=1e-5)


def test_reconstruction_needs_enough_images(tiny_vit, calib64):
    x = _x(tiny_vit, calib64)
    with pytest.raises(VitcError, match="at least 64 calibration images, got 32"):
        apply(tiny_vit, QuantConfig(wbits=4, abits=4, reconstruct_iters=5), x[:32])
    with pytest.raises(VitcError, match="--iters"):
        QuantConfig(reconstruct_iters=-1).validate()


# ---------------------------------------------------------------- mixed precision

def _hand_table():
    # four free layers of equal size; "a" and "b" are sensitive, "c" and "d" are not
    sens = {"a": {4: 10.0, 6: 1.0, 8: 0.0}, "b": {4: 8.0, 6: 0.9, 8: 0.0},
            "c": {4: 0.2, 6: 0.05, 8: 0.0}, "d": {4: 0.1, 6: 0.02, 8: 0.0}}
    costs = {"a": 100, "b": 100, "c": 100, "d": 100, "end": 20}
    return sens, costs


@pytest.mark.parametrize("method", ["ilp", "greedy"])
def test_allocation_meets_the_budget_and_prefers_sensitive_layers(method):
    sens, costs = _hand_table()
    fixed = {"end"}
    for budget in (5.0, 6.0, 7.0, 4.2):
        bits = mixed.allocate(sens, costs, budget, fixed, method=method)
        avg = mixed.average_bits(bits, costs)
        assert avg <= budget + 1e-9
        assert bits["end"] == 8
        # tight: no single layer could go one width up and still fit
        for n in sens:
            if bits[n] < 8:
                up = dict(bits, **{n: bits[n] + 2})
                assert mixed.average_bits(up, costs) > budget + 1e-9, (budget, n, bits)
        assert bits["a"] >= bits["c"] and bits["a"] >= bits["d"] and bits["b"] >= bits["c"] and bits["b"] >= bits["d"]
    # at 5.0 bits: 8*20 + 100*(wa+wb+wc+wd) <= 5.0*420 -> 19.4 bits over four layers: 6+6+4+4 (20 > 19.4): 6,4,4,4
    bits = mixed.allocate(sens, costs, 5.0, fixed, method=method)
    assert sorted(bits[n] for n in "abcd") == [4, 4, 4, 6] and bits["a"] == 6
    # at 6.0 bits: 23.6 bits over four layers: 8+6+4+4 (the next step up, 24, does not fit)
    bits = mixed.allocate(sens, costs, 6.0, fixed, method=method)
    assert (bits["a"], bits["b"], bits["c"], bits["d"]) == (8, 6, 4, 4)


def test_impossible_budget_names_the_smallest_reachable():
    sens, costs = _hand_table()
    with pytest.raises(VitcError, match=r"smallest reachable average is 4\.19 bits.*--size-budget 4\.20"):
        mixed.allocate(sens, costs, 2.0, {"end"})


def test_mixed_model_exports_its_weight_widths_and_refuses_low_bit_activations(tiny_vit, calib64, tmp_path):
    x = _x(tiny_vit, calib64)
    plan = mixed.plan_mixed(tiny_vit, x, size_budget=5.0)
    assert plan["average_wbits"] <= 5.0
    assert {w for w, _ in plan["layer_bits"].values()} >= {4}
    q = apply(tiny_vit, QuantConfig(layer_bits=plan["layer_bits"]), x)
    specs = quant_record(q)["layers"]
    assert all(specs[n]["wbits"] == w for n, (w, _) in plan["layer_bits"].items())
    from vitc.export.qdq import export_qdq_onnx
    from vitc.runtimes import open_session

    path = export_qdq_onnx(q, tmp_path / "m.onnx")
    out = open_session(path, runtime="onnxruntime")(x[:16])
    ref = q(x[:16]).numpy()
    assert (np.asarray(out).argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    # a 4-bit weight is exported with its own codes (at most 7 in magnitude)
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    small = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and np.abs(numpy_helper.to_array(i)).max() <= 7]
    assert len(small) >= sum(1 for w, _ in plan["layer_bits"].values() if w == 4)
    # activations at 4 bits: refused before export, by layer name
    low = {n: [8, 4] for n in plan["layer_bits"]}
    first = next(iter(plan["layer_bits"]))
    q4 = apply(tiny_vit, QuantConfig(layer_bits={**{n: [8, 8] for n in low}, first: [8, 4]}), x)
    with pytest.raises(VitcError, match=first.replace(".", r"\.")):
        export_qdq_onnx(q4, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_mixed_precision_on_the_graph_path(tiny_vit, calib64, tmp_path):
    """The table, keyed by module name, lands on the captured graph's sites of those modules;
    the model saves, reloads and exports its weight widths like a uniform one."""
    from vitc.compress.quantize.saved import load_quantized, save_quantized
    from vitc.export.qdq import export_qdq_onnx
    from vitc.runtimes import open_session

    x = _x(tiny_vit, calib64)
    plan = mixed.plan_mixed(tiny_vit, x, size_budget=5.0)
    table = plan["layer_bits"]
    q = apply(tiny_vit, QuantConfig(layer_bits=table, sites="graph"), x)
    record = quant_record(q)
    assert record["sites"] == "graph"
    sites = record["quant_plan"]["sites"]
    by_module = {}
    for site in sites:
        if site.get("weight") and site.get("module") in table:
            by_module.setdefault(site["module"], set()).add(site["weight"]["bits"])
    assert set(by_module) == set(table)  # every Linear of the table has its site
    assert all(bits == {table[m][0]} for m, bits in by_module.items())
    assert {4, 8} <= {b for bits in by_module.values() for b in bits}
    out = q(x[:16])
    save_quantized(q, tmp_path / "m")
    assert torch.equal(load_quantized(tmp_path / "m")(x[:16]), out)
    path = export_qdq_onnx(q, tmp_path / "m.onnx")
    got = np.asarray(open_session(path, runtime="onnxruntime")(x[:16]))
    assert (got.argmax(-1) == out.numpy().argmax(-1)).mean() >= 0.9
    # 4-bit activations on the query projection: key and value read the same tensor, so they run at
    # 4 bits too, and the pass says so; the export refuses the model before writing anything
    query = next(n for n in table if n.endswith("attention.q_proj"))
    said = []
    q4 = apply(tiny_vit, QuantConfig(layer_bits={**table, query: [8, 4]}, sites="graph"), x, say=said.append)
    lowered = next(m for m in said if "quantizes narrower" in m)
    assert query.replace("q_proj", "k_proj") in lowered and query.replace("q_proj", "v_proj") in lowered
    with pytest.raises(VitcError, match="8-bit activations only"):
        export_qdq_onnx(q4, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


# ---------------------------------------------------------------- weight-only

def test_group_quantization_roundtrip():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    s = WO.group_scales(w, 4, 32)
    assert s.shape == (8, 4)
    codes = WO.group_codes(w, s, 4)
    assert codes.min() >= -8 and codes.max() <= 7
    # every group's error is at most half a step of its own scale where nothing clipped
    err = (WO.dequantize_groups(codes, s) - w).abs().reshape(8, 4, 32)
    unclipped = (w.abs().reshape(8, 4, 32) <= 7 * s[..., None])
    assert torch.all(err[unclipped] <= (s[..., None].expand_as(err)[unclipped] / 2 + 1e-6))
    packed = WO.pack_codes(np.array([[-7, 0, 7], [1, 2, -8]], dtype=np.int8), 4)
    from onnx import TensorProto, helper, numpy_helper

    t = helper.make_tensor("w", TensorProto.INT4, [2, 3], packed, raw=True)
    assert numpy_helper.to_array(t).tolist() == [[-7, 0, 7], [1, 2, -8]]


@pytest.mark.parametrize("wbits,group", [(4, 32), (8, 64)])
def test_weight_only_exports_run_in_ort_and_openvino_with_parity(tiny_vit, calib64, tmp_path, wbits, group):
    import onnx
    import openvino as ov

    from vitc.export.qdq import export_qdq_onnx
    from vitc.runtimes import open_session

    x = _x(tiny_vit, calib64)[:16]
    q = apply(tiny_vit, QuantConfig(wbits=wbits, abits=16, group_size=group))
    sim = q(x).numpy()
    path = export_qdq_onnx(q, tmp_path / "m.onnx")
    model = onnx.load(str(path))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    blocked = [n for n in dq if any(a.name == "block_size" and a.i == group for a in n.attribute)]
    assert len(blocked) == sum(1 for s in quant_record(q)["weight_only"]["layers"].values() if s["group_size"])
    want = onnx.TensorProto.INT4 if wbits == 4 else onnx.TensorProto.INT8
    assert sum(1 for i in model.graph.initializer if i.data_type == want) >= len(blocked)
    ort_out = np.asarray(open_session(path, runtime="onnxruntime")(x))
    assert np.abs(ort_out - sim).max() < 2e-2 * max(1.0, np.abs(sim).max())
    ov_model = ov.convert_model(str(path))
    types = WO.ir_weight_types(ov_model)
    assert types.get("i4" if wbits == 4 else "i8", 0) >= len(blocked)  # the IR keeps the weights compressed
    ov.save_model(ov_model, str(tmp_path / "m.xml"), compress_to_fp16=False)
    ov_out = np.asarray(open_session(tmp_path / "m.xml", runtime="openvino", precision="f32")(x))
    assert np.abs(ov_out - sim).max() < 2e-2 * max(1.0, np.abs(sim).max())


def test_weight_only_mixed_precision_keeps_the_sensitive_layers_at_int8(tiny_vit, calib64, tmp_path):
    """--bits auto --size-budget 5 --abits 16: each layer int4 with group scales or int8 per channel,
    by output KL measured on those grids; the result saves, reloads and exports."""
    from vitc.calibration.sources import open_source
    from vitc.export.qdq import export_qdq_onnx
    from vitc.runtimes import open_session

    x = _x(tiny_vit, calib64)
    plan = mixed.plan_mixed(tiny_vit, x, size_budget=5.0, abits=16, group_size=32)
    assert 4.0 < plan["average_wbits"] <= 5.0
    assert {tuple(b) for b in plan["layer_bits"].values()} == {(4, 16), (8, 16)}
    rows = {r["layer"]: r for r in plan["rows"]}
    ends = [n for n, r in rows.items() if r["kl_w4"] is None]  # the patch conv and the classifier: int8, unmeasured
    assert sorted(ends) == sorted([tiny_vit.structure.classifier, "model.vit.embeddings.patch_embeddings.projection"])
    assert all(plan["layer_bits"][n][0] == 8 for n in ends)
    # the ILP keeps at 8 bits layers whose int4 KL is above that of every layer of the same size it lowers
    free = [r for n, r in rows.items() if n not in ends]
    for size in {r["params"] for r in free}:
        same = [r for r in free if r["params"] == size]
        kept, lowered = [r["kl_w4"] - r["kl_w8"] for r in same if r["wbits"] == 8], [r["kl_w4"] - r["kl_w8"] for r in same if r["wbits"] == 4]
        if kept and lowered:
            assert min(kept) >= max(lowered), size
    mixed_q = apply(tiny_vit, QuantConfig(wbits=4, abits=16, group_size=32, layer_bits=plan["layer_bits"]), x)
    layers = WO.weight_only_layers(mixed_q.module)
    for name, (wb, _) in plan["layer_bits"].items():
        assert (layers[name].wbits, layers[name].group_size) == ((4, 32) if wb == 4 else (8, None)), name
    xe = _x(tiny_vit, open_source("bundled:eval").select(64, seed=0))
    save_quantized(mixed_q, tmp_path / "m")
    assert torch.equal(load_quantized(tmp_path / "m")(xe[:8]), mixed_q(xe[:8]))
    sim = mixed_q(xe[:16]).detach().numpy()
    out = np.asarray(open_session(export_qdq_onnx(mixed_q, tmp_path / "m.onnx"), runtime="onnxruntime")(xe[:16]))
    assert np.abs(out - sim).max() < 2e-2 * max(1.0, np.abs(sim).max())
    with pytest.raises(VitcError, match=r"\[6, 16\] in a weight-only table"):
        QuantConfig(wbits=4, abits=16, layer_bits={"a": [6, 16]}).validate()


def test_weight_only_mixed_precision_beats_uniform_int4_on_a_trained_vit(calib64):
    """On a trained model (the random tiny ViT's errors are too small and too entangled to rank), 4.9
    average bits of int4/int8 leave less logit error than uniform int4 (measured 0.72x since int4
    groups use all 16 levels, which lowered uniform int4's error by 36%; 0.48x before)."""
    from vitc.calibration.sources import open_source
    from vitc.models.intake import load_model

    vit = load_model("zoo:vit-c10")
    x, xe = _x(vit, calib64), _x(vit, open_source("bundled:eval").select(64, seed=0))
    plan = mixed.plan_mixed(vit, x, size_budget=5.0, abits=16, group_size=32)
    mixed_q = apply(vit, QuantConfig(wbits=4, abits=16, group_size=32, layer_bits=plan["layer_bits"]), x)
    uniform = apply(vit, QuantConfig(wbits=4, abits=16, group_size=32), x)
    with torch.no_grad():
        ref = vit(xe)
        err_mixed, err_uniform = (mixed_q(xe) - ref).pow(2).mean(), (uniform(xe) - ref).pow(2).mean()
    assert err_mixed < 0.8 * err_uniform, (err_mixed, err_uniform)


def test_int4_group_codes_use_all_sixteen_levels():
    """Group grids at 4 bits use -8..7, as ONNX INT4, OpenVINO i4 and NNCF's INT4_SYM do: on a group
    spread evenly over [-1, 7/8] the searched scale lands near 1/8, the codes reach -8, and the error
    is below the best restricted (-7..7) grid's; 8-bit groups keep the restricted grid."""
    w = (torch.arange(-8, 8).float() / 8).repeat(4).reshape(1, 64)
    s = WO.group_scales(w, 4, 64)
    codes = WO.group_codes(w, s, 4)
    assert codes.min().item() == -8 and codes.max().item() == 7
    restricted = Q.weight_qparams(w, 4)
    err_full = (WO.dequantize_groups(codes, s) - w).pow(2).sum()
    err_restricted = (Q.fake_quant_weight(w, restricted, 4) - w).pow(2).sum()
    assert err_full < 0.5 * err_restricted, (err_full, err_restricted)
    assert WO.group_range(4) == (-8, 7) and WO.group_range(8) == (-127, 127)


def test_asymmetric_groups_fit_one_sided_weights():
    """A group whose weights lie on one side of zero: the asymmetric grid spends its 16 levels on
    [0, max] (codes 0..15; a zero point in 0..15 keeps 0 on the grid), half the symmetric grid's
    step, so about a quarter of its squared error (measured 0.21x); GPTQ rounds onto the same grid."""
    torch.manual_seed(0)
    w = torch.rand(4, 64) * 0.5 + 0.1  # all positive: the symmetric grid wastes its negative half
    s, z = WO.group_qparams_asymmetric(w, 4, 64)
    codes = WO.group_codes(w, s, 4, z)
    assert codes.dtype == torch.uint8 and codes.min() >= 0 and codes.max() <= 15 and codes.max() == 15
    err_asym = (WO.dequantize_groups(codes, s, z) - w).pow(2).sum()
    ss = WO.group_scales(w, 4, 64)
    err_sym = (WO.dequantize_groups(WO.group_codes(w, ss, 4), ss) - w).pow(2).sum()
    assert err_asym < 0.3 * err_sym, (err_asym, err_sym)
    # mixed precision's sensitivity measures the same grid (weight_only.fake_quant)
    assert torch.equal(WO.fake_quant(w, 4, 64, asymmetric=True), WO.dequantize_groups(codes, s, z))
    x = torch.randn(256, 64)
    from vitc.compress.quantize.gptq import gptq_groups

    q = gptq_groups(w, x.T @ x, s, 4, qrange=WO.asymmetric_range(4), zero=z)
    assert torch.allclose(WO.dequantize_groups(WO.group_codes(q, s, 4, z), s, z), q, atol=1e-6)  # on the grid
    assert ((q - w) @ x.T).pow(2).sum() < ((WO.dequantize_groups(codes, s, z) - w) @ x.T).pow(2).sum()


def test_asymmetric_grid_beats_symmetric_with_nearest_rounding_and_exports_with_zero_points(calib64, tmp_path):
    """--weight-scheme asymmetric on a trained ViT (zoo:vit-c10, int4 g32): with nearest rounding the
    grid alone leaves less logit error than the symmetric one (measured 0.0056 against 0.0096 MSE);
    with GPTQ, which compensates either grid's rounding, the two are within noise (0.00098 against
    0.00089). It saves and reloads bit-exact, and its ONNX graph holds uint4 codes and zero points
    that ONNX Runtime and OpenVINO (u4 constants) run within the symmetric export's parity bound."""
    import onnx
    import openvino as ov

    from vitc.calibration.sources import open_source
    from vitc.compress.quantize.saved import model_size
    from vitc.export.qdq import export_qdq_onnx
    from vitc.models.intake import load_model
    from vitc.runtimes import open_session

    vit = load_model("zoo:vit-c10")
    x, xe = _x(vit, calib64), _x(vit, open_source("bundled:eval").select(64, seed=0))
    nearest = {"wbits": 4, "abits": 16, "group_size": 32, "weight_rounding": "nearest"}
    asym_nearest = apply(vit, QuantConfig(**nearest, weight_scheme="asymmetric"), x)
    sym_nearest = apply(vit, QuantConfig(**nearest), x)
    asym = apply(vit, QuantConfig(wbits=4, abits=16, group_size=32, weight_scheme="asymmetric"), x)
    sym = apply(vit, QuantConfig(wbits=4, abits=16, group_size=32), x)
    with pytest.raises(VitcError, match="int8 weights stay symmetric"):  # the Python API refuses what the CLI refuses
        apply(vit, QuantConfig(wbits=8, abits=16, weight_scheme="asymmetric"), x)
    record = quant_record(asym)["weight_only"]
    assert record["asymmetric"] and all(bool(s.get("asymmetric")) == (s["group_size"] is not None) for s in record["layers"].values())
    with torch.no_grad():
        ref, out = vit(xe), asym(xe)
        mse = lambda m: (m(xe) - ref).pow(2).mean()
        assert mse(asym_nearest) < 0.7 * mse(sym_nearest), (mse(asym_nearest), mse(sym_nearest))
        err_asym, err_sym = (out - ref).pow(2).mean(), mse(sym)
    assert err_asym < 1.25 * err_sym, (err_asym, err_sym)
    # a 4-bit zero point per group of 32 beside 4-bit codes and a 32-bit scale: at most 2.5% more
    assert model_size(asym) <= 1.025 * model_size(sym)
    save_quantized(asym, tmp_path / "a")
    assert torch.equal(load_quantized(tmp_path / "a")(xe[:8]), out[:8])
    path = export_qdq_onnx(asym, tmp_path / "a.onnx")
    model = onnx.load(str(path))
    grouped = sum(1 for s in record["layers"].values() if s["group_size"])
    with_zero = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and len(n.input) == 3]
    assert len(with_zero) == grouped
    assert sum(1 for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT4) == 2 * grouped
    sim = out[:16].numpy()
    ort_out = np.asarray(open_session(path, runtime="onnxruntime")(xe[:16]))
    assert np.abs(ort_out - sim).max() < 2e-2 * max(1.0, np.abs(sim).max())
    ov_model = ov.convert_model(str(path))
    assert WO.ir_weight_types(ov_model).get("u4", 0) >= grouped
    ov.save_model(ov_model, str(tmp_path / "a.xml"), compress_to_fp16=False)
    ov_out = np.asarray(open_session(tmp_path / "a.xml", runtime="openvino", precision="f32")(xe[:16]))
    assert np.abs(ov_out - sim).max() < 2e-2 * max(1.0, np.abs(sim).max())


def test_weight_only_saves_reloads_and_shrinks(tiny_vit, calib64, tmp_path):
    from vitc.compress.quantize.saved import model_size

    x = _x(tiny_vit, calib64)[:8]
    q = apply(tiny_vit, QuantConfig(wbits=4, abits=16, group_size=32))
    save_quantized(q, tmp_path / "w")
    assert json.loads((tmp_path / "w" / "vitc_quant.json").read_text())["format"] == WO.FORMAT
    back = load_quantized(tmp_path / "w")
    assert torch.equal(back(x), q(x))
    assert model_size(q) < 0.3 * model_size(tiny_vit)


def test_weight_only_bad_input():
    with pytest.raises(VitcError, match="--group-size 48"):
        QuantConfig(wbits=4, abits=16, group_size=48).validate()
    with pytest.raises(VitcError, match="--wbits 4 or 8"):
        QuantConfig(wbits=6, abits=16).validate()
    with pytest.raises(VitcError, match="weight-only"):
        QuantConfig(wbits=4, abits=8, group_size=64).validate()
    with pytest.raises(VitcError, match="--weight-scheme asymmetric applies to weight-only"):
        QuantConfig(wbits=4, abits=8, weight_scheme="asymmetric").validate()
    with pytest.raises(VitcError, match="--weight-scheme zero"):
        QuantConfig(wbits=4, abits=16, weight_scheme="zero").validate()


def test_cli_bad_inputs(tiny_vit_dir, tmp_path, capsys):
    from vitc.cli import run

    cases = [
        (["--bits", "auto", "--size-budget", "2"], "smallest reachable average is 4."),
        (["--bits", "auto"], "exactly one of --size-budget"),
        (["--bits", "4", "--reconstruct", "--calib-size", "40"], "at least 64 calibration images, got 40"),
        (["--size-budget", "5"], "with --bits auto"),
        (["--bits", "five"], "not a bit width"),
        (["--wbits", "4", "--abits", "16", "--group-size", "48"], "--group-size 48 is not supported"),
        (["--bits", "8", "--rounding", "nearest"], "--rounding nearest applies to weight-only quantization and to weights below 8 bits"),
        (["--wbits", "4", "--abits", "16", "--rounding", "best"], "weight rounding 'best' is not supported"),
        (["--bits", "auto", "--max-drop", "1", "--abits", "16"], "weight-only mixed precision (--abits 16) takes --size-budget"),
        (["--bits", "auto", "--size-budget", "3", "--abits", "16"], "--size-budget 3 cannot be met: the smallest reachable average is 4."),
        (["--wbits", "4", "--abits", "16", "--reconstruct"], "--reconstruct applies to weight-and-activation quantization"),
        (["--wbits", "8", "--abits", "16", "--weight-scheme", "asymmetric"], "int8 weights stay symmetric"),
        (["--bits", "8", "--weight-scheme", "asymmetric"], "--weight-scheme asymmetric applies to weight-only quantization"),
    ]
    for args, message in cases:
        out = tmp_path / "o"
        code = run(["quantize", "-m", f"hf:{tiny_vit_dir}", "--no-latency", "--eval-size", "16", "-o", str(out), *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, (args, err)
        assert message in err and len(err.splitlines()) == 1, (args, err)
        assert not out.exists()


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_cli_weight_only_quantize_and_export(tiny_vit_dir, tmp_path, capsys, scheme):
    from vitc.cli import run

    model = tmp_path / "wo"
    assert run(["quantize", "-m", f"hf:{tiny_vit_dir}", "--wbits", "4", "--abits", "16", "--group-size", "32",
                "--weight-scheme", scheme, "--eval-size", "32", "--threads", "1", "-o", str(model),
                "--out", str(tmp_path / "q.json")]) == 0
    result = json.loads((tmp_path / "q.json").read_text())
    assert result["weight_only"]["group_size"] == 32 and result["compression"] > 3.3
    assert result["weight_only"]["asymmetric"] == (scheme == "asymmetric")
    for target in ("onnx", "openvino"):
        out = tmp_path / target
        # 64 parity images: the random tiny ViT's top-2 logit margins go down to 0.002, below ONNX Runtime
        # MatMulNBits's deviation from the float simulation (0.003 max abs, as large with plain scales),
        # so one image of 32 can flip on a tie (96.9% < 98%); one of 64 cannot fail the check
        assert run(["export", "-m", str(model), "--target", target, "-o", str(out), "--eval-size", "64"]) == 0, capsys.readouterr().err
        manifest = json.loads(next(out.glob("*.manifest.json")).read_text())
        assert manifest["status"] == "passed"
        if target == "openvino":
            assert manifest["parity"]["compressed_weight_constants"].get("u4" if scheme == "asymmetric" else "i4", 0) > 0
    code = run(["export", "-m", str(model), "--target", "coreml", "-o", str(tmp_path / "c")])
    assert code == 2 and "weight-only" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- hybrids: the ends and the bridge stay 8-bit

def test_keep_ends_reaches_into_a_conv_stem_and_the_bridge(make_convstem_vit, calib64):
    from vitc.compress.quantize.ptq import end_layers

    hybrid = make_convstem_vit()
    stem = "model.vit.embeddings.patch_embeddings.projection"
    # the patch embedding of a hybrid is a container: its first conv, the 1x1 conv that hands the
    # feature map to attention (the bridge) and the classifier are the 8-bit ends
    assert end_layers(hybrid.structure, hybrid.module) == [f"{stem}.0", f"{stem}.9", "model.classifier"]
    x = _x(hybrid, calib64)
    q = apply(hybrid, QuantConfig(wbits=4, abits=4), x)
    layers = quant_record(q)["layers"]
    for name in (f"{stem}.0", f"{stem}.9", "model.classifier"):
        assert (layers[name]["wbits"], layers[name]["input"]["bits"]) == (8, 8), name
    assert layers[f"{stem}.3"]["wbits"] == 4 and layers["model.vit.layers.0.attention.q_proj"]["wbits"] == 4
    # mixed precision pins the same layers
    fixed = {l.name for l in mixed.candidate_layers(hybrid.module, hybrid.structure) if l.fixed}
    assert fixed == {f"{stem}.0", f"{stem}.9", "model.classifier"}


def test_keep_ends_of_a_plain_vit_are_its_patch_conv_and_classifier(tiny_vit):
    from vitc.compress.quantize.ptq import end_layers

    s = tiny_vit.structure
    assert end_layers(s, tiny_vit.module) == [s.patch_embed, s.classifier]


# ---------------------------------------------------------------- reconstruction speed-ups

def test_chained_block_inputs_and_one_pass_targets_equal_the_per_unit_captures(tiny_vit, calib64):
    from vitc.compress.quantize.modules import set_mode

    x = _x(tiny_vit, calib64)
    q = apply(tiny_vit, QuantConfig(wbits=4, abits=4), x)
    module = q.module
    set_mode(module, "quant")
    units = R.find_units(module, tiny_vit.structure, x[:1])
    links = R.chain_links(module, units, x[:2])
    blocks = [k for k, u in enumerate(units) if u.kind == "block"]
    # consecutive transformer blocks chain; the patch embedding -> first block does not (cls token, positions)
    assert blocks[0] in links and blocks[0] - 1 not in links
    k = blocks[0]
    here = R.capture(module, units[k].path, x)
    with torch.no_grad():
        out = R.first_tensor(module.get_submodule(units[k].path)(*here.args, **here.kwargs))
    chained = links[k].inputs(out)
    direct = R.capture(module, units[k + 1].path, x)
    args, _ = chained.inputs(torch.arange(x.shape[0]))
    assert torch.allclose(args[links[k].position], direct.args[links[k].position], atol=1e-6)
    # every unit's FP32 target from one pass equals its own partial pass
    set_mode(module, "off")
    targets = R.capture_outputs(module, [u.path for u in units], x)
    for u in units:
        assert torch.allclose(targets[u.path], R.capture(module, u.path, x, want_inputs=False).output, atol=1e-6), u.path
    assert R.capture_outputs(module, [u.path for u in units], x, max_bytes=1) == {}  # too big: one capture per unit


def test_reconstruction_runs_on_its_own_thread_count_and_restores_the_callers(tiny_vit, calib64, monkeypatch):
    x = _x(tiny_vit, calib64)
    seen = []
    real = R.learn_unit
    monkeypatch.setattr(R, "learn_unit", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        apply(tiny_vit, QuantConfig(wbits=4, abits=4, reconstruct_iters=2), x, say=lambda *_: None)
        assert seen and set(seen) == {R.ReconstructOptions().threads}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_log_quantizer_passes_a_straight_through_gradient():
    from vitc.compress.quantize import quantizers as Q

    p = torch.softmax(torch.randn(4, 16), -1).requires_grad_(True)
    out = Q.fake_quant_log2(p, 4, sqrt2=True)
    assert torch.equal(out.detach(), Q.fake_quant_log2(p.detach(), 4, sqrt2=True))  # same values as without a gradient
    out.sum().backward()
    assert torch.equal(p.grad, torch.ones_like(p))


# ---------------------------------------------------------------- weight-only: activation-aware group scales

def test_activation_weighted_group_scales_lower_the_weighted_error():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    importance = torch.rand(128) ** 4 * 100  # a few loud input channels, as after a LayerNorm
    plain = WO.group_scales(w, 4, 64)
    aware = WO.group_scales(w, 4, 64, importance=importance)

    def weighted_error(s):
        return ((WO.dequantize_groups(WO.group_codes(w, s, 4), s) - w) ** 2 * importance).sum()

    assert weighted_error(aware) < 0.97 * weighted_error(plain)
    # equal importance is the plain search
    assert torch.allclose(WO.group_scales(w, 4, 64, importance=torch.full((128,), 3.0)), plain)


def test_weight_only_with_images_is_activation_aware(tiny_vit, calib64):
    x = _x(tiny_vit, calib64)
    plain = apply(tiny_vit, QuantConfig(wbits=4, abits=16, group_size=32))
    aware = apply(tiny_vit, QuantConfig(wbits=4, abits=16, group_size=32, weight_rounding="nearest"), x)
    assert quant_record(plain)["weight_only"]["scale_search"] == "MSE"
    record = quant_record(aware)
    assert record["weight_only"]["scale_search"] == "activation-weighted MSE" and record["calibration_images"] == 64
    # each grouped layer's expected output error from its rounding, sum_i E[x_i^2] (w_i - q_i)^2 on
    # the calibration images, is no larger than with the plain search, and smaller somewhere
    float_weights = {n: m.weight.detach() for n, m in tiny_vit.module.named_modules() if isinstance(m, torch.nn.Linear)}
    grouped = [n for n, l in WO.weight_only_layers(aware.module).items() if l.group_size]
    moments = WO.input_mean_squares(tiny_vit.module, grouped, x)
    layers_p, layers_a = WO.weight_only_layers(plain.module), WO.weight_only_layers(aware.module)
    errors = [(((layers_p[n].weight - float_weights[n]) ** 2 * moments[n]).sum().item(),
               ((layers_a[n].weight - float_weights[n]) ** 2 * moments[n]).sum().item()) for n in grouped]
    assert all(a <= p * (1 + 1e-6) for p, a in errors)
    assert sum(a for _, a in errors) < 0.98 * sum(p for p, _ in errors)


def test_gptq_rounding_lowers_each_layers_output_error_on_the_same_grid(tiny_vit, calib64):
    """GPTQ keeps every weight on its group grid and, against nearest rounding on that grid, lowers
    each grouped layer's output error tr((W - Q) E[xx^T] (W - Q)^T) on the calibration images, and
    the model's logit error on other images, to under half."""
    x = _x(tiny_vit, calib64)
    nearest = apply(tiny_vit, QuantConfig(wbits=4, abits=16, group_size=32, weight_rounding="nearest"), x)
    gptq = apply(tiny_vit, QuantConfig(wbits=4, abits=16, group_size=32), x)
    blocks = len(tiny_vit.structure.stages[0].blocks)
    assert quant_record(gptq)["weight_only"]["rounding"] == f"GPTQ, sequential in {blocks} steps, scales refit {WO.GPTQ_REFITS} times"  # one per block
    assert quant_record(nearest)["weight_only"]["rounding"] == "nearest"
    float_weights = {n: m.weight.detach() for n, m in tiny_vit.module.named_modules() if isinstance(m, torch.nn.Linear)}
    layers_n, layers_g = WO.weight_only_layers(nearest.module), WO.weight_only_layers(gptq.module)
    grouped = [n for n, l in layers_g.items() if l.group_size]
    assert grouped
    moments = WO.input_mean_squares(tiny_vit.module, grouped, x, full=True)
    for n in grouped:
        g, ref = layers_g[n], float_weights[n]
        codes = g.codes()
        assert codes.min() >= -8 and codes.max() <= 7
        assert torch.allclose(WO.dequantize_groups(codes, g.weight_scale), g.weight, atol=1e-6)
        h = moments[n].float()
        err = lambda w: torch.einsum("oi,ij,oj->", w - ref, h, w - ref).item()
        nearest_same_grid = WO.dequantize_groups(WO.group_codes(ref, g.weight_scale, 4), g.weight_scale)
        assert err(g.weight) < 0.5 * err(nearest_same_grid), n  # measured 0.02-0.17
    from vitc.calibration.sources import open_source

    xe = _x(tiny_vit, open_source("bundled:eval").select(64, seed=0))
    with torch.no_grad():
        ref, out_n, out_g = tiny_vit.module(xe), nearest.module(xe), gptq.module(xe)
    assert ((out_g - ref) ** 2).mean() < 0.5 * ((out_n - ref) ** 2).mean()  # measured 0.11



@pytest.mark.parametrize("asymmetric", [False, True])
def test_scale_refit_keeps_gptqs_codes_and_lowers_the_output_error(asymmetric):
    """``refit_group_scales`` keeps every code (and zero point), lowers each row's output error
    (w - q)^T H (w - q) against GPTQ's on the searched grid, and recovers a grid exactly: weights
    that lie on a grid 10% wider than the one they are read on get the true scales back."""
    from vitc.compress.quantize.gptq import gptq_groups, refit_group_scales

    torch.manual_seed(0)
    x = torch.randn(4000, 256) * torch.rand(256) * 3  # inputs of uneven loudness
    h = x.T @ x / x.shape[0]
    w = torch.randn(48, 256) * 0.05 + (0.02 if asymmetric else 0.0)
    if asymmetric:
        scale, zero = WO.group_qparams_asymmetric(w, 4, 64, importance=torch.diag(h))
        qrange = WO.asymmetric_range(4)
    else:
        scale, zero, qrange = WO.group_scales(w, 4, 64, importance=torch.diag(h)), None, WO.group_range(4)
    q = gptq_groups(w, h, scale, 4, qrange=qrange, zero=zero)
    refit = refit_group_scales(w, q, h, scale)
    codes = WO.group_codes(q, scale, 4, zero)
    q2 = WO.dequantize_groups(codes, refit, zero)
    assert torch.equal(WO.group_codes(q2, refit, 4, zero), codes)
    row_err = lambda v: torch.einsum("oi,ij,oj->o", w - v, h, w - v)
    assert torch.all(row_err(q2) <= row_err(q) * (1 + 1e-5))
    assert row_err(q2).sum() < 0.998 * row_err(q).sum()  # measured 0.997 (symmetric), 0.995 (asymmetric)
    true_scale = scale * torch.linspace(0.8, 1.2, scale.numel()).reshape(scale.shape)
    on_grid = WO.dequantize_groups(codes, true_scale, zero)
    assert torch.allclose(refit_group_scales(on_grid, WO.dequantize_groups(codes, 1.1 * true_scale, zero), h, 1.1 * true_scale),
                          true_scale, rtol=1e-5)


def test_prefix_grid_fits_a_loud_cls_token_without_coarsening_the_patches():
    """The split grid on (batch, tokens, channels) values whose CLS token is 10x the patches': the
    patch tokens' error drops to the single-grid error of patches alone, the CLS token is not clipped."""
    from vitc.calibration import observers as obs
    from vitc.compress.quantize.config import QuantConfig
    from vitc.compress.quantize.modules import ActQuant
    from vitc.compress.quantize.torch_graph import _calibrate_prefix_split

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 17, 64, generator=g)
    x[:, 0] *= 10
    config = QuantConfig(wbits=6, abits=6, calibrator="mse")

    def calibrated(split: bool, prefix_bits: int = 0) -> ActQuant:
        q = ActQuant("x", bits=6)
        q.prefix_bits = prefix_bits
        q.observer = obs.Observer("x", channel_axis=-1)
        q.mode = "observe"
        q(x)
        q.observer.start_histogram()
        if split:
            q.prefix_tokens, q.prefix_observer = 1, obs.Observer("x prefix")
            q.prefix_observer.min, q.prefix_observer.max = q.observer.min, q.observer.max
            q.prefix_observer.start_histogram()
        q(x)
        if split:
            _calibrate_prefix_split(q, config)
        else:
            from vitc.compress.quantize.ptq import _calibrate_uniform

            _, sym, s, z = _calibrate_uniform(q, "mse", config, "per-layer")[0]
            q.set_uniform(s, z, sym, False)
        q.mode = "quant"
        return q

    one, split = calibrated(False), calibrated(True)
    assert split.scale.numel() == 2 and split.prefix_observer is None and split.spec()["granularity"] == "prefix+patches"
    err = lambda q, sl: ((q(x) - x)[:, sl] ** 2).mean().item()
    assert err(split, slice(1, None)) < 0.2 * err(one, slice(1, None))  # the patches' grid no longer spans the CLS range
    assert err(split, slice(0, 1)) < 1.5 * err(one, slice(0, 1))
    assert split.scale[0] > 5 * split.scale[1]
    # the prefix grid at 8 bits (QuantConfig.prefix_bits): 4x finer steps for the CLS token, the patches' grid unchanged
    wide = calibrated(True, prefix_bits=8)
    assert err(wide, slice(0, 1)) < 0.15 * err(split, slice(0, 1))
    assert torch.equal(wide(x)[:, 1:], split(x)[:, 1:])
    codes = wide(x)[:, 0] / wide.scale[0] + wide.zero_point[0]
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.round().unique().numel() > 64
    assert wide.spec()["prefix_bits"] == 8 and "prefix_bits" not in split.spec()


def test_graph_path_splits_token_inputs_below_8_bits_and_reloads(tiny_vit, calib64, tmp_path):
    x = _x(tiny_vit, calib64)[:32]
    q6 = apply(tiny_vit, QuantConfig(wbits=6, abits=6, sites="graph", calibrator="minmax"), x)
    rec = quant_record(q6)
    blocks = len(tiny_vit.structure.stages[0].blocks)
    # each block's Linear inputs: q/k/v's shared input, the output projection's, fc1's and fc2's
    assert len(rec["plan"]["prefix_grids"]) == 4 * blocks and rec["vit_quantizers"]["prefix_token_grids"] == 4 * blocks
    split = [i for s in rec["quant_plan"]["sites"] for i in s["inputs"] if i["prefix_tokens"]]
    assert split and all(i["prefix_tokens"] == 1 and i["kind"] == "uniform" for i in split)
    # one width by default; QuantConfig.prefix_bits=8 gives the CLS grids 8 bits, the patches' stay at 6
    assert all(i["prefix_bits"] == 6 and i["bits"] == 6 for i in split) and rec["vit_quantizers"]["prefix_token_bits"] == "6"
    wide = apply(tiny_vit, QuantConfig(wbits=6, abits=6, sites="graph", calibrator="minmax", prefix_bits=8), x)
    wide_rec = quant_record(wide)
    assert all(i["prefix_bits"] == 8 for s in wide_rec["quant_plan"]["sites"] for i in s["inputs"] if i["prefix_tokens"])
    assert wide_rec["vit_quantizers"]["prefix_token_bits"] == "8"
    assert not quant_record(apply(tiny_vit, QuantConfig(sites="graph", calibrator="minmax"), x))["plan"]["prefix_grids"]
    off = apply(tiny_vit, QuantConfig(wbits=6, abits=6, sites="graph", calibrator="minmax", prefix_grid="off"), x)
    assert not quant_record(off)["plan"]["prefix_grids"]
    on8 = apply(tiny_vit, QuantConfig(sites="graph", calibrator="minmax", prefix_grid="on"), x)
    assert len(quant_record(on8)["plan"]["prefix_grids"]) == 4 * blocks
    from vitc.export.qdq import export_qdq_onnx

    with pytest.raises(VitcError, match="prefix\\+patches activation grid, which has no Q/DQ form"):
        export_qdq_onnx(on8, tmp_path / "on8.onnx")
    assert not (tmp_path / "on8.onnx").exists()
    xe = _x(tiny_vit, calib64)[32:48]
    for name, model in (("q6", q6), ("wide", wide)):
        save_quantized(model, tmp_path / name)
        back = load_quantized(tmp_path / name)
        with torch.no_grad():
            assert torch.equal(back(xe), model(xe))


def test_hessian_taps_weight_the_prefix_tokens():
    """Token weighting: E_all[x x^T] + w E_prefix[x x^T] for inputs whose token count is a prefix
    layout; other inputs (a 2-D batch, another token count) keep the plain moment."""
    from vitc.compress.quantize.gptq import HessianTaps

    g = torch.Generator().manual_seed(0)
    x, other = torch.randn(4, 5, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    taps = HessianTaps(True, {5: 1}, 2.0)
    taps.add("a", x)
    taps.add("b", other)
    flat, cls = x.reshape(-1, 3).double(), x[:, 0].double()
    expect = flat.T @ flat / 20 + 2.0 * cls.T @ cls / 4
    assert torch.allclose(taps.means()["a"].double(), expect, rtol=1e-5)
    assert torch.allclose(taps.means()["b"].double(), other.reshape(-1, 3).double().T @ other.reshape(-1, 3).double() / 24, rtol=1e-5)
    assert "a" not in HessianTaps(True, {5: 1}, 0.0).prefix_layouts  # weight 0: plain moments


def test_block_moments_cut_the_forward_short_and_match_the_full_forward(tiny_vit, calib64):
    """GPTQ's per-block input moments stop each batch's forward once the block's layers have run,
    with the same moments as the whole forward; the last layers' moments (nothing to cut) too."""
    from vitc.compress.quantize.gptq import HessianTaps

    module = tiny_vit.copy().require_module("test").eval()
    x = _x(tiny_vit, calib64)[:24]
    block = tiny_vit.structure.blocks[0].path
    first = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n.startswith(block + ".")]
    last = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)][-1:]
    calls = []
    tail = module.get_submodule(tiny_vit.structure.blocks[-1].path)
    handle = tail.register_forward_hook(lambda *a: calls.append(1))
    try:
        for names in (first, last):
            calls.clear()
            got = WO.input_mean_squares(module, names, x, batch=8, full=True)
            taps = HessianTaps(True)
            for n in names:
                taps.hook(module.get_submodule(n), n, on="input")
            with torch.no_grad():
                for i in range(0, 24, 8):
                    module(x[i:i + 8])
            taps.remove()
            want = taps.means()
            assert set(got) == set(names) and all(torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-7) for n in names)
            if names is first:  # the first batch runs whole (to count each layer's calls), the next two stop early
                assert len(calls) == 1 + 3
    finally:
        handle.remove()


def test_gptq_token_weighting_lowers_the_cls_rows_error(tiny_vit, calib64, monkeypatch):
    """With the CLS token weighted (WO.PREFIX_WEIGHT, recorded), GPTQ's rounding error on the CLS rows
    of the grouped layers' outputs, tr((W - Q) E_cls[x x^T] (W - Q)^T) on the calibration images,
    is lower in sum than with plain moments."""
    from vitc.compress.quantize.gptq import prefix_token_layouts

    x = _x(tiny_vit, calib64)
    layouts = prefix_token_layouts(tiny_vit.structure)
    assert layouts and all(p == 1 for p in layouts.values())
    weighted = apply(tiny_vit, QuantConfig(wbits=4, abits=16, group_size=32), x)
    monkeypatch.setattr(WO, "PREFIX_WEIGHT", 0.0)
    plain = apply(tiny_vit, QuantConfig(wbits=4, abits=16, group_size=32), x)
    assert quant_record(weighted)["weight_only"]["hessian_prefix_weight"] == 1.0
    assert quant_record(plain)["weight_only"]["hessian_prefix_weight"] == 0.0
    float_weights = {n: m.weight.detach() for n, m in tiny_vit.module.named_modules() if isinstance(m, torch.nn.Linear)}
    lw, lp = WO.weight_only_layers(weighted.module), WO.weight_only_layers(plain.module)
    grouped = [n for n, l in lw.items() if l.group_size]
    monkeypatch.setattr(WO, "PREFIX_WEIGHT", 1.0)  # the CLS rows' moment: (all + 1 x CLS) - all
    full = WO.input_mean_squares(tiny_vit.module, grouped, x, full=True)
    cls_only = {n: WO.input_mean_squares(tiny_vit.module, [n], x, full=True, prefix_layouts=layouts)[n] - full[n] for n in grouped}
    err = lambda layers, n: torch.einsum("oi,ij,oj->", layers[n].weight - float_weights[n], cls_only[n], layers[n].weight - float_weights[n]).item()
    assert sum(err(lw, n) for n in grouped) < 0.5 * sum(err(lp, n) for n in grouped)  # measured 0.09


def test_gptq_waves_follow_the_blocks():
    from types import SimpleNamespace as NS

    structure = NS(stages=[NS(path="enc", blocks=[NS(path="enc.0"), NS(path="enc.1")]), NS(path="convs")])
    names = ["enc.1.fc", "head", "enc.0.q", "convs.2", "enc.0.fc", "enc.10.fc"]
    assert WO.block_waves(names, structure) == [["enc.0.q", "enc.0.fc"], ["enc.1.fc"], ["convs.2"], ["head", "enc.10.fc"]]
    assert WO.block_waves(names, None) == [names]


def test_graph_path_rounds_low_bit_linear_weights_by_gptq(tiny_vit, calib64):
    """Below 8 bits the graph path's Linear weights are GPTQ-rounded on their per-channel grids:
    every weight stays on its grid, and the logit error against FP32 drops against nearest rounding."""
    from vitc.compress.quantize.modules import weight_quantizers

    x = _x(tiny_vit, calib64)
    cfg = dict(wbits=4, abits=8, sites="graph", calibrator="minmax", range_search="off")
    gptq = apply(tiny_vit, QuantConfig(**cfg), x[:48])
    nearest = apply(tiny_vit, QuantConfig(**cfg, weight_rounding="nearest"), x[:48])
    rounded = quant_record(gptq)["plan"]["gptq_weights"]
    blocks = len(tiny_vit.structure.stages[0].blocks)
    assert len(rounded) == 6 * blocks and not quant_record(nearest)["plan"]["gptq_weights"]  # q, k, v, o, fc1, fc2
    assert quant_record(gptq)["vit_quantizers"]["gptq_rounded_weights"] == 6 * blocks
    gm = gptq.module.graph_module
    for wq in weight_quantizers(gptq.module).values():
        if wq.target in rounded:
            w = gm.get_parameter(wq.target) if "." in wq.target else getattr(gm, wq.target)
            codes = w / wq.weight_scale.reshape(-1, 1)
            assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.abs().max() <= 7.001
    assert not quant_record(apply(tiny_vit, QuantConfig(sites="graph", calibrator="minmax"), x[:48]))["plan"]["gptq_weights"]
    xe = _x(tiny_vit, calib64)[48:]
    with torch.no_grad():
        ref = tiny_vit(xe)
        err = lambda q: ((q(xe) - ref) ** 2).mean().item()
        assert err(gptq) < 0.5 * err(nearest)  # measured 0.14


# ---------------------------------------------------------------- reconstruction on the graph path

def test_rounding_can_start_from_the_calibrated_codes():
    w = torch.tensor([[0.26, -0.74, 0.5, 0.12]])
    s = torch.tensor([0.1])
    codes = torch.tensor([[3.0, -7.0, 6.0, 1.0]])  # 3: floor+1 (up), -7: nearest, 6: one past ceil, 1: nearest
    floor, v = R.init_rounding_at(w, s, codes)
    assert torch.equal(R.hard_weight(floor, v, s, 8) / s, codes)  # the hard start is the calibrated rounding
    soft = R.soft_weight(floor, v, s, 8)
    # where the codes are the nearest rounding, learning starts at the float weight
    assert torch.allclose(soft[0, [1, 3]], w[0, [1, 3]], atol=1e-4)
    assert torch.all((soft - codes * s).abs() <= 0.4 * s + 1e-6)


def test_graph_cut_into_units_reproduces_the_model(tiny_vit, calib64):
    """Each block of the captured graph, run alone on its recorded inputs, gives its recorded outputs."""
    from vitc.compress.quantize import graph_reconstruct as GR
    from vitc.compress.quantize import torch_graph as TG

    x = _x(tiny_vit, calib64)[:4]
    gm = TG.capture(tiny_vit.module, x[:2]).graph_module
    units = GR.partition(gm, tiny_vit.structure, f"{TG.QUANT_ROOT}.")
    blocks = [u.path for u in units if u.kind == "block"]
    assert blocks == [b.path for b in tiny_vit.structure.blocks]
    assert units[0].kind == "span" and units[-1].kind == "span"  # the embeddings, the head
    values = GR.record_values(gm, {n for u in units for n in u.inputs + u.outputs}, x)
    GR.check_cut(gm, units, values, x)
    # chained, the units are the model
    flow = {next(p.name for p in gm.graph.nodes if p.op == "placeholder"): x}
    for u in units:
        for name, v in zip(u.outputs, GR.run_unit(GR.cut(gm, u), [flow[n] for n in u.inputs], len(x))):
            flow[name] = v
    with torch.no_grad():
        assert torch.allclose(flow[units[-1].outputs[-1]], gm(x), atol=1e-6)


def test_graph_path_reconstruction_lowers_the_error_and_stays_on_the_grids(tiny_vit, calib64, tmp_path):
    """--reconstruct on the graph path (prefix grids and GPTQ codes below 8 bits included): every
    unit ends no worse than calibration, the output is closer to FP32, the weights lie on their grids,
    and the model saves and reloads to the same outputs."""
    from vitc.compress.quantize.modules import weight_quantizers

    x = _x(tiny_vit, calib64)
    cfg = dict(wbits=4, abits=4, sites="graph", calibrator="minmax")
    calibrated = apply(tiny_vit, QuantConfig(**cfg), x)
    said = []
    # 120 steps: at 40 the output error ratio below measured 0.84 in one installation and 0.94 in
    # another (same code; the tiny random ViT's few-step learning is that sensitive); 80: 0.85
    q = apply(tiny_vit, QuantConfig(**cfg, reconstruct_iters=120), x, say=said.append)
    rec = quant_record(q)
    assert "reconstruction (graph)" in said[0] and rec["reconstruction"]["path"] == "graph"
    assert rec["plan"]["prefix_grids"] and rec["plan"]["gptq_weights"]
    learned = [u for u in rec["reconstruction"]["units"] if u["weights"]]
    assert [u["unit"] for u in learned if u["kind"] == "block"] == [b.path for b in tiny_vit.structure.blocks]
    assert all(u["mse_after"] <= u["mse_before"] for u in learned)
    assert any(u["codes_changed"] > 0 for u in learned)  # the rounding moved off the calibrated codes
    assert any(u["learned_mse"] < 0.9 * u["mse_before"] for u in learned), learned
    xe = _x(tiny_vit, calib64)[:48]
    with torch.no_grad():
        ref = tiny_vit(xe)
        assert (q(xe) - ref).pow(2).mean() < 0.75 * (calibrated(xe) - ref).pow(2).mean()  # measured 0.59
    gm = q.module.graph_module
    for wq in weight_quantizers(q.module).values():
        w = gm.get_parameter(wq.target) if "." in wq.target else getattr(gm, wq.target)
        codes = w.movedim(wq.axis, 0) / wq.weight_scale.reshape(-1, *[1] * (w.dim() - 1))
        assert torch.allclose(codes, codes.round(), atol=1e-3), wq.target
    save_quantized(q, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(xe[:8]), q(xe[:8]))


def test_graph_path_reconstruction_resumes(tiny_vit, calib64, tmp_path, monkeypatch):
    from vitc.compress.quantize import graph_reconstruct as GR

    x = _x(tiny_vit, calib64)
    config = QuantConfig(wbits=4, abits=8, sites="graph", calibrator="minmax", reconstruct_iters=4)
    full = apply(tiny_vit, config, x, say=lambda *_: None)
    real, calls = GR.learn_graph_unit, {"n": 0}

    def dies_after_two(*a, **k):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(GR, "learn_graph_unit", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        apply(tiny_vit, config, x, reconstruct_staging=tmp_path, say=lambda *_: None)
    monkeypatch.setattr(GR, "learn_graph_unit", real)
    said = []
    resumed = apply(tiny_vit, config, x, reconstruct_staging=tmp_path, say=said.append)
    assert "resuming after 2 finished units" in said[0] and not any(tmp_path.iterdir())
    with torch.no_grad():
        assert torch.allclose(resumed(x[:8]), full(x[:8]), atol=1e-5)


@pytest.mark.parametrize("sites", ["modules", "graph"])
def test_reconstruction_steps_grow_with_depth_at_the_same_total(tiny_vit, calib64, sites):
    """--iters-ramp 0.5: the learnable units' steps run linearly from half to one and a half times
    --iters, in execution order, and add up to about units x --iters; the progress bar's total is
    that sum and the record lists each unit's steps."""
    x = _x(tiny_vit, calib64)
    said = []
    q = apply(tiny_vit, QuantConfig(wbits=4, abits=8, sites=sites, calibrator="minmax", reconstruct_iters=8,
                                    reconstruct_ramp=0.5), x, say=said.append)
    units = quant_record(q)["reconstruction"]["units"]
    steps = [u["steps"] for u in units]
    assert len(steps) >= 3 and steps[0] == 4 and steps[-1] == 12
    assert steps == sorted(steps) and abs(sum(steps) - 8 * len(steps)) <= len(steps) // 2
    assert any(f"4..12 steps (growing with depth, {sum(steps)} in all)" in line for line in said)


def test_iters_ramp_is_refused_out_of_range_or_without_reconstruction():
    with pytest.raises(VitcError, match=r"--iters-ramp 1.0 is out of range.*\[0, 1\)"):
        QuantConfig(reconstruct_iters=10, reconstruct_ramp=1.0).validate()
    with pytest.raises(VitcError, match="--iters-ramp applies to block reconstruction.*--reconstruct"):
        QuantConfig(reconstruct_ramp=0.5).validate()


def test_graph_cut_refuses_a_block_run_twice():
    """A block whose ops are not one stretch of the graph (a module applied twice) cannot be a unit:
    one line that says so and what to do."""
    from types import SimpleNamespace as NS

    from vitc.compress.quantize import graph_reconstruct as GR
    from vitc.compress.quantize import torch_graph as TG

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk, self.mid = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.blk(self.mid(self.blk(x)))

    gm = TG.capture(Twice(), torch.randn(2, 8)).graph_module
    with pytest.raises(VitcError, match="the ops of blk are not one stretch of the captured graph.*without --reconstruct"):
        GR.partition(gm, NS(blocks=[NS(path="blk")], conv_stages=[]), f"{TG.QUANT_ROOT}.")
    units = GR.partition(gm, NS(blocks=[NS(path="mid")], conv_stages=[]), f"{TG.QUANT_ROOT}.")
    assert [u.kind for u in units] == ["span", "block", "span"]


# ---------------------------------------------------------------- 4-bit attention: adaptive log grid, key centring

def test_adaptive_log_grid_keeps_the_mass_of_a_long_attention():
    """257-token attention rows sit near 1/257 = 2**-8, below log-sqrt(2)'s last 4-bit level (2**-7):
    that grid zeroes most of them; the adaptive step keeps the mass."""
    torch.manual_seed(0)
    p = torch.softmax(1.5 * torch.randn(64, 257), -1)
    step, errors = Q.adaptive_log_step(p, 4)
    assert errors[step] == min(errors.values()) and step in Q.LOG_STEPS
    sqrt2 = Q.fake_quant_log2(p, 4, sqrt2=True)
    adaptive = Q.fake_quant_log2(p, 4, step=step)
    assert torch.equal(Q.fake_quant_log2(p, 4, step=0.5), sqrt2) and torch.equal(Q.fake_quant_log2(p, 4, step=1.0),
                                                                                Q.fake_quant_log2(p, 4))
    lost_sqrt2 = (1 - sqrt2.sum(-1)).abs().mean()
    lost_adaptive = (1 - adaptive.sum(-1)).abs().mean()
    assert lost_sqrt2 > 0.3 and lost_adaptive < 0.1
    assert (adaptive - p).abs().mean() < 0.5 * (sqrt2 - p).abs().mean()


def test_auto_softmax_grid_keeps_log_sqrt2_where_it_keeps_the_mass():
    """softmax "auto" below 8 bits: per attention, log-sqrt(2) unless it rounds more than 10% of the mass to 0."""
    from vitc.calibration.observers import Observer
    from vitc.compress.quantize.modules import ActQuant

    torch.manual_seed(0)
    long_rows = torch.softmax(1.5 * torch.randn(8, 4, 257, 257), -1)  # near 2**-8: below log-sqrt(2)'s 4-bit range
    short_rows = torch.softmax(torch.randn(8, 4, 16, 16), -1)  # near 2**-4
    chosen = {}
    for name, p in (("long", long_rows), ("short", short_rows)):
        q = ActQuant(name, bits=4, kind="adalog")
        q.mode = "observe"
        q.observer = Observer(name)
        q(p)
        lost = q.set_adaptive_log(0.10)
        chosen[name] = (q.kind, lost)
    assert chosen["long"][0] == "adalog" and chosen["long"][1] > 0.3
    assert chosen["short"][0] == "logsqrt2" and chosen["short"][1] <= 0.10


def _key_offset_vit(tiny_vit, offset: float):
    """tiny_vit with a large per-channel offset on every key (as pretrained ViTs' keys carry)."""
    import copy

    module = copy.deepcopy(tiny_vit.module).eval()
    torch.manual_seed(1)
    keys = [module.get_submodule(b.attention.k) for b in tiny_vit.structure.blocks]
    assert keys
    for m in keys:
        m.bias.data += offset * torch.randn_like(m.bias)
    return module


def test_key_centring_is_exact_and_narrows_the_keys(tiny_vit, calib64):
    from vitc.compress.quantize import torch_graph as TG

    x = _x(tiny_vit, calib64)[:16]
    module = _key_offset_vit(tiny_vit, 8.0)
    with torch.no_grad():
        want = module(x)
    captured = TG.capture(module, x[:2])
    gm = captured.graph_module
    TG.decompose_sdpa(gm)
    TG.shape_prop(gm, x[:1])
    plan = TG.find_sites(gm, QuantConfig(wbits=4, abits=4))
    installed = TG.install(gm, plan)
    keys = TG.key_operands(gm, installed, plan)
    blocks = len(tiny_vit.structure.stages[0].blocks)
    assert len(keys) == blocks
    ranges = TG.KeyRanges(gm, keys)
    with torch.no_grad():
        captured(x)
    ranges.remove()
    spans = {k: (ranges.lo[k].abs().amax().item(), ranges.hi[k].abs().amax().item()) for k in keys}
    done = TG.center_keys(gm, installed, ranges)
    assert set(done) == set(keys)
    kept = {}
    hooks = [gm.get_submodule(f"{TG.QUANT_ROOT}.a_{TG._safe(k)}").register_forward_hook(
        lambda m, inp, out, k=k: kept.__setitem__(k, inp[0].detach().abs().amax().item())) for k in keys]
    with torch.no_grad():
        got = captured(x)
    for h in hooks:
        h.remove()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)  # the softmax removes the shift
    for k in keys:  # the keys' one grid now spans their spread, not their offsets
        assert kept[k] < 0.5 * max(spans[k])


def test_keys_are_left_alone_where_the_logits_are_not_a_softmax_or_the_keys_are_shared():
    from vitc.compress.quantize import torch_graph as TG

    class Gate(nn.Module):  # sigmoid(q k^T) v: a shift of the keys would change it
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return torch.sigmoid(self.q(x) @ self.k(x).transpose(-2, -1)) @ x

    class Shared(Gate):  # softmax(q k^T) v, and the same k^T read by a second, plain product
        def forward(self, x):
            kt = self.k(x).transpose(-2, -1)
            return torch.softmax(self.q(x) @ kt, -1) @ x + (x @ kt) @ x

    class Plain(Gate):  # the attention alone: its keys are centred
        def forward(self, x):
            return torch.softmax(self.q(x) @ self.k(x).transpose(-2, -1), -1) @ x

    def keys(module):
        x = torch.randn(4, 5, 8)
        captured = TG.capture(module.eval(), x[:2])
        gm = captured.graph_module
        TG.shape_prop(gm, x[:1])
        plan = TG.find_sites(gm, QuantConfig(wbits=4, abits=4))
        return TG.key_operands(gm, TG.install(gm, plan), plan)

    assert keys(Gate()) == [] and keys(Shared()) == []
    assert len(keys(Plain())) == 1


def test_graph_path_at_4_bits_centres_keys_fits_the_log_grid_and_reloads(tiny_vit, calib64, tmp_path):
    x = _x(tiny_vit, calib64)[:32]
    xe = _x(tiny_vit, calib64)[32:48]
    blocks = len(tiny_vit.structure.stages[0].blocks)
    q4 = apply(tiny_vit, QuantConfig(wbits=4, abits=4, sites="graph", calibrator="minmax", range_search="off",
                                     softmax="adalog"), x)
    rec = quant_record(q4)
    assert len(rec["plan"]["centered_keys"]) == blocks
    probs = [i for s in rec["quant_plan"]["sites"] for i in s["inputs"] if i["pattern"] == "post-softmax"]
    assert len(probs) == blocks and all(i["kind"] == "adalog" for i in probs)
    from vitc.compress.quantize.modules import ActQuant

    steps = [m.spec()["log_step"] for m in q4.module.modules() if isinstance(m, ActQuant) and m.kind == "adalog"]
    assert len(steps) == blocks and all(min(abs(s - c) for c in Q.LOG_STEPS) < 1e-4 for s in steps)
    save_quantized(q4, tmp_path / "q4")
    back = load_quantized(tmp_path / "q4")
    with torch.no_grad():
        assert torch.equal(back(xe), q4(xe))
    # 6-bit activations keep log-sqrt(2) (it keeps the mass there) and plain keys (auto); "off" and an explicit grid override
    q6 = quant_record(apply(tiny_vit, QuantConfig(wbits=6, abits=6, sites="graph", calibrator="minmax", range_search="off"), x))
    assert not q6["plan"]["centered_keys"]
    assert {i["kind"] for s in q6["quant_plan"]["sites"] for i in s["inputs"] if i["pattern"] == "post-softmax"} == {"logsqrt2"}
    off = quant_record(apply(tiny_vit, QuantConfig(wbits=4, abits=4, sites="graph", calibrator="minmax", range_search="off",
                                                   key_centering="off", softmax="logsqrt2"), x))
    assert not off["plan"]["centered_keys"]
    assert {i["kind"] for s in off["quant_plan"]["sites"] for i in s["inputs"] if i["pattern"] == "post-softmax"} == {"logsqrt2"}


def test_mlp_rotation_is_exact_in_float_reloads_and_exports(tiny_vit, calib64, tmp_path):
    """--mlp-rotation on (graph path): each block's fc2 input is rotated by a 64-wide block-diagonal Hadamard in
    front of its grid, the rotation folded into fc2's weight, so the float graph computes what the model does;
    the rotated grid is a plain uniform one (not GELU's twin grid); the quantized model saves and reloads to
    the same outputs, and at 8 bits exports to ONNX with the rotation as a float MatMul and runs in ONNX Runtime
    and OpenVINO (f32) like its simulation."""
    from vitc.compress.quantize import torch_graph as TG

    h = TG.hadamard(64)
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6) and torch.equal(h, h.T)
    with pytest.raises(ValueError, match="power of 2"):
        TG.hadamard(48)
    x = _x(tiny_vit, calib64)
    blocks = len(tiny_vit.structure.blocks)
    module = tiny_vit.module.eval()
    captured = TG.capture(__import__("copy").deepcopy(module), x[:2])
    gm = captured.graph_module
    TG.decompose_sdpa(gm)
    TG.shape_prop(gm, x[:1])
    plan = TG.find_sites(gm, QuantConfig(wbits=4, abits=4))
    installed = TG.install(gm, plan)
    fc2 = {n: p.detach().clone() for n, p in gm.named_parameters() if n.endswith("fc2.weight")}
    rotated = TG.rotate_linear_inputs(gm, installed, {"post-gelu"})
    assert len(rotated) == blocks and set(rotated.values()) == {64}
    assert all(not torch.equal(gm.get_parameter(n), w) for n, w in fc2.items())  # folded into every fc2
    with torch.no_grad():  # quantizers off: the rotation is exact
        assert torch.allclose(captured(x[:16]), module(x[:16]), atol=1e-4)
    low = dict(wbits=4, abits=4, sites="graph", calibrator="minmax", range_search="off", gelu="twin", prefix_grid="off")
    q = apply(tiny_vit, QuantConfig(**low, mlp_rotation="on"), x[:32])
    rec = quant_record(q)
    assert len(rec["plan"]["rotated_inputs"]) == blocks
    assert rec["vit_quantizers"]["post-gelu"].endswith(f"; hadamard-rotated on {blocks}")
    gelu = [i for s in rec["quant_plan"]["sites"] for i in s["inputs"] if i["pattern"] == "post-gelu"]
    assert len(gelu) == blocks and all(i["kind"] == "uniform" for i in gelu)
    plain = quant_record(apply(tiny_vit, QuantConfig(**low), x[:32]))  # the GELU grid asked for: twin, unless rotated
    assert not plain["plan"]["rotated_inputs"]
    assert {i["kind"] for s in plain["quant_plan"]["sites"] for i in s["inputs"] if i["pattern"] == "post-gelu"} == {"twin"}
    xe = x[32:48]
    save_quantized(q, tmp_path / "q4")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q4")(xe), q(xe))
    from vitc.export.qdq import export_qdq_onnx
    from vitc.runtimes import open_session

    q8 = apply(tiny_vit, QuantConfig(sites="graph", mlp_rotation="on"), x[:32])
    path = export_qdq_onnx(q8, tmp_path / "r.onnx")
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    rotations = [n for n in model.graph.node if n.op_type == "MatMul" and any(
        a in consts and consts[a].shape == (64, 64) and np.allclose(np.abs(consts[a]), 1 / 8) for a in n.input)]
    assert len(rotations) == blocks
    with torch.no_grad():
        ref = q8(xe).numpy()
    import openvino as ov

    ov.save_model(ov.convert_model(str(path)), str(tmp_path / "r.xml"), compress_to_fp16=False)
    for out in (np.asarray(open_session(path, runtime="onnxruntime")(xe)),
                np.asarray(open_session(tmp_path / "r.xml", runtime="openvino", precision="f32")(xe))):
        assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
        assert np.abs(out - ref).max() < 0.03 * (ref.max() - ref.min())  # measured 0.012 in both


def test_norm_rotation_rotates_the_post_layernorm_inputs_in_place_of_repq_and_reloads(tiny_vit, calib64, tmp_path):
    """--norm-rotation on (graph path): every post-LayerNorm linear input (q/k/v, fc1, the classifier) is
    rotated by the 64-wide block-diagonal Hadamard in front of its grid, folded into every linear that reads it,
    exact in float; RepQ then folds no norm (their outputs no longer reach a grid directly); with --mlp-rotation
    on as well, the fc2 inputs are rotated too; the saved model reloads to the same outputs; the 4-bit weights of
    the rotated linears lose less of their layer's output than with RepQ's map."""
    from vitc.compress.quantize import torch_graph as TG

    x = _x(tiny_vit, calib64)
    blocks = len(tiny_vit.structure.blocks)
    low = dict(wbits=4, abits=4, sites="graph", calibrator="minmax", range_search="off", prefix_grid="off")
    repq = quant_record(apply(tiny_vit, QuantConfig(**low), x[:32]))
    assert len(repq["plan"]["reparameterised_norms"]) == 2 * blocks and not repq["plan"]["rotated_inputs"]
    q = apply(tiny_vit, QuantConfig(**low, norm_rotation="on"), x[:32])
    rec = quant_record(q)
    # each block's two norms, and the final one the classifier reads (through the CLS token's getitem)
    assert len(rec["plan"]["rotated_inputs"]) == 2 * blocks + 1 and set(rec["plan"]["rotated_inputs"].values()) == {64}
    assert rec["plan"]["reparameterised_norms"] == [] and rec["plan"]["rotation_skipped"] == {}
    assert rec["vit_quantizers"]["post-layernorm"].endswith(f"repq on 0 norms; hadamard-rotated on {2 * blocks + 1}")
    both = quant_record(apply(tiny_vit, QuantConfig(**low, norm_rotation="on", mlp_rotation="on"), x[:32]))
    assert len(both["plan"]["rotated_inputs"]) == 3 * blocks + 1
    assert both["vit_quantizers"]["post-gelu"].endswith(f"; hadamard-rotated on {blocks}")
    module = tiny_vit.module.eval()
    captured, installed = _graph_installed(module, x)
    skipped = {}  # a block wider than the model: nothing rotated, and each input said why
    assert TG.rotate_linear_inputs(captured.graph_module, installed, {"post-layernorm"}, block=128, skipped=skipped) == {}
    assert len(skipped) == 2 * blocks + 1 and set(skipped.values()) == {TG.ROTATION_WIDTH}
    assert len(TG.rotate_linear_inputs(captured.graph_module, installed, {"post-layernorm"})) == 2 * blocks + 1
    with torch.no_grad():  # quantizers off: the rotations are exact
        assert torch.allclose(captured(x[:16]), module(x[:16]), atol=1e-4)
    xe = x[32:48]
    save_quantized(q, tmp_path / "q4")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q4")(xe), q(xe))
    with torch.no_grad():
        ref = tiny_vit.module.eval()(xe)
        err = {name: torch.nn.functional.mse_loss(m(xe), ref).item()
               for name, m in (("repq", apply(tiny_vit, QuantConfig(**{**low, "abits": 8}), x[:32])),
                               ("rotated", apply(tiny_vit, QuantConfig(**{**low, "abits": 8}, norm_rotation="on"), x[:32])))}
    # measured 3.47e-5 rotated vs 4.91e-5 RepQ (0.71x, 2026-12-08): a margin, not a coin flip
    assert err["rotated"] < 0.85 * err["repq"], err


def test_mlp_rotation_is_refused_where_it_is_not_built(tiny_vit, calib64):
    with pytest.raises(VitcError, match="--mlp-rotation on applies to the graph path.*--sites graph"):
        apply(tiny_vit, QuantConfig(sites="modules", mlp_rotation="on"), _x(tiny_vit, calib64)[:16])
    with pytest.raises(VitcError, match="mlp_rotation 'auto' is not supported"):
        QuantConfig(mlp_rotation="auto").validate()
    with pytest.raises(VitcError, match="--norm-rotation on applies to the graph path.*--sites graph"):
        apply(tiny_vit, QuantConfig(sites="modules", norm_rotation="on"), _x(tiny_vit, calib64)[:16])


def _graph_installed(module, x):
    from vitc.compress.quantize import torch_graph as TG

    captured = TG.capture(__import__("copy").deepcopy(module).eval(), x[:2])
    gm = captured.graph_module
    TG.decompose_sdpa(gm)
    TG.shape_prop(gm, x[:1])
    return captured, TG.install(gm, TG.find_sites(gm, QuantConfig(wbits=4, abits=4)))


def test_value_reparam_finds_the_value_channels_folds_exactly_and_reloads(tiny_vit, calib64, tmp_path):
    """--value-reparam on (graph path): each attention's output projection input (softmax @ V) gets RepQ-ViT's
    per-channel affine map, folded into the value projection's rows and the output projection, so the float
    model is unchanged and one per-tensor grid fits the channels. The value channel behind each input channel
    is found by running the model (separate q/k/v projections, and a fused qkv with a head split); a model whose
    V is also read elsewhere keeps its weights (the fold would change that reader)."""
    from vitc.compress.quantize import torch_graph as TG

    sys.path.insert(0, str(Path(__file__).parent))
    import generality_prune_models as gpm
    from vitc.models.intake import load_model

    x = _x(tiny_vit, calib64)
    captured, installed = _graph_installed(tiny_vit.module, x)
    done = TG.reparam_values(captured, installed, x[:32])
    blocks = len(tiny_vit.structure.blocks)
    assert len(done) == blocks and {d["channels"] for d in done.values()} == {64}
    with torch.no_grad():
        assert torch.allclose(captured(x[32:48]), tiny_vit.module(x[32:48]), atol=1e-4)
        sites = TG.value_reparam_sites(captured.graph_module, installed)
        for key in done:  # every V channel now spans the same range, and the projection input's channels lie inside it
            seen = {}
            hook = captured.graph_module.get_submodule(sites[key]["v_quantizer"]).register_forward_hook(
                lambda m, inp, out: seen.__setitem__("v", inp[0].detach()))
            ranges = TG.ChannelRanges(captured.graph_module, [key])
            captured(x[:32])
            ranges.remove()
            hook.remove()
            v = seen["v"]  # (images, heads, tokens, head width)
            lo, hi = v.amin((0, 2)).clamp_max(0), v.amax((0, 2)).clamp_min(0)
            assert float((hi - lo).std() / (hi - lo).mean()) < 0.02
            assert float(ranges.lo[key].min()) >= float(lo.min()) - 1e-4 and float(ranges.hi[key].max()) <= float(hi.max()) + 1e-4

    fused = load_model("generality_prune_models:fused_vit")
    xf = _x(fused, calib64)
    captured, installed = _graph_installed(fused.module, xf)
    sites = TG.value_reparam_sites(captured.graph_module, installed)
    assert len(sites) == 2
    dim = 128
    for key, site in sites.items():  # V is the last third of the fused projection's rows, in head order
        TG.ensure_bias(captured.graph_module, site["linear"])
        captured.graph_module.recompile()
        assert torch.equal(TG._value_channels(captured, key, site["linear"], xf[:2])[0], torch.arange(2 * dim, 3 * dim))
    assert len(TG.reparam_values(captured, installed, xf[:32])) == 2
    with torch.no_grad():
        assert torch.allclose(captured(xf[32:48]), fused.module(xf[32:48]), atol=1e-4)

    class VReadTwice(gpm.FusedAttention):  # V also added to the output: no fold is exact for that reader
        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            out = (((q @ k.transpose(-2, -1)) * self.head_dim ** -0.5).softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
            return self.proj(out) + v.transpose(1, 2).reshape(b, n, -1)

    torch.manual_seed(0)
    twice = gpm.FusedViT()
    for blk in twice.blocks:
        old = blk.attn
        blk.attn = VReadTwice(128, 4)
        blk.attn.load_state_dict(old.state_dict())
    captured, installed = _graph_installed(twice.eval(), xf)
    assert len(TG.value_reparam_sites(captured.graph_module, installed)) == 2  # candidates by structure ...
    skipped = {}
    assert TG.reparam_values(captured, installed, xf[:32], skipped=skipped) == {}  # ... each put back by the exactness check
    assert len(skipped) == 2 and set(skipped.values()) == {TG.VALUE_READ_ELSEWHERE}  # and said why
    with torch.no_grad():
        assert torch.allclose(captured(xf[32:48]), twice(xf[32:48]), atol=1e-5)

    low = dict(wbits=4, abits=4, sites="graph", calibrator="minmax", range_search="off")
    q = apply(tiny_vit, QuantConfig(**low, value_reparam="on"), x[:32])
    rec = quant_record(q)
    assert len(rec["plan"]["reparameterised_values"]) == blocks and rec["plan"]["values_kept_plain"] == {}
    assert rec["vit_quantizers"]["attention_output"] == f"repq through the value projection on {blocks}"
    assert not quant_record(apply(tiny_vit, QuantConfig(**low), x[:32]))["plan"]["reparameterised_values"]
    save_quantized(q, tmp_path / "q4")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q4")(x[32:48]), q(x[32:48]))


def test_what_a_rewrite_left_out_is_said_once_per_reason_with_up_to_four_names():
    """The rotations' and --value-reparam's notes (one helper): grouped by reason, reasons in order, four names."""
    from vitc.compress.quantize import torch_graph as TG

    said = []
    left = {f"x{i}": TG.ROTATION_WIDTH for i in range(6)} | {"y": TG.ROTATION_OTHER_READERS}
    TG._say_left_out(said.append, left, lambda n: f"the rotation left {n} of 9 post-layernorm inputs unrotated")
    assert said == [f"note: the rotation left 1 of 9 post-layernorm inputs unrotated (y): {TG.ROTATION_OTHER_READERS}",
                    f"note: the rotation left 6 of 9 post-layernorm inputs unrotated (x0, x1, x2, x3, ...): {TG.ROTATION_WIDTH}"]
    TG._say_left_out(said.append, {}, lambda n: "never")
    assert len(said) == 2


def test_value_reparam_is_refused_where_it_is_not_built(tiny_vit, calib64):
    with pytest.raises(VitcError, match="--value-reparam on applies to the graph path.*--sites graph"):
        apply(tiny_vit, QuantConfig(sites="modules", value_reparam="on"), _x(tiny_vit, calib64)[:16])
    with pytest.raises(VitcError, match="value_reparam 'auto' is not supported"):
        QuantConfig(value_reparam="auto").validate()


def test_key_centring_on_the_module_path_is_said_not_done(tiny_vit, calib64):
    said = []
    q = apply(tiny_vit, QuantConfig(wbits=4, abits=4, sites="modules", key_centering="on", calibrator="minmax",
                                    range_search="off"), _x(tiny_vit, calib64)[:16], say=said.append)
    assert any("--key-centering on applies to the graph path" in line for line in said)
    assert "centered_keys" not in quant_record(q)["plan"]
    with pytest.raises(VitcError, match="key_centering 'sometimes' is not supported"):
        QuantConfig(key_centering="sometimes").validate()


# ---------------------------------------------------------------- the "fisher" reconstruction loss

def test_output_weights_keep_half_the_plain_error_and_follow_position_and_channel():
    flat = torch.full((5, 4), 3.0)
    assert torch.allclose(R.output_weights(flat), torch.ones(5, 4))
    s = torch.ones(5, 4)
    s[0] *= 100.0  # the first position (a CLS token) moves the output 100x per element
    s[:, 2] *= 4.0  # and one channel 4x
    w = R.output_weights(s)
    assert w.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert w.min().item() >= 1.0 - R.FISHER_MIX - 1e-6  # no element loses more than the mixed-in share
    pos, ch = w.mean(1), w.mean(0)
    assert pos[0] / pos[1:].mean() > 5 and ch[2] / ch[[0, 1, 3]].mean() > 1.5  # 2.90 / 0.52; 5 positions bound the first at 5x
    assert torch.allclose(R.output_weights(torch.zeros(3, 2)), torch.ones(3, 2))  # no signal: plain error
    conv = torch.ones(3, 2, 2)
    conv[1] *= 9.0
    wc = R.output_weights(conv)
    assert wc.shape == (3, 2, 2) and wc[1].mean() > wc[0].mean() and wc.mean().item() == pytest.approx(1.0, rel=1e-5)


def test_record_sensitivity_is_the_gauss_newton_diagonal_and_zero_where_the_output_does_not_look():
    """y = W2 (W1 x)[:, 0]: the sensitivity of the hidden value is sum_j W2[j, k]^2 at token 0 (for any x)
    and exactly 0 at the other tokens, which the output never reads (a ViT head reading the CLS token)."""
    import torch.fx as fx

    from vitc.compress.quantize import graph_reconstruct as GR

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(3, 6)
            self.w2 = nn.Linear(6, 4)

        def forward(self, x):
            h = self.w1(x)
            return self.w2(h[:, 0])

    net = Net().eval()
    gm = fx.symbolic_trace(net)
    x = torch.randn(2048, 5, 3)
    sens = GR.record_sensitivity(gm, {"w1"}, x)["w1"]
    expected = net.w2.weight.detach().pow(2).sum(0)  # (6,)
    assert sens.shape == (5, 6)
    assert torch.equal(sens[1:], torch.zeros(4, 6))
    # 2,048 draws: the relative standard error of a mean of squared normals is sqrt(2 / 2048) = 3%
    assert torch.allclose(sens[0], expected, rtol=0.12), (sens[0], expected)
    assert all(p.grad is None for p in gm.parameters())  # nothing left behind for the learning to pick up


@pytest.mark.parametrize("sites", ["graph", "modules"])
def test_reconstruction_with_the_fisher_loss_weighs_the_cls_token(tiny_vit, calib64, tmp_path, sites):
    """--recon-loss fisher, both paths: the tiny ViT's head reads the CLS token only, so the last block's patch
    tokens keep just the plain half of the loss and the CLS token carries the rest; every unit still ends no
    worse than calibration (by its own weighted error), and the model saves and reloads to the same outputs."""
    x = _x(tiny_vit, calib64)
    q = apply(tiny_vit, QuantConfig(wbits=4, abits=8, sites=sites, calibrator="minmax", reconstruct_iters=30,
                                    reconstruct_loss="fisher"), x, say=lambda *_: None)
    rec = quant_record(q)["reconstruction"]
    assert rec["options"]["loss"] == "fisher"
    blocks = [u for u in rec["units"] if u["kind"] == "block"]
    assert len(blocks) == len(tiny_vit.structure.blocks)
    ratios = [u["output_weights"]["first_position_vs_rest"] for u in blocks]
    assert ratios[-1] > 50 and all(r > 1 for r in ratios), ratios  # 65 tokens: 33 / 0.5 = 66 in the last block
    assert all(u["mse_after"] <= u["mse_before"] for u in rec["units"])
    save_quantized(q, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(x[:8]), q(x[:8]))


def test_recon_loss_is_refused_without_reconstruction_or_unknown():
    with pytest.raises(VitcError, match="--recon-loss applies to block reconstruction.*--reconstruct"):
        QuantConfig(reconstruct_loss="fisher").validate()
    with pytest.raises(VitcError, match="--recon-loss kl is not one of mse, fisher"):
        QuantConfig(reconstruct_iters=4, reconstruct_loss="kl").validate()


@pytest.mark.parametrize("sites", ["graph", "modules"])
def test_reconstruction_learns_the_affine_parameters_too(tiny_vit, calib64, tmp_path, sites):
    """--recon-affine, both paths: each unit also learns its weights' per-channel scales and its 1-D float
    parameters (biases, LayerNorm affines), moved by the same relative step; the weights still lie on their
    (learned) grids, the model's parameters keep no gradient, every unit ends no worse
    than calibration, and the model saves and reloads to the same outputs."""
    x = _x(tiny_vit, calib64)
    cfg = dict(wbits=4, abits=4, sites=sites, calibrator="minmax", reconstruct_iters=60)  # at A8 / 30 steps both blocks kept calibration
    plain = apply(tiny_vit, QuantConfig(**cfg), x, say=lambda *_: None)
    q = apply(tiny_vit, QuantConfig(**cfg, reconstruct_affine=True), x, say=lambda *_: None)
    rec = quant_record(q)["reconstruction"]
    assert rec["options"]["affine"]
    blocks = [u for u in rec["units"] if u["kind"] == "block"]
    assert len(blocks) == len(tiny_vit.structure.blocks)
    for u in blocks:  # q, k, v, o, fc1, fc2 and both LayerNorms of each block
        assert u["affine"]["weight_scales"] == 6, u
        names = u["affine"]["floats"]
        assert sum(n.endswith("fc2.bias") for n in names) == 1 and sum("layernorm" in n and n.endswith(".weight") for n in names) == 2, names
    assert all(u["mse_after"] <= u["mse_before"] for u in rec["units"])
    learned = [u for u in blocks if not u["kept_calibration"]]
    assert learned  # else nothing below is tested
    if sites == "graph":
        from vitc.compress.quantize.modules import weight_quantizers

        module, scales, ref_scales = q.module.graph_module, weight_quantizers(q.module), weight_quantizers(plain.module)
        weights = {wq.target: module.get_parameter(wq.target) for wq in scales.values()}
    else:
        module, scales, ref_scales = q.module, weighted_layers(q.module), weighted_layers(plain.module)
        weights = {n: l.weight for n, l in scales.items()}
    moved = [n for n in scales if not torch.equal(scales[n].weight_scale, ref_scales[n].weight_scale)]
    assert len(moved) >= 6, moved  # at least one block's scales were learned
    for n, wq in scales.items():
        w = weights[wq.target] if sites == "graph" else weights[n]
        axis = wq.axis if sites == "graph" else 0
        codes = w.movedim(axis, 0) / wq.weight_scale.reshape(-1, *[1] * (w.dim() - 1))
        assert torch.allclose(codes, codes.round(), atol=1e-3), n
    assert [n for n, p in module.named_parameters() if p.grad is not None] == []  # no gradient left behind
    name = next(n for n in learned[0]["affine"]["floats"] if n.endswith("fc2.bias"))
    base = plain.module.graph_module if sites == "graph" else plain.module
    assert not torch.equal(module.get_parameter(name), base.get_parameter(name))
    save_quantized(q, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(x[:8]), q(x[:8]))


def test_recon_affine_is_refused_without_reconstruction():
    with pytest.raises(VitcError, match="--recon-affine applies to block reconstruction.*--reconstruct"):
        QuantConfig(reconstruct_affine=True).validate()


def test_record_values_mapped_equals_in_memory_and_leaves_nothing_behind():
    """The float targets of the graph path's units, memory-mapped (the default there): the same values as
    in memory and as one pass over every image, batch-first ones over every image (37: the last chunk short), a value without the batch
    (a constant) from the first chunk, and no file left in the temp folder."""
    import tempfile

    import torch.fx as fx

    from vitc.compress.quantize import graph_reconstruct as GR

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(3, 6)
            self.register_buffer("table", torch.arange(12.0).reshape(4, 3))

        def forward(self, x):
            h = self.w1(x)
            t = self.table * 2
            return h.sum(-1) + t.sum()

    torch.manual_seed(0)
    gm = fx.symbolic_trace(Net().eval())
    names = {"w1", "_tensor_constant0"}  # fx folds (table * 2).sum() into a constant: a value without the batch
    assert names <= {n.name for n in gm.graph.nodes}
    x = torch.randn(37, 5, 3)
    before = set(Path(tempfile.gettempdir()).glob("vitc-float-values-*"))
    plain = GR.record_values(gm, names, x, chunk=8)
    mapped = GR.record_values(gm, names, x, chunk=8, mapped=True)
    with torch.no_grad():
        whole = gm.w1(x)  # every image at once
    assert mapped["w1"].shape == (37, 5, 6) and torch.allclose(plain["w1"], whole, atol=1e-6)
    assert torch.equal(mapped["w1"], plain["w1"])
    assert torch.equal(mapped["_tensor_constant0"], plain["_tensor_constant0"])
    assert mapped["_tensor_constant0"].shape == () and float(mapped["_tensor_constant0"]) == 132.0
    assert set(Path(tempfile.gettempdir()).glob("vitc-float-values-*")) == before
