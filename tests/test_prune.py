"""Structured pruning: shapes, consistency, equivalence with the dense model with the removed
units zeroed, importance rankings, targets, saving/reloading, export and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitc.calibration.data import load_tensors
from vitc.compress.prune import PruneConfig, apply
from vitc.compress.prune import importance as imp
from vitc.compress.prune.api import kept_count
from vitc.compress.prune.persist import save_backbone
from vitc.errors import VitcError
from vitc.models.intake import load_model


@pytest.fixture(scope="module")
def calib(tiny_vit_dir):
    from vitc.calibration.sources import open_source

    b = load_model(f"hf:{tiny_vit_dir}")
    return load_tensors(open_source("bundled:calib").select(32, seed=1), b.preprocess)[0]


def _rows_kept(dense_w: torch.Tensor, pruned_w: torch.Tensor) -> list[int]:
    """Which rows of ``dense_w`` survive in ``pruned_w`` (found by value, independent of the pruner)."""
    d = dense_w.reshape(dense_w.shape[0], -1)
    p = pruned_w.reshape(pruned_w.shape[0], -1)
    idx = [int((d == row).all(1).nonzero()[0]) for row in p]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    return idx


def _zero_removed_inputs(layer: torch.nn.Module, kept: list[int], group: int = 1) -> None:
    """Zero the input columns of ``layer`` that belong to removed units: the dense way to remove them."""
    keep_ch = {k * group + j for k in kept for j in range(group)} if group > 1 else set(kept)
    drop = [c for c in range(layer.weight.shape[1]) if c not in keep_ch]
    with torch.no_grad():
        layer.weight[:, drop] = 0


def test_vit_heads_and_mlp_equal_dense_with_removed_units_zeroed(tiny_vit, calib):
    pruned = apply(tiny_vit, PruneConfig(importance="activation", heads=0.5, mlp=0.5, round_to=8), calib)
    reference = tiny_vit.copy()
    for bd, bp in zip(tiny_vit.structure.blocks, pruned.structure.blocks):
        att_p = pruned.module.get_submodule(bp.attention.path)
        assert bp.attention.num_heads == 2 and att_p.num_attention_heads == 2
        assert pruned.module.get_submodule(bp.attention.q).weight.shape == (2 * 16, 64)
        assert pruned.module.get_submodule(bp.attention.out_proj).weight.shape == (64, 2 * 16)
        assert bp.mlp.hidden == 64
        q_rows = _rows_kept(tiny_vit.module.get_submodule(bd.attention.q).weight, pruned.module.get_submodule(bp.attention.q).weight)
        heads = sorted({r // 16 for r in q_rows})
        _zero_removed_inputs(reference.module.get_submodule(bd.attention.out_proj), heads, group=16)
        fc1_rows = _rows_kept(tiny_vit.module.get_submodule(bd.mlp.fc1).weight, pruned.module.get_submodule(bp.mlp.fc1).weight)
        _zero_removed_inputs(reference.module.get_submodule(bd.mlp.fc2), fc1_rows)
    assert torch.allclose(pruned(calib), reference(calib), atol=1e-5)
    cfg = pruned.module.model.config
    assert (cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size) == (2, 16, 64)
    record = pruned.transforms[-1]
    assert record["pass"] == "prune" and record["config"]["heads"] == 0.5
    assert record["flops"] < record["flops_dense"] and record["params"] < record["params_dense"]
    assert tiny_vit.module.get_submodule(tiny_vit.structure.blocks[0].attention.q).weight.shape == (64, 64)  # input untouched


def _lively(backbone):
    """BatchNorm statistics measured on a batch and random affine terms: freshly initialised transformers
    models let the signal die out (MobileViT's logits are all zero), which would hide a wrong channel mapping."""
    g = torch.Generator().manual_seed(0)
    bns = [m for m in backbone.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))
            m.momentum = 1.0  # running statistics := this batch's
        backbone.module.train()
        backbone.module(backbone.example_input(8))
        backbone.module.eval()
    return backbone


