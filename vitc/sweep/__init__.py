"""Sweeps over recipe parameters: grid, random and successive-halving search, parallel
compression, one measuring worker per device, resumable JSONL results, Pareto fronts,
locally or on Ray (``executors``), and the HTML/markdown report (``report``)."""
from .runner import run_sweep, summarize
from .space import Space, load_space, parse_space

__all__ = ["Space", "load_space", "parse_space", "run_sweep", "summarize"]
