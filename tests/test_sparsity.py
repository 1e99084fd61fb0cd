"""2:4 sparsity: masks, eligibility, the three criteria, SparseGPT's OBS update, fixed masks in
recovery, saving, export, quantization and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from vitc.calibration.data import load_tensors
from vitc.compress.sparsity import SparsityConfig, apply, eligible_layers, layer_masks, masks, sparse_layers
from vitc.errors import VitcError
from vitc.models.intake import load_model


@pytest.fixture(scope="module")
def calib(tiny_vit_dir):
    from vitc.calibration.sources import open_source

    b = load_model(f"hf:{tiny_vit_dir}")
    return load_tensors(open_source("bundled:calib").select(48, seed=2), b.preprocess)[0]


def _groups_ok(weight: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs holds at most 2 non-zeros (checked directly, not via masks.violations)."""
    w = masks.conv_to_2d(weight.detach())
    return bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())


def test_nm_mask_keeps_the_two_largest_of_each_four():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, -1.0, 0.0, 9.0, 8.0]])
    assert masks.nm_mask(scores).tolist() == [[False, True, True, False, False, False, True, True]]
    w = torch.randn(64, 128)
    kept = w * masks.magnitude_mask(w)
    assert _groups_ok(kept) and masks.violations(kept) == 0 and masks.violations(w) > 0
    assert (kept != 0).float().mean().item() == pytest.approx(0.5)


def test_conv_layout_groups_input_channels_at_one_tap():
    w = torch.randn(32, 64, 3, 3)
    w2 = masks.conv_to_2d(w)
    assert torch.equal(w2[:, :4], w[:, :4, 0, 0]) and torch.equal(masks.conv_from_2d(w2, w), w)


def test_sparsegpt_reconstructs_layer_output_better_than_magnitude_and_wanda():
    torch.manual_seed(0)
    # correlated, unevenly scaled inputs, as activations are: where second-order information pays
    x = torch.randn(512, 64) @ torch.randn(64, 64) * torch.linspace(0.1, 3.0, 64)
    w = torch.randn(32, 64)
    hessian = x.T @ x
    errors = {}
    for name, new in {
        "magnitude": w * masks.magnitude_mask(w),
        "wanda": w * masks.wanda_mask(w, hessian.diagonal()),
        "sparsegpt": masks.sparsegpt(w, hessian)[0],
    }.items():
        assert _groups_ok(new)
        errors[name] = ((x @ (w - new).T) ** 2).mean().item()
    # seed 0 gives magnitude 1966, Wanda 1865, SparseGPT 1551; over seeds 0-3 the OBS update is 17-21% better
    assert errors["sparsegpt"] < 0.88 * min(errors["wanda"], errors["magnitude"])
    assert errors["wanda"] < errors["magnitude"]
    _, keep = masks.sparsegpt(w, hessian)
    assert torch.equal(keep.sum(1), torch.full((32,), 32))  # exactly half of every row


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_apply_sparsifies_every_eligible_layer(tiny_vit, calib, method):
    sparse = apply(tiny_vit, SparsityConfig(method=method), calib)
    record = sparse.transforms[-1]
    eligible, skipped = eligible_layers(tiny_vit.module)
    assert record["sparse_layers"] == eligible and len(eligible) == 12  # q, k, v, o, fc1, fc2 in 2 blocks
    assert "model.classifier" in record["dense_layers"]  # 10 outputs: not a multiple of 32
    assert sparse_layers(sparse) == eligible
    names = dict(sparse.module.named_modules())
    for path in eligible:
        assert _groups_ok(names[path].weight)
        assert (names[path].weight == 0).float().mean().item() >= 0.5
    for path in skipped:
        assert torch.equal(names[path].weight, dict(tiny_vit.module.named_modules())[path].weight)
    agree = (sparse(calib).argmax(-1) == tiny_vit(calib).argmax(-1)).float().mean().item()
    assert agree > 0.3  # still the same model, roughly (random weights, 50% of them gone)


def test_conv_model_and_sparse_layers_of_dense_model(tiny_resnet):
    sparse = apply(tiny_resnet, SparsityConfig(method="magnitude"))
    layers = sparse_layers(sparse)
    assert layers and all(isinstance(sparse.module.get_submodule(p), nn.Conv2d) for p in layers)
    assert all(_groups_ok(sparse.module.get_submodule(p).weight) for p in layers)
    assert sparse_layers(tiny_resnet) == []


