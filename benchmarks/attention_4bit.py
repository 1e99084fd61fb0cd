"""4-bit attention on a real ViT: the adaptive log grid for the probabilities and key centring, alone and together.

One run, simulation (PyTorch graph path, ``sites="graph"``, calibration only, no reconstruction), same calibration and test
images for every row: W4A4 with ``--prefix-bits 8 --range-search mean`` (the W4A4 command's settings)
under the four combinations of ``softmax`` (logsqrt2: RepQ-ViT's grid, the 4-bit default before; adalog:
``quantizers.adaptive_log_step``) and ``key_centering`` (off / on: ``torch_graph.center_keys``). For each,
every grid quantized, then the quantized weights with only the attention probabilities' grids, and with
only the keys' grids (the rest float). Metrics against FP32: top-1, agreement, output KL.

    python benchmarks/attention_4bit.py --model zoo:dinov2s-c10 --test-size 300 --threads 1 \\
        --out benchmarks/results_attention_4bit_2026-12-07_dinov2s_c10.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"

from prefix_bits import Bench, group_of  # noqa: E402  (the graph path's activation groups, one definition)

SETTINGS = (("log-sqrt(2), keys as they are", "logsqrt2", "off"), ("adaptive log, keys as they are", "adalog", "off"),
            ("log-sqrt(2), keys centred", "logsqrt2", "on"), ("adaptive log, keys centred (the 4-bit default)", "adalog", "on"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:dinov2s-c10")
    ap.add_argument("--calib", default=str(CIFAR / "train.tar.gz"))
    ap.add_argument("--test", default=str(CIFAR / "test.tar.gz"))
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--test-size", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import vitc
    from vitc.compress.quantize.modules import ActQuant

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    backbone, calib, bench = Bench.load(args.model, args.calib, args.test, args.calib_size, args.test_size, width=72)
    x, predict, row, rows = bench.x, bench.predict, bench.row, bench.rows

    print(f"{args.model}: W4A4 (--prefix-bits 8 --range-search mean), calibration only; {len(calib)} calibration / "
          f"{len(x)} test images (class-stratified), {args.threads} thread(s), {started}")
    row("FP32", bench.fp)
    for n, (label, softmax, centring) in enumerate(SETTINGS):
        t = time.perf_counter()
        q = vitc.quantize(backbone, calib, wbits=4, abits=4, prefix_bits=8, range_search="mean", softmax=softmax, sites="graph",
                          key_centering=centring)
        seconds = round(time.perf_counter() - t, 1)
        steps = sorted(round(m.spec()["log_step"], 2) for m in q.module.modules() if isinstance(m, ActQuant) and m.kind == "adalog")
        row(label, predict(q), softmax=softmax, key_centering=centring, seconds=seconds, log_steps=steps)
        acts = {name: m for name, m in q.module.named_modules() if isinstance(m, ActQuant)}
        for m in acts.values():
            m.mode = "off"
        if n == 0:
            row("  the quantized weights alone (every activation float)", predict(q), softmax=softmax,
                key_centering=centring, group="none")
        for group in ("attention probabilities", "k (transposed)"):
            members = [m for name, m in acts.items() if group_of(name) == group]
            for m in members:
                m.mode = "quant"
            row(f"  weights + {group} only ({len(members)} grids)", predict(q), softmax=softmax, key_centering=centring, group=group)
            for m in members:
                m.mode = "off"
    bench.finish(args, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
