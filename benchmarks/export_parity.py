"""Export parity: every reference backbone (and its W8A8 version) through every export target,
checked against PyTorch on the CIFAR-10 test set, in one table.

    python benchmarks/export_parity.py                       # 10,000 test images, all targets
    python benchmarks/export_parity.py --eval-size 1000 --json parity.json
    python benchmarks/export_parity.py --models hf:/path/to/model --targets onnx,openvino --no-w8a8

Each row runs ``vitc.export.export_artifact`` (the code behind ``vitc export``): PyTorch's
top-1 and the artifact's top-1 side by side, their top-1 agreement and logit errors. W8A8
rows quantize with ``vitc.compress.quantize`` (symmetric, so the TensorRT graph is
rule-clean) on the bundled calibration slice, and are held to their PyTorch simulation.
CoreML predicts only on macOS and TensorRT is checked through its ONNX graph where the
``tensorrt`` package is missing; the table says so.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CIFAR_TEST = REPO.parent / "shared" / "data" / "cifar10" / "test.tar.gz"
ZOO = ("zoo:vit-c10", "zoo:convvit-c10", "zoo:resnet-c10")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ZOO), help="comma-separated --model specs")
    ap.add_argument("--targets", default="onnx,openvino,tensorrt,coreml")
    ap.add_argument("--data", default=str(CIFAR_TEST), help="images for parity (default: the CIFAR-10 test set)")
    ap.add_argument("--eval-size", type=int, default=None, help="a deterministic subset of this many images")
    ap.add_argument("--calib-data", default="bundled:calib", help="calibration images for the W8A8 versions")
    ap.add_argument("--no-w8a8", action="store_true", help="skip the quantized versions")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the rows as JSON")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from vitc.commands.common import set_threads
    from vitc.errors import VitcError
    from vitc.export import ParityError, export_artifact
    from vitc.models.intake import load_model

    threads = set_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vitc-export-parity-") as work:
        for spec in args.models.split(","):
            try:
                base = load_model(spec)
            except VitcError as exc:
                rows.append({"model": spec, "variant": "-", "target": "-", "status": "skipped", "note": str(exc)})
                continue
            variants = [("fp32", base)]
            if not args.no_w8a8:
                variants.append(("w8a8", _w8a8(base, args.calib_data)))
            for variant, backbone in variants:
                if isinstance(backbone, str):
                    rows.append({"model": spec, "variant": variant, "target": "-", "status": "skipped", "note": backbone})
                    continue
                for target in args.targets.split(","):
                    out = Path(work) / f"{spec.replace(':', '_').replace('/', '_')}-{variant}-{target}"
                    t0 = time.perf_counter()
                    row = {"model": spec, "variant": variant, "target": target}
                    try:
                        art = export_artifact(backbone, target, out, data=args.data, eval_size=args.eval_size)
                    except ParityError as exc:
                        art = exc.artifact
                    except VitcError as exc:
                        rows.append({**row, "status": "error", "note": str(exc)})
                        continue
                    p = art.parity or {}
                    rows.append({**row, "precision": art.precision, "status": art.status, "seconds": round(time.perf_counter() - t0, 1),
                                 **{k: p.get(k) for k in ("images", "reference_top1", "artifact_top1", "top1_agreement",
                                                          "max_abs_logit_error", "mean_abs_logit_error", "min_agreement")},
                                 "checked_with": (p.get("runtime") or {}).get("runtime"),
                                 "note": p.get("failure") or p.get("skipped") or p.get("checked") or ""})
                    r = rows[-1]
                    print(f"  {spec} {variant} {target}: {r['status']}, agreement {r.get('top1_agreement')}, "
                          f"{r['seconds']} s", flush=True)

    table = Table(title=f"export parity vs PyTorch on {args.data}" + (f" ({args.eval_size} images)" if args.eval_size else ""))
    for col in ("model", "variant", "target", "precision", "status", "images", "PyTorch top-1", "artifact top-1", "agreement",
                "min", "max |Δ logit|", "mean |Δ logit|", "checked with"):
        table.add_column(col)
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    sci = lambda v: "-" if v is None else f"{v:.2e}"  # noqa: E731
    for r in rows:
        table.add_row(r["model"], r["variant"], r["target"], r.get("precision", "-"), r["status"], str(r.get("images") or "-"),
                      pct(r.get("reference_top1")), pct(r.get("artifact_top1")), pct(r.get("top1_agreement")),
                      pct(r.get("min_agreement")), sci(r.get("max_abs_logit_error")), sci(r.get("mean_abs_logit_error")),
                      r.get("checked_with") or "-")
    console = Console(width=200)
    console.print(table)
    for r in rows:
        if r.get("note"):
            console.print(f"  {r['model']} {r['variant']} {r['target']}: {r['note']}", highlight=False)
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": threads, "machine": platform.machine(),
           "processor": platform.processor()}
    if args.json:
        args.json.write_text(json.dumps({"data": args.data, "eval_size": args.eval_size, "environment": env, "rows": rows}, indent=2) + "\n")
    return 1 if any(r["status"] in ("failed", "error") for r in rows) else 0


def _w8a8(backbone, calib_data: str):
    """The backbone quantized to W8A8 (symmetric), or the reason it could not be."""
    try:
        from vitc.compress.quantize.config import QuantConfig
        from vitc.compress.quantize.ptq import apply
    except ImportError as exc:
        return f"no quantization pass in this vitc ({exc})"
    from vitc.errors import VitcError

    try:
        return apply(backbone, QuantConfig(wbits=8, abits=8, scheme="symmetric"), data=calib_data)
    except VitcError as exc:
        return str(exc)


if __name__ == "__main__":
    sys.exit(main())
