"""Integer-only ViT: float reference, conversion, the integer-only executor, the bit-exact
ONNX export, and the bad inputs of issue 8 (tiny random ViT, real bundled CIFAR-10 images)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitc.calibration.data import load_tensors
from vitc.compress import integer
from vitc.compress.integer.hf_vit import read_vit
from vitc.compress.integer.program import FLOAT_DTYPES, execute
from vitc.errors import VitcError
from vitc.evaluate import agreement


@pytest.fixture(scope="module")
def images(eval_images, tiny_vit_dir):
    from vitc.models.intake import load_model

    return load_tensors(eval_images, load_model(f"hf:{tiny_vit_dir}").preprocess)[0]


@pytest.fixture(scope="module")
def converted(tiny_vit_dir, calib_images):
    from vitc.models.intake import load_model

    backbone = load_model(f"hf:{tiny_vit_dir}")
    return backbone, integer.apply(backbone, integer.IntegerConfig(calib_size=64), data=calib_images)


def test_float_reference_reproduces_the_model(tiny_vit, images):
    ref = read_vit(tiny_vit)
    with torch.no_grad():
        assert (ref.forward(images) - tiny_vit(images)).abs().max() < 1e-4


def test_integer_model_agrees_with_float(converted, images):
    backbone, int_backbone = converted
    a = agreement(backbone(images), int_backbone(images))
    spread = backbone(images).abs().max().item()
    # random-weight tiny ViT: logits are small and close together, so agreement is the strict test
    assert a["top1_agreement"] >= 0.9
    assert a["max_abs_logit_error"] < 0.1 * spread
    rec = int_backbone.transforms[-1]
    assert rec["pass"] == "integer" and rec["config"]["act_bits"] == 8
    assert backbone.transforms == []  # the source backbone is untouched


class DtypeRecorder(TorchDispatchMode):
    """Records every aten op that runs, with the dtypes of its tensor inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        dtypes = [t.dtype for t in torch.utils._pytree.tree_leaves((args, kwargs or {}, out)) if isinstance(t, torch.Tensor)]
        self.ops.append((str(func), dtypes))
        return out


def test_no_float_op_between_input_quantizer_and_logits(converted, images):
    program = converted[1].module.program
    xq = program.quantize_input(images[:4])
    assert xq.dtype == torch.int8
    rec = DtypeRecorder()
    with rec:
        acc = execute(program, xq)
    assert acc.dtype == torch.int32
    assert len(rec.ops) > 100  # the recorder did see the executor's ops
    floats = [(op, d) for op, d in rec.ops if any(t in FLOAT_DTYPES for t in d)]
    assert floats == []
    seen = {t for _, d in rec.ops for t in d}
    assert {torch.int8, torch.int32, torch.int64} <= seen


def test_activation_table_is_the_kernel(converted):
    act = converted[1].module.program.blocks[0].act
    half = 1 << (act.in_bits - 1)
    x = torch.randint(-half, half, (4, 65, 128), generator=torch.Generator().manual_seed(0))
    assert act.kind == "exact" and act.in_bits == 16  # the defaults: the model's GELU on a 16-bit input
    assert torch.equal(act.lookup(x).to(torch.int64), act(x) + act.zero_point)


def test_executor_refuses_a_float_tensor(converted, images):
    program = converted[1].module.program
    with pytest.raises(AssertionError, match="float tensor"):
        execute(program, images[:2])


