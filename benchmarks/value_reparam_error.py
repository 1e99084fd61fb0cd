"""Why ``--value-reparam``, and why it maps by V's ranges: the relative squared error of a 4-bit per-tensor asymmetric
grid (clipping searched over 15 factors of the min/max range) on each block's attention output projection input
(``softmax @ V``, the patch tokens; the CLS token gets its own grid) and on V (the value projection's output, which
the attention also quantizes) of the real ViT-S, the errors measured back in the original units. First table, the
projection input: as it is, rotated by a 64-wide block Hadamard (what ``--mlp-rotation`` does to fc2's input), each
channel on a grid of its own (not runnable: an integer matmul takes one scale per input), after RepQ-ViT's
per-channel affine map (``reparam.repq_factors``) from its own ranges, and from V's (what ``--value-reparam`` folds
into the value and output projections). Second table, V under the same two maps. Float activations of 16 CIFAR-10
training images; a simplified grid, so the figures rank the choices, they are not the quantized model's errors.

    python benchmarks/value_reparam_error.py > benchmarks/results_value_reparam_error_2026-12-07.txt
"""
import torch

from gelu_rotation_error import relative_error, rotated
from vitc.calibration.data import load_tensors
from vitc.calibration.sources import open_source
from vitc.compress.quantize.reparam import repq_factors
from vitc.models.intake import load_model


def per_channel_error(a: torch.Tensor, bits: int = 4) -> float:
    lo, hi = a.amin(0), a.amax(0)
    best = None
    for c in torch.linspace(0.3, 1.0, 15):
        scale = ((hi - lo) * c / (2 ** bits - 1)).clamp_min(1e-8)
        zero = torch.round(-lo * c / scale)
        q = (torch.clamp(torch.round(a / scale) + zero, 0, 2 ** bits - 1) - zero) * scale
        e = float((q - a).pow(2).mean() / a.pow(2).mean())
        best = e if best is None else min(best, e)
    return best


def reparam_error(a: torch.Tensor, bits: int = 4, ranges: torch.Tensor | None = None) -> float:
    """The error of one grid after the RepQ map of ``ranges``' per-channel ranges (``a``'s own when None)."""
    ranges = a if ranges is None else ranges
    r, t = repq_factors(ranges.amin(0), ranges.amax(0), bits)
    b = (a + t) / r
    best = None
    for c in torch.linspace(0.3, 1.0, 15):
        lo, hi = b.min() * c, b.max() * c
        scale = (hi - lo) / (2 ** bits - 1)
        zero = torch.round(-lo / scale)
        q = (torch.clamp(torch.round(b / scale) + zero, 0, 2 ** bits - 1) - zero) * scale
        e = float((q * r - t - a).pow(2).mean() / a.pow(2).mean())
        best = e if best is None else min(best, e)
    return best


def main() -> None:
    torch.set_num_threads(1)
    bb = load_model("zoo:dinov2s-c10")
    model = bb.module.eval()
    x = load_tensors(open_source("../shared/data/cifar10/train.tar.gz").select(16, seed=1), bb.preprocess)[0]
    inputs, values = {}, {}
    hooks = [m.register_forward_hook(lambda m, a, out, n=n: inputs.__setitem__(n[:-len(".o_proj")], a[0].detach()[:, 1:].flatten(0, -2)))
             for n, m in model.named_modules() if n.endswith("attention.o_proj")]
    hooks += [m.register_forward_hook(lambda m, a, out, n=n: values.__setitem__(n[:-len(".v_proj")], out.detach().flatten(0, -2)))
              for n, m in model.named_modules() if n.endswith("attention.v_proj")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    print("| output projection input (patch tokens) | widest channel range / median | per-tensor | 64-wide Hadamard | "
          "per-channel grids | RepQ map, its own ranges | RepQ map, V's ranges (--value-reparam) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, a in inputs.items():
        width = a.amax(0) - a.amin(0)
        print(f"| {name.split('encoder.')[-1]} | {float(width.max() / width.median()):.1f} | {relative_error(a):.4f} | "
              f"{relative_error(rotated(a, 64)):.4f} | {per_channel_error(a):.4f} | {reparam_error(a):.4f} | "
              f"{reparam_error(a, ranges=values[name]):.4f} |")
    print()
    print("| V (value projection output) | per-tensor | RepQ map, the projection input's ranges | RepQ map, V's ranges (--value-reparam) |")
    print("| --- | --- | --- | --- |")
    for name, v in values.items():
        print(f"| {name.split('encoder.')[-1]} | {relative_error(v):.4f} | {reparam_error(v, ranges=inputs[name]):.4f} | "
              f"{reparam_error(v):.4f} |")


if __name__ == "__main__":
    main()
