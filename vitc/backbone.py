"""The Backbone: the one object that travels through vitc.

A Backbone is an ``nn.Module`` whose forward maps a normalised image batch (N, 3, H, W) to
logits (N, classes), plus what every pass needs to know: its preprocessing, its labels,
where it came from, its structure (discovered on first use by the family adapters) and the
record of transforms applied so far. Passes take a Backbone and return a new one through
``with_module``; nothing else mutates it.

An ONNX file loads as a Backbone without a module (``onnx_path`` set): it serves the steps
that run artifacts (export checks, bench); steps that need PyTorch call ``require_module``.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
import torch.nn as nn

from vitc.errors import VitcError
from vitc.models.preprocess import Preprocess
from vitc.models.structure import Structure


@dataclass(eq=False)
class Backbone:
    module: nn.Module | None
    preprocess: Preprocess
    labels: list[str]
    source: str  # the --model spec it was loaded from
    source_hash: str = ""  # sha256 of the weights/model file(s), for manifests
    transforms: list[dict] = field(default_factory=list)  # [{"pass": name, "config": {...}, ...}]
    preprocess_origin: str = "config"  # "config" | "flags" | "defaults"
    onnx_path: Path | None = None
    card: dict | None = None  # zoo model card, when loaded from the zoo
    source_weights: str | None = None  # the --weights file of a factory/timm source (a saved artifact rebuilds from it)

    @cached_property
    def structure(self) -> Structure:
        from vitc.models.adapters import discover

        if self.module is None:
            return Structure(family="onnx", kind="unknown")
        return discover(self.module)

    @property
    def kind(self) -> str:
        if self.card and "kind" in self.card:
            return self.card["kind"]
        return self.structure.kind

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def require_module(self, step: str) -> nn.Module:
        if self.module is None:
            raise VitcError(f"{step} needs a PyTorch model, but {self.source} is an ONNX file",
                            "pass the PyTorch model it was exported from (zoo:, hf:, timm:, module:factory, .pt2)")
        return self.module

    def example_input(self, batch: int = 1) -> torch.Tensor:
        s = self.preprocess.input_size
        return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0))

    def with_module(self, module: nn.Module, transform: dict) -> "Backbone":
        """A new Backbone holding ``module``, with ``transform`` appended to the record."""
        return replace(self, module=module, transforms=[*self.transforms, transform])

    def copy(self) -> "Backbone":
        """A deep copy of the module, so a pass can change it in place without touching self."""
        return replace(self, module=copy.deepcopy(self.module) if self.module is not None else None,
                       transforms=list(self.transforms))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.require_module("running the model")
        return module(x)

    def parameters_count(self) -> int:
        module = self.require_module("counting parameters")
        return sum(p.numel() for p in module.parameters())

    def flops(self) -> int:
        """Forward FLOPs for one image at the model's input size (2 per multiply-add)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        module = self.require_module("counting FLOPs")
        was_training = module.training
        module.eval()
        counter = FlopCounterMode(display=False)
        # The math backend runs attention as matmuls the counter sees; the fused CPU kernel is not counted.
        with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
            module(self.example_input(1))
        module.train(was_training)
        return int(counter.get_total_flops())

    def describe(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "family": self.structure.family,
            "classes": self.num_classes,
            "preprocess": self.preprocess.to_dict(),
            "preprocess_origin": self.preprocess_origin,
            "transforms": self.transforms,
        }


@contextlib.contextmanager
def mha_fast_path_off():
    """``nn.MultiheadAttention`` in eval/no-grad takes a fused fast path (``_native_multi_head_attention``)
    that no ONNX exporter translates and no graph capture can quantize (one op, no matmul); its
    regular path traces as matmuls and softmax. Every tracer of a backbone's module runs under this."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
