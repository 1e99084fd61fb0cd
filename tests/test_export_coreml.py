"""The coreml target on Linux: an ML program converted through torch.export, validated as a spec.

Prediction parity needs macOS (CoreML runs models only there); elsewhere it is skipped with
that reason and the manifest says so. One tiny model keeps this under ~15 s."""
from __future__ import annotations

import platform

import pytest

from vitc.errors import VitcError
from vitc.export import export_artifact


def test_coreml_package_is_structurally_valid(tiny_vit, tmp_path):
    pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'vitc[coreml]')")
    from vitc.export.coreml import validate_package

    art = export_artifact(tiny_vit, "coreml", tmp_path / "vit.mlpackage", eval_size=16)
    assert art.path.is_dir() and art.precision == "fp16" and (tmp_path / "vit.manifest.json").exists()
    structure = art.manifest["export"]["structure"]
    assert structure["type"] == "mlProgram"
    assert structure["input"] == {"name": "pixel_values", "dtype": "FLOAT32", "shape": [1, 3, 32, 32], "batch_range": [1, 64]}
    assert set(structure["weight_dtypes"]) == {"FLOAT16"}  # FP16 by default
    ops = structure["op_types"]
    # 2 blocks: 6 linears each (q, k, v, o, fc1, fc2) + the classifier; 2 matmuls (QK^T, PV) and a softmax per block
    assert ops["linear"] == 13 and ops["matmul"] == 4 and ops["softmax"] == 2 and ops["conv"] == 1
    if platform.system() != "Darwin":
        assert art.status == "unchecked" and "only on macOS" in art.parity["skipped"]
    # The validator holds packages to the precision they claim.
    with pytest.raises(VitcError, match=r"weights are stored as \['FLOAT16'\], not only \['FLOAT32'\]"):
        validate_package(art.path, 32, "fp32", True, 64)
    with pytest.raises(VitcError, match=r"the input is FLOAT32 \[1, 3, 32, 32\], not FLOAT32 \[N, 3, 64, 64\]"):
        validate_package(art.path, 64, "fp16", True, 64)


def test_coreml_refuses_what_it_cannot_take(tiny_vit, tmp_path):
    quantized = tiny_vit.with_module(tiny_vit.module, {"pass": "quantize", "config": {}})
    with pytest.raises(VitcError, match="cannot take the quantize pass's simulated int8 activations"):
        export_artifact(quantized, "coreml", tmp_path / "q.mlpackage")
    with pytest.raises(VitcError, match="writes fp16, fp32 or int8"):
        export_artifact(tiny_vit, "coreml", tmp_path / "q.mlpackage", precision="bf16")
    assert not list(tmp_path.iterdir())
