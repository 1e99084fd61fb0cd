"""Split a large ``saved_vs_fp32.py`` result by the images a smaller one measured: the drop on the smaller run's
images (paired against the model that run measured) and on the rest. Reads only the two JSON files (each keeps
every image's correctness) and the data's file list (to match images by name), so no model is run:

    python benchmarks/saved_vs_fp32_subset.py \
        --large benchmarks/results_saved_vs_fp32_2026-12-08_dinov2s_c10_w4a4_recommended_10000.json \
        --small benchmarks/results_saved_vs_fp32_2026-12-07_dinov2s_c10_w4a4_rot_affine_3000.json

Why: two models made by one command on two machines (or thread counts) differ in their rounding decisions; this
tells that spread apart from which images were measured.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from saved_vs_fp32 import CIFAR, paired_difference, paired_drop  # (it puts the repository on sys.path)


def main() -> None:
    from vitc.calibration.sources import open_source

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--large", required=True, type=Path)
    ap.add_argument("--small", required=True, type=Path)
    ap.add_argument("--data", default=str(CIFAR / "test.tar.gz"))
    args = ap.parse_args()
    large, small = (json.loads(p.read_text()) for p in (args.large, args.small))
    if large["base"] != small["base"] or Path(large["data"]).name != Path(small["data"]).name:
        ap.error("the two results measured different base models or data")
    src = open_source(args.data)
    keys_large = [s.key for s in src.select(large["images"], seed=0).samples]
    keys_small = [s.key for s in src.select(small["images"], seed=0).samples]
    at = {k: i for i, k in enumerate(keys_large)}
    if any(k not in at for k in keys_small):
        ap.error("--small measured images --large did not")

    def correct(bits: str, keys=None) -> torch.Tensor:
        return torch.tensor([c == "1" for c in bits] if keys is None else [bits[at[k]] == "1" for k in keys])

    f, q = correct(large["fp32_correct"], keys_small), correct(large["quantized_correct"], keys_small)
    sf, sq = correct(small["fp32_correct"]), correct(small["quantized_correct"])
    drop, se = paired_drop(f, q)
    print(f"{args.large.name} on the {len(keys_small)} images of {args.small.name}: FP32 {100 * float(f.double().mean()):.2f}%, "
          f"quantized {100 * float(q.double().mean()):.2f}%, drop {drop:.2f} +- {se:.2f} pt "
          f"(the float model differs from the small run's on {int((f != sf).sum())} images)")
    _, clause = paired_difference(q, sq, "small")
    print(f"  against the small run's model (its drop there {paired_drop(sf, sq)[0]:.2f}): "
          + clause.replace("--model", "this model").replace("only with it", "only with the small run's"))
    chosen = set(keys_small)
    rest = [k for k in keys_large if k not in chosen]
    if rest:
        drop, se = paired_drop(correct(large["fp32_correct"], rest), correct(large["quantized_correct"], rest))
        print(f"  the other {len(rest)} images: drop {drop:.2f} +- {se:.2f} pt")


if __name__ == "__main__":
    main()
