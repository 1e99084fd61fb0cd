"""Where low-bit activation error comes from on a real ViT, and what the CLS token's own 8-bit grid buys.

One run, simulation (PyTorch graph path), on the same calibration and test images:

1. W{w}A{a} with one width everywhere (``prefix_bits = abits``), then each activation group
   quantized alone on top of the quantized weights (the others left float): post-LayerNorm
   (q/k/v and fc1 inputs), q and v, k, attention probabilities, the output projection's input,
   post-GELU (fc2 input); for the post-GELU inputs, the CLS token alone and the patch tokens alone.
2. The same widths with the prefix tokens' grids at 8 bits (``QuantConfig.prefix_bits=8``, opt-in).

Metrics against FP32 on the test images: top-1, top-1 agreement and the KL divergence of the
output distribution (the figure that separates settings a few hundred images cannot separate by top-1).

    python benchmarks/prefix_bits.py --model zoo:dinov2s-c10 --test-size 300 --widths 6x6,4x4 --threads 1
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

# activation quantizers of the graph path, by the node they read (torch_graph names them a_<node>)
GROUPS = (("post-LayerNorm (q/k/v, fc1 inputs)", r"a_layer_norm"), ("post-GELU (fc2 input)", r"a_gelu"),
          ("output projection input", r"a_reshape"), ("attention probabilities", r"a_softmax"),
          ("k (transposed)", r"a_transpose_int"), ("q and v", r"a_transpose_\d"))


def group_of(name: str) -> str | None:
    leaf = name.split(".")[-1]
    for label, pattern in GROUPS:
        if re.match(pattern, leaf):
            return label
    return None


class PrefixOnly:
    """Within a context, split activation grids quantize only the prefix tokens ("prefix") or only
    the patch tokens ("patches"); the other part passes through in float. ``only``: restrict this to
    these quantizers (the others quantize both parts as usual)."""

    def __init__(self, part: str, only=None):
        self.part = part
        self.only = None if only is None else {id(q) for q in only}

    def __enter__(self):
        from vitc.compress.quantize.modules import ActQuant

        self.original = ActQuant.forward
        part, original, only = self.part, self.original, self.only

        def forward(q, x):
            y = original(q, x)
            if q.mode != "quant" or not q.prefix_tokens or (only is not None and id(q) not in only):
                return y
            p = q.prefix_tokens
            return torch.cat([y[:, :p], x[:, p:]], 1) if part == "prefix" else torch.cat([x[:, :p], y[:, p:]], 1)

        ActQuant.forward = forward
        return self

    def __exit__(self, *exc):
        from vitc.compress.quantize.modules import ActQuant

        ActQuant.forward = self.original


class Bench:
    """One model's calibration and test images, its FP32 logits, and the table's rows against them:
    ``row(label, logits)`` prints and keeps top-1, top-1 agreement with FP32 and the output KL."""

    def __init__(self, x: torch.Tensor, y: np.ndarray, fp: np.ndarray, width: int = 62):
        self.x, self.y, self.fp, self.width = x, y, fp, width
        self.log_p = torch.log_softmax(torch.from_numpy(fp), -1)
        self.rows: list[dict] = []

    @classmethod
    def load(cls, model: str, calib_data: str, test_data: str, calib_size: int, test_size: int, width: int = 62):
        from vitc.calibration.data import load_tensors
        from vitc.calibration.sources import open_source
        from vitc.models.intake import load_model

        backbone = load_model(model)
        calib, _ = load_tensors(open_source(calib_data).select(calib_size, seed=0), backbone.preprocess)
        x, y = load_tensors(open_source(test_data).select(test_size, seed=0), backbone.preprocess)
        bench = cls(x, y.numpy(), np.zeros(0), width)
        bench.fp = bench.predict(backbone)
        bench.log_p = torch.log_softmax(torch.from_numpy(bench.fp), -1)
        return backbone, calib, bench

    @torch.no_grad()
    def predict(self, model) -> np.ndarray:
        return torch.cat([model(self.x[i:i + 50]) for i in range(0, len(self.x), 50)]).double().numpy()

    def row(self, label: str, logits: np.ndarray, **extra) -> dict:
        log_q = torch.log_softmax(torch.from_numpy(logits), -1)
        rows = self.rows
        r = {"setting": label, "top1": float((logits.argmax(-1) == self.y).mean()),
             "agreement_with_fp32": float((logits.argmax(-1) == self.fp.argmax(-1)).mean()),
             "kl_vs_fp32": float((self.log_p.exp() * (self.log_p - log_q)).sum(-1).mean()), **extra}
        r["drop_pt"] = 100 * (rows[0]["top1"] - r["top1"]) if rows else 0.0
        rows.append(r)
        print(f"{label:{self.width}s} top-1 {100 * r['top1']:6.2f}%  drop {r['drop_pt']:+6.2f}  agree {100 * r['agreement_with_fp32']:6.2f}%"
              f"  KL {r['kl_vs_fp32']:.4f}", flush=True)
        return r

    def finish(self, args, started: str) -> None:
        """The test set's size in points, and the rows as JSON to ``args.out``."""
        rows, n = self.rows, len(self.x)
        se = float(np.sqrt(rows[0]["top1"] * (1 - rows[0]["top1"]) / n))
        print(f"one image = {100 / n:.2f} point; FP32 top-1 standard error {100 * se:.2f} points")
        if args.out:
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "started": started,
                                            "test_images": n, "rows": rows}, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:dinov2s-c10")
    ap.add_argument("--calib", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10/train.tar.gz"))
    ap.add_argument("--test", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10/test.tar.gz"))
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--test-size", type=int, default=300)
    ap.add_argument("--widths", default="6x6,4x4", help="comma-separated WxA")
    ap.add_argument("--no-groups", action="store_true", help="skip the per-group breakdown")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import vitc
    from vitc.compress.quantize.modules import ActQuant

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    backbone, calib, bench = Bench.load(args.model, args.calib, args.test, args.calib_size, args.test_size)
    x, predict, row, rows = bench.x, bench.predict, bench.row, bench.rows

    print(f"{args.model}: {len(calib)} calibration / {len(x)} test images (class-stratified), {args.threads} thread(s), {started}")
    row("FP32", bench.fp)
    for spec in args.widths.split(","):
        w, a = (int(v) for v in spec.lower().split("x"))
        for prefix_bits in (a, 8) if a < 8 else (a,):
            t = time.perf_counter()
            q = vitc.quantize(backbone, calib, wbits=w, abits=a, prefix_bits=prefix_bits)
            seconds = round(time.perf_counter() - t, 1)
            tag = f"W{w}A{a}" + ("" if prefix_bits == a else f", CLS grids at {prefix_bits} bits")
            row(tag, predict(q), wbits=w, abits=a, prefix_bits=prefix_bits, seconds=seconds)
            if args.no_groups or prefix_bits != a:
                continue
            acts = {n: m for n, m in q.module.named_modules() if isinstance(m, ActQuant)}
            for m in acts.values():
                m.mode = "off"
            row(f"W{w}A{a}: weights only (activations float)", predict(q), wbits=w, abits=a, prefix_bits=prefix_bits, group="none")
            for label, _ in GROUPS:
                members = [m for n, m in acts.items() if group_of(n) == label]
                for m in members:
                    m.mode = "quant"
                row(f"W{w}A{a}: weights + {label} only", predict(q), wbits=w, abits=a, prefix_bits=prefix_bits, group=label)
                if label.startswith("post-GELU"):
                    for part in ("prefix", "patches"):
                        with PrefixOnly(part):
                            row(f"W{w}A{a}: weights + post-GELU, {'CLS token' if part == 'prefix' else 'patch tokens'} only",
                                predict(q), wbits=w, abits=a, prefix_bits=prefix_bits, group=f"{label}, {part}")
                for m in members:
                    m.mode = "off"
    bench.finish(args, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
