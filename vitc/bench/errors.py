"""Bench errors exit with 3, so a CI gate tells a broken harness from a regression (1) or an inconclusive run (2)."""
from __future__ import annotations

from vitc.errors import VitcError


class BenchError(VitcError):
    """The harness could not measure (bad input, missing runtime, out of memory, ...)."""

    exit_code = 3
