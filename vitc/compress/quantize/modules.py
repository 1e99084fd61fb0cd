"""The quantization-simulation modules the pass swaps into a model.

``QuantLinear``/``QuantConv2d`` subclass ``nn.Linear``/``nn.Conv2d`` and keep their module
paths, so ``backbone.structure`` and every other pass still find them. Each owns an
``ActQuant`` for its input and per-output-channel symmetric weight scales. After calibration
the stored weight already lies on its integer grid (quantize-dequantize is idempotent), so the
simulation runs plain float kernels; ``export_mode`` re-applies the weight fake-quant so that
the ONNX exporter emits QuantizeLinear/DequantizeLinear around the weights.
``set_decomposed_export`` is the ``torch.export`` counterpart (CoreML): the same grids as
``torch.ops.quantized_decomposed`` ops with the scales frozen into Python numbers.

``AttentionCore`` runs ``softmax(q k^T * scaling) v`` with quantizers on both inputs of both
matmuls; the family adapters (``adapters/``) route attention through it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitc.calibration.observers import Observer

from . import quantizers as Q

ACT_KINDS = ("uniform", "log2", "logsqrt2", "adalog", "twin")
# values of an adaptive log grid's input kept while observing (strided), to choose its step
LOG_SAMPLE_MAX = 1 << 21


class ActQuant(nn.Module):
    """One activation quantizer. ``mode``: "off" (identity), "observe" (feed the observer), "quant".

    ``channel_axis`` is the axis of per-channel statistics and, when ``per_channel``, of the
    per-channel grid (last axis for tokens, 1 for feature maps).

    ``prefix_tokens`` > 0 (token activations (batch, tokens, channels), below 8 bits): the first
    ``prefix_tokens`` tokens (CLS, registers) get a uniform grid of their own, ``scale[0]`` /
    ``zero_point[0]``, and the patch tokens ``scale[1]`` / ``zero_point[1]``. A pretrained ViT's
    CLS token carries values several times the patch tokens' range in some blocks' MLP inputs
    (zoo:dinov2s-c10: 13.8 against 3.5 after block 2's GELU), and the head reads exactly that
    token: one 6-bit grid must either clip it or spend its levels on it. While calibrating,
    ``prefix_observer`` sees the prefix tokens and ``observer`` the rest. ``prefix_bits`` (0: ``bits``)
    is the prefix grid's width (``QuantConfig.prefix_bits``).

    ``kind`` "adalog" (attention probabilities): a log grid ``2**(-q * step)`` whose step is chosen
    from the observed values (``set_adaptive_log``) and kept in ``scale[0]``.
    """

    def __init__(self, name: str, bits: int = 8, kind: str = "uniform", channel_axis: int = -1, channels: int = 1):
        super().__init__()
        self.name = name
        self.bits = bits
        self.kind = kind
        self.symmetric = False
        self.per_channel = False
        self.channel_axis = channel_axis
        self.mode = "off"
        self.observer: Observer | None = None
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("zero_point", torch.zeros(channels, dtype=torch.int32))
        self.register_buffer("twin", torch.ones(2))  # negative and positive scales of the twin grid
        self.frozen_qparams: tuple | None = None  # set by set_decomposed_export
        self.prefix_tokens = 0
        self.prefix_bits = 0
        self.prefix_observer: Observer | None = None
        self.log_samples: list[torch.Tensor] | None = None  # adaptive log grid: values seen while observing

    @property
    def qrange(self) -> tuple[int, int]:
        return Q.int_range(self.bits, self.symmetric)

    @property
    def prefix_qrange(self) -> tuple[int, int]:
        return Q.int_range(self.prefix_bits or self.bits, self.symmetric)

    def keep_log_sample(self, x: torch.Tensor) -> None:
        """Keep every 61st value (a prime stride, across rows) of an adaptive log grid's input."""
        if self.log_samples is None:
            self.log_samples = []
        if sum(t.numel() for t in self.log_samples) < LOG_SAMPLE_MAX:
            self.log_samples.append(x.detach().reshape(-1)[::61].float().clone())

    def set_adaptive_log(self, keep_sqrt2_below: float | None = None) -> float:
        """Choose the adaptive log grid's step from the kept values (``quantizers.adaptive_log_step``).
        ``keep_sqrt2_below`` (``softmax="auto"``): keep log-sqrt(2) instead where its grid rounds at
        most that share of the probability mass to 0. Returns the share log-sqrt(2) would round to 0."""
        values = torch.cat(self.log_samples)
        self.log_samples = None
        lost = Q.log_mass_lost(values, self.bits, 0.5)
        if keep_sqrt2_below is not None and lost <= keep_sqrt2_below:
            self.kind = "logsqrt2"
            return lost
        step, _ = Q.adaptive_log_step(values, self.bits)
        self.scale = torch.tensor([step])
        return lost

    def set_uniform(self, scale: torch.Tensor, zero: torch.Tensor, symmetric: bool, per_channel: bool) -> None:
        self.kind, self.symmetric, self.per_channel = "uniform", symmetric, per_channel
        self.scale = scale.reshape(-1).float().clone()
        self.zero_point = zero.reshape(-1).to(torch.int32).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            if self.prefix_observer is not None:
                p = self.prefix_tokens
                self.prefix_observer.update(x[:, :p])
                self.observer.update(x[:, p:])
            else:
                self.observer.update(x)
            if self.kind == "adalog":
                self.keep_log_sample(x)
            return x
        if self.kind == "uniform":
            if getattr(self, "frozen_qparams", None) is not None:
                return decomposed_fake_quant(x, *self.frozen_qparams)
            qmin, qmax = self.qrange
            if self.prefix_tokens:
                p = self.prefix_tokens
                return torch.cat([Q.fake_quant(x[:, :p], self.scale[0], self.zero_point[0], *self.prefix_qrange),
                                  Q.fake_quant(x[:, p:], self.scale[1], self.zero_point[1], qmin, qmax)], 1)
            if self.per_channel:
                return Q.fake_quant(x, self.scale, self.zero_point, qmin, qmax, self.channel_axis)
            return Q.fake_quant(x, self.scale[0], self.zero_point[0], qmin, qmax)
        if self.kind in ("log2", "logsqrt2"):
            return Q.fake_quant_log2(x, self.bits, sqrt2=self.kind == "logsqrt2")
        if self.kind == "adalog":  # the step lives in ``scale``, so a saved state carries it
            return Q.fake_quant_log2(x, self.bits, step=float(self.scale[0]))
        return Q.fake_quant_twin(x, float(self.twin[0]), float(self.twin[1]), self.bits)

    def spec(self) -> dict:
        d = {"kind": self.kind, "bits": self.bits}
        if self.kind == "uniform":
            d.update(symmetric=self.symmetric, granularity="channel" if self.per_channel else
                     ("prefix+patches" if self.prefix_tokens else "tensor"))
            if self.prefix_tokens:
                d["prefix_tokens"] = self.prefix_tokens
                if self.prefix_bits and self.prefix_bits != self.bits:
                    d["prefix_bits"] = self.prefix_bits
        elif self.kind == "adalog":
            d["log_step"] = round(float(self.scale[0]), 4)
        return d

    def load_spec(self, spec: dict) -> None:
        """Set kind and scheme from ``spec`` and size the buffers, so a saved state dict loads."""
        self.kind, self.bits = spec["kind"], spec["bits"]
        self.symmetric = spec.get("symmetric", False)
        self.per_channel = spec.get("granularity") == "channel"
        self.prefix_tokens = spec.get("prefix_tokens", 0)
        self.prefix_bits = spec.get("prefix_bits", 0)
        n = spec.get("channels", 1) if self.per_channel else (2 if self.prefix_tokens else 1)
        self.scale = torch.ones(n)
        self.zero_point = torch.zeros(n, dtype=torch.int32)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.spec()}, mode={self.mode}"


