"""OpenVINO session. The precision hint is explicit: on CPUs with bf16 support OpenVINO runs
f32 models in bf16 unless told ``INFERENCE_PRECISION_HINT=f32``, so vitc always sets it and
records it: the ``precision`` asked for, else the hint the IR carries in its
``runtime_options`` (written by vitc's measured precision policy for int8 IRs,
``vitc.export.precision_policy``), else ``f32``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vitc.errors import MissingExtraError, VitcError

from .base import Session


class OpenVinoSession(Session):
    name = "openvino"

    def __init__(self, path, threads: int | None = None, device: str = "cpu", precision: str | None = None):
        from .cpu_isa import guard_int8_isa

        guard_int8_isa()  # must run before OpenVINO's first compile in this process (AMX listed but faulting)
        try:
            import openvino as ov
        except ImportError as exc:
            raise MissingExtraError("openvino", "openvino") from exc
        self.path = Path(path)
        core = ov.Core()
        dev = device.upper()
        if dev not in core.available_devices:
            raise VitcError(f"OpenVINO has no device {dev} here", f"available: {', '.join(core.available_devices)}")
        try:
            model = core.read_model(str(self.path))
            if precision is None:
                precision = ir_precision_hint(model) or "f32"
            config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            if model.inputs[0].get_partial_shape().is_dynamic:
                pass  # compiled for dynamic batch; OpenVINO reshapes on the fly
            self.compiled = core.compile_model(model, dev, config)
        except Exception as exc:
            raise VitcError(f"OpenVINO cannot compile {self.path} ({str(exc).splitlines()[0][:160]})", "re-export the model") from exc
        self.request = self.compiled.create_infer_request()
        self.precision = precision
        self.threads = threads
        self.device = dev
        self.version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()
        try:
            self.execution_devices = [str(d) for d in self.compiled.get_property("EXECUTION_DEVICES")]
        except Exception:  # pragma: no cover - older OpenVINO or a plugin without the property
            self.execution_devices = [dev]

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer({0: batch})
        return self.request.get_output_tensor(0).data.copy()

    def runtime_precisions(self) -> dict[str, int]:
        """Count of executed layers by runtime precision (from the compiled model, not the IR)."""
        counts: dict[str, int] = {}
        for op in self.compiled.get_runtime_model().get_ops():
            rt = op.get_rt_info()
            prec = str(rt["runtimePrecision"].value) if "runtimePrecision" in rt else "?"
            counts[prec] = counts.get(prec, 0) + 1
        return counts

    @property
    def input_shape(self) -> tuple:
        shape = self.compiled.inputs[0].get_partial_shape()
        return tuple(d.get_length() if d.is_static else None for d in shape)

    def fallbacks(self) -> list[str]:
        out = []
        ran_on = [d for d in self.execution_devices if not d.startswith(self.device)]
        if ran_on:
            out.append(f"OpenVINO asked for {self.device} but runs on {', '.join(ran_on)}")
        # Per-layer runtimePrecision also reports f16 for layers that only decompress f16-stored
        # weights, so the device's own answer to the hint is the reliable signal.
        try:
            applied = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        except Exception:  # pragma: no cover - a plugin without the property
            applied = self.precision
        if applied != self.precision:
            out.append(f"OpenVINO asked for {self.precision} but the device applies {applied}")
        return out

    def describe(self) -> dict:
        return {"runtime": "openvino", "version": self.version, "device": self.device,
                "precision": f"INFERENCE_PRECISION_HINT={self.precision}", "threads": self.threads,
                "execution_devices": self.execution_devices}


RT_HINT = ["runtime_options", "INFERENCE_PRECISION_HINT"]


def ir_precision_hint(model) -> str | None:
    """The precision hint an IR carries in its rt_info (``runtime_options``), or None."""
    try:
        return str(model.get_rt_info(RT_HINT).astype(str)) if model.has_rt_info(RT_HINT) else None
    except Exception:  # pragma: no cover - an OpenVINO without rt_info lookups by path
        return None
