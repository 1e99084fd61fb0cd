"""Structured pruning (``vitc prune``): heads, MLP channels, attention sublayers, conv channels."""
from .api import PruneConfig, apply

__all__ = ["PruneConfig", "apply"]
