"""Weight-only int4 exports in their runtimes' default and exact modes, against the simulation.

ONNX Runtime fuses ``DequantizeLinear(int4) -> MatMul`` into ``MatMulNBits`` with
``accuracy_level`` 4 by default (session option ``session.qdq_matmulnbits_accuracy_level``): the
activations are quantized to int8 per block on the fly. OpenVINO's CPU plugin does the same for
compressed weights (``DYNAMIC_QUANTIZATION_GROUP_SIZE`` 32). Both are what a user's session runs;
level 0 / group size 0 compute the float activations against the dequantized weights, which is what
the simulation computes. This script quantizes one model weight-only (symmetric and asymmetric int4
groups), exports each, and prints top-1 agreement and logit error against the simulation in both
modes of both runtimes, so the export's exactness and the runtimes' own activation rounding are
told apart.

    python benchmarks/weight_only_runtime_modes.py --model zoo:vit-c10 --group-size 64 --test-size 1000
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="zoo:vit-c10")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import onnxruntime as ort
    import openvino as ov

    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress.quantize import QuantConfig, apply
    from vitc.export.qdq import export_qdq_onnx
    from vitc.models.intake import load_model

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    calib, _ = load_tensors(open_source(str(CIFAR / "train.tar.gz")).select(args.calib_size, seed=0), model.preprocess)
    x, _ = load_tensors(open_source(str(CIFAR / "test.tar.gz")).select(args.test_size, seed=0), model.preprocess)
    batches = [x[i:i + 50] for i in range(0, len(x), 50)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in ("symmetric", "asymmetric"):
            q = apply(model, QuantConfig(wbits=4, abits=16, group_size=args.group_size, weight_scheme=scheme), calib)
            with torch.no_grad():
                sim = torch.cat([q(b) for b in batches]).numpy()
            path = export_qdq_onnx(q, Path(tmp) / f"{scheme}.onnx")
            runs = {}
            for level in ("4", "0"):  # ORT's default, then float activations
                so = ort.SessionOptions()
                so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", level)
                so.intra_op_num_threads = args.threads
                s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                name = s.get_inputs()[0].name
                runs[f"onnxruntime accuracy_level {level}" + (" (default)" if level == "4" else "")] = \
                    np.concatenate([s.run(None, {name: b.numpy()})[0] for b in batches])
            core = ov.Core()
            for group in (None, 0):  # OpenVINO's default, then no dynamic quantization
                cfg = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": args.threads}
                if group is not None:
                    cfg["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = group
                compiled = core.compile_model(core.read_model(str(path)), "CPU", cfg)
                label = f"openvino dynamic quantization group {compiled.get_property('DYNAMIC_QUANTIZATION_GROUP_SIZE')}"
                runs[label + (" (default)" if group is None else "")] = np.concatenate([compiled(b.numpy())[0] for b in batches])
            scale = float(sim.std())
            for label, out in runs.items():
                row = {"scheme": scheme, "runtime": label, "images": len(x),
                       "agreement_with_sim": float((out.argmax(-1) == sim.argmax(-1)).mean()),
                       "max_abs_logit_error": float(np.abs(out - sim).max()),
                       "mean_rel_logit_error": float(np.abs(out - sim).mean() / scale)}
                rows.append(row)
                print(f"{scheme:10s} {label:50s} agreement {100 * row['agreement_with_sim']:6.2f}%  "
                      f"max |err| {row['max_abs_logit_error']:.2e}  mean err / spread {row['mean_rel_logit_error']:.2e}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "group_size": args.group_size, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
