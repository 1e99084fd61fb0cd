"""PyTorch's own x86 int8 path, as a peer row in ``vitc bench``: PT2E with the X86 Inductor quantizer.

``torch.export`` captures the model, ``prepare_pt2e`` with ``X86InductorQuantizer`` (static
per-tensor activations, per-channel weights, oneDNN int8 kernels) inserts observers, a few
calibration batches run, ``convert_pt2e`` writes Q/DQ, and ``torch.compile`` with Inductor's
freezing lowers the pattern to oneDNN int8 GEMMs. The quantizer lives in torchao since torch
2.6 moved PT2E out of ``torch.ao`` (and 2.13 removed it there); either import works.
"""
from __future__ import annotations

import numpy as np
import torch

from vitc.errors import VitcError

from .base import Session


def x86_quantizer_api():
    """(prepare_pt2e, convert_pt2e, X86InductorQuantizer, default config) from torchao or torch.ao, or a VitcError."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except Exception:
        try:
            from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torch.ao.quantization.quantizer import x86_inductor_quantizer as xiq
        except Exception as exc:
            raise VitcError(f"PyTorch's x86 PT2E quantizer does not import here (torch {torch.__version__}, no torchao)",
                            "pip install torchao (torch >= 2.6 keeps PT2E there)") from exc
    return prepare_pt2e, convert_pt2e, xiq.X86InductorQuantizer, xiq.get_default_x86_inductor_quantization_config


def quantize_pt2e_x86(module: torch.nn.Module, calib: torch.Tensor, example: torch.Tensor, batch: int = 8) -> torch.nn.Module:
    """``module`` quantized by PT2E + X86InductorQuantizer (W8A8, static), calibrated on ``calib``; not yet compiled."""
    prepare_pt2e, convert_pt2e, Quantizer, default_config = x86_quantizer_api()
    quantizer = Quantizer()
    quantizer.set_global(default_config())
    with torch.no_grad():
        batch_dim = torch.export.Dim("batch", min=1, max=1024)
        graph = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch_dim},)).module()
        prepared = prepare_pt2e(graph, quantizer)
        for i in range(0, len(calib), batch):
            prepared(calib[i:i + batch])
        return convert_pt2e(prepared)


def calibration_images(backbone, count: int = 32) -> torch.Tensor:
    """The bundled calibration slice, preprocessed for ``backbone`` (what ``vitc quantize`` calibrates on by default)."""
    from vitc.calibration.data import load_tensors
    from vitc.calibration.sources import open_source

    x, _ = load_tensors(open_source("bundled:calib").select(count, 0), backbone.preprocess, convert_rgb=True)
    return x


class Pt2eX86Session(Session):
    """The Backbone quantized by PT2E (X86 Inductor quantizer), compiled by Inductor with freezing."""

    name = "torch-pt2e"

    def __init__(self, backbone, calib: torch.Tensor, threads: int | None = None, device: str = "cpu"):
        if device != "cpu":
            raise VitcError(f"the PT2E x86 int8 path runs on the CPU, not {device}", "pass --device cpu")
        import torch._inductor.config as inductor_config

        self.threads = threads or torch.get_num_threads()
        torch.set_num_threads(self.threads)
        module = backbone.require_module("the PT2E x86 quantizer")
        example = calib[:2]
        try:
            quantized = quantize_pt2e_x86(module, calib, example)
            inductor_config.freezing = True  # constant-folds the weight Q/DQ so oneDNN gets packed int8 weights
            self.module = torch.compile(quantized)
            with torch.no_grad():
                self.module(example)  # compile now, not inside the first timed call
        except VitcError:
            raise
        except Exception as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise VitcError(f"PyTorch's PT2E x86 path fails on this model ({type(exc).__name__}: {first})",
                            "bench the ONNX/OpenVINO targets instead") from exc
        self.backbone = backbone

    def run(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(batch)).float().numpy()

    def describe(self) -> dict:
        return {"runtime": "torch+pt2e", "version": torch.__version__, "device": "cpu",
                "precision": "int8 (PT2E X86InductorQuantizer, torch.compile)", "threads": self.threads}
