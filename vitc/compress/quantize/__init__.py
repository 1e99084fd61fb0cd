"""Post-training quantization (``vitc quantize``): see ``ptq`` for the pass and docs/quantize.md."""
from __future__ import annotations

from .config import QuantConfig
from .ptq import PASS_NAME, apply, quant_params

__all__ = ["QuantConfig", "apply", "quant_params", "PASS_NAME"]
