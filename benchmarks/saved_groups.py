"""Where a saved low-bit model still loses: each activation group of a SAVED quantized model (``vitc quantize
-o FOLDER``, e.g. after ``--reconstruct``) left in float while every other grid stays quantized, against FP32.

``prefix_bits.py`` asks the question of a fresh calibration, one group quantized at a time; after block
reconstruction the weights' learned rounding and the learned step sizes were fitted together, so this asks the
complement on the artifact itself: how much output KL would go if one group's grids were exact. Rows: every grid
quantized; every activation float (the learned weights alone); each group float; for the post-GELU (fc2) inputs,
the CLS token's and the patch tokens' grids alone.

    python benchmarks/saved_groups.py --model W6A6 --test-size 600 --threads 1 \\
        --out benchmarks/results_saved_groups_2026-12-07_dinov2s_c10_w6a6_recon_c512.json
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

from prefix_bits import GROUPS, PrefixOnly, group_of  # noqa: E402  (the graph path's activation groups, one definition)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a folder written by vitc quantize -o (graph path)")
    ap.add_argument("--data", default=str(CIFAR / "test.tar.gz"))
    ap.add_argument("--test-size", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.commands.common import set_threads
    from vitc.compress.quantize.modules import ActQuant
    from vitc.compress.quantize.saved import load_base, load_quantized

    set_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    quantized = load_quantized(args.model)
    base = load_base(json.loads((Path(args.model) / "vitc_quant.json").read_text()))
    x, y = load_tensors(open_source(args.data).select(args.test_size, seed=0), base.preprocess)

    @torch.no_grad()
    def predict(model) -> torch.Tensor:
        return torch.cat([model(x[i:i + 50]) for i in range(0, len(x), 50)]).double()

    fp = predict(base)
    log_p = torch.log_softmax(fp, -1)
    rows = []

    def row(label: str, logits: torch.Tensor) -> None:
        log_q = torch.log_softmax(logits, -1)
        r = {"setting": label, "top1": float((logits.argmax(-1) == y).double().mean()),
             "agreement_with_fp32": float((logits.argmax(-1) == fp.argmax(-1)).double().mean()),
             "kl_vs_fp32": float((log_p.exp() * (log_p - log_q)).sum(-1).mean())}
        rows.append(r)
        print(f"{label:62s} top-1 {100 * r['top1']:6.2f}%  agree {100 * r['agreement_with_fp32']:6.2f}%  KL {r['kl_vs_fp32']:.4f}",
              flush=True)

    acts = {n: m for n, m in quantized.module.named_modules() if isinstance(m, ActQuant)}
    members = {label: [m for n, m in acts.items() if group_of(n) == label] for label, _ in GROUPS}
    if not any(members.values()):
        raise SystemExit(f"{args.model}: no graph-path activation grids found; this script reads graph-path models")
    print(f"{args.model}: {len(x)} class-stratified test images, {args.threads} thread(s), {started}; grids per group:",
          {k: len(v) for k, v in members.items()})
    row("FP32", fp)
    row("every grid quantized", predict(quantized))
    for m in acts.values():
        m.mode = "off"
    row("every activation float (the learned weights alone)", predict(quantized))
    for m in acts.values():
        m.mode = "quant"
    for label, group in members.items():
        for m in group:
            m.mode = "off"
        row(f"{label} float, the rest quantized", predict(quantized))
        for m in group:
            m.mode = "quant"

    for part in ("prefix", "patches"):
        with PrefixOnly(part, only=members["post-GELU (fc2 input)"]):
            row("post-GELU: " + ("patch tokens float (CLS quantized)" if part == "prefix" else "CLS float (patch tokens quantized)"),
                predict(quantized))
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "started": started, "test_images": len(x),
                                        "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
