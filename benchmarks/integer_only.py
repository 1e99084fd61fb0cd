"""Integer-only ViT (issue 8) against FP32 and W8A8 QDQ, in one run, on the same model, data and machine.

    python benchmarks/integer_only.py --model zoo:vit-c10 zoo:convvit-c10 --recover-steps 300 --threads 1 \
        --out benchmarks/results_integer_only_2026-11-21.json

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
import os
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

    t = Table(title=title)  # wide: the table is read in logs, not only on a terminal
    for _, head in cols:
        t.add_column(head)
    for r in rows:
        t.add_row(*["-" if r.get(k) is None else f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for k, _ in cols])
    Console(width=220).print(t)


def interleaved(source, seed: int = 0):
    """All images of ``source`` in a class-interleaved random order, so that any prefix is class-balanced.

    The run writes its figures after every batch; when a shared machine stops it early, the
    images it did measure are an unbiased sample of the test set (reported with their count).
    """
    from vitc.calibration.sources import ImageSource

    rng = np.random.default_rng(seed)
    by_class: dict = {}
    for smp in sorted(source.samples, key=lambda smp: smp.key):
        by_class.setdefault(smp.label, []).append(smp)
    queues = [[items[i] for i in rng.permutation(len(items))] for _, items in sorted(by_class.items())]
    order = [q[d] for d in range(max(map(len, queues))) for q in queues if d < len(q)]
    return ImageSource(source.location, order, source.classes, source._archive, source._root)


def run_model(model: str, args, threads: int, checkpoint=None) -> dict:
    """Every row of one model: accuracy on the test set, ORT vs the executor, latency, dominant ops.

    ``checkpoint(result)`` is called with the figures so far after every test batch.
    """
    from vitc.calibration.data import iter_batches, label_map, load_tensors
    from vitc.calibration.sources import open_source
    from vitc.compress import integer
    from vitc.export.integer_onnx import export as export_integer
    from vitc.models.intake import load_model

    backbone = load_model(model)
    size = backbone.preprocess.input_size
    train = open_source(args.train_data)
    test = interleaved(open_source(args.eval_data).select(args.eval_size, seed=0))
    calib_source = train.select(args.calib_size, seed=1)
    calib_x, _ = load_tensors(calib_source, backbone.preprocess)

    t0 = time.perf_counter()
    free = integer.apply(backbone, integer.IntegerConfig(calib_size=args.calib_size, calibration=args.calibration),
                         data=calib_x)
    convert_s = time.perf_counter() - t0
    variants = {"integer-only, training-free": free}
    recover_s = None
    if args.recover_steps:
        rec_x, _ = load_tensors(train.select(args.recover_size, seed=2), backbone.preprocess)
        cfg = integer.IntegerConfig(calib_size=args.calib_size, calibration=args.calibration,
                                    recover_steps=args.recover_steps, recover_size=args.calib_size + len(rec_x),
                                    recover_lr=args.recover_lr)
        t0 = time.perf_counter()
        # calibration on the same first images as training-free; recovery draws from all of them
        variants[f"integer-only, {args.recover_steps} recovery steps"] = integer.apply(
            backbone, cfg, data=torch.cat([calib_x, rec_x]))
        recover_s = time.perf_counter() - t0

    work = Path(tempfile.mkdtemp(prefix="vitc-int-bench-"))
    fp32_path = export_fp32(backbone, work / "fp32.onnx")
    qdq_path, qdq_name = w8a8_qdq(backbone, calib_source, calib_x, fp32_path, work / "w8a8_qdq.onnx")
    int_paths = {name: export_integer(b, work / f"int{i}.onnx") for i, (name, b) in enumerate(variants.items())}
    fp32_name = "FP32 (ONNX Runtime)"

    # latency first (short): one integer graph, the recovered one has the same ops with other constants
    lat_int = next(iter(int_paths))
    lat_paths = {fp32_name: fp32_path, qdq_name: qdq_path, lat_int: int_paths[lat_int]}
    lat = {b: latency(lat_paths, size, threads, b, rounds=args.rounds, seconds=args.round_seconds) for b in (1, 32)}
    ops = {"integer": dominant_ops(int_paths[lat_int], size, threads),
           "fp32": dominant_ops(fp32_path, size, threads), "w8a8_qdq": dominant_ops(qdq_path, size, threads)}

    sessions = {fp32_name: session(fp32_path, threads), qdq_name: session(qdq_path, threads)}
    sessions.update({name: session(p, threads) for name, p in int_paths.items()})
    mapping = label_map(test, backbone.labels)
    correct = collections.Counter()
    mismatched = collections.Counter()
    ref_seconds = collections.Counter()
    exact_n = collections.Counter()
    state = {"n": 0}

    def result(complete: bool) -> dict:
        n = max(state["n"], 1)
        fp32_top1 = correct["FP32 (PyTorch)"] / n
        rows = []
        for name in ["FP32 (PyTorch)", *sessions]:
            top1 = correct[name] / n
            rows.append({"model": model, "variant": name, "images": state["n"], "top1": 100 * top1,
                         "delta": 100 * (top1 - fp32_top1), "ms_b1": lat[1].get(name), "ms_b32": lat[32].get(name),
                         "vs_fp32_b32": lat[32][name] / lat[32][fp32_name] if name in lat[32] else None,
                         "bit_exact": f"{mismatched[name]} of {exact_n[name]} differ" if name in variants else None,
                         "mismatched_images": mismatched[name] if name in variants else None,
                         "exact_images": exact_n[name] if name in variants else None,
                         "ref_img_s": exact_n[name] / ref_seconds[name] if ref_seconds[name] else None})
        return {"model": model, "complete": complete, "images": state["n"], "test_images": len(test), "rows": rows,
                "dominant_ops": ops, "convert_s": convert_s, "recover_s": recover_s,
                "recover_steps": args.recover_steps,
                "recover_s_per_step": (recover_s - convert_s) / args.recover_steps if recover_s else None,
                "qdq_peer": qdq_name, "calibration_images": len(calib_x)}

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
        state["n"] += len(y)
        print(f"\r{model}: {state['n']}/{len(test)} images", end="", file=sys.stderr, flush=True)
        if checkpoint is not None:
            checkpoint(result(False))
    print(file=sys.stderr)
    return result(True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["zoo:vit-c10", "zoo:convvit-c10"])
    ap.add_argument("--train-data", default=str(CIFAR / "train.tar.gz"))
    ap.add_argument("--eval-data", default=str(CIFAR / "test.tar.gz"))
    ap.add_argument("--eval-size", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--calibration", default="minmax", help="the 2026-11-21 results used percentile")
    ap.add_argument("--recover-steps", type=int, default=1000)
    ap.add_argument("--recover-size", type=int, default=4096)
    ap.add_argument("--recover-lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--round-seconds", type=float, default=1.0, help="seconds each graph runs in a round")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--exact-images", type=int, default=None,
                    help="compare ORT with the reference executor on this many test images (default: all)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="print and write one table from the --out files of per-model runs (no measuring)")
    args = ap.parse_args()

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if args.combine:  # models run as separate processes (one per model), reported as one table
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        results = [m for part in parts for m in part["models"]]
        started = min(part["started"] for part in parts)
        threads = parts[0]["threads"]
    else:
        from vitc.commands.common import set_threads

        threads = set_threads(args.threads)
        results = []

        def checkpoint(partial: dict) -> None:
            if args.out:
                write(args, started, threads, [*results, partial])

        for m in args.model:
            results.append(run_model(m, args, threads, checkpoint))
    rows = [r for res in results for r in res["rows"]]
    images = ", ".join(f"{res['model']} {res['images']}" for res in results)
    table(f"integer-only vs FP32 and W8A8 QDQ (test images: {images}; {threads} threads)", rows,
          [("model", "model"), ("variant", "variant"), ("top1", "top-1 %"), ("delta", "Δ vs FP32 (pt)"),
           ("ms_b1", "ORT ms/batch 1"), ("ms_b32", "ORT ms/batch 32"), ("vs_fp32_b32", "x FP32 (b32)"),
           ("bit_exact", "ORT vs reference executor"), ("ref_img_s", "executor img/s")])
    for res in results:
        for graph, ops in res["dominant_ops"].items():
            print(f"{res['model']} {graph} graph, share of ONNX Runtime kernel time by op (batch 32): "
                  + ", ".join(f"{op} {pct}%" for op, pct in ops))
        print(f"{res['model']}: conversion {res['convert_s']:.1f} s"
              + (f", recovery {res['recover_s']:.1f} s ({res['recover_s_per_step']:.2f} s/step)"
                 if res["recover_s"] else ""))
    if args.out:
        write(args, started, threads, results)


def write(args, started: str, threads: int, results: list[dict]) -> None:
    import platform

    from vitc.artifacts import write_json

    rows = [r for res in results for r in res["rows"]]
    write_json(args.out, {
        "complete": all(res["complete"] for res in results), "started": started,
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_at_write": os.getloadavg()},
        "threads": threads, "rows": rows, "models": results,
        "combined_from": [str(f) for f in args.combine] if args.combine else None,
        "args": {k: str(v) for k, v in vars(args).items()}})


if __name__ == "__main__":
    main()
