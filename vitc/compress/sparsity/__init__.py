"""2:4 semi-structured sparsity (``vitc sparsify``): magnitude, Wanda, SparseGPT."""
from .api import SparsityConfig, apply, eligible_layers, layer_masks, sparse_layers

__all__ = ["SparsityConfig", "apply", "eligible_layers", "layer_masks", "sparse_layers"]
