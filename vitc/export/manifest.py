"""The manifest written beside every artifact (``<stem>.manifest.json``).

It says where the artifact came from (source model and its hash, the transforms applied),
how it was made (exporter, options, library versions), what it takes and returns (input
shapes, preprocessing, labels) and whether it passed parity. ``vitc.models.intake`` reads
the preprocessing back when the ONNX file is loaded as a model.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
from pathlib import Path

MANIFEST_VERSION = 1


def vitc_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vitc")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def library_versions(names: list[str]) -> dict[str, str]:
    """Installed versions of ``names`` (distribution names); absent ones are left out."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def status_of(parity: dict | None) -> str:
    if parity is None or "skipped" in parity:
        return "unchecked"
    return "passed" if parity.get("passed") else "failed"


def build(backbone, target: str, stem: str, staging: Path, staged, opts, parity: dict | None, quant: dict | None) -> dict:
    import torch

    size = backbone.preprocess.input_size
    batch = "batch" if opts.dynamic_batch else 1
    files = {p.name: sha256_of(p) for p in sorted(staging.iterdir())}
    # the graph's own input/output names and shapes (an ONNX file keeps its names; the
    # OpenVINO target records them under "onnx", the graph it converted)
    io_info = staged.info.get("onnx", staged.info) if isinstance(staged.info.get("onnx"), dict) else staged.info
    graph_in = io_info.get("input") or {}
    graph_out = dict(io_info.get("output") or {"name": "logits", "shape": [batch, backbone.num_classes], "dtype": "float32"})
    graph_out["shape"] = list(graph_out["shape"]) if graph_out.get("shape") else [batch, backbone.num_classes]  # the graph's own axes
    graph_out.setdefault("dtype", "float32")
    return {
        "manifest_version": MANIFEST_VERSION,
        "status": status_of(parity),
        "target": target,
        "artifact": str(staged.primary.relative_to(staging)),  # "." when the artifact is the folder itself
        "precision": opts.precision,
        "files": files,
        "source": {"model": backbone.source, "sha256": backbone.source_hash, "kind": backbone.kind,
                   "family": backbone.structure.family},
        "transforms": backbone.transforms,
        "quantization": quant,
        "input": {"name": graph_in.get("name", "pixel_values"), "shape": _input_shape(graph_in.get("shape"), batch, size),
                  "dtype": graph_in.get("dtype", "float32"), "layout": "NCHW",
                  "batch_range": [1, opts.max_batch] if opts.dynamic_batch else [1, 1]},
        "output": graph_out,
        **({"outputs": io_info["outputs"]} if len(io_info.get("outputs", [])) > 1 else {}),
        "preprocess": backbone.preprocess.to_dict(),
        "labels": backbone.labels,
        "options": opts.to_dict(),
        "export": staged.info,
        "versions": {"vitc": vitc_version(), "python": platform.python_version(), "torch": torch.__version__,
                     **library_versions(["onnx", "onnxruntime", "onnxscript", "openvino", "coremltools", "tensorrt"])},
        "parity": parity,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "system": platform.system()},
    }


def _input_shape(graph_shape, batch, size: int) -> list:
    """The graph's own batch axis (its name, e.g. "N", or 1), the sizes the export ran at elsewhere
    (a graph with dynamic height/width was exported at ``size``)."""
    if not graph_shape or len(graph_shape) != 4:
        return [batch, 3, size, size]
    return [graph_shape[0], *(d if isinstance(d, int) else s for d, s in zip(graph_shape[1:], (3, size, size)))]


def graph_io(info: dict) -> tuple[dict, dict]:
    """The input's and output's name, shape and dtype as the written ONNX graph has them (the onnx
    target records them in ``info``, the targets that convert an ONNX graph under ``info["onnx"]``):
    an ONNX file given as the model keeps its own names, which are not pixel_values/logits."""
    graph = info if "input" in info and "output" in info else info.get("onnx") or {}
    if not ("input" in graph and "output" in graph):
        return {}, {}
    pick = lambda d: {k: d[k] for k in ("name", "shape", "dtype") if k in d}  # noqa: E731
    return pick(graph["input"]), pick(graph["output"])


def write(path: Path, manifest: dict) -> None:
    from vitc.artifacts import dumps

    path.write_text(dumps(manifest))


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())