@pytest.mark.parametrize("fixture", ["tiny_resnet", "tiny_mobilevit"])
def test_conv_channels_equal_dense_with_removed_channels_zeroed(fixture, request):
    from vitc.compress.prune.adapters import conv_groups

    dense = _lively(request.getfixturevalue(fixture))
    x = dense.example_input(4)
    assert dense(x).std(0).mean() > 1e-3  # the comparison below would prove nothing on constant logits
    pruned = apply(dense, PruneConfig(importance="magnitude", conv=0.5, round_to=8))
    reference = dense.copy()
    groups = conv_groups(dense.module, dense.structure)
    assert groups
    shrunk = 0
    for g in groups:
        kept = _rows_kept(dense.module.get_submodule(g.producers[0]).weight, pruned.module.get_submodule(g.producers[0]).weight)
        shrunk += len(kept) < dense.module.get_submodule(g.producers[0]).weight.shape[0]
        for path in g.norms:  # BatchNorm statistics follow their channels
            bn_d, bn_p = dense.module.get_submodule(path), pruned.module.get_submodule(path)
            assert torch.equal(bn_p.running_var, bn_d.running_var[kept]) and torch.equal(bn_p.weight, bn_d.weight[kept])
        for path in g.depthwise:
            dw = pruned.module.get_submodule(path)
            assert dw.groups == dw.in_channels == dw.out_channels == len(kept)
        _zero_removed_inputs(reference.module.get_submodule(g.consumers[0]), kept)
    assert shrunk > 0
    assert torch.allclose(pruned(x), reference(x), atol=1e-5)
    assert pruned.parameters_count() < dense.parameters_count()


def test_drop_attention_removes_least_turning_sublayer(tiny_vit, calib):
    from vitc.compress.prune.scoring import attention_turns

    turns = attention_turns(tiny_vit.module, tiny_vit.structure, calib, 16)
    expected = min(turns, key=turns.get)
    pruned = apply(tiny_vit, PruneConfig(importance="magnitude", drop_attention=1), calib)
    assert pruned.transforms[-1]["plan"]["dropped_attention"] == [expected]
    dropped = [b for b in pruned.structure.blocks if b.attention is None]
    assert [b.path + ".attention" for b in dropped] == [expected]
    reference = tiny_vit.copy()
    o = reference.module.get_submodule(expected + ".o_proj")
    with torch.no_grad():
        o.weight.zero_()
        o.bias.zero_()
    assert torch.allclose(pruned(calib), reference(calib), atol=1e-5)
    assert pruned.flops() < tiny_vit.flops()


