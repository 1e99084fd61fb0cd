"""Why ``--norm-rotation``: the post-LayerNorm linears (q/k/v on norm1, fc1 on norm2) of the real ViT-S
(zoo:dinov2s-c10) at 4-bit weights (per output channel, symmetric, clipping searched; nearest rounding and GPTQ)
and 4-bit inputs (per tensor, asymmetric, clipping searched on the squared error), against the float layer, on the
norms' outputs for 24 CIFAR-10 training images. Each cell: the layers' relative squared output error
``|X W^T - Xq Wq^T|^2 / |X W^T|^2`` summed over the linears reading the norm, with float inputs (the weights'
share) and with both grids. Input maps:

- ``plain``: the norm output as it is;
- ``repq``: RepQ-ViT's per-channel ``(x + t) / r`` from the output's ranges, ``r`` folded into the weights' columns
  (the graph path's default on these norms);
- ``h64`` / ``h128``: a block-diagonal Hadamard of 64 / 128 channels, ``W H`` (``--norm-rotation on`` uses 64);
- ``repq+h64``: both, RepQ's map first.

GPTQ rounds on the same 24 images it is scored on (the reconstruction does likewise). One thread, about 8 minutes.

    python benchmarks/norm_rotation_error.py > benchmarks/results_norm_rotation_error_2026-12-07.txt
"""
from pathlib import Path

import torch

from vitc.calibration.data import load_tensors
from vitc.calibration.sources import open_source
from vitc.compress.quantize import quantizers as Q
from vitc.compress.quantize import reparam
from vitc.compress.quantize.gptq import gptq_groups
from vitc.compress.quantize.torch_graph import hadamard
from vitc.models.intake import load_model

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"
BITS = 4


def input_grid(x: torch.Tensor) -> torch.Tensor:
    """``x`` on a per-tensor asymmetric grid whose range is shrunk by the factor with the least squared error."""
    qmin, qmax = Q.int_range(BITS, False)
    best = None
    for f in torch.linspace(0.3, 1.0, 15):
        s, z = Q.uniform_qparams(x.min() * f, x.max() * f, BITS, False)
        xq = Q.fake_quant(x, s, z, qmin, qmax)
        e = (xq - x).pow(2).mean()
        if best is None or e < best[0]:
            best = (e, xq)
    return best[1]


def weight_grid(w: torch.Tensor, x: torch.Tensor, gptq: bool) -> torch.Tensor:
    s = Q.weight_qparams(w, BITS)
    if not gptq:
        return Q.fake_quant_weight(w, s, BITS)
    return gptq_groups(w.clone(), (x.T.double() @ x.double()).float(), s[:, None], BITS)


def block_hadamard(n: int, block: int) -> torch.Tensor:
    return torch.block_diag(*[hadamard(block)] * (n // block))


def main() -> None:
    torch.set_num_threads(1)
    bb = load_model("zoo:dinov2s-c10")
    module = bb.module.eval()
    x = load_tensors(open_source(str(CIFAR / "train.tar.gz")).select(24, seed=0), bb.preprocess)[0]
    layers = module.model.dinov2.encoder.layer
    outputs: dict[str, list] = {}

    def keep(key):
        return lambda mod, inp, out: outputs.setdefault(key, []).append(out.reshape(-1, out.shape[-1]))

    hooks = [h for b, layer in enumerate(layers) for h in (layer.norm1.register_forward_hook(keep(f"{b}.norm1")),
                                                           layer.norm2.register_forward_hook(keep(f"{b}.norm2")))]
    with torch.no_grad():
        for i in range(0, len(x), 8):
            module(x[i:i + 8])
    for h in hooks:
        h.remove()
    names = ("plain", "repq", "h64", "h128", "repq+h64")
    rows, totals = [], {}
    print("# per norm, for each map (" + ", ".join(names) + "): nearest weights/both, GPTQ weights/both")
    for b, layer in enumerate(layers):
        att = layer.attention
        for key, linears in ((f"{b}.norm1", (att.q_proj, att.k_proj, att.v_proj)), (f"{b}.norm2", (layer.mlp.fc1,))):
            xs = torch.cat(outputs[key])
            ws = [lin.weight.detach() for lin in linears]
            n = xs.shape[1]
            r, t = reparam.norm_factors(xs.amin(0), xs.amax(0), torch.stack([w.abs().amax(0) for w in ws]).amax(0),
                                        BITS, None, True)
            one, zero = torch.ones(n), torch.zeros(n)
            maps = {"plain": (one, zero, None), "repq": (r, t, None), "h64": (one, zero, block_hadamard(n, 64)),
                    "h128": (one, zero, block_hadamard(n, 128)), "repq+h64": (r, t, block_hadamard(n, 64))}
            cells = []
            for name in names:
                rr, tt, rot = maps[name]
                xm, wm = (xs + tt) / rr, [w * rr[None, :] for w in ws]  # (x + t)/r (W r)^T = x W^T + t W^T (a bias)
                if rot is not None:
                    xm, wm = xm @ rot, [w @ rot for w in wm]
                xq = input_grid(xm)
                for gptq in (False, True):
                    err_w = err_both = energy = 0.0
                    for w in wm:
                        wq, y = weight_grid(w, xm, gptq), xm @ w.T
                        err_w += (xm @ wq.T - y).pow(2).sum().item()
                        err_both += (xq @ wq.T - y).pow(2).sum().item()
                        energy += y.pow(2).sum().item()
                    cells.append((err_w / energy, err_both / energy))
                    totals.setdefault((name, gptq), []).append(cells[-1])
            rows.append((key, cells))
            print(f"{key:9s} " + " ".join(f"{w:.4f}/{a:.4f}" for w, a in cells), flush=True)
    print()
    print(f"mean over the {len(rows)} norms: relative output error, weights' share / both grids")
    print("| input map | nearest: weights | nearest: both | GPTQ: weights | GPTQ: both |")
    print("| --- | --- | --- | --- | --- |")
    for name in names:
        cell = [sum(v[i] for v in totals[(name, g)]) / len(totals[(name, g)]) for g in (False, True) for i in (0, 1)]
        print(f"| {name} | " + " | ".join(f"{c:.4f}" for c in cell) + " |")


if __name__ == "__main__":
    main()
