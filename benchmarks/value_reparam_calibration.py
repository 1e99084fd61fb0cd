"""``--value-reparam`` on a calibration-only W4A4 model of the real ViT-S (zoo:dinov2s-c10): the quantized model's
output against FP32 (mean KL of the softmax, top-1 agreement, top-1) on 300 class-stratified CIFAR-10 test images,
64 calibration images, graph path, 4-bit weights and activations with 8-bit CLS grids, the mean-objective range
search and ``--mlp-rotation on``, with and without ``--value-reparam on``. One thread; each configuration about
6 minutes. The arguments name the configurations: ``rot`` (rotation only) and ``rot_vr`` (rotation + value reparam).

    python benchmarks/value_reparam_calibration.py rot rot_vr > benchmarks/results_value_reparam_calibration_2026-12-07.txt
"""
import sys
import time
from pathlib import Path

import torch

from vitc.calibration.data import load_tensors
from vitc.calibration.sources import open_source
from vitc.compress.quantize import QuantConfig, apply
from vitc.compress.quantize.saved import quant_record
from vitc.models.intake import load_model

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def main() -> None:
    torch.set_num_threads(1)
    bb = load_model("zoo:dinov2s-c10")
    module = bb.module.eval()
    x = load_tensors(open_source(str(CIFAR / "train.tar.gz")).select(64, seed=0), bb.preprocess)[0]
    xt, yt = load_tensors(open_source(str(CIFAR / "test.tar.gz")).select(300, seed=0), bb.preprocess)[:2]
    with torch.no_grad():
        ref = torch.cat([module(xt[i:i + 50]) for i in range(0, len(xt), 50)])
    for mode in sys.argv[1:]:
        kw = dict(wbits=4, abits=4, prefix_bits=8, range_search="mean", sites="graph")
        if "rot" in mode:
            kw["mlp_rotation"] = "on"
        if "vr" in mode:
            kw["value_reparam"] = "on"
        start = time.time()
        q = apply(bb, QuantConfig(**kw), x)
        with torch.no_grad():
            out = torch.cat([q(xt[i:i + 50]) for i in range(0, len(xt), 50)])
        kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
        agree = (out.argmax(-1) == ref.argmax(-1)).float().mean()
        print(mode, "KL %.4f agree %.3f top1 %.3f fp32 %.3f (%.0fs)" % (
            kl, agree, (out.argmax(-1) == yt).float().mean(), (ref.argmax(-1) == yt).float().mean(), time.time() - start),
            quant_record(q)["vit_quantizers"].get("attention_output"), flush=True)


if __name__ == "__main__":
    main()
