"""Integer-only on a DINOv2-style model: LayerScale, a linear probe reading several blocks (CLS and
patch means through the final norm, then a standardisation), 14-bit attention probabilities,
the exact activation table and the unsigned activation grid (tiny random Dinov2Probe, real
bundled CIFAR-10 images)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitc.calibration.data import load_tensors
from vitc.compress import integer
from vitc.compress.integer.hf_vit import read_vit


def _probe_backbone(seed: int = 0):
    import transformers

    from vitc.backbone import Backbone
    from vitc.models.preprocess import Preprocess
    from vitc.models.real import Dinov2Probe, ProbeLayout
    from vitc.models.wrappers import LogitsModule

    torch.manual_seed(seed)
    config = transformers.Dinov2Config(image_size=56, patch_size=14, hidden_size=64, num_hidden_layers=4,
                                       num_attention_heads=2, mlp_ratio=4, layerscale_value=1.0, layer_norm_eps=1e-6)
    model = Dinov2Probe(config, ProbeLayout((2, 4), (3, 4)), 10).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.dinov2.encoder.layer:  # LayerScale far from 1, as trained DINOv2 has it
            layer.layer_scale1.lambda1.copy_(torch.rand(64, generator=g) * 0.5 + 0.05)
            layer.layer_scale2.lambda1.copy_(torch.rand(64, generator=g) * 0.5 + 0.05)
        model.feature_norm.mean.copy_(torch.randn(4 * 64, generator=g) * 0.3)
        model.feature_norm.std.copy_(torch.rand(4 * 64, generator=g) + 0.2)
    return Backbone(LogitsModule(model).eval(), Preprocess(56, 56), [str(i) for i in range(10)], "test:dinov2-probe")


@pytest.fixture(scope="module")
def probe():
    return _probe_backbone()


@pytest.fixture(scope="module")
def images(probe, eval_images):
    return load_tensors(eval_images, probe.preprocess)[0]


@pytest.fixture(scope="module")
def converted(probe, calib_images):
    return integer.apply(probe, integer.IntegerConfig(calib_size=64, calibration="minmax"), data=calib_images)


def test_float_reference_folds_layer_scale_and_the_probe_standardisation(probe, images):
    ref = read_vit(probe)
    assert [(p.block, p.pool) for p in ref.head] == [(1, "cls"), (3, "cls"), (2, "mean"), (3, "mean")]
    with torch.no_grad():
        want = probe(images)
        assert (ref.forward(images) - want).abs().max() < 1e-4 * max(1.0, float(want.abs().max()))
    # the fold: the projection's rows carry LayerScale (not 1 here, so the check above depends on it)
    lam = probe.module.model.dinov2.encoder.layer[0].layer_scale1.lambda1
    w = probe.module.model.dinov2.encoder.layer[0].attention.o_proj.weight
    assert torch.allclose(ref.blocks[0].o[0], w * lam[:, None])


def test_integer_probe_agrees_and_onnx_is_bit_exact(probe, converted, images, tmp_path):
    import onnxruntime as ort

    from vitc.evaluate import agreement
    from vitc.export.integer_onnx import export

    program = converted.module.program
    assert len(program.head) == 4 and program.final_norm is None
    assert [p.pool for p in program.head] == ["cls", "cls", "mean", "mean"]
    with torch.no_grad():
        a = agreement(probe(images), converted(images))
    # random weights: near-tied logits; the relative logit error is the strict measure here
    assert a["top1_agreement"] >= 0.9
    assert a["mean_abs_logit_error"] < 0.05 * float(probe(images).abs().mean())
    path = export(converted, tmp_path / "probe.onnx")
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = s.run(None, {"pixel_values": images.numpy()})[1]
    want = converted.module.integer_logits(images).numpy()
    assert got.dtype == np.int32 and np.array_equal(got, want)


def test_fourteen_bit_probabilities_run_as_two_uint8_digits(converted, tmp_path):
    """Above 8 bits, probs x V is two MatMulIntegers (high and low byte): the same integers."""
    from vitc.export.integer_onnx import build_graph

    program = converted.module.program
    assert all(b.prob_levels == 2 ** 14 - 1 for b in program.blocks)
    model = build_graph(program)
    matmuls = sum(n.op_type == "MatMulInteger" for n in model.graph.node)
    # per block: q, k, v, scores, probs x V twice, o, fc1, fc2; plus the patch projection and the classifier
    assert matmuls == 9 * len(program.blocks) + 2  # 8 with 8-bit probabilities


def test_exact_activation_table_is_the_models_gelu_on_an_unsigned_grid(converted):
    from vitc.compress.integer.convert import activation_grid

    b = converted.module.program.blocks[0]
    act, ranges = b.act, converted.module.program.meta["ranges"]
    assert act.kind == "exact" and act.in_bits == 16 and act.table().numel() == 2 ** 16
    s_in = ranges["0.fc1"] / (2 ** 15 - 1)
    s_out, zero = activation_grid(ranges["0.act"], -0.16997120747, 8)
    assert act.zero_point == zero and 0 < zero < 128  # the floor -0.17 takes fewer codes than a symmetric grid
    x = torch.arange(-2 ** 15, 2 ** 15, 97, dtype=torch.int64)
    want = torch.round(torch.nn.functional.gelu(x.double() * s_in) / s_out).clamp(-zero, 255 - zero)
    assert torch.equal(act(x), want.to(torch.int64))
    assert torch.equal(act.lookup(x).to(torch.int64), want.to(torch.int64) + zero)


def test_lambda_table_is_still_the_kernel(probe, calib_images):
    out = integer.apply(probe, integer.IntegerConfig(calib_size=32, calibration="minmax", gelu="lambda"),
                        data=calib_images)
    act = out.module.program.blocks[1].act
    assert act.kind == "gelu"
    x = torch.randint(-2 ** 15, 2 ** 15, (2, 17, 256), generator=torch.Generator().manual_seed(0))
    assert torch.equal(act.lookup(x).to(torch.int64), act(x) + act.zero_point)


def test_norm_equalisation_keeps_the_function_and_narrows_the_grid(probe, calib_images):
    from vitc.compress.integer.convert import calibrate, equalize_norms

    ref = read_vit(probe)
    x = load_tensors(calib_images, probe.preprocess)[0][:32]
    eq, names = equalize_norms(ref, [x])
    assert len(names) == 2 * len(ref.blocks)
    with torch.no_grad():
        assert (eq.forward(x) - ref.forward(x)).abs().max() < 1e-4 * max(1.0, float(ref.forward(x).abs().max()))
    before, after = calibrate(ref, [x], "minmax"), calibrate(eq, [x], "minmax")
    # one per-tensor grid over centred, equal-range channels is narrower than over the raw ones
    assert all(after[f"{i}.norm1"] < before[f"{i}.norm1"] for i in range(len(ref.blocks)))