def test_onnx_runtime_is_bit_exact_with_the_reference_executor(converted, images, tmp_path):
    import onnx
    import onnxruntime as ort

    from vitc.export.integer_onnx import export

    path = export(converted[1], tmp_path / "int.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"MatMulInteger", "BitShift", "Div"} <= ops and "MatMul" not in ops and "Softmax" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, logits_int = session.run(None, {"pixel_values": images.numpy()})
    ref_int = converted[1].module.integer_logits(images).numpy()
    assert logits_int.dtype == np.int32
    assert np.array_equal(logits_int, ref_int)  # every logit identical, on all 64 images
    assert np.array_equal(logits, converted[1](images).numpy())
    from vitc.runtimes import open_session

    assert np.array_equal(open_session(path).run(images[:8].numpy()), logits[:8])
    path18 = export(converted[1], tmp_path / "int18.onnx", opset=18)
    s18 = ort.InferenceSession(str(path18), providers=["CPUExecutionProvider"])
    assert np.array_equal(s18.run(None, {"pixel_values": images[:8].numpy()})[1], ref_int[:8])


def test_onnx_graph_computes_in_float_only_at_the_two_boundaries(converted, tmp_path):
    import onnx

    from vitc.export.integer_onnx import export

    model = onnx.load(str(export(converted[1], tmp_path / "int.onnx")))
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.output, *inferred.input]}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    assert all(n.output[0] in types for n in model.graph.node)
    float_out = [n.op_type for n in model.graph.node if types[n.output[0]] in floats]
    # quantizer: Div, Round, Clip, Add of the zero point (then Cast to uint8); dequantizer: Cast to float,
    # Mul, Identity (the output)
    assert sorted(float_out) == sorted(["Div", "Round", "Clip", "Add", "Cast", "Mul", "Identity"])


def test_widths_above_8_are_refused(tiny_vit, calib_images):
    with pytest.raises(VitcError, match="--abits"):
        integer.apply(tiny_vit, integer.IntegerConfig(act_bits=16), data=calib_images)
    with pytest.raises(VitcError, match="--wbits"):
        integer.apply(tiny_vit, integer.IntegerConfig(weight_bits=10), data=calib_images)


def test_unsupported_activation_is_named(tiny_vit, calib_images):
    blk = tiny_vit.structure.blocks[0]
    parent = tiny_vit.module.get_submodule(blk.mlp.fc1.rsplit(".", 1)[0])
    parent.activation_fn = torch.nn.Tanh()
    del tiny_vit.__dict__["structure"]  # rediscover after the edit
    with pytest.raises(VitcError, match=r"activation 'tanh' after .*fc1"):
        integer.apply(tiny_vit, integer.IntegerConfig(calib_size=8), data=calib_images)


def test_int32_accumulator_overflow_names_the_layer(tiny_vit, calib_images):
    blk = tiny_vit.structure.blocks[1]
    fc2 = tiny_vit.module.get_submodule(blk.mlp.fc2)
    with torch.no_grad():
        fc2.bias[0] = 1e9  # a bias far beyond what the int32 accumulator holds at its input/weight scales
    with pytest.raises(VitcError, match=r"int32 accumulator of layer .*layers\.1\.mlp\.fc2"):
        integer.apply(tiny_vit, integer.IntegerConfig(calib_size=8, calibration="minmax"), data=calib_images)


def test_recovery_fine_tunes_a_copy_and_converts(tiny_vit, images):
    from vitc.compress.integer.convert import calibrate
    from vitc.compress.integer.recover import recover

    ref = read_vit(tiny_vit)
    ranges = calibrate(ref, [images[:32]], "minmax")
    before = ref.blocks[0].fc1[0].clone()
    tuned = recover(ref, ranges, images[:32], steps=3, lr=1e-3, batch_size=8)
    assert torch.equal(ref.blocks[0].fc1[0], before)  # the source is untouched
    assert not torch.equal(tuned.blocks[0].fc1[0], before)
    assert not tuned.blocks[0].fc1[0].requires_grad
    out = integer.apply(tiny_vit, integer.IntegerConfig(calib_size=32, recover_steps=2, recover_size=32),
                        data=images[:32])
    assert out.transforms[-1]["recovery_images"] == 32
    assert out(images[:4]).shape == (4, 10)


def test_clips_run_on_unsigned_offsets(converted):
    """Every Clip of a requantization clamps uint64 (offset) values: ONNX Runtime 1.31's int64 Clip/Max/Min
    mishandle inputs in [2**31, 2**32), which int64 accumulators times 24-bit multipliers reach."""
    import onnx

    from vitc.export.integer_onnx import build_graph

    model = build_graph(converted[1].module.program)
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *inferred.input]}
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert len(clips) >= 2 * 9  # nine clamps per block (norms, q, k, v, context, fc1, two residual adds), 2 blocks
    wide = [n.name for n in clips if types.get(n.input[0]) == onnx.TensorProto.INT64]
    assert wide == []
