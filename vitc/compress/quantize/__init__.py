"""Post-training quantization (``vitc quantize``): see ``ptq`` for the pass and docs/quantize.md."""
from __future__ import annotations

from .config import QuantConfig
from .ptq import PASS_NAME, quant_params
from .ptq import apply as _apply_module


def apply(backbone, config: QuantConfig | None = None, data=None, progress=None, **options):
    """Quantize ``backbone``: its PyTorch module (``ptq.apply``), or, for a Backbone loaded from an
    ONNX file, its graph (``onnx_graph.apply``: a Backbone whose ``onnx_path`` is the Q/DQ graph)."""
    if getattr(backbone, "module", None) is None and getattr(backbone, "onnx_path", None) is not None:
        from .onnx_graph import apply as _apply_onnx

        return _apply_onnx(backbone, config, data, progress)
    return _apply_module(backbone, config, data, progress, **options)  # reconstruct_staging=, say=

__all__ = ["QuantConfig", "apply", "quant_params", "PASS_NAME"]