def test_recovery_keeps_masks_fixed(tiny_vit, calib):
    from vitc.compress.recover import RecoverConfig, recover

    sparse = apply(tiny_vit, SparsityConfig(method="magnitude"))
    before = {p: sparse.module.get_submodule(p).weight.detach().clone() for p in sparse_layers(sparse)}
    tuned = recover(sparse, tiny_vit, calib, RecoverConfig(steps=4, batch_size=16, lr=1e-3), layer_masks(sparse))
    assert tuned.transforms[-1]["pass"] == "recover"
    changed = 0
    for path, w0 in before.items():
        w1 = tuned.module.get_submodule(path).weight
        assert _groups_ok(w1) and torch.equal(w1 == 0, w0 == 0)
        changed += not torch.equal(w1, w0)
    assert changed == len(before)
    assert sparse_layers(tuned) == list(before)


def test_teacher_targets_and_uint8_recovery(tiny_vit, eval_images):
    from vitc.calibration.data import load_tensors
    from vitc.compress.recover import RecoverConfig, as_inputs, recover, teacher_targets

    floats = load_tensors(eval_images, tiny_vit.preprocess)[0][:32]
    # the same images as uint8, as a training set is kept in memory; normalised per batch to the same inputs
    mean = torch.tensor(tiny_vit.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_vit.preprocess.std).view(1, 3, 1, 1)
    raw = ((floats * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    assert torch.allclose(as_inputs(raw, tiny_vit.preprocess), floats, atol=1e-4)
    targets = teacher_targets(tiny_vit, raw, batch=10)
    assert targets.shape == (32, 2, 10)
    assert torch.allclose(targets[:, 0], tiny_vit(floats), atol=1e-4)
    assert torch.allclose(targets[:, 1], tiny_vit(floats.flip(-1)), atol=1e-4)
    # a student equal to its teacher sees (near) zero distillation loss on cached and on online targets
    for augment in ("flip", "flip-shift"):
        same = recover(tiny_vit, tiny_vit, raw, RecoverConfig(steps=1, batch_size=8, augment=augment))
        assert same.transforms[-1]["loss_first"] < 1e-6, augment
    sparse = apply(tiny_vit, SparsityConfig(method="magnitude"))
    first = recover(sparse, tiny_vit, raw, RecoverConfig(steps=2, batch_size=16, lr=1e-3), layer_masks(sparse), targets=targets)
    assert first.transforms[-1]["teacher_cache_seconds"] < 0.5 and sparse_layers(first) == sparse_layers(sparse)
    from vitc.compress.recover import resolve_augment

    assert resolve_augment(RecoverConfig(steps=100, batch_size=64), 1000, cached=False) == "flip"  # 6,400 draws >= 2 x 1,000
    assert resolve_augment(RecoverConfig(steps=10, batch_size=64), 1000, cached=False) == "flip-shift"
    assert resolve_augment(RecoverConfig(steps=10, batch_size=64), 1000, cached=True) == "flip"
    assert resolve_augment(RecoverConfig(steps=10, augment="flip-shift"), 10, cached=True) == "flip-shift"
    with pytest.raises(VitcError, match="unknown recovery augmentation"):
        recover(sparse, tiny_vit, raw, RecoverConfig(steps=1, augment="mixup"))


def test_save_reload_and_onnx_keep_zeros(tiny_vit, calib, tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from vitc.compress.prune.persist import save_backbone

    sparse = apply(tiny_vit, SparsityConfig(method="wanda"), calib)
    save_backbone(sparse, tmp_path / "s")
    again = load_model(f"hf:{tmp_path / 's'}")
    assert sparse_layers(again) == sparse_layers(sparse)
    assert torch.allclose(again(calib), sparse(calib), atol=1e-6)
    path = tmp_path / "s.onnx"
    torch.onnx.export(again.module.eval(), (calib[:2],), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": calib[:8].numpy()})[0], again(calib[:8]).numpy(), atol=1e-4)
    # the exported weights are still 2:4 (as MatMul initialisers they are stored transposed: inputs x outputs)
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]
    two_four = [w for w in weights if w.ndim == 2 and w.shape[0] % 4 == 0 and _groups_ok(torch.from_numpy(w.T.copy()))
                and (w == 0).mean() >= 0.5]
    assert len(two_four) == len(sparse_layers(sparse))


@pytest.mark.parametrize("wbits", [8, 4])
def test_zeros_stay_zeros_through_quantization(tiny_vit, calib, wbits):
    quantize = pytest.importorskip("vitc.compress.quantize")
    sparse = apply(tiny_vit, SparsityConfig(method="magnitude"))
    quantized = quantize.apply(sparse, quantize.QuantConfig(wbits=wbits, abits=8, calibrator="minmax"), calib[:32])
    assert sparse_layers(quantized) == sparse_layers(sparse)
    for path in sparse_layers(sparse):
        layer = quantized.module.get_submodule(path)
        assert getattr(layer, "quantized", False)
        w_q, w_s = layer.weight, sparse.module.get_submodule(path).weight
        assert (w_q[w_s == 0] == 0).all() and _groups_ok(w_q)


def test_bad_input(tiny_vit, calib):
    with pytest.raises(VitcError, match="does not exist"):
        apply(tiny_vit, SparsityConfig(method="magnitude", layers=["model.vit.layers.9.mlp.fc1"]))
    with pytest.raises(VitcError, match="cannot be 2:4"):
        apply(tiny_vit, SparsityConfig(method="magnitude", layers=["model.classifier"]))
    with pytest.raises(VitcError, match="needs calibration images"):
        apply(tiny_vit, SparsityConfig(method="sparsegpt"))
    with pytest.raises(VitcError, match="unknown 2:4 method"):
        apply(tiny_vit, SparsityConfig(method="random"), calib)
    narrow = tiny_vit.with_module(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), {"pass": "test"})
    with pytest.raises(VitcError, match="no layer that GPU 2:4 kernels run"):
        apply(narrow, SparsityConfig(method="magnitude"))


def test_cli_sparsify(tiny_vit_dir, tmp_path, capsys):
    from vitc.cli import run

    out = tmp_path / "s.json"
    base = ["sparsify", "--model", f"hf:{tiny_vit_dir}", "--calib-size", "16", "--threads", "1"]
    assert run(base + ["--method", "sparsegpt", "--out", str(out), "-o", str(tmp_path / "m")]) == 0
    data = json.loads(out.read_text())
    assert len(data["sparse_layers"]) == 12 and "model.classifier" in data["dense_layers"]
    assert sparse_layers(load_model(f"hf:{tmp_path / 'm'}")) == data["sparse_layers"]
    capsys.readouterr()
    assert run(base + ["--layers", "model.nope"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: layer 'model.nope' does not exist") and err.count("\n") == 1
    every = ",".join(data["sparse_layers"])
    assert run(base + ["--method", "magnitude", "--exclude", every]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: every layer 2:4 sparsity could take is excluded") and err.count("\n") == 1


def test_feature_distillation_matches_every_block_and_lowers_their_error(tiny_vit, calib):
    """``feature_weight > 0``: every block's output is distilled too (the teacher on every batch); on the
    same steps and images the student's block outputs end closer to the dense model's than before recovery
    and than with logits only."""
    from vitc.compress.recover import RecoverConfig, _Outputs, block_paths, recover, resolve_augment

    sparse = apply(tiny_vit, SparsityConfig(method="magnitude"))
    assert resolve_augment(RecoverConfig(steps=100, batch_size=64, feature_weight=1.0), 1000, cached=True) == "flip-shift"
    runs = {w: recover(sparse, tiny_vit, calib, RecoverConfig(steps=12, batch_size=16, lr=1e-3, feature_weight=w),
                       layer_masks(sparse)) for w in (0.0, 1.0)}
    assert runs[1.0].transforms[-1]["feature_blocks"] == runs[1.0].transforms[-1]["feature_blocks_of"] == 2
    assert runs[0.0].transforms[-1]["feature_blocks"] == 0

    def block_error(b) -> float:
        paths = block_paths(tiny_vit)
        hs, ht = _Outputs(b.module, paths), _Outputs(tiny_vit.module, paths)
        with torch.no_grad():
            b(calib[:32]), tiny_vit(calib[:32])
        hs.close(), ht.close()
        return sum(float((hs.values[p] - ht.values[p]).norm() / ht.values[p].norm()) for p in paths)

    # logits alone move a random model's blocks far from the teacher's (1.04 against 0.22 unrecovered, written
    # when measured); distilling the blocks brings them closer than before recovery (0.16)
    features, logits_only, unrecovered = block_error(runs[1.0]), block_error(runs[0.0]), block_error(sparse)
    assert features < unrecovered and features < logits_only
    with pytest.raises(VitcError, match="--recover-features"):
        RecoverConfig(feature_weight=-1).validate()