class _QuantWeighted:
    """What QuantLinear and QuantConv2d share: the input quantizer and the weight grid."""

    input_quant: ActQuant
    weight_scale: torch.Tensor
    wbits: int
    export_mode: bool
    quantized: bool

    def _init_quant(self, name: str, abits: int, wbits: int, channel_axis: int) -> None:
        self.input_quant = ActQuant(name, abits, channel_axis=channel_axis)
        self.wbits = wbits
        self.export_mode = False
        self.quantized = False
        self.register_buffer("weight_scale", torch.ones(self.weight.shape[0]))

    def quantize_weight(self, search: bool = True) -> torch.Tensor:
        """Put the weight on its per-channel grid; return the float weight it replaced."""
        original = self.weight.detach().clone()
        self.weight_scale = Q.weight_qparams(original, self.wbits, search)
        with torch.no_grad():
            self.weight.copy_(Q.fake_quant_weight(original, self.weight_scale, self.wbits))
        self.quantized = True
        return original

    def weight_codes(self) -> torch.Tensor:
        qmin, qmax = Q.int_range(self.wbits, True, restricted=True)
        return Q.quantize_int(self.weight.detach(), self.weight_scale, torch.zeros_like(self.weight_scale, dtype=torch.int32),
                              qmin, qmax, axis=0)

    def _weight(self) -> torch.Tensor:
        codes = self._buffers.get("weight_int8")
        if codes is not None:
            # the stored weight already equals codes * scale, so this is the same tensor, but
            # torch.export now sees int8 constants and their dequantization
            qmin, qmax = Q.int_range(self.wbits, True, restricted=True)
            zero = torch.zeros_like(self.weight_scale, dtype=torch.int32)
            return _decomposed().dequantize_per_channel(codes, self.weight_scale, zero, 0, qmin, qmax, torch.int8)
        if self.export_mode and self.quantized:
            # the export grid is [-128, 127] (what ONNX allows); codes only use [-127, 127]
            zero = torch.zeros_like(self.weight_scale, dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(self.weight, self.weight_scale, zero, 0,
                                                          -(2 ** (self.wbits - 1)), 2 ** (self.wbits - 1) - 1)
        return self.weight


class QuantLinear(nn.Linear, _QuantWeighted):
    @classmethod
    def from_float(cls, linear: nn.Linear, name: str, abits: int, wbits: int) -> "QuantLinear":
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight = linear.weight
        m.bias = linear.bias
        m._init_quant(name, abits, wbits, channel_axis=-1)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self._weight(), self.bias)


