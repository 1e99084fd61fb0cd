"""``vitc.bench``: latency harness per runtime and the A/B latency-regression gate.

    from vitc.bench import run, compare, check
    doc = run("zoo:vit-c10", targets=["torch", "onnx"], batches=[1, 8])
    gate = compare(["base.onnx", "cand.onnx"])      # gate["decision"], gate["exit_code"]

Heavy modules load on first use, so importing ``vitc.bench`` stays cheap.
"""
from __future__ import annotations


def run(*args, **kwargs) -> dict:
    from vitc.bench.runner import run as _run

    return _run(*args, **kwargs)


def compare(*args, **kwargs) -> dict:
    from vitc.bench.gate import compare as _compare

    return _compare(*args, **kwargs)


def check(*args, **kwargs) -> dict:
    from vitc.bench.gate import check as _check

    return _check(*args, **kwargs)
