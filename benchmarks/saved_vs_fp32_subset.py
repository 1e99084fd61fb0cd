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
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


def _drop(fp32: list[bool], quant: list[bool]) -> tuple[float, float]:
    """Top-1 drop in points and its paired standard error."""
    d = [int(a) - int(b) for a, b in zip(fp32, quant)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return 100 * mean, 100 * sd / math.sqrt(n)


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
    pick = lambda bits, keys: [bits[at[k]] == "1" for k in keys]  # noqa: E731
    f, q = pick(large["fp32_correct"], keys_small), pick(large["quantized_correct"], keys_small)
    sf, sq = ([c == "1" for c in small[k]] for k in ("fp32_correct", "quantized_correct"))
    drop, se = _drop(f, q)
    print(f"{args.large.name} on the {len(keys_small)} images of {args.small.name}: FP32 {100 * sum(f) / len(f):.2f}%, "
          f"quantized {100 * sum(q) / len(q):.2f}%, drop {drop:.2f} +- {se:.2f} pt "
          f"(the float model differs from the small run's on {sum(a != b for a, b in zip(f, sf))} images)")
    diff, diff_se = _drop(sq, q)  # the small run's model minus this one, as a drop: positive = this one is worse
    print(f"  this model minus the small run's model: {-diff:+.2f} +- {diff_se:.2f} pt "
          f"({sum(a and not b for a, b in zip(q, sq))} images right only with this one, "
          f"{sum(b and not a for a, b in zip(q, sq))} only with the small run's; its drop there {_drop(sf, sq)[0]:.2f})")
    chosen = set(keys_small)
    rest = [k for k in keys_large if k not in chosen]
    if rest:
        drop, se = _drop(pick(large["fp32_correct"], rest), pick(large["quantized_correct"], rest))
        print(f"  the other {len(rest)} images: drop {drop:.2f} +- {se:.2f} pt")


if __name__ == "__main__":
    main()
