"""Export a Backbone to a deployable artifact and check it against PyTorch.

    art = export_artifact(backbone, "onnx", "out/model.onnx")      # -> Artifact
    art.path, art.precision, art.manifest, art.parity

One module per target (``onnx``, ``openvino``, ``tensorrt``, ``coreml``) writes the files;
``pipeline`` stages them in a temporary folder, runs parity where the artifact can run
here, writes the manifest beside the artifact and moves everything into place at once.
"""
from __future__ import annotations

from vitc.export.pipeline import TARGETS, Artifact, ExportOptions, ParityError, export_artifact, planned_paths, resolve_output

__all__ = ["TARGETS", "Artifact", "ExportOptions", "ParityError", "export_artifact", "planned_paths", "resolve_output"]
