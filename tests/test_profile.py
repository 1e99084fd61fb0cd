"""``vitc bench --profile`` / ``--peak``: per-op profiles by kind from each runtime's profiler, on real small artifacts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitc.bench.profile import (KINDS, aggregate, gemm_ops, measure_peaks, ort_kind, ov_precision, profile,
                                profile_session, PeakConfig)
from vitc.cli import run as cli

# tiny ViT of conftest: 32 px, patch 4 -> 64 patches + CLS = 65 tokens, width 64, 2 layers, 4 heads, MLP 128, 10 classes
T, D, L, H, M, C = 65, 64, 2, 4, 128, 10
WEIGHT_MACS = L * T * (4 * D * D + 2 * D * M)  # q, k, v, o and the two MLP GEMMs per token
ATTN_MACS = L * 2 * H * T * T * (D // H)  # QK^T and AV
CONV_MACS = 64 * D * 3 * 4 * 4  # the patch embedding: 64 patches, 48 inputs each
HEAD_MACS = D * C


@pytest.fixture(scope="module")
def tiny_artifacts(tmp_path_factory, tiny_vit_dir):
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.export.onnx import write_onnx
    from vitc.export.pipeline import ExportOptions
    from vitc.export.qdq import export_qdq_onnx
    from vitc.models.intake import load_model

    root = tmp_path_factory.mktemp("profile")
    backbone = load_model(f"hf:{tiny_vit_dir}")
    x, _ = load_tensors(open_source("bundled:calib").select(16, seed=0), backbone.preprocess)
    q = apply(backbone, QuantConfig(calibrator="minmax"), x)
    write_onnx(backbone, root / "fp32.onnx", ExportOptions("fp32"), None)
    export_qdq_onnx(q, root / "int8.onnx")
    export_qdq_onnx(q, root / "int8_ov.onnx", split_shared_inputs=False)
    return {"backbone": backbone, "q": q, "x": x, "fp32": root / "fp32.onnx", "int8": root / "int8.onnx",
            "int8_ov": root / "int8_ov.onnx", "root": root}


def _pool(x, batch=2):
    return [np.ascontiguousarray(x[i:i + batch].numpy()) for i in range(0, 8, batch)]


def _check_shares(prof):
    assert sum(k["share"] for k in prof["kinds"].values()) == pytest.approx(1.0, abs=1e-9)
    assert sum(k["ms"] for k in prof["kinds"].values()) == pytest.approx(prof["total_ms"], rel=1e-9)
    assert set(prof["kinds"]) <= set(KINDS)


def test_ort_fp32_profile_counts_the_gemm_work_exactly(tiny_artifacts):
    from vitc.runtimes import open_session

    s = open_session(tiny_artifacts["fp32"], runtime="onnxruntime", threads=1)
    prof = profile(s, _pool(tiny_artifacts["x"]), runs=3, peak_gops={"f32": 100.0, "int8": 400.0})
    _check_shares(prof)
    kinds = prof["kinds"]
    for kind in ("float GEMM", "attention matmul", "norm", "softmax"):
        assert kinds[kind]["ms"] > 0, kind
    # GOP from the profiler's shapes equals the model's arithmetic (batch 2)
    assert kinds["attention matmul"]["gop"] * 1e9 == pytest.approx(2 * 2 * ATTN_MACS, rel=1e-6)
    assert kinds["float GEMM"]["gop"] * 1e9 == pytest.approx(2 * 2 * (WEIGHT_MACS + CONV_MACS) + 2 * 2 * HEAD_MACS, rel=1e-6)
    assert "int8 GEMM" not in kinds
    assert kinds["float GEMM"]["of_peak"] == pytest.approx(kinds["float GEMM"]["gops"] / 100.0)


def test_ort_int8_profile_finds_int8_gemms(tiny_artifacts):
    from vitc.runtimes import open_session

    s = open_session(tiny_artifacts["int8"], runtime="onnxruntime", threads=1)
    prof = profile(s, _pool(tiny_artifacts["x"]), runs=3)
    _check_shares(prof)
    i8 = prof["kinds"]["int8 GEMM"]
    assert set(i8["precisions"]) == {"i8"}
    # every weight GEMM of the blocks and the patch embedding (an int8 GEMM after patchify_conv) runs in int8
    assert i8["gop"] * 1e9 >= 2 * 2 * (WEIGHT_MACS + CONV_MACS) * (1 - 1e-6)
    assert prof["kinds"]["Q/DQ + reorder"]["ops"] > 0


def test_openvino_profile_by_kind_with_exec_precision(tiny_artifacts):
    from vitc.runtimes import open_session

    fp = profile(open_session(tiny_artifacts["fp32"], runtime="openvino", threads=1, precision="f32"), _pool(tiny_artifacts["x"]), runs=3)
    q = profile(open_session(tiny_artifacts["int8_ov"], runtime="openvino", threads=1, precision="f32"), _pool(tiny_artifacts["x"]), runs=3)
    for prof in (fp, q):
        _check_shares(prof)
    assert set(fp["kinds"]["float GEMM"]["precisions"]) == {"f32"}
    assert "int8 GEMM" not in fp["kinds"]
    assert set(q["kinds"]["int8 GEMM"]["precisions"]) <= {"i8", "u8"}
    # the same weight GEMM work, counted from the IR, whichever precision runs it (the 10-class head on
    # the CLS token is fused under another layer's name in OpenVINO, so it is not counted: 0.01% here)
    gemm = lambda p: sum(p["kinds"].get(k, {}).get("gop", 0.0) for k in ("int8 GEMM", "float GEMM"))
    for prof in (fp, q):
        assert gemm(prof) * 1e9 == pytest.approx(2 * 2 * (WEIGHT_MACS + CONV_MACS), rel=2e-4)
    assert fp["kinds"]["attention matmul"]["gop"] * 1e9 == pytest.approx(2 * 2 * ATTN_MACS, rel=1e-6)


def test_torch_profile_and_a_runtime_without_profiler(tiny_artifacts):
    from vitc.runtimes import open_session

    prof = profile(open_session(tiny_artifacts["backbone"], runtime="torch", threads=1), _pool(tiny_artifacts["x"]), runs=2)
    _check_shares(prof)
    assert prof["kinds"]["float GEMM"]["gop"] > 0 and prof["source"] == "torch.profiler"

    class NoProfiler:
        def describe(self):
            return {"runtime": "tensorrt"}

    none = profile(NoProfiler(), _pool(tiny_artifacts["x"]), runs=2)
    assert none == {"available": False, "note": "tensorrt has no profiler vitc reads; the timing above ran without a profile"}
    assert profile_session(NoProfiler(), _pool(tiny_artifacts["x"])) is None


def test_classification_and_gemm_arithmetic():
    assert gemm_ops([2, 65, 64], [2, 65, 128]) == 2 * 2 * 65 * 64 * 128
    assert gemm_ops([2, 4, 65, 16], [2, 4, 65, 65]) == 2 * 2 * 4 * 65 * 16 * 65
    assert gemm_ops([None, 65, 64], [2, 65, 128]) == 0.0
    assert ort_kind("MatMulIntegerToFloat", True, True) == "int8 GEMM"
    assert ort_kind("QLinearMatMul", True, False) == "attention matmul"
    assert ort_kind("MatMul", False, True) == "float GEMM"
    assert ort_kind("SkipLayerNormalization", False, True) == "norm"
    assert ort_kind("DequantizeLinear", False, True) == "Q/DQ + reorder"
    assert ov_precision("brgemm_avx512_amx_I8") == "i8" and ov_precision("jit_avx512_FP32") == "f32"
    assert ov_precision("undef") == "?"


def test_aggregate_compares_each_kind_with_its_precision_peak():
    from vitc.bench.profile import OpRecord

    recs = [OpRecord("a", "FullyConnected", "int8 GEMM", "i8", 1000.0, 1e9), OpRecord("b", "MVN", "norm", "f32", 500.0),
            OpRecord("c", "FullyConnected", "float GEMM", "bf16", 500.0, 1e8)]
    agg = aggregate(recs, {"int8": 2000.0, "bf16": 400.0, "f32": 100.0})
    assert agg["total_ms"] == pytest.approx(2.0)
    assert agg["kinds"]["int8 GEMM"]["gops"] == pytest.approx(1000.0)  # 1 GOP in 1 ms
    assert agg["kinds"]["int8 GEMM"]["of_peak"] == pytest.approx(0.5)
    assert agg["kinds"]["float GEMM"]["peak_key"] == "bf16" and agg["kinds"]["float GEMM"]["of_peak"] == pytest.approx(0.5)
    assert agg["kinds"]["norm"]["share"] == pytest.approx(0.25)


def test_peaks_are_measured_in_each_runtime():
    small = PeakConfig(m=128, k=256, n=256, runs=3)
    ort = measure_peaks("onnxruntime", 1, small)
    assert ort["f32"] > 0 and ort["int8"] > 0 and ort["bf16"] is None and ort["notes"]
    ov = measure_peaks("openvino", 1, small)
    assert ov["f32"] > 0 and ov["int8"] > 0
    assert measure_peaks("coreml", 1, small)["int8"] is None


def test_cli_profile_png_json(tiny_artifacts, tmp_path, capsys):
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    code = cli(["bench", "-m", str(tiny_artifacts["int8"]), "--batch", "1,2", "--threads", "1", "--max-time", "0.3",
                "--min-time", "0.05", "--max-warmup", "0.1", "--profile", "--profile-runs", "2", "--png", str(png), "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "profile: int8.onnx b=1" in text and "int8 GEMM" in text and "GEMM peaks" in text
    doc = json.loads(out.read_text())
    assert [r["profile"]["batch"] for r in doc["results"]] == [1, 2]
    assert all(r["profile"]["available"] and "int8 GEMM" in r["profile"]["kinds"] for r in doc["results"])
    assert doc["peaks"]["onnxruntime"]["int8"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_peak_alone(capsys, tmp_path):
    out = tmp_path / "peak.json"
    assert cli(["bench", "--peak", "--runtime", "onnxruntime", "--threads", "1", "--out", str(out)]) == 0
    assert "GEMM peaks" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["kind"] == "peak" and doc["peaks"]["onnxruntime"]["int8"] > 0


def test_cli_profile_bad_input_exits_3_and_writes_nothing(tiny_artifacts, tmp_path, capsys):
    png, out = tmp_path / "p.png", tmp_path / "o.json"
    assert cli(["bench", "-m", str(tiny_artifacts["fp32"]), "--png", str(png), "--out", str(out)]) == 3
    assert "--png draws the profile" in capsys.readouterr().err
    assert cli(["bench", "-m", str(tiny_artifacts["fp32"]), "--profile", "--png", str(tmp_path / "p.jpg")]) == 3
    assert cli(["bench", "-m", str(tiny_artifacts["fp32"]), "--profile", "--profile-runs", "0"]) == 3
    assert not png.exists() and not out.exists()


def test_openvino_profile_counts_fused_attention_of_a_dynamo_export(tmp_path):
    """The IR of a graph-path (dynamo-exported) model holds ScaledDotProductAttention ops, compiled into
    snippets named after a transpose: they are attention matmuls, with QK^T and P.V's work counted
    (before, they were filed under "eltwise" with no work)."""
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.export import export_artifact
    from vitc.models.intake import load_model
    from vitc.runtimes import open_session

    base = load_model("tests.generality_models:hf_dinov2")  # 2 blocks, 4 heads of 16, 17 tokens at 56 px
    x = load_tensors(open_source("bundled:calib").select(8, seed=0), base.preprocess)[0]
    q = apply(base, QuantConfig(sites="graph", range_search="off"), x)
    art = export_artifact(q, "openvino", tmp_path / "q.xml", check=False)
    pool = [np.ascontiguousarray(x[i:i + 2].numpy()) for i in range(0, 8, 2)]
    prof = profile(open_session(art.path, runtime="openvino", threads=1, precision="f32"), pool, runs=3)
    _check_shares(prof)
    attention = prof["kinds"].get("attention matmul")
    assert attention is not None, prof["kinds"].keys()
    per_image = 2 * 2 * 2 * 4 * 17 * 17 * 16  # 2 ops per MAC x (QK^T + P.V) x 2 blocks x heads x tokens^2 x d
    assert attention["gop"] * 1e9 == pytest.approx(2 * per_image, rel=1e-6)  # batch 2
