"""The Session interface shared by every runtime."""
from __future__ import annotations

import numpy as np
import torch


class Session:
    """A loaded model in one runtime. Subclasses implement ``run`` and ``describe``."""

    name = "base"

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def synchronize(self) -> None:
        """Block until queued device work is done (CPU runtimes return at once)."""

    def describe(self) -> dict:
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple | None:
        """The model input's shape, None for a dynamic dimension; None when the runtime takes any shape."""
        return None

    def fallbacks(self) -> list[str]:
        """Where the runtime runs on another device or precision than asked (empty when it does not)."""
        return []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.run(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))))
