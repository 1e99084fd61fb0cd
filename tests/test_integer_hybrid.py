"""Integer-only hybrid: a ViT whose patch projection is a BatchNorm conv stem (conv-BN-ReLU x3, 1x1 conv).

Tiny random hybrid with trained-looking BatchNorm statistics, real bundled CIFAR-10 images:
BN folding and the stem in the float reference, the integer stem (im2col GEMM, dyadic
requantization, ReLU as the clamp of an unsigned output), the conv -> token bridge, ONNX
Runtime against the executor bit for bit, and the stem's bad inputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vitc.calibration.data import load_tensors
from vitc.compress import integer
from vitc.compress.integer.hf_vit import read_vit
from vitc.compress.integer.program import FLOAT_DTYPES, execute
from vitc.errors import VitcError
from vitc.evaluate import agreement


@pytest.fixture(scope="module")
def hybrid(make_convstem_vit):
    return make_convstem_vit()


@pytest.fixture(scope="module")
def images(hybrid, eval_images):
    return load_tensors(eval_images, hybrid.preprocess)[0]


@pytest.fixture(scope="module")
def converted(hybrid, calib_images):
    return integer.apply(hybrid, integer.IntegerConfig(calib_size=64), data=calib_images)


def test_float_reference_folds_the_stem_batchnorms(hybrid, images):
    ref = read_vit(hybrid)
    assert [c.activation for c in ref.stem] == ["relu"] * 3
    assert [c.stride for c in ref.stem] == [1, 2, 2] and ref.patch_size == 1
    assert ref.paths["patch"].endswith("projection.9")
    with torch.no_grad():
        assert (ref.forward(images) - hybrid(images)).abs().max() < 1e-4


def test_integer_hybrid_agrees_with_float(hybrid, converted, images):
    program = converted.module.program
    assert len(program.stem) == 3 and program.image_size == 32 and program.in_channels == 3
    assert all(c.out.lo == 0 and c.out.hi == 255 for c in program.stem)  # ReLU = the clamp of a uint8 output
    a = agreement(hybrid(images), converted(images))
    spread = hybrid(images).abs().max().item()
    assert a["top1_agreement"] >= 0.9  # random weights: near-tied logits
    assert a["max_abs_logit_error"] < 0.1 * spread


def test_integer_stem_conv_is_the_quantized_float_conv(converted, hybrid, images):
    """The first stem conv, run in integers, equals the float conv on the same quantized input within one step."""
    program = converted.module.program
    ref = read_vit(hybrid)
    conv, fconv = program.stem[0], ref.stem[0]
    xq = program.quantize_input(images[:8])
    got = conv(xq.permute(0, 2, 3, 1)).float()
    assert got.dtype == torch.float32 and conv(xq.permute(0, 2, 3, 1)).dtype == torch.uint8
    scale_out = program.meta["ranges"]["stem.0"] / 255
    with torch.no_grad():
        want = fconv(xq.float() * program.input_scale).permute(0, 2, 3, 1) / scale_out
    want = want.round().clamp(0, 255)
    # weight quantization (per channel, 8 bits) moves a few outputs by one or two steps
    diff = (got - want).abs()
    assert diff.max() <= 3 and diff.mean() < 0.5


class DtypeRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.dtypes: list[set] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}, out))
        self.dtypes.append({t.dtype for t in leaves if isinstance(t, torch.Tensor)})
        return out


def test_no_float_op_in_the_integer_stem(converted, images):
    program = converted.module.program
    xq = program.quantize_input(images[:4])
    rec = DtypeRecorder()
    with rec:
        acc = execute(program, xq)
    assert acc.dtype == torch.int32 and len(rec.dtypes) > 100
    assert not any(d & set(FLOAT_DTYPES) for d in rec.dtypes)
    assert any(torch.uint8 in d for d in rec.dtypes)  # the stem's ReLU outputs travel as uint8


def test_onnx_runtime_is_bit_exact_on_the_hybrid(converted, images, tmp_path):
    import onnx
    import onnxruntime as ort

    from vitc.export.integer_onnx import export

    path = export(converted, tmp_path / "hybrid.onnx")
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") >= 3 + 1 + 2 * 8 and "Conv" not in ops and "MatMul" not in ops
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output, *inferred.input]}
    float_out = [n.op_type for n in model.graph.node if types[n.output[0]] == onnx.TensorProto.FLOAT]
    assert sorted(float_out) == sorted(["Div", "Round", "Clip", "Add", "Cast", "Mul", "Identity"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, logits_int = session.run(None, {"pixel_values": images.numpy()})
    assert np.array_equal(logits_int, converted.module.integer_logits(images).numpy())  # all 64 images
    assert np.array_equal(logits, converted(images).numpy())


def test_recovery_tunes_the_stem_too(hybrid, images):
    from vitc.compress.integer.convert import calibrate
    from vitc.compress.integer.recover import recover

    ref = read_vit(hybrid)
    ranges = calibrate(ref, [images[:32]], "minmax")
    before = ref.stem[1].weight.clone()
    tuned = recover(ref, ranges, images[:32], steps=2, lr=1e-3, batch_size=8)
    assert torch.equal(ref.stem[1].weight, before)
    assert not torch.equal(tuned.stem[1].weight, before) and not tuned.stem[1].weight.requires_grad


def test_stem_activation_without_integer_version_is_named(make_convstem_vit, calib_images):
    def hardswish(stem):
        stem[5] = torch.nn.Hardswish()

    with pytest.raises(VitcError, match=r"projection\.5 \(Hardswish\) of the conv stem") as err:
        integer.apply(make_convstem_vit(edit=hardswish), integer.IntegerConfig(calib_size=8), data=calib_images)
    assert "without --integer-only" in err.value.fix


def test_grouped_stem_conv_is_refused_with_its_name(make_convstem_vit, calib_images):
    def grouped(stem):
        stem[3] = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False)

    with pytest.raises(VitcError, match=r"conv .*projection\.3 has groups"):
        integer.apply(make_convstem_vit(edit=grouped), integer.IntegerConfig(calib_size=8), data=calib_images)


def test_stem_accumulator_overflow_names_the_conv(make_convstem_vit, calib_images):
    def huge_bias(stem):
        stem[4].bias.data[0] = 1e9  # the folded bias of conv 3 leaves its int32 accumulator

    with pytest.raises(VitcError, match=r"int32 accumulator of layer .*projection\.3"):
        integer.apply(make_convstem_vit(edit=huge_bias), integer.IntegerConfig(calib_size=8, calibration="minmax"),
                      data=calib_images)
