"""Integer-only ViT (issue 8) against FP32 and W8A8 QDQ, in one run, on the same model, data and machine.

    python benchmarks/integer_only.py --model zoo:vit-c10 --recover-steps 1000 --out integer_only.json

Rows (top-1 on the CIFAR-10 test archive, all 10,000 images by default; calibration and
recovery images from the training archive, never the test images):

* FP32: the PyTorch model; its ONNX export in ONNX Runtime for latency.
* W8A8 QDQ (peer): vitc's W8A8 pass exported as a QDQ graph when ``vitc.export.qdq`` is
  there, otherwise ONNX Runtime's own static quantization (QDQ, per-channel weights) of the
  FP32 graph. Its non-linearities (softmax, GELU, LayerNorm) run in float.
* integer-only, training-free and after ``--recover-steps``: the integer ONNX graph in ONNX
  Runtime; every logit is compared with the reference executor (``bit-exact`` column: images
  whose int32 logits differ, must be 0).

Latency: ONNX Runtime CPU, ms per batch at batch 1 and 32 (median of rounds that alternate
between the graphs, so shared-machine load hits them alike), and the ops that dominate the
integer graph's time (ONNX Runtime profiler). Goals: training-free within 2 points of FP32,
within 1 point after <= 1,000 recovery steps; ORT == reference on every image.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


def export_fp32(backbone, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(backbone.module.eval(), (backbone.example_input(2),), str(path), input_names=["pixel_values"],
                          output_names=["logits"], dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return path


def w8a8_qdq(backbone, calib_source, calib_x: torch.Tensor, fp32_path: Path, out: Path) -> tuple[Path, str]:
    """The W8A8 QDQ peer graph: vitc's pass when its QDQ writer exists, else ONNX Runtime's static quantization."""
    try:
        from vitc.compress import quantize
        from vitc.export.qdq import export_qdq_onnx

        qb = quantize.apply(backbone, quantize.QuantConfig(), data=calib_source)
        export_qdq_onnx(qb, out, 17, True)
        return out, "vitc W8A8 (QDQ)"
    except ImportError:
        pass
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"pixel_values": b.numpy()} for b in calib_x.split(32)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return out, "ORT static W8A8 (QDQ)"


def session(path: Path, threads: int, profile: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_profiling = profile
    if profile:  # keep ONNX Runtime's per-run JSON dumps out of the working tree
        import tempfile

        opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "vitc_integer_profile")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def latency(paths: dict[str, Path], size: int, threads: int, batch: int, rounds: int = 5, seconds: float = 1.0) -> dict:
    """Median ms per batch; rounds alternate between the graphs."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    sessions = {k: session(p, threads) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(2):
            s.run(None, {"pixel_values": x})
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            n, t0 = 0, time.perf_counter()
            while n < 3 or time.perf_counter() - t0 < seconds:
                s.run(None, {"pixel_values": x})
                n += 1
            times[k].append(1000 * (time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in times.items()}


def dominant_ops(path: Path, size: int, threads: int, batch: int = 32) -> list[tuple[str, float]]:
    s = session(path, threads, profile=True)
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    for _ in range(3):
        s.run(None, {"pixel_values": x})
    trace = json.loads(Path(s.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values()) or 1
    return [(op, round(100 * t / total, 1)) for op, t in by_op.most_common(8)]


def table(title: str, rows: list[dict], cols: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for _, head in cols:
        t.add_column(head)
    for r in rows:
        t.add_row(*["-" if r.get(k) is None else f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k, _ in cols])
    Console().print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:vit-c10")
    ap.add_argument("--train-data", default=str(CIFAR / "train.tar.gz"))
    ap.add_argument("--eval-data", default=str(CIFAR / "test.tar.gz"))
    ap.add_argument("--eval-size", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--calibration", default="percentile")
    ap.add_argument("--recover-steps", type=int, default=1000)
    ap.add_argument("--recover-size", type=int, default=4096)
    ap.add_argument("--recover-lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--exact-images", type=int, default=None,
                    help="compare ORT with the reference executor on this many test images (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from vitc.calibration.data import iter_batches, label_map, load_tensors
    from vitc.calibration.sources import open_source
    from vitc.commands.common import set_threads
    from vitc.compress import integer
    from vitc.export.integer_onnx import export as export_integer
    from vitc.models.intake import load_model

    threads = set_threads(args.threads)
    backbone = load_model(args.model)
    size = backbone.preprocess.input_size
    train = open_source(args.train_data)
    test = open_source(args.eval_data).select(args.eval_size, seed=0)
    calib_source = train.select(args.calib_size, seed=1)
    calib_x, _ = load_tensors(calib_source, backbone.preprocess)

    t0 = time.perf_counter()
    free = integer.apply(backbone, integer.IntegerConfig(calib_size=args.calib_size, calibration=args.calibration),
                         data=calib_x)
    convert_s = time.perf_counter() - t0
    variants = {"integer-only (training-free)": free}
    recover_s = None
    if args.recover_steps:
        rec_x, _ = load_tensors(train.select(args.recover_size, seed=2), backbone.preprocess)
        cfg = integer.IntegerConfig(calib_size=args.calib_size, calibration=args.calibration,
                                    recover_steps=args.recover_steps, recover_size=args.calib_size + len(rec_x),
                                    recover_lr=args.recover_lr)
        t0 = time.perf_counter()
        # calibration on the same first images as training-free; recovery on all of them
        variants[f"integer-only + {args.recover_steps} recovery steps"] = integer.apply(
            backbone, cfg, data=torch.cat([calib_x, rec_x]))
        recover_s = time.perf_counter() - t0

    work = Path(tempfile.mkdtemp(prefix="vitc-int-bench-"))
    fp32_path = export_fp32(backbone, work / "fp32.onnx")
    qdq_path, qdq_name = w8a8_qdq(backbone, calib_source, calib_x, fp32_path, work / "w8a8_qdq.onnx")
    int_paths = {name: export_integer(b, work / f"int{i}.onnx") for i, (name, b) in enumerate(variants.items())}
    sessions = {"FP32 (ONNX Runtime)": session(fp32_path, threads), qdq_name: session(qdq_path, threads)}
    sessions.update({name: session(p, threads) for name, p in int_paths.items()})

    mapping = label_map(test, backbone.labels)
    correct = collections.Counter()
    mismatched = collections.Counter()
    n = 0
    ref_seconds = collections.Counter()
    exact_n = collections.Counter()
    for x, y in iter_batches(test, backbone.preprocess, args.batch_size):
        if mapping is not None:
            y = torch.from_numpy(mapping[y.numpy()])
        with torch.no_grad():
            correct["FP32 (PyTorch)"] += int((backbone(x).argmax(-1) == y).sum())
        xn = x.numpy()
        for name, s in sessions.items():
            out = s.run(None, {"pixel_values": xn})
            correct[name] += int((torch.from_numpy(out[0]).argmax(-1) == y).sum())
            if name in variants and (args.exact_images is None or exact_n[name] < args.exact_images):
                exact_n[name] += len(y)
                t0 = time.perf_counter()
                ref = variants[name].module.integer_logits(x).numpy()
                ref_seconds[name] += time.perf_counter() - t0
                mismatched[name] += int((out[1] != ref).any(-1).sum())
        n += len(y)
        print(f"\r{n}/{len(test)} images", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    lat1 = latency({"FP32 (ONNX Runtime)": fp32_path, qdq_name: qdq_path, **int_paths}, size, threads, 1)
    lat32 = latency({"FP32 (ONNX Runtime)": fp32_path, qdq_name: qdq_path, **int_paths}, size, threads, 32)
    ops = dominant_ops(next(iter(int_paths.values())), size, threads)
    fp32_top1 = correct["FP32 (PyTorch)"] / n
    rows = []
    for name in correct:
        top1 = correct[name] / n
        rows.append({"model": name, "top1": 100 * top1, "delta": 100 * (top1 - fp32_top1),
                     "ms_b1": lat1.get(name), "ms_b32": lat32.get(name),
                     "bit_exact": f"{mismatched[name]} of {exact_n[name]} differ" if name in variants else None,
                     "ref_img_s": exact_n[name] / ref_seconds[name] if name in variants and ref_seconds[name] else None})
    table(f"{args.model}: integer-only vs FP32 and W8A8 QDQ, {n} test images, {threads} threads", rows,
          [("model", "model"), ("top1", "top-1 %"), ("delta", "Δ vs FP32 (pt)"), ("ms_b1", "ORT ms/batch 1"),
           ("ms_b32", "ORT ms/batch 32"), ("bit_exact", "ORT vs reference executor"),
           ("ref_img_s", "reference executor img/s")])
    print("integer graph, share of ONNX Runtime kernel time by op (batch 32): "
          + ", ".join(f"{op} {pct}%" for op, pct in ops))
    print(f"conversion {convert_s:.1f} s" + (f", recovery {recover_s:.1f} s" if recover_s else ""))
    if args.out:
        from vitc.artifacts import write_json

        write_json(args.out, {"model": args.model, "images": n, "threads": threads, "rows": rows, "dominant_ops": ops,
                              "convert_s": convert_s, "recover_s": recover_s, "qdq_peer": qdq_name,
                              "args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
