"""The Python verbs: each takes a model spec string, a Backbone or a plain nn.Module, and does
what its CLI verb does; saved artifacts load through the loaders their passes registered."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import vitc
from vitc.errors import VitcError
from vitc.models.intake import load_model

sys.path.insert(0, str(Path(__file__).parent))
import generality_prune_models as gm  # noqa: E402


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.bn = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv(x)))))
        return self.fc(x.mean((2, 3)))


def test_as_backbone_wraps_a_module_with_stated_preprocessing():
    from vitc.api import as_backbone

    b = as_backbone(TinyCNN(), input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert b.preprocess.input_size == 32 and b.preprocess.mean == (0.5, 0.5, 0.5) and b.num_classes == 10
    assert b.preprocess_origin == "flags" and b.source == "python:TinyCNN"
    d = as_backbone(TinyCNN())
    assert d.preprocess.input_size == 224 and d.preprocess_origin == "defaults"
    assert as_backbone(b) is b
    with pytest.raises(VitcError, match="spec string, a Backbone or an nn.Module"):
        as_backbone(42)


def test_prune_takes_a_module_a_backbone_and_a_spec(tiny_vit_dir):
    from vitc.api import as_backbone

    p = vitc.prune(as_backbone(TinyCNN(), input_size=32), None, importance="magnitude", conv=0.5, round_to=1)
    assert p.module.model.conv.out_channels == 32 and p.module.model.conv2.in_channels == 32
    q = vitc.prune(f"hf:{tiny_vit_dir}", None, importance="magnitude", mlp=0.5)
    assert q.transforms[-1]["groups_from"] == "adapter"
    with pytest.raises(VitcError, match="unknown PruneConfig setting 'flop'"):
        vitc.prune(f"hf:{tiny_vit_dir}", None, flop=0.5)


def test_sparsify_and_save_reload_a_factory_model(tmp_path):
    spec, weights = gm.write("subclassed-cnn", tmp_path)
    s = vitc.sparsify(load_model(spec, weights), None, method="magnitude")
    folder = vitc.save(s, tmp_path / "s")
    meta = json.loads((Path(folder) / "vitc_model.json").read_text())
    assert meta["format"] == "vitc-state/1" and meta["base"] == {"spec": spec, "weights": weights, "sha256": s.source_hash}
    again = load_model(folder)
    x = s.example_input(2)
    assert torch.equal(again(x), s(x))
    with pytest.raises(VitcError, match="already exists"):
        vitc.save(s, tmp_path / "s")
    doc = vitc.bench(folder, targets=["torch"], batches=[2], min_samples=5, min_time_s=0.05, max_time_s=0.5, warmup_max_s=0.3)
    assert doc["results"][0]["stats"]["p50"]["value"] > 0  # vitc bench loads the saved folder too


def test_merge_and_evaluate_by_spec(tiny_vit_dir):
    merged = vitc.merge(f"hf:{tiny_vit_dir}", r=2)
    assert merged.transforms[-1]["pass"] == "merge"
    res = vitc.evaluate(merged, "bundled:eval", size=16, batch_size=16)
    assert res["images"] == 16 and 0 <= res["top1"] <= 1
    import vitc.evaluate as module  # the submodule replaces the attribute; calling it still runs the verb

    assert module(f"hf:{tiny_vit_dir}", size=8)["images"] == 8


def test_export_and_bench_a_plain_module(tmp_path):
    from vitc.api import as_backbone

    b = as_backbone(TinyCNN(), input_size=32)
    art = vitc.export(b, "onnx", tmp_path / "m.onnx", eval_size=16)
    assert art.path.exists() and art.status == "passed"
    doc = vitc.bench(b, targets=["onnx"], batches=[1], min_samples=5, min_time_s=0.05, max_time_s=0.5, warmup_max_s=0.3)
    assert doc["results"] and doc["results"][0]["stats"]["p50"]["value"] > 0
    with pytest.raises(VitcError, match="torch target"):
        vitc.bench(b, targets=["torch"])


def test_quantize_takes_a_module():
    from vitc.api import as_backbone

    q = vitc.quantize(as_backbone(TinyCNN(), input_size=32), torch.randn(8, 3, 32, 32))
    assert q.transforms[-1]["pass"] == "quantize"


def test_saved_folders_load_through_registered_loaders(tmp_path, tiny_vit_dir):
    from vitc.models.loaders import find_loader, registered

    tags = {ld.tag for ld in registered()}
    assert {"vitc-quant/", "vitc-state/", "merged-model", "1"} <= tags
    p = vitc.prune(f"hf:{tiny_vit_dir}", None, importance="magnitude", mlp=0.5)
    spec = vitc.save(p, tmp_path / "hfp")
    assert spec.startswith("hf:") and find_loader(tmp_path / "hfp").tag == "1"
    assert load_model(spec).transforms[-1]["pass"] == "prune"
    assert find_loader(tmp_path) is None
