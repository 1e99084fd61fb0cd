"""PyTorch eager (optionally ``torch.compile``) session over a Backbone."""
from __future__ import annotations

import numpy as np
import torch

from .base import Session


class TorchSession(Session):
    name = "torch"

    def __init__(self, backbone, threads: int | None = None, device: str = "cpu", compile: bool = False):
        self.backbone = backbone
        self.threads = threads or torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self.device = device
        module = backbone.require_module("the torch runtime").eval().to(device)
        self.module = torch.compile(module) if compile else module
        self.compiled = compile

    def run(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.module(torch.from_numpy(batch).to(self.device))
        return out.float().cpu().numpy()

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def describe(self) -> dict:
        return {"runtime": "torch" + ("+compile" if self.compiled else ""), "version": torch.__version__, "device": self.device,
                "precision": "fp32", "threads": self.threads}
