"""Token merging (vitc merge): the algorithms on hand-worked examples, mass preservation, the
pass on a tiny ViT (identity at r=0, static shapes, batch independence, structure kept),
schedules, FLOPs targeting, export parity, composition with quantization, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vitc.calibration.data import load_tensors
from vitc.compress.tokens import MergeConfig, apply, for_flops
from vitc.compress.tokens.merge import attentive_pruning, bipartite_soft_matching, reduce_tokens, token_transforming
from vitc.compress.tokens.schedule import check, per_layer
from vitc.errors import VitcError

METHODS = ("tome", "prune", "transform")


@pytest.fixture(scope="module")
def images(tiny_vit_dir):
    from vitc.calibration.sources import open_source
    from vitc.models.intake import load_model

    b = load_model(f"hf:{tiny_vit_dir}")
    return load_tensors(open_source("bundled:eval").select(16, seed=0), b.preprocess)[0]


# ---------------------------------------------------------------- algorithms

def test_bipartite_matching_hand_worked():
    # A = tokens 0, 2, 4; B = tokens 1, 3, 5. Cosine similarities of each A token's best B:
    # a0 -> b0 (token 1): 0.995, a1 -> b1 (token 3): 0.8, a2 -> b2 (token 5): 0.0.
    metric = torch.tensor([[[1, 0], [1, 0.1], [0, 1], [0.6, 0.8], [-1, 0], [0, -1]]], dtype=torch.float32)
    red = bipartite_soft_matching(metric, r=2)
    ids = torch.eye(6).unsqueeze(0)  # token i -> basis vector i, so each output row says who it holds
    out = red.apply(ids)[0]
    expected = torch.zeros(4, 6)
    expected[0, 4] = 1  # the A token that stays (token 4)
    expected[1, [0, 1]] = 1  # B tokens, in order: token 1 with token 0 merged in
    expected[2, [2, 3]] = 1  # token 3 with token 2
    expected[3, 5] = 1
    assert torch.equal(out, expected)
    r1 = bipartite_soft_matching(metric, r=1).apply(ids)[0]
    assert r1.shape == (5, 6) and r1[2, 0] == 1 and r1[2, 1] == 1  # only the most similar pair merges


def test_attentive_pruning_hand_worked():
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.05]])
    x = torch.arange(5, dtype=torch.float32).view(1, 5, 1) * 10
    size = torch.ones(1, 5, 1)
    red = attentive_pruning(scores, r=2)
    y, s, _ = reduce_tokens(red, x, size)
    # keeps tokens 0 and 2 (most attended), fuses 1, 3, 4 weighted by attention
    fused = (0.1 * 10 + 0.05 * 30 + 0.05 * 40) / 0.2
    assert torch.allclose(y[0, :, 0], torch.tensor([0.0, 20.0, fused]), atol=1e-5)
    assert s[0, :, 0].tolist() == [1.0, 1.0, 3.0]


def test_token_transforming_spreads_redundant_tokens_over_nearest_targets():
    # A = tokens 0, 2, 4; B = 1, 3, 5. Token 2 is A's most redundant (identical to B token 3),
    # so r=1 removes it; with k=1 it goes wholly to token 3, with k=2 also to its runner-up, 0.
    metric = torch.tensor([[[1, 0], [0, 1], [0.6, 0.8], [0.6, 0.8], [-1, 0], [0, -1]]], dtype=torch.float32)
    hard = token_transforming(metric, r=1, k=1).apply(torch.eye(6).unsqueeze(0))[0]
    # output rows: kept A (0, 4; most similar first: cos 0 and -0 tie, topk keeps index order), then B (1, 3, 5)
    rows = [0, 4, 1, 3, 5]
    expected = torch.eye(6)[rows]
    expected[3, 2] = 1.0
    assert torch.equal(hard, expected)
    soft = token_transforming(metric, r=1, k=2, temperature=1.0).apply(torch.eye(6).unsqueeze(0))[0]
    # cos(token 2, token 3) = 1, cos(token 2, token 0) = 0.6, cos(token 2, token 1) = 0.8: the two most similar are 3 and 1
    w3, w1 = torch.softmax(torch.tensor([1.0, 0.8]), 0).tolist()
    assert soft[3, 2].item() == pytest.approx(w3, abs=1e-6) and soft[2, 2].item() == pytest.approx(w1, abs=1e-6)
    assert soft[:, 2].sum().item() == pytest.approx(1.0, abs=1e-6)  # many-to-many, mass kept


@pytest.mark.parametrize("method", METHODS)
def test_merging_preserves_token_mass(method):
    g = torch.Generator().manual_seed(0)
    b, n, c, r = 3, 20, 8, 7
    x = torch.randn(b, n, c, generator=g)
    size = torch.randint(1, 5, (b, n, 1), generator=g).float()
    metric = torch.randn(b, n, 16, generator=g)
    scores = torch.rand(b, n, generator=g).softmax(-1)
    red = {"tome": lambda: bipartite_soft_matching(metric, r), "prune": lambda: attentive_pruning(scores, r),
           "transform": lambda: token_transforming(metric, r)}[method]()
    y, s, _ = reduce_tokens(red, x, size)
    assert y.shape == (b, n - r, c) and s.shape == (b, n - r, 1)
    assert torch.allclose(s.sum(1), size.sum(1), atol=1e-4)  # every patch is counted once
    if method != "prune":  # size-weighted averaging keeps sum(size * x); pruning weights its fused token by attention
        assert torch.allclose((s * y).sum(1), (size * x).sum(1), atol=1e-3)


def test_schedules():
    assert per_layer(4, 3) == [4, 4, 4]
    dec = per_layer(4, 6, "decreasing")
    assert dec == sorted(dec, reverse=True) and abs(sum(dec) - 24) <= 3
    assert per_layer(5, 6, layers=[1, 3]) == [0, 5, 0, 5, 0, 0]
    assert check("tome", [8, 4, 0, 0, 0, 0], 6, 64) == [8, 4, 0, 0, 0, 0]
    with pytest.raises(VitcError, match="largest valid value is 21"):
        check("tome", 40, 2, 64)  # 64 -> 43 -> 22 patches: 21 per block is the most that fits
    with pytest.raises(VitcError, match="2 entries but the model has 6"):
        check("tome", [1, 2], 6, 64)
    with pytest.raises(VitcError, match="unknown merge method"):
        check("bogus", 4, 6, 64)


# ---------------------------------------------------------------- the pass

@pytest.mark.parametrize("method", METHODS)
def test_r0_is_the_original_model(tiny_vit, images, method):
    merged = apply(tiny_vit, MergeConfig(method, 0))
    assert torch.allclose(merged(images), tiny_vit(images), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_merged_model_is_static_and_keeps_structure(tiny_vit, images, method):
    merged = apply(tiny_vit, MergeConfig(method, 8))
    assert merged.transforms[-1]["tokens"] == [65, 57, 49]
    assert set(merged.module.state_dict()) == set(tiny_vit.module.state_dict())
    blocks = merged.structure.blocks
    assert [b.attention.q for b in blocks] == [b.attention.q for b in tiny_vit.structure.blocks]
    assert isinstance(merged.module.get_submodule(blocks[0].mlp.fc1), torch.nn.Linear)
    full = merged(images)
    # no state carried between calls or across the batch: each image's logits do not depend on the others
    assert torch.allclose(merged(images[:3]), full[:3], atol=1e-5)
    assert torch.allclose(merged(images), full)
    assert not torch.allclose(full, tiny_vit(images), atol=1e-4)  # it did change the computation
    assert 0.8 < merged.flops() / tiny_vit.flops() < 0.95
    assert tiny_vit.transforms == []  # the input backbone is untouched


def test_for_flops_picks_the_smallest_r(tiny_vit):
    config, ratio = for_flops(tiny_vit, "tome", 0.8)
    assert ratio <= 0.8
    above = apply(tiny_vit, MergeConfig("tome", config.r - 1)).flops() / tiny_vit.flops()
    assert above > 0.8
    with pytest.raises(VitcError, match="outside"):
        for_flops(tiny_vit, "tome", 0.0)
    with pytest.raises(VitcError, match="cannot bring"):
        for_flops(tiny_vit, "tome", 0.05)


def test_refusals(tiny_vit, tiny_resnet, tiny_mobilevit):
    with pytest.raises(VitcError, match="is a CNN"):
        apply(tiny_resnet, MergeConfig("tome", 4))
    with pytest.raises(VitcError, match="grid"):
        apply(tiny_mobilevit, MergeConfig("tome", 4))
    with pytest.raises(VitcError, match="largest valid value is 31"):
        apply(tiny_vit, MergeConfig("prune", 64))  # 64 -> 64 - r must still leave r + 2
    with pytest.raises(VitcError, match="already token-merged"):
        apply(apply(tiny_vit, MergeConfig("tome", 2)), MergeConfig("tome", 2))


def test_blocks_without_attention_are_skipped_or_refused(tiny_vit, images, calib_images):
    prune = pytest.importorskip("vitc.compress.prune")
    pruned = prune.apply(tiny_vit, prune.PruneConfig(importance="magnitude", drop_attention=1), data=calib_images.select(8))
    gone = [i for i, b in enumerate(pruned.structure.blocks) if b.attention is None]
    assert len(gone) == 1
    # the default reduces only where attention (keys, CLS attention) is left
    merged = apply(pruned, MergeConfig("tome", 8))
    assert merged.transforms[-1]["removals"][gone[0]] == 0 and sum(merged.transforms[-1]["removals"]) == 8
    assert torch.allclose(apply(pruned, MergeConfig("tome", 0))(images), pruned(images), atol=1e-5)
    assert torch.isfinite(merged(images)).all()
    rs = [0, 0]
    rs[gone[0]] = 4
    with pytest.raises(VitcError, match=f"block {gone[0]} .* has no attention sublayer"):
        apply(pruned, MergeConfig("prune", rs))


def test_attention_without_key_projections_is_refused(tiny_vit):
    import copy

    from vitc.compress.tokens.adapters import block_parts

    block = copy.deepcopy(tiny_vit.structure.blocks[0])
    block.attention.k = None
    with pytest.raises(VitcError, match="no query/key/value projections"):
        block_parts(tiny_vit.module, tiny_vit.structure, block)


def test_token_groups_cover_every_patch(tiny_vit, images):
    from vitc.compress.tokens.viz import token_groups

    groups = token_groups(apply(tiny_vit, MergeConfig("tome", 0)), images[:2])
    assert torch.equal(groups, torch.stack([torch.arange(64)] * 2))  # nothing merged: one patch per token
    merged = apply(tiny_vit, MergeConfig("tome", 16))
    groups = token_groups(merged, images[:2])
    assert groups.shape == (2, 64) and int(groups.max()) < 32
    assert all(torch.unique(g).numel() == 32 for g in groups)  # 64 - 2 * 16 tokens left, none empty


def test_description_round_trip(tiny_vit, tiny_vit_dir, images, tmp_path):
    from vitc.compress.tokens import save_description
    from vitc.models.intake import load_model

    merged = apply(tiny_vit, MergeConfig("transform", [6, 3]))
    path = tmp_path / "merged.json"
    save_description(path, merged)
    again = load_model(str(path))
    assert again.transforms[-1]["removals"] == [6, 3]
    assert torch.allclose(again(images), merged(images), atol=1e-6)
    path.write_text(json.dumps({"something": "else"}))
    with pytest.raises(VitcError, match="not a model description"):
        load_model(str(path))


# ---------------------------------------------------------------- deployment

@pytest.mark.parametrize("method", METHODS)
def test_onnx_export_parity(tiny_vit, method, tmp_path):
    import onnx

    from vitc.export import export_artifact

    merged = apply(tiny_vit, MergeConfig(method, 8))
    art = export_artifact(merged, "onnx", tmp_path / "m.onnx", eval_size=32)
    assert art.status == "passed"
    assert art.parity["top1_agreement"] == 1.0 and art.parity["max_abs_logit_error"] < 1e-4
    # a fixed schedule: the batch axis is the only dynamic one, so the merged blocks compute no
    # shapes (the embeddings' own reshapes are the original model's)
    ops = [n for n in onnx.load(str(art.path)).graph.node if "layers" in n.name]
    assert not [n.name for n in ops if n.op_type in ("Shape", "ConstantOfShape", "Expand", "NonZero")]


def test_openvino_export_parity(tiny_vit, tmp_path):
    from vitc.export import export_artifact

    art = export_artifact(apply(tiny_vit, MergeConfig("tome", 8, "decreasing")), "openvino", tmp_path / "m.xml", eval_size=16)
    assert art.status == "passed" and art.parity["max_abs_logit_error"] < 1e-4


def test_merge_then_quantize_then_export(tiny_vit, calib_images, images, tmp_path):
    quantize = pytest.importorskip("vitc.compress.quantize")
    from vitc.export import export_artifact

    merged = apply(tiny_vit, MergeConfig("tome", 8))
    q = quantize.apply(merged, quantize.QuantConfig(), data=calib_images.select(16))
    assert [t["pass"] for t in q.transforms] == ["merge", "quantize"]
    # the quantizers sit inside the merged attention: they saw data and change the output a little
    diff = (q(images) - merged(images)).abs()
    assert 0 < diff.max() < 0.1
    art = export_artifact(q, "onnx", tmp_path / "mq.onnx", eval_size=16)
    assert art.status == "passed"


# ---------------------------------------------------------------- other families

def _wrap(model, size: int, source: str):
    from vitc.backbone import Backbone
    from vitc.models.preprocess import Preprocess
    from vitc.models.wrappers import LogitsModule

    return Backbone(LogitsModule(model.eval()).eval(), Preprocess(size, size), [str(i) for i in range(10)], source)


@pytest.mark.parametrize("method", ["tome", "transform"])
def test_deit_with_distillation_token(images, method):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.DeiTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=10)
    deit = _wrap(T.DeiTForImageClassificationWithTeacher(cfg), 32, "tiny-deit")
    assert deit.structure.family == "hf-deit"
    assert torch.allclose(apply(deit, MergeConfig(method, 0))(images), deit(images), atol=1e-5)
    merged = apply(deit, MergeConfig(method, 8))
    assert merged.transforms[-1]["tokens"] == [66, 58, 50]  # CLS + distillation token + 64 patches
    out = merged(images)
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    assert torch.allclose(merged(images[:2]), out[:2], atol=1e-5)


def test_timm_vision_transformer(images):
    try:
        import timm
    except Exception as exc:  # ImportError, or torchvision's RuntimeError about missing ops
        pytest.skip(f"timm: is untested in this project (README): timm does not import here ({str(exc).splitlines()[0][:80]})")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, num_classes=10, depth=2)
    vit = _wrap(model, 32, "timm-tiny")
    assert vit.structure.family == "timm-vit"
    assert torch.allclose(apply(vit, MergeConfig("tome", 0))(images), vit(images), atol=1e-4)
    merged = apply(vit, MergeConfig("tome", 8))
    assert merged(images).shape == (16, 10)


def test_ranking_breaks_exact_ties_by_index_as_onnx_topk_does(tmp_path):
    """Exactly equal scores (CIFAR upsampled to 224 px is full of identical patches): torch.topk
    ordered them its own way and ONNX's TopK by index, so an exported merged model could merge
    other tokens. ``_ranked`` orders ties by index, and its exported graph (the TorchScript exporter,
    as merged models are written) ranks exactly as PyTorch does."""
    import onnxruntime as ort

    from vitc.compress.tokens.merge import _ranked

    values, idx = _ranked(torch.tensor([[0.5, 1.0, 1.0, 0.2, 1.0, 0.5]]), 6)
    assert idx.tolist() == [[1, 2, 4, 0, 5, 3]] and torch.equal(values, torch.tensor([[1.0, 1.0, 1.0, 0.5, 0.5, 0.2]]))

    class Rank(torch.nn.Module):
        def forward(self, x):
            return _ranked(x, 150)[1]

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (3, 200), generator=g).float() / 4  # many exact ties
    torch.onnx.export(Rank(), (x,), str(tmp_path / "rank.onnx"), dynamo=False)
    sess = ort.InferenceSession(str(tmp_path / "rank.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], Rank()(x).numpy())
