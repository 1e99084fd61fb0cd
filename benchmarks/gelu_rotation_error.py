"""Why ``--mlp-rotation`` uses 64-channel blocks: the relative squared error of a 4-bit per-tensor asymmetric grid
(clipping searched over 15 factors of the min/max range) on each block's fc2 input of the real ViT-S, unrotated and
rotated by a block-diagonal Hadamard of 64 or 512 channels (``torch_graph.hadamard``). Float activations of 16
CIFAR-10 training images; a simplified grid (vitc's own gives the CLS token an 8-bit grid of its own), so the
figures rank the block sizes, they are not the quantized model's errors.

    python benchmarks/gelu_rotation_error.py > benchmarks/results_gelu_rotation_error_2026-12-07.txt
"""
import torch

from vitc.calibration.data import load_tensors
from vitc.calibration.sources import open_source
from vitc.compress.quantize.torch_graph import hadamard
from vitc.models.intake import load_model


def relative_error(a: torch.Tensor, bits: int = 4) -> float:
    best = None
    lo, hi = a.min(), a.max()
    for c in torch.linspace(0.3, 1.0, 15):
        scale = (hi - lo) * c / (2 ** bits - 1)
        zero = torch.round(-lo * c / scale)
        q = (torch.clamp(torch.round(a / scale) + zero, 0, 2 ** bits - 1) - zero) * scale
        e = float((q - a).pow(2).mean() / a.pow(2).mean())
        best = e if best is None else min(best, e)
    return best


def rotated(a: torch.Tensor, block: int) -> torch.Tensor:
    return (a.reshape(a.shape[0], -1, block) @ hadamard(block)).reshape(a.shape)


def main() -> None:
    torch.set_num_threads(1)
    bb = load_model("zoo:dinov2s-c10")
    model = bb.module.eval()
    x = load_tensors(open_source("../shared/data/cifar10/train.tar.gz").select(16, seed=1), bb.preprocess)[0]
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: inputs.__setitem__(n, a[0].detach().flatten(0, -2)))
             for n, m in model.named_modules() if n.endswith("fc2")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    print("| fc2 input | loudest channel / median channel | unrotated | 64-wide blocks | 512-wide blocks |")
    print("| --- | --- | --- | --- | --- |")
    for name, a in inputs.items():
        peak = a.abs().amax(0)
        print(f"| {name} | {float(peak.max() / peak.median()):.1f} | {relative_error(a):.4f} | "
              f"{relative_error(rotated(a, 64)):.4f} | {relative_error(rotated(a, 512)):.4f} |")


if __name__ == "__main__":
    main()
