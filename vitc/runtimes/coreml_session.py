"""CoreML session (``.mlpackage``/``.mlmodel``); CoreML predicts only on macOS."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from vitc.errors import MissingExtraError, VitcError

from .base import Session

COMPUTE_UNITS = {"cpu": "CPU_ONLY", "all": "ALL", "gpu": "CPU_AND_GPU", "ane": "CPU_AND_NE", "npu": "CPU_AND_NE"}


class CoreMlSession(Session):
    name = "coreml"

    def __init__(self, path, threads: int | None = None, device: str = "cpu"):
        if platform.system() != "Darwin":
            raise VitcError(f"CoreML runs models only on macOS, and this is {platform.system()}",
                            "bench the .mlpackage on a Mac, or bench the ONNX/OpenVINO artifact here")
        try:
            import coremltools as ct
        except ImportError as exc:
            raise MissingExtraError("coremltools", "coreml") from exc
        if device not in COMPUTE_UNITS:
            raise VitcError(f"CoreML has no device '{device}'", f"use one of {', '.join(COMPUTE_UNITS)}")
        self.path = Path(path)
        self.device = device
        try:
            self.model = ct.models.MLModel(str(self.path), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[device]))
        except Exception as exc:
            raise VitcError(f"CoreML cannot load {self.path} ({str(exc).splitlines()[0][:160]})", "re-export the model") from exc
        spec = self.model.get_spec()
        self.input_name = spec.description.input[0].name
        self.output_name = spec.description.output[0].name
        shape = spec.description.input[0].type.multiArrayType.shape
        self._input_shape = tuple(int(d) for d in shape) if shape else None
        self.threads = threads
        self.version = ct.__version__

    @property
    def input_shape(self) -> tuple | None:
        return self._input_shape

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict({self.input_name: batch})[self.output_name], dtype=np.float32)

    def describe(self) -> dict:
        return {"runtime": "coreml", "version": self.version, "device": f"compute_units={COMPUTE_UNITS[self.device]}",
                "precision": "as in the package", "threads": self.threads}
