"""TensorRT session over a serialized engine (``.engine``/``.plan``), when ``tensorrt`` imports.

Buffers live in torch CUDA tensors, so no pycuda is needed; ``run`` copies the batch in and
the logits out, and ``synchronize`` waits on the stream the engine was enqueued on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vitc.errors import MissingExtraError, VitcError

from .base import Session


class TensorRtSession(Session):
    name = "tensorrt"

    def __init__(self, path, threads: int | None = None, device: str = "cuda"):
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise MissingExtraError("tensorrt", "tensorrt") from exc
        import torch

        if not torch.cuda.is_available():
            raise VitcError("TensorRT needs a CUDA GPU, and torch sees none here", "run on a machine with an NVIDIA GPU")
        self.path = Path(path)
        self.device = "cuda" if device in ("cpu", "cuda") else device
        self._trt, self._torch = trt, torch
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise VitcError(f"TensorRT cannot deserialize {self.path}", "rebuild the engine with this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.out_dtype = torch.from_numpy(np.zeros(1, dtype=trt.nptype(self.engine.get_tensor_dtype(self.output_name)))).dtype
        self.stream = torch.cuda.Stream()
        self.threads = threads
        self.version = trt.__version__

    @property
    def input_shape(self) -> tuple:
        return tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(self.input_name))

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(batch).to("cuda", non_blocking=False)
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), device="cuda", dtype=self.out_dtype)
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise VitcError(f"TensorRT failed to run {self.path} on a batch of shape {tuple(x.shape)}",
                                "check that the batch fits the engine's optimisation profile")
            result = out.float().cpu()
        return result.numpy()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def describe(self) -> dict:
        return {"runtime": "tensorrt", "version": self.version, "device": self.device,
                "precision": "as built into the engine", "threads": self.threads}