class QuantConv2d(nn.Conv2d, _QuantWeighted):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, name: str, abits: int, wbits: int) -> "QuantConv2d":
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(m, attr, getattr(conv, attr))
        m.weight = conv.weight
        m.bias = conv.bias
        m._init_quant(name, abits, wbits, channel_axis=1)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_mode and self._pads_asymmetric_input():
            # OpenVINO pads a quantized conv input with code 0 rather than the zero point, so an
            # asymmetric grid saw wrong borders there (93% agreement with the simulation on the
            # conv-stem hybrid). Padding in float before the quantizer is exact: 0 maps to the
            # zero point and back to 0.
            x = nn.functional.pad(x, self._reversed_padding_repeated_twice)
            return nn.functional.conv2d(self.input_quant(x), self._weight(), self.bias, self.stride, 0, self.dilation, self.groups)
        return self._conv_forward(self.input_quant(x), self._weight(), self.bias)

    def _pads_asymmetric_input(self) -> bool:
        q = self.input_quant
        return (q.mode == "quant" and q.kind == "uniform" and not q.symmetric and self.padding_mode == "zeros"
                and any(p > 0 for p in self._reversed_padding_repeated_twice))


class AttentionCore(nn.Module):
    """``softmax(q k^T * scaling) v`` on (B, heads, tokens, head_dim) with all four matmul inputs quantized."""

    def __init__(self, name: str, bits: int):
        super().__init__()
        self.q_quant = ActQuant(f"{name}.q", bits)
        self.k_quant = ActQuant(f"{name}.k", bits)
        self.probs_quant = ActQuant(f"{name}.softmax", bits)
        self.v_quant = ActQuant(f"{name}.v", bits)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        scores = torch.matmul(self.q_quant(q), self.k_quant(k).transpose(-1, -2)) * scaling
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(self.probs_quant(probs), self.v_quant(v))


