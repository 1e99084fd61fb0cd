"""The 4-bit attention-probability grid on short attentions: log-sqrt(2), the adaptive log grid, and ``auto``
(which keeps log-sqrt(2) where it rounds at most ``plan.LOG_MASS_LOSS_MAX`` of the mass to 0).

For each model, W4A4 calibration only with the defaults otherwise (the path ``sites="auto"`` picks), the
same calibration and test images for every row; per row the mass log-sqrt(2) would round to 0 in each
attention and the grids calibration chose. This is what ``LOG_MASS_LOSS_MAX`` was set from, with
``attention_4bit.py`` for the 257-token real ViT-S.

    python benchmarks/softmax_grid_zoo.py --models zoo:vit-c10,zoo:convvit-c10 --calib-size 512 --test-size 2000 \\
        --out benchmarks/results_softmax_grid_zoo_2026-12-07.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"

from prefix_bits import Bench  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="zoo:vit-c10,zoo:convvit-c10")
    ap.add_argument("--calib", default=str(CIFAR / "train.tar.gz"))
    ap.add_argument("--test", default=str(CIFAR / "test.tar.gz"))
    ap.add_argument("--calib-size", type=int, default=512)
    ap.add_argument("--test-size", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import vitc
    from vitc.compress.quantize import modules as M

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lost: list[float] = []
    choose = M.ActQuant.set_adaptive_log

    def recording(self, keep_sqrt2_below=None):  # the mass log-sqrt(2) would lose, per attention
        share = choose(self, keep_sqrt2_below)
        lost.append(round(share, 4))
        return share

    M.ActQuant.set_adaptive_log = recording
    out = {}
    for model in args.models.split(","):
        backbone, calib, bench = Bench.load(model, args.calib, args.test, args.calib_size, args.test_size, width=48)
        print(f"{model}: W4A4 calibration only, {len(calib)} calibration / {len(bench.x)} test images, {args.threads} thread(s)")
        bench.row("FP32", bench.fp)
        for softmax in ("logsqrt2", "adalog", "auto"):
            lost.clear()
            q = vitc.quantize(backbone, calib, wbits=4, abits=4, softmax=softmax)
            kinds = [m.spec() for m in q.module.modules() if isinstance(m, M.ActQuant) and m.kind in ("logsqrt2", "adalog")]
            bench.row(f"softmax {softmax}", bench.predict(q), softmax=softmax, grids=kinds, log_sqrt2_mass_lost=list(lost))
            print(f"   grids: {', '.join(k['kind'] + (' ' + str(k['log_step']) if 'log_step' in k else '') for k in kinds)}; "
                  f"log-sqrt(2) would round to 0: {', '.join(f'{100 * v:.1f}%' for v in lost) or '-'}")
        bench.finish(argparse.Namespace(out=None), started)
        out[model] = bench.rows
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "started": started, "models": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
