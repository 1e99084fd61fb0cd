"""Structured pruning and 2:4 on models vitc has no adapter for, found from the graph.

For each model of the matrix (transformers MobileNetV2, EfficientNet, ConvNeXt, Dinov2 with
random weights; a hand-written CNN with subclassed convs, SE, residuals and a concat; a
hand-written fused-qkv ViT): pruning to a FLOPs target keeps the output shape, reaches the
target, exports to ONNX with parity, and saves/reloads strictly with equal outputs; 2:4 makes
every sparsified weight exactly 2:4 and saves/reloads the same way. Real CIFAR-10 images.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitc
from vitc.calibration.data import load_tensors
from vitc.compress.sparsity import masks
from vitc.errors import VitcError
from vitc.models.intake import load_model

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import generality_prune_models as gm  # noqa: E402

TARGET = 0.6


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("generality")
    return {name: gm.write(name, root) for name in gm.NAMES}


@pytest.fixture(scope="module")
def images(eval_images):
    """Real images per input size (the models take 32, 56 or 64 px)."""
    cache = {}

    def at(backbone):
        key = backbone.preprocess.input_size
        if key not in cache:
            cache[key] = load_tensors(eval_images, backbone.preprocess)[0][:8]
        return cache[key]
    return at


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", gm.NAMES)
def test_prune_engages_exports_and_reloads(name, written, images, tmp_path):
    spec, weights = written[name]
    dense = load_model(spec, weights)
    x = images(dense)
    # round_to=1: the tiny test widths (8-64 channels) would make multiples of 8 a coarse staircase
    pruned = vitc.prune(dense, x, importance="activation", flops=TARGET, method="graph", batch_size=8, round_to=1)
    rec = pruned.transforms[-1]
    assert rec["groups_from"] == "graph"
    reached = rec["flops"] / rec["flops_dense"]
    assert TARGET - 0.05 <= reached <= TARGET + 1e-6, reached
    with torch.no_grad():
        out = pruned.module(x)
    assert out.shape == dense.module(x).shape
    cover = rec["coverage"]
    assert 0 < cover["flops_share"] <= 1 and cover["ops_total"] >= cover["ops_pruned"] > 0
    assert all(item["reason"] for item in cover["left_alone"])
    if name in ("dinov2", "fused-vit"):  # heads found by pattern, not only MLP channels
        heads = rec["plan"]["heads"]
        assert heads and all(h["heads"] < 4 for h in heads.values())

    art = vitc.export(pruned, "onnx", tmp_path / "m.onnx", eval_size=16, batch_size=16)
    assert art.status == "passed" and art.parity is not None

    folder = tmp_path / "saved"
    again = load_model(vitc.save(pruned, folder))
    with torch.no_grad():
        assert _same(again.module(x), out)
    assert again.transforms[-1]["plan"]["channels"] == rec["plan"]["channels"]
    assert sum(p.numel() for p in again.module.parameters()) == pruned.parameters_count()


@pytest.mark.parametrize("name", gm.NAMES)
def test_sparsify_is_exact_24_and_reloads(name, written, images, tmp_path):
    spec, weights = written[name]
    dense = load_model(spec, weights)
    x = images(dense)
    sparse = vitc.sparsify(dense, x, method="wanda", batch_size=8)
    rec = sparse.transforms[-1]
    assert rec["sparse_layers"], rec["dense_layers"]
    layers = dict(sparse.module.named_modules())
    for path in rec["sparse_layers"]:
        w = masks.conv_to_2d(layers[path].weight.detach())
        per_group = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert int(per_group.max()) <= 2, path
    cover = rec["coverage"]
    assert cover["ops_sparsified"] == len(rec["sparse_layers"]) and 0 < cover["flops_share"] <= 1
    assert {d["name"] for d in cover["left_alone"]} >= set(rec["dense_layers"])
    with torch.no_grad():
        out = sparse.module(x)
    again = load_model(vitc.save(sparse, tmp_path / "s"))
    with torch.no_grad():
        assert _same(again.module(x), out)
    assert again.transforms[-1]["sparse_layers"] == rec["sparse_layers"]


def test_prune_finds_the_coupled_channels_of_a_subclassed_cnn(written):
    """Residual stream (stem, both projections, their BNs, SE gates' expand), depthwise convs with
    their expand conv, a concat feeding a strided conv: the groups Torch-Pruning would form."""
    from vitc.compress.prune.generic import find_groups

    spec, weights = written["subclassed-cnn"]
    b = load_model(spec, weights)
    groups, _ = find_groups(b.module, b.example_input(2))
    by_name = {g.name: g for g in groups}
    stream = by_name["model.stem"]
    assert {"model.stem", "model.block1.project", "model.block2.project"} <= set(stream.producers)
    assert "model.side" in stream.consumers and "model.down" in stream.consumers  # the concat's first half
    expanded = by_name["model.block1.pw"]
    fqn = {m[0] for m in expanded.members}
    assert {"model.block1.dw.weight", "model.block1.bn2.running_mean", "model.block1.se.expand.weight",
            "model.block1.se.reduce.weight", "model.block1.project.weight"} <= fqn
    down_in = [m for m in by_name["model.side"].members if m[0] == "model.down.weight"]
    assert down_in == [("model.down.weight", 1, 64, 64)]  # the concat's second half, at its offset


def test_untraceable_model_is_one_line_exit_2_nothing_written(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{Path.cwd()}{os.pathsep}{HERE}"}
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "-m", "vitc.cli", "prune", "--model", "generality_bad:branchy", "--flops", "0.7",
                        "--importance", "magnitude", "--input-size", "32", "-o", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr + r.stdout
    text = (r.stderr + r.stdout).strip()
    assert "cannot capture the model" in text and "generality_bad.py" in text and "ONNX" in text
    assert "Traceback" not in text and "def forward" not in text  # no traceback, no graph dump
    assert len([ln for ln in text.splitlines() if "cannot capture" in ln]) == 1
    assert not out.exists()


def test_cli_prune_and_sparsify_a_factory_model_then_eval_and_export_the_folder(written, tmp_path):
    spec, weights = written["subclassed-cnn"]
    env = {**os.environ, "PYTHONPATH": f"{Path.cwd()}{os.pathsep}{HERE}"}

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "vitc.cli", *args], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:] + r.stdout[-2000:]
        return r.stdout
    stdout = cli("prune", "--model", spec, "--weights", weights, "--flops", "0.7", "--importance", "magnitude",
                 "-o", str(tmp_path / "p"), "--out", str(tmp_path / "p.json"))
    assert "coverage:" in stdout
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["coverage"]["flops_share"] > 0.9 and doc["groups_from"] == "graph"
    meta = json.loads((tmp_path / "p" / "vitc_model.json").read_text())
    assert meta["base"] == {"spec": spec, "weights": weights, "sha256": meta["base"]["sha256"]} and meta["base"]["sha256"]
    cli("eval", "--model", str(tmp_path / "p"), "--eval-size", "16")
    cli("sparsify", "--model", spec, "--weights", weights, "--method", "wanda", "--calib-size", "16", "-o", str(tmp_path / "ps"),
        "--out", str(tmp_path / "ps.json"))
    assert json.loads((tmp_path / "ps.json").read_text())["coverage"]["flops_share"] > 0.5
    cli("export", "--model", str(tmp_path / "ps"), "--target", "onnx", "-o", str(tmp_path / "ps.onnx"), "--eval-size", "16")
    assert (tmp_path / "ps.onnx").exists()


def test_a_module_given_as_python_object_is_refused_before_saving(tmp_path):
    model = gm.subclassed_cnn()
    pruned = vitc.prune(model, None, importance="magnitude", conv=0.5, method="graph")
    with pytest.raises(VitcError, match="Python object"):
        vitc.save(pruned, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_models_never_import_compress():
    offenders = []
    for p in (Path(vitc.__file__).parent / "models").rglob("*.py"):
        for line in p.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import ", "from ")) and "compress" in s:
                offenders.append(f"{p.name}: {s}")
    assert offenders == []


def test_a_torch_export_program_sparsifies_saves_and_reloads_and_prune_says_why_not(tmp_path):
    model = gm.subclassed_cnn().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    b = load_model(str(tmp_path / "m.pt2"))
    sparse = vitc.sparsify(b, None, method="magnitude")
    rec = sparse.transforms[-1]
    assert rec["coverage"]["flops_share"] > 0.9 and "model.block1.pw" in rec["sparse_layers"]
    again = load_model(vitc.save(sparse, tmp_path / "s"))
    x = b.example_input(2)
    assert torch.equal(again(x), sparse(x))
    with pytest.raises(VitcError, match="wanda reads each layer's inputs"):
        vitc.sparsify(b, x, method="wanda")
    with pytest.raises(VitcError, match="torch.export program bakes layer widths"):
        vitc.prune(b, None, importance="magnitude", flops=0.7, method="graph")


def test_global_taylor_allocation_ranks_graph_groups(images):
    from vitc.api import as_backbone

    b = as_backbone(gm.subclassed_cnn(), input_size=32)
    p = vitc.prune(b, images(b), importance="taylor", flops=0.6, allocation="global", method="graph", round_to=1)
    rec = p.transforms[-1]
    assert 0.55 <= rec["flops"] / rec["flops_dense"] <= 0.6 + 1e-6
    assert rec["keep_ratio"] is None and rec["global_rank_kept"] > 0  # ranked units, not one shared ratio


def test_taylor_scores_reach_every_output_of_a_detector(tmp_path):
    """YOLOS returns class logits and boxes: the Taylor objective covers both, so the box head's
    channels get a gradient (with the logits alone they got none and scoring crashed), and the
    pruned detector still returns both outputs with their shapes."""
    import vitc
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.prune.generic import _loss
    from vitc.models.intake import load_model

    logits = torch.randn(2, 5, 4, requires_grad=True)
    boxes = torch.randn(2, 5, 4, requires_grad=True)
    _loss({"logits": logits, "pred_boxes": boxes}).backward()
    assert logits.grad is not None and boxes.grad is not None and boxes.grad.abs().sum() > 0

    spec, weights = gm.write("hf_yolos", tmp_path)
    dense = load_model(spec, weights)
    x = load_tensors(open_source("bundled:calib").select(8, seed=0), dense.preprocess)[0]
    pruned = vitc.prune(dense, x, importance="taylor", flops=0.7, method="graph", round_to=1, batch_size=8)
    rec = pruned.transforms[-1]
    assert rec["flops"] / rec["flops_dense"] <= 0.75
    with torch.no_grad():
        out, ref = pruned.module(x[:2]), dense.module(x[:2])
    assert [tuple(t.shape) for t in out] == [tuple(t.shape) for t in ref]


@pytest.mark.parametrize("name, blocked", [("mha_vit", {"embed", "sdpa.qkv"}), ("hf_swin", {"attention.q_proj"})])
def test_groups_whose_width_the_forward_reads_are_left_alone_with_the_error(name, blocked, tmp_path):
    """nn.MultiheadAttention checks its input against embed_dim, a hand-written attention reshapes
    with x.shape[-1] // heads, Swin adds a per-head bias from a table: pruning those groups broke
    the forward ("the pruned model no longer runs"). Each group is now tried on a copy first; the
    ones that break the forward are left alone with the error as the reason, the rest are pruned,
    and the model saves and reloads."""
    from vitc.calibration.sources import open_source

    spec, weights = gm.write(name, tmp_path)
    dense = load_model(spec, weights)
    x = load_tensors(open_source("bundled:calib").select(8, seed=0), dense.preprocess)[0]
    pruned = vitc.prune(dense, x, importance="taylor", mlp=0.5, method="graph", round_to=1, batch_size=8)
    rec = pruned.transforms[-1]
    assert rec["plan"]["channels"] and all(k.endswith(("mlps.0.1", "mlps.1.1", "mlp.fc1")) for k in rec["plan"]["channels"])
    assert rec["flops"] < rec["flops_dense"]
    reasons = [d["reason"] for d in rec["coverage"]["left_alone"]]
    assert sum("pruning it breaks the model's forward" in r for r in reasons) >= len(blocked), reasons
    with torch.no_grad():
        out = pruned.module(x)
    again = load_model(vitc.save(pruned, tmp_path / "saved"))
    with torch.no_grad():
        assert _same(again.module(x), out)
    if name == "mha_vit":  # nn.MultiheadAttention's eval fast path has no ONNX form: exported with it off
        art = vitc.export(pruned, "onnx", tmp_path / "m.onnx", eval_size=8, batch_size=8)
        assert art.status == "passed"


def test_narrow_cnn_2_4_is_refused_at_kernel_shapes_and_runs_with_shapes_any(tmp_path):
    """A CNN with no layer at the shapes GPU 2:4 kernels run (outputs a multiple of 32, inputs of
    64) is refused with a pointer to --shapes any, which sparsifies every layer whose inputs are a
    multiple of 4 (exactly 2:4, saved and reloaded); the 3-channel stem stays dense with why."""
    from vitc.calibration.sources import open_source

    spec, weights = gm.write("effnet_like", tmp_path)
    dense = load_model(spec, weights)
    x = load_tensors(open_source("bundled:calib").select(8, seed=0), dense.preprocess)[0]
    with pytest.raises(VitcError, match="--shapes any"):
        vitc.sparsify(dense, x, method="wanda")
    sparse = vitc.sparsify(dense, x, method="wanda", shapes="any")
    rec = sparse.transforms[-1]
    layers = dict(sparse.module.named_modules())
    assert len(rec["sparse_layers"]) >= 10
    for path in rec["sparse_layers"]:
        assert masks.violations(masks.conv_to_2d(layers[path].weight.detach())) == 0, path
    stem = [why for path, why in rec["dense_layers"].items() if path.endswith("stem.0")]
    assert stem and "inputs must be a multiple of 4" in stem[0], rec["dense_layers"]
    with torch.no_grad():
        out = sparse.module(x)
    again = load_model(vitc.save(sparse, tmp_path / "s"))
    with torch.no_grad():
        assert _same(again.module(x), out)
    with pytest.raises(VitcError, match="unknown --shapes"):
        vitc.sparsify(dense, x, method="wanda", shapes="gpu")