def test_all_methods_remove_a_dead_head_first(tiny_vit, calib):
    dead = tiny_vit.copy()
    site = dead.structure.blocks[0].attention
    with torch.no_grad():
        dead.module.get_submodule(site.out_proj).weight[:, 16:32] = 0  # head 1 contributes nothing
    for method in ("magnitude", "activation", "taylor"):
        pruned = apply(dead, PruneConfig(importance=method, heads=0.75), calib)
        q_rows = _rows_kept(dead.module.get_submodule(site.q).weight, pruned.module.get_submodule(site.q).weight)
        assert sorted({r // 16 for r in q_rows}) == [0, 2, 3], method


def test_flops_target_is_met_and_reloads(tiny_vit, calib, tmp_path):
    pruned = apply(tiny_vit, PruneConfig(importance="taylor", flops=0.7), calib)
    ratio = pruned.flops() / tiny_vit.flops()
    assert 0.5 < ratio <= 0.7
    for b in pruned.structure.blocks:
        assert b.mlp.hidden % 8 == 0
    save_backbone(pruned, tmp_path / "p")
    again = load_model(f"hf:{tmp_path / 'p'}")
    assert torch.allclose(again(calib), pruned(calib), atol=1e-6)
    assert [t["pass"] for t in again.transforms] == ["prune"]
    import transformers

    plain = transformers.ViTForImageClassification.from_pretrained(str(tmp_path / "p"))  # uniform widths: plain transformers too
    assert torch.allclose(plain(pixel_values=calib).logits, pruned(calib), atol=1e-5)


def test_nonuniform_model_reloads_and_exports(tiny_vit, calib, tmp_path):
    import onnxruntime as ort

    pruned = apply(tiny_vit, PruneConfig(importance="activation", drop_attention=1, mlp=0.5), calib)
    assert pruned.transforms[-1]["plan"]["config_describes_all_layers"] is False
    save_backbone(pruned, tmp_path / "p")
    again = load_model(f"hf:{tmp_path / 'p'}")
    assert torch.allclose(again(calib), pruned(calib), atol=1e-6)
    assert [b.attention is None for b in again.structure.blocks] == [b.attention is None for b in pruned.structure.blocks]
    path = tmp_path / "p.onnx"
    torch.onnx.export(again.module.eval(), (calib[:2],), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": calib[:8].numpy()})[0]
    np.testing.assert_allclose(y, again(calib[:8]).numpy(), atol=1e-4)


def test_info_shows_pruned_structure(tiny_resnet, tmp_path):
    from vitc.commands.info import describe_model

    pruned = apply(tiny_resnet, PruneConfig(importance="magnitude", conv=0.5))
    save_backbone(pruned, tmp_path / "r")
    d = describe_model(load_model(f"hf:{tmp_path / 'r'}"))
    assert d["parameters"] == pruned.parameters_count() and d["transforms"][0]["pass"] == "prune"


def test_importance_functions():
    w_out = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    w_in = torch.zeros(5, 3)
    assert torch.allclose(imp.owned_weight_norm([w_out], [w_in]), torch.tensor([5.0, 0.0, 1.0]))
    gates = torch.tensor([[1.0, -1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # unit gates: image 0 -> (0, 2), image 1 -> (2, 0); squared and summed: (4, 4)
    assert torch.allclose(imp.per_unit(imp.taylor_from_gates(gates, 2), 2), torch.tensor([4.0, 4.0]))
    assert imp.keep_indices(torch.tensor([0.3, 0.1, 0.9, 0.5]), 2).tolist() == [2, 3]
    x = torch.randn(10, 8)
    assert float(imp.residual_turn(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(imp.residual_turn(x, -x)) == pytest.approx(2.0, abs=1e-6)


def test_global_counts_rank_units_by_score_per_cost():
    from vitc.compress.prune.api import global_counts

    scores = {"heads": torch.tensor([8.0, 1.0, 6.0, 0.5]), "mlp": torch.arange(32, dtype=torch.float32)}
    cost = {"heads": 4.0, "mlp": 1.0}  # per unit: heads 2, 0.25, 1.5, 0.125; mlp 0..31
    sizes = {"heads": 16, "mlp": 1}
    # the 10 best by score per cost are mlp channels 22..31: no head survives the ranking, one is kept anyway
    assert global_counts(scores, cost, sizes, 10, 8) == {"heads": 1, "mlp": 8}
    # mlp 31..2 (30 of them) and heads 0 (2.0) and 2 (1.5) beat mlp 1; 30 channels round to 32
    assert global_counts(scores, cost, sizes, 32, 8) == {"heads": 2, "mlp": 32}
    assert global_counts(scores, cost, sizes, 36, 1) == {"heads": 4, "mlp": 32}
    assert global_counts(scores, cost, sizes, 13, 1) == {"heads": 1, "mlp": 13}


def test_global_allocation_meets_target_with_per_block_widths(tiny_vit, calib, tmp_path):
    import onnxruntime as ort

    lame = tiny_vit.copy()
    b0 = lame.structure.blocks[0]
    with torch.no_grad():  # block 0's MLP barely contributes: a global ranking takes its channels first
        lame.module.get_submodule(b0.mlp.fc2).weight.mul_(1e-3)
    uniform = apply(lame, PruneConfig(importance="taylor", flops=0.7), calib)
    pruned = apply(lame, PruneConfig(importance="taylor", flops=0.7, allocation="global"), calib)
    assert pruned.flops() / lame.flops() <= 0.7 and pruned.flops() >= uniform.flops() * 0.95
    widths = [b.mlp.hidden for b in pruned.structure.blocks]
    assert all(w % 8 == 0 for w in widths) and widths[0] < widths[1]
    assert all(b.attention.num_heads >= 1 for b in pruned.structure.blocks)
    record = pruned.transforms[-1]
    assert record["config"]["allocation"] == "global" and record["global_rank_kept"] > 0
    save_backbone(pruned, tmp_path / "g")
    again = load_model(f"hf:{tmp_path / 'g'}")
    assert [b.mlp.hidden for b in again.structure.blocks] == widths
    path = tmp_path / "g.onnx"
    torch.onnx.export(again.module.eval(), (calib[:2],), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": calib[:8].numpy()})[0]
    np.testing.assert_allclose(y, pruned(calib[:8]).numpy(), atol=1e-4)


def test_kept_count_rounding():
    assert kept_count(256, 0.7, 1, 8) == 176  # 179.2 -> nearest multiple of 8
    assert kept_count(256, 0.01, 1, 8) == 8  # never below one multiple
    assert kept_count(6, 0.5, 1, 8) == 3  # narrower than round_to: plain rounding
    assert kept_count(4, 0.1, 16, 8) == 0  # heads may round to none: apply() refuses that


@pytest.mark.parametrize("config, message", [
    (PruneConfig(flops=1.2), "outside (0, 1)"),
    (PruneConfig(heads=0.0), "outside (0, 1)"),
    (PruneConfig(importance="magnitude", heads=0.1), "remove every head"),
    (PruneConfig(importance="magnitude", drop_attention=2), "every attention sublayer"),
    (PruneConfig(importance="magnitude", conv=0.5), "no conv units"),
    (PruneConfig(importance="fisher", flops=0.5), "unknown importance"),
    (PruneConfig(importance="magnitude", flops=0.5, allocation="global"), "allocation global ranks units across layers"),
    (PruneConfig(flops=0.5, allocation="greedy"), "unknown allocation"),
    (PruneConfig(flops=0.01), "out of reach"),
])
def test_bad_input(tiny_vit, calib, config, message):
    with pytest.raises(VitcError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply(tiny_vit, config, calib)


def test_cli_prune_writes_model_and_json(tiny_vit_dir, tmp_path, capsys):
    from vitc.cli import run

    out, model = tmp_path / "r.json", tmp_path / "pruned"
    base = ["prune", "--model", f"hf:{tiny_vit_dir}", "--threads", "1"]
    assert run(base + ["--flops", "0.8", "--allocation", "global", "--calib-size", "16", "--recover-steps", "3",
                       "--train-size", "32", "--recover-batch", "16", "-o", str(model), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["allocation"] == "global" and all(n % 8 == 0 for k, n in data["channels"].items() if "fc1" in k)
    assert [s["stage"] for s in data["stages"]] == ["dense", "prune", "prune + recovery"]
    assert data["stages"][1]["flops"] <= 0.8 * data["stages"][0]["flops"]
    assert [t["pass"] for t in load_model(f"hf:{model}").transforms] == ["prune", "recover"]
    capsys.readouterr()
    assert run(base + ["--heads", "1.5"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: --heads 1.5 is outside (0, 1)") and err.count("\n") == 1
    assert run(base + ["--heads", "0.1", "--importance", "magnitude"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: keeping 10% of the heads would remove every head of") and err.count("\n") == 1
    assert not (tmp_path / "other").exists()


def test_image_source_and_tensor_give_the_same_model(tiny_vit, calib_images):
    tensor = load_tensors(calib_images, tiny_vit.preprocess)[0]
    a = apply(tiny_vit, PruneConfig(importance="taylor", heads=0.5), calib_images)
    b = apply(tiny_vit, PruneConfig(importance="taylor", heads=0.5), tensor)
    x = tensor[:8]
    assert torch.equal(a(x), b(x))


def test_units_left_out_of_the_plan_are_named_as_such(tiny_vit, calib):
    """An MLP-only prune leaves the attention projections whole; coverage says why (the --units choice),
    not that they lie outside the adapter's blocks."""
    pruned = apply(tiny_vit, PruneConfig(importance="magnitude", flops=0.8, units=["mlp"]), calib)
    left = {d["name"]: d["reason"] for d in pruned.transforms[-1]["coverage"]["left_alone"]}
    q = [n for n in left if n.endswith("attention.q_proj")]
    assert q, sorted(left)
    assert all("heads units were not in the pruning plan" in left[n] for n in q)
    assert any("outside the blocks" in r for r in left.values())  # the patch embedding / classifier