class WeightFakeQuant(nn.Module):
    """The weight grid of a graph-path site (``torch_graph``): per-output-channel symmetric scales.

    The weight itself stays where the model keeps it (a subclass's own forward still reads it);
    after calibration it already lies on its grid, so this is the identity except in export mode,
    where it re-applies the fake-quant so that the exporter emits Q/DQ around the weight."""

    def __init__(self, target: str, weight: torch.Tensor, bits: int = 8, axis: int = 0):
        super().__init__()
        self.target = target
        self.wbits = bits
        self.axis = axis
        self.export_mode = False
        self.quantized = False
        self.register_buffer("weight_scale", torch.ones(weight.shape[axis]))

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, search: bool = True) -> torch.Tensor:
        """Put ``weight`` (the model's parameter) on its grid in place; return the float weight it replaced."""
        original = weight.detach().clone()
        moved = original.movedim(self.axis, 0)
        self.weight_scale = Q.weight_qparams(moved, self.wbits, search)
        weight.copy_(Q.fake_quant_weight(moved, self.weight_scale, self.wbits).movedim(0, self.axis))
        self.quantized = True
        return original

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes = self._buffers.get("weight_int8")
        if codes is not None:
            # int8 constants and their dequantization, which the dynamo ONNX exporter writes as
            # an int8 initializer feeding DequantizeLinear (set by ``freeze_for_export``)
            qmin, qmax = -(2 ** (self.wbits - 1)), 2 ** (self.wbits - 1) - 1
            return _decomposed().dequantize_per_channel(codes, self.weight_scale, self.weight_zero, self.axis % w.dim(),
                                                        qmin, qmax, torch.int8)
        if self.export_mode and self.quantized:
            zero = torch.zeros_like(self.weight_scale, dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(w, self.weight_scale, zero, self.axis % w.dim(),
                                                          -(2 ** (self.wbits - 1)), 2 ** (self.wbits - 1) - 1)
        return w

    def extra_repr(self) -> str:
        return f"{self.target}: W{self.wbits} per-channel axis {self.axis}"


def weight_quantizers(module: nn.Module) -> dict[str, WeightFakeQuant]:
    return {name: m for name, m in module.named_modules() if isinstance(m, WeightFakeQuant)}


def act_quantizers(module: nn.Module) -> dict[str, ActQuant]:
    return {name: m for name, m in module.named_modules() if isinstance(m, ActQuant)}


def weighted_layers(module: nn.Module) -> dict[str, QuantLinear | QuantConv2d]:
    return {name: m for name, m in module.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}


def set_mode(module: nn.Module, mode: str) -> None:
    for q in act_quantizers(module).values():
        q.mode = mode


def set_export_mode(module: nn.Module, on: bool) -> None:
    for layer in weighted_layers(module).values():
        layer.export_mode = on
    for wq in weight_quantizers(module).values():
        wq.export_mode = on


def _decomposed():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers torch.ops.quantized_decomposed

    return torch.ops.quantized_decomposed


def decomposed_fake_quant(x: torch.Tensor, scale: float, zero: int, qmin: int, qmax: int) -> torch.Tensor:
    """Per-tensor quantize-dequantize as ``quantized_decomposed`` ops: the same rounding and clamping
    as ``torch.fake_quantize_per_tensor_affine``, in ops ``torch.export`` keeps and CoreML converts."""
    ops = _decomposed()
    dtype = torch.int8 if qmin < 0 else torch.uint8
    return ops.dequantize_per_tensor(ops.quantize_per_tensor(x, scale, zero, qmin, qmax, dtype), scale, zero, qmin, qmax, dtype)


def freeze_for_export(module: nn.Module, on: bool, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Quantizers as ``quantized_decomposed`` ops with constant scales, which ``torch.export`` (the
    dynamo ONNX exporter of graph-path models, opset 18) turns into Q/DQ pairs: reading a scale
    buffer with ``float()`` would be a data-dependent guard there, and ``fake_quantize_*`` has no
    fake-tensor kernel. 8-bit uniform per-tensor activation grids only. ``weights``: each
    ``WeightFakeQuant``'s weight by its target, stored as int8 codes for the export."""
    for name, q in act_quantizers(module).items():
        q.frozen_qparams = None
        if not on or q.mode != "quant":
            continue
        if q.kind != "uniform" or q.per_channel or q.prefix_tokens:
            raise ValueError(f"{q.name or name}: a {q.spec()} quantizer has no Q/DQ form")
        qmin, qmax = q.qrange
        q.frozen_qparams = (float(q.scale[0]), int(q.zero_point[0]), qmin, qmax)
    for name, wq in weight_quantizers(module).items():
        if not on:
            wq._buffers.pop("weight_int8", None)
            wq._buffers.pop("weight_zero", None)
            continue
        if weights is None or not wq.quantized:
            continue
        if wq.wbits > 8:
            raise ValueError(f"a {wq.wbits}-bit weight has no int8 form")
        w = weights[wq.target].detach()
        shape = [1] * w.dim()
        shape[wq.axis % w.dim()] = -1
        qmin, qmax = Q.int_range(wq.wbits, True, restricted=True)
        codes = torch.clamp(torch.round(w / wq.weight_scale.reshape(shape)), qmin, qmax).to(torch.int8)
        wq.register_buffer("weight_int8", codes, persistent=False)
        wq.register_buffer("weight_zero", torch.zeros_like(wq.weight_scale, dtype=torch.int32), persistent=False)


def set_decomposed_export(module: nn.Module, on: bool) -> None:
    """Make the simulation capturable by ``torch.export`` (for CoreML), or undo it.

    The simulation reads its activation scales from buffers, which ``torch.export`` traces as
    tensors it cannot turn into the constant scales a quantize op needs: freeze them into Python
    numbers. Weights become their int8 codes (a non-persistent buffer, so saving is unchanged)
    and a per-channel dequantize. Only 8-bit (or narrower) uniform per-tensor activation grids
    and weights up to 8 bits have this form; anything else raises ValueError, so callers check first.
    """
    for name, q in act_quantizers(module).items():
        if not on:
            q.frozen_qparams = None
            continue
        if q.mode != "quant":
            continue
        if q.kind != "uniform" or q.per_channel or q.prefix_tokens or q.bits > 8:
            raise ValueError(f"{q.name or name}: a {q.spec()} quantizer has no quantized_decomposed form")
        qmin, qmax = q.qrange
        q.frozen_qparams = (float(q.scale[0]), int(q.zero_point[0]), qmin, qmax)
    for layer in weighted_layers(module).values():
        if not on:
            if "weight_int8" in layer._buffers:
                del layer._buffers["weight_int8"]
            continue
        if not layer.quantized:
            continue
        if layer.wbits > 8:
            raise ValueError(f"a {layer.wbits}-bit weight has no int8 form")
        layer.register_buffer("weight_int8", layer.weight_codes().to(torch.int8), persistent=False)
