"""Runtime sessions: one class per runtime, one interface for parity, eval and bench.

    session = open_session(path_or_backbone, runtime=None, threads=None, device="cpu")
    logits = session.run(batch)      # numpy float32 NCHW -> numpy logits
    session.synchronize()            # wait for device work before a clock is read
    session.describe()               # runtime, version, device, precision, threads

The artifact's type picks the runtime (``.onnx`` -> onnxruntime, ``.xml`` -> openvino,
``.engine``/``.plan`` -> tensorrt, ``.mlpackage`` -> coreml, a Backbone -> torch);
``runtime=`` overrides. Sessions are also callables on torch tensors so ``vitc.evaluate``
takes them like a Backbone.
"""
from __future__ import annotations

from pathlib import Path

from vitc.errors import VitcError

from .base import Session

RUNTIME_BY_SUFFIX = {".onnx": "onnxruntime", ".xml": "openvino", ".engine": "tensorrt", ".plan": "tensorrt",
                     ".mlpackage": "coreml", ".mlmodel": "coreml"}
RUNTIMES = ("torch", "onnxruntime", "openvino", "tensorrt", "coreml")


def runtime_for(artifact) -> str:
    from vitc.backbone import Backbone

    if isinstance(artifact, Backbone):
        return "torch" if artifact.module is not None else "onnxruntime"
    suffix = Path(artifact).suffix
    if suffix not in RUNTIME_BY_SUFFIX:
        raise VitcError(f"no runtime runs '{artifact}'", f"pass an artifact ending in {', '.join(RUNTIME_BY_SUFFIX)}")
    return RUNTIME_BY_SUFFIX[suffix]


def open_session(artifact, runtime: str | None = None, threads: int | None = None, device: str = "cpu", **options) -> Session:
    """Load ``artifact`` (a path or a Backbone) into a session of ``runtime`` (default: by type)."""
    from vitc.backbone import Backbone

    runtime = runtime or runtime_for(artifact)
    if isinstance(artifact, Backbone) and artifact.module is not None and runtime != "torch":
        raise VitcError(f"the {runtime} runtime runs exported artifacts, not a PyTorch model", "export it first, or use --runtime torch")
    if isinstance(artifact, Backbone) and artifact.module is None and runtime != "torch":
        artifact = artifact.onnx_path
    if runtime == "torch" and not isinstance(artifact, Backbone):
        raise VitcError(f"the torch runtime runs a PyTorch model, not the file {artifact}", "pass the model (zoo:, hf:, ...) or pick the artifact's runtime")
    if not isinstance(artifact, Backbone) and not Path(artifact).exists():
        raise VitcError(f"artifact {artifact} does not exist", "check the path, or export it first with vitc export")
    if runtime == "torch" and options.pop("pt2e", False):
        from .torch_pt2e import Pt2eX86Session, calibration_images

        return Pt2eX86Session(artifact, calibration_images(artifact), threads=threads, device=device)
    if runtime == "torch":
        from .torch_session import TorchSession as cls
    elif runtime == "onnxruntime":
        from .ort_session import OrtSession as cls
    elif runtime == "openvino":
        from .openvino_session import OpenVinoSession as cls
    elif runtime == "tensorrt":
        from .tensorrt_session import TensorRtSession as cls
    elif runtime == "coreml":
        from .coreml_session import CoreMlSession as cls
    else:
        raise VitcError(f"unknown runtime '{runtime}'", f"use one of {', '.join(RUNTIMES)}")
    return cls(artifact, threads=threads, device=device, **options)
