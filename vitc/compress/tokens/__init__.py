"""Training-free token reduction for ViTs: ToMe merging, EViT-style attentive pruning and
Token Transforming, as one pass: ``apply(backbone, MergeConfig(...)) -> Backbone``.

``merge.py`` holds the algorithms (pure functions on tensors), ``schedule.py`` how many
tokens each block removes, ``block.py`` the block that runs them, ``adapters/`` which part of
a family's block is which.
"""
from .api import MergeConfig, apply, for_flops, load_description, plan, save_description
from .schedule import METHODS

__all__ = ["MergeConfig", "METHODS", "apply", "for_flops", "plan", "save_description", "load_description"]
