"""How much each part of a block's output moves the model's output, on the real ViT-S (zoo:dinov2s-c10):
the numbers behind ``--recon-loss fisher`` and behind its measured failure there (docs/quantize.md).

Per block output, with ``g`` the gradient of the logits projected on a random normal direction (the
estimator of ``reconstruct.sensitivity``):

* per element, the CLS token's ``E[g^2]`` over a patch token's (what the diagonal weighting sees);
* the largest channel's ``E[g^2]`` over the mean channel's;
* coherence: ``E[(sum over patch tokens of g)^2]`` over ``sum over patch tokens of E[g^2]``, i.e. how much
  more one error shared by every patch token moves the output than the diagonal says (1: not at all, the
  patch count: fully shared, as through a mean over the patch tokens);
* the CLS token's ``E[g^2]`` over the patches' shared-error sensitivity: the CLS token against the patches
  when the error is one the rounded weights make alike on every token.

    PYTHONPATH=$PWD python benchmarks/recon_loss_sensitivity.py --images 64 --out benchmarks/results_recon_loss_sensitivity_2026-12-07.json
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
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:dinov2s-c10")
    ap.add_argument("--data", default=str(CIFAR / "train.tar.gz"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source
    from vitc.models.intake import load_model

    torch.set_num_threads(args.threads)
    backbone = load_model(args.model)
    module = backbone.require_module("sensitivity")
    blocks = [b.path for b in backbone.structure.blocks]
    x, _ = load_tensors(open_source(args.data).select(args.images, seed=0), backbone.preprocess)
    values: dict[str, torch.Tensor] = {}

    def keep(path):
        def hook(m, a, out):
            o = out[0] if isinstance(out, tuple) else out
            o.retain_grad()
            values[path] = o
        return hook

    hooks = [module.get_submodule(p).register_forward_hook(keep(p)) for p in blocks]
    gen = torch.Generator().manual_seed(0)
    acc = {p: {"cls": 0.0, "patch_diag": 0.0, "patch_shared": 0.0, "chan": 0.0} for p in blocks}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for i in range(0, len(x), 16):
        values.clear()
        out = module(x[i:i + 16])
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
        for p, v in values.items():
            g = v.grad.double()
            a = acc[p]
            a["cls"] += g[:, 0].pow(2).sum().item()
            a["patch_diag"] += g[:, 1:].pow(2).sum().item()
            a["patch_shared"] += g[:, 1:].sum(1).pow(2).sum().item()
            a["chan"] = a["chan"] + g.pow(2).sum((0, 1))
    for h in hooks:
        h.remove()
    tokens = values[blocks[0]].shape[1]
    rows = []
    print(f"{args.model}, {len(x)} images of {args.data}, {tokens} tokens ({started})")
    print(f"{'block':>5s} {'CLS/patch per element':>22s} {'channel max/mean':>17s} {'shared/diagonal':>16s} {'CLS/patches shared':>19s}")
    for k, p in enumerate(blocks):
        a = acc[p]
        row = {"block": p, "cls_vs_patch_per_element": a["cls"] / (a["patch_diag"] / (tokens - 1)),
               "channel_max_vs_mean": float(a["chan"].max() / a["chan"].mean()),
               "shared_vs_diagonal": a["patch_shared"] / a["patch_diag"],
               "cls_vs_patches_shared": a["cls"] / a["patch_shared"]}
        rows.append(row)
        print(f"{k:5d} {row['cls_vs_patch_per_element']:22.1f} {row['channel_max_vs_mean']:17.1f} "
              f"{row['shared_vs_diagonal']:16.1f} {row['cls_vs_patches_shared']:19.3f}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "started": started,
                                        "tokens": tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
