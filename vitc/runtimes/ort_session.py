"""ONNX Runtime session (CPU; CUDA/TensorRT execution providers when present and asked for)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vitc.errors import MissingExtraError, VitcError

from .base import Session


class OrtSession(Session):
    name = "onnxruntime"

    def __init__(self, path, threads: int | None = None, device: str = "cpu", providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise MissingExtraError("onnxruntime", "onnx") from exc
        self.path = Path(path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        wanted = providers or {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                               "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}.get(device)
        if wanted is None:
            raise VitcError(f"onnxruntime has no device '{device}'", "use cpu, cuda or tensorrt")
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise VitcError(f"onnxruntime here has no {wanted[0]}", f"available: {', '.join(available)}")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=[p for p in wanted if p in available])
        except Exception as exc:
            raise VitcError(f"onnxruntime cannot load {self.path} ({str(exc).splitlines()[0][:160]})", "re-export the model") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.requested = wanted
        self.threads = threads
        self.version = ort.__version__

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    @property
    def input_shape(self) -> tuple:
        return tuple(d if isinstance(d, int) else None for d in self.session.get_inputs()[0].shape)

    def fallbacks(self) -> list[str]:
        # ORT silently drops an execution provider that fails to initialise (missing CUDA libraries, say).
        active = self.session.get_providers()
        if self.requested[0] not in active:
            return [f"onnxruntime asked for {self.requested[0]} but runs on {active[0]}"]
        return []

    def describe(self) -> dict:
        return {"runtime": "onnxruntime", "version": self.version, "device": self.session.get_providers()[0],
                "providers": self.session.get_providers(), "precision": "as in graph", "threads": self.threads}
