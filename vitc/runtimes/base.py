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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.run(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))))
