"""Structure discovery for each supported family; paths must resolve to the right modules."""
from __future__ import annotations

import pytest
import torch.nn as nn


def _get(module, path):
    return module.get_submodule(path)


def test_vit_structure(tiny_vit):
    s = tiny_vit.structure
    assert (s.family, s.kind) == ("hf-vit", "vit")
    assert len(s.blocks) == 2
    a = s.blocks[0].attention
    assert (a.num_heads, a.head_dim, a.fused) == (4, 16, False)
    for p in (a.q, a.k, a.v, a.out_proj, s.blocks[0].mlp.fc1, s.blocks[0].mlp.fc2, s.classifier):
        assert isinstance(_get(tiny_vit.module, p), nn.Linear), p
    assert isinstance(_get(tiny_vit.module, s.blocks[0].norm1), nn.LayerNorm)
    t = s.transformer_stages[0].tokens
    assert (t.cls_index, t.dist_index, t.grid, t.num_tokens, t.unstructured) == (0, None, (8, 8), 65, True)
    assert s.blocks[0].mlp.hidden == 128 and s.blocks[0].mlp.activation == "gelu"


def test_deit_distillation_token(tmp_path):
    import transformers as T

    from vitc.models.intake import load_model

    cfg = T.DeiTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)
    T.DeiTForImageClassificationWithTeacher(cfg).save_pretrained(str(tmp_path / "deit"))
    b = load_model(f"hf:{tmp_path / 'deit'}")
    t = b.structure.transformer_stages[0].tokens
    assert b.structure.family == "hf-deit" and (t.cls_index, t.dist_index, t.num_tokens) == (0, 1, 66)
    assert b(b.example_input(2)).shape == (2, 10)


def test_mobilevit_hybrid_structure(tiny_mobilevit):
    s = tiny_mobilevit.structure
    assert (s.family, s.kind) == ("hf-mobilevit", "hybrid")
    assert len(s.transformer_stages) == 3 and len(s.bridges) == 3
    assert all(not st.tokens.unstructured for st in s.transformer_stages)
    assert [st.tokens.grid for st in s.transformer_stages] == [(4, 4), (2, 2), (1, 1)]
    for br in s.bridges:
        assert isinstance(_get(tiny_mobilevit.module, br.conv), nn.Conv2d)
        assert isinstance(_get(tiny_mobilevit.module, br.into), nn.Linear)
    for st in s.conv_stages:
        for c in st.convs:
            assert isinstance(_get(tiny_mobilevit.module, c), nn.Conv2d)
        for n in st.norms:
            assert isinstance(_get(tiny_mobilevit.module, n), nn.BatchNorm2d)
    assert s.blocks[0].mlp.activation == "silu"


def test_resnet_and_convnext_are_cnns(tiny_resnet, tmp_path):
    import transformers as T

    from vitc.models.intake import load_model

    s = tiny_resnet.structure
    assert (s.family, s.kind, len(s.conv_stages)) == ("hf-resnet", "cnn", 5)
    assert isinstance(_get(tiny_resnet.module, s.classifier), nn.Linear)
    T.ConvNextForImageClassification(T.ConvNextConfig(num_labels=10, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                                      image_size=32)).save_pretrained(str(tmp_path / "cnx"))
    b = load_model(f"hf:{tmp_path / 'cnx'}")
    assert (b.structure.family, b.structure.kind, len(b.structure.conv_stages)) == ("hf-convnext", "cnn", 5)


def test_flops_count_matches_hand_count(tiny_vit):
    # ViT: patch conv + per block (q,k,v,o: 4*N*d^2, QK^T and AV: 2*N^2*d, MLP: 2*N*d*h) + classifier; 2 FLOPs per MAC
    n, d, h, blocks, p = 65, 64, 128, 2, 4
    macs = 64 * (3 * p * p) * d + blocks * (4 * n * d * d + 2 * n * n * d + 2 * n * d * h) + d * 10
    assert tiny_vit.flops() == pytest.approx(2 * macs, rel=0.01)


def test_conv_stem_vit_is_a_hybrid_with_a_bridge():
    import transformers as T

    from vitc.models.convstem import ConvStem
    from vitc.models.intake import load_model  # noqa: F401 - same loader path as the zoo
    from vitc.models.adapters import discover
    from vitc.models.wrappers import LogitsModule

    cfg = T.ViTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, num_labels=10)
    m = T.ViTForImageClassification(cfg)
    m.vit.embeddings.patch_embeddings.projection = ConvStem(3, [8, 16, 16], 32, 4)
    module = LogitsModule(m.eval())
    s = discover(module)
    assert s.kind == "hybrid" and [st.kind for st in s.stages] == ["conv", "transformer"]
    assert len(s.conv_stages[0].norms) == 3 and s.bridges[0].into.endswith("q_proj")
    assert isinstance(module.get_submodule(s.bridges[0].conv), nn.Conv2d)
    assert s.transformer_stages[0].tokens.unstructured and s.transformer_stages[0].tokens.grid == (8, 8)
    import torch

    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 10)
