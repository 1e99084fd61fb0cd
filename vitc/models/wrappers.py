"""Wrap classifiers so that every backbone's forward is ``module(pixels) -> logits``."""
from __future__ import annotations

import torch
import torch.nn as nn


class LogitsModule(nn.Module):
    """A transformers image classifier (or any model returning ``.logits``/a dict) as ``x -> logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values) if _takes_pixel_values(self.model) else self.model(pixel_values)
        return logits_of(out)


def _takes_pixel_values(model: nn.Module) -> bool:
    return getattr(model, "main_input_name", None) == "pixel_values"


def logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


class DroppedAttention(nn.Module):
    """Stands in for a removed attention sublayer: adds nothing to the residual stream.

    Returns a scalar zero that broadcasts onto the residual, so neither the projections nor
    the attention matrix are computed. ``returns_tuple`` mirrors attentions that return
    ``(output, weights)``.
    """

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        zero = hidden_states.new_zeros(())
        return (zero, None) if self.returns_tuple else zero
