"""What gets benchmarked: a model or artifact resolved into something a runtime session opens.

A ``--model`` spec loads as a Backbone and is exported per target (torch runs it as is);
an artifact path (``.onnx``, ``.xml``, ``.engine``, ``.mlpackage``) runs in the runtime its
type picks, or ``--runtime``. Either way the subject carries the preprocessing that builds its
input pool and the shape checks that keep A and B comparable.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from vitc.bench.errors import BenchError
from vitc.errors import VitcError

# target name -> (export format or None, runtime, session options)
TARGETS = {
    "torch": (None, "torch", {}),
    "compile": (None, "torch", {"compile": True}),
    "pt2e": (None, "torch", {"pt2e": True}),  # PyTorch's own x86 int8: PT2E X86InductorQuantizer + torch.compile
    "onnx": ("onnx", "onnxruntime", {}),
    "openvino": ("openvino", "openvino", {}),
    "tensorrt": ("tensorrt", "tensorrt", {}),
    "coreml": ("coreml", "coreml", {}),
}
ARTIFACT_SUFFIXES = (".onnx", ".xml", ".engine", ".plan", ".mlpackage", ".mlmodel")


@dataclass
class Subject:
    label: str
    target: str
    runtime: str
    artifact: str  # file path, or the model spec for torch
    preprocess: object  # vitc.models.preprocess.Preprocess
    labels: list[str]
    precision: str
    size_bytes: int | None
    backbone: object = None  # the Backbone torch runs
    options: dict = field(default_factory=dict)
    spec: str = ""  # what the user passed (model spec or artifact path), to measure the same thing again

    def open(self, threads: int, device: str = "cpu"):
        """(session, load seconds); every failure is a BenchError."""
        from vitc.runtimes import open_session

        t0 = time.perf_counter()
        try:
            session = open_session(self.backbone if self.runtime == "torch" else self.artifact, self.runtime, threads, device, **self.options)
        except BenchError:
            raise
        except VitcError as exc:
            raise BenchError(exc.problem, exc.fix) from exc
        load_s = time.perf_counter() - t0
        check_input_shape(session, self)
        return session, load_s

    def describe(self) -> dict:
        return {"label": self.label, "spec": self.spec, "target": self.target, "runtime": self.runtime, "artifact": self.artifact,
                "precision": self.precision, "size_bytes": self.size_bytes, "input_size": self.preprocess.input_size}


def check_input_shape(session, subject: Subject) -> None:
    shape = session.input_shape
    if not shape or len(shape) != 4:
        return
    side = subject.preprocess.input_size
    if any(d is not None and d != side for d in shape[2:]):
        raise BenchError(f"{subject.artifact} takes {shape[2]}x{shape[3]} inputs but its preprocessing makes {side}x{side}",
                         "pass --input-size to match the artifact")


def check_batch(session, subject: Subject, batch: int) -> None:
    shape = session.input_shape
    if shape and shape[0] is not None and shape[0] != batch:
        raise BenchError(f"{subject.artifact} was exported for batch {shape[0]} only, not {batch}",
                         f"pass --batch {shape[0]}, or export with a dynamic batch dimension")


def artifact_size(path: Path) -> int | None:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    if not path.exists():
        return None
    size = path.stat().st_size
    siblings = [path.with_suffix(".bin")] if path.suffix == ".xml" else [path.parent / (path.name + ".data"), path.with_suffix(".onnx.data")]
    return size + sum(p.stat().st_size for p in set(siblings) if p.exists() and p != path)


def module_size(backbone) -> int:
    module = backbone.require_module("measuring size")
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _manifest_preprocess(path: Path):
    from vitc.models.preprocess import Preprocess

    from vitc.artifacts import manifest_beside

    manifest = manifest_beside(path)
    if manifest is not None:
        data = json.loads(manifest.read_text())
        if "preprocess" in data:
            return Preprocess.from_dict(data["preprocess"]), data
    return None, {}


def _artifact_side(path: Path) -> int | None:
    if path.suffix == ".xml":
        import openvino as ov

        shape = ov.Core().read_model(str(path)).inputs[0].get_partial_shape()
        last = shape[len(shape) - 1]
        return last.get_length() if last.is_static else None
    return None


def artifact_subject(path: str, runtime: str | None, flags) -> Subject:
    """A subject for an artifact file, its preprocessing from the export manifest, its shape or flags."""
    from vitc.models.intake import load_model
    from vitc.artifacts import onnx_precision
    from vitc.models.preprocess import Preprocess
    from vitc.runtimes import runtime_for

    p = Path(path)
    if not p.exists():
        raise BenchError(f"artifact {p} does not exist", "check the path, or export it first with vitc export")
    try:
        runtime = runtime or runtime_for(str(p))
    except VitcError as exc:
        raise BenchError(exc.problem, exc.fix) from exc
    if runtime == "torch":
        raise BenchError(f"the torch runtime runs a PyTorch model, not the file {p}", "drop --runtime torch, or pass the model spec")
    if p.suffix == ".onnx":
        try:
            backbone = load_model(str(p), None, flags)
        except VitcError as exc:
            raise BenchError(exc.problem, exc.fix) from exc
        pre, labels, manifest = backbone.preprocess, backbone.labels, _manifest_preprocess(p)[1]
    else:
        pre, manifest = _manifest_preprocess(p)
        try:
            side = _artifact_side(p)
        except Exception as exc:
            raise BenchError(f"{p} is not a readable {runtime} artifact ({str(exc).splitlines()[0][:160]})", "export it again") from exc
        try:
            pre, _ = flags.apply(pre or (Preprocess(side, side) if side else None), str(p))
        except VitcError as exc:
            raise BenchError(exc.problem, exc.fix) from exc
        labels = manifest.get("labels") or []
    target = {"onnxruntime": "onnx"}.get(runtime, runtime)
    precision = manifest.get("precision") or (onnx_precision(p) if p.suffix == ".onnx" else "graph")  # read from the graph
    return Subject(p.name, target, runtime, str(p), pre, labels, precision, artifact_size(p))


def model_subjects(spec: str, targets: list[str], workdir: Path, flags, weights=None, on_status=None,
                   max_batch: int = 64) -> list[Subject]:
    """Subjects for a model spec: torch runs the Backbone, other targets export it into ``workdir``."""
    from vitc.models.intake import load_model

    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise BenchError(f"unknown target '{unknown[0]}'", f"use any of {', '.join(TARGETS)}")
    try:
        backbone = load_model(spec, str(weights) if weights else None, flags)
    except VitcError as exc:
        raise BenchError(exc.problem, exc.fix) from exc
    out = []
    for target in targets:
        fmt, runtime, options = TARGETS[target]
        if fmt is None:
            if backbone.module is None:
                raise BenchError(f"{spec} is an ONNX file; the {target} target needs the PyTorch model", "pass the model it was exported from")
            out.append(Subject(target, target, runtime, spec, backbone.preprocess, backbone.labels, "fp32",
                               module_size(backbone), backbone=backbone, options=dict(options)))
            continue
        if on_status is not None:
            on_status(f"exporting {spec} to {target}")
        art = export_for(backbone, fmt, workdir, max_batch)
        out.append(Subject(target, target, runtime, str(art.path), backbone.preprocess, backbone.labels,
                           str(getattr(art, "precision", "fp32")), artifact_size(Path(art.path)), options=dict(options)))
    return out


def export_for(backbone, fmt: str, workdir: Path, max_batch: int = 64):
    try:
        from vitc.export import export_artifact
    except ImportError as exc:
        raise BenchError(f"exporting to {fmt} needs vitc.export, which this installation lacks",
                         "export the artifact yourself and pass its path instead of --model") from exc
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        # A folder per target: the exporter names the files inside (some targets write folders).
        return export_artifact(backbone, fmt, workdir / fmt, check=False, max_batch=max(64, max_batch))
    except BenchError:
        raise
    except VitcError as exc:
        raise BenchError(exc.problem, exc.fix) from exc


def resolve(spec: str, targets: list[str] | None, runtime: str | None, workdir: Path, flags, weights=None,
            on_status=None, max_batch: int = 64) -> list[Subject]:
    """Subjects for ``spec``: an artifact path (one subject) or a model spec (one per target)."""
    looks_like_file = Path(spec).suffix in ARTIFACT_SUFFIXES
    if looks_like_file:
        if targets:
            raise BenchError(f"--targets exports a model, but {spec} is already an artifact", "pass --model with a model spec, or drop --targets")
        subjects = [artifact_subject(spec, runtime, flags)]
    else:
        if runtime and targets:
            raise BenchError("--runtime and --targets both pick runtimes", "pass one of them")
        if runtime:
            inverse = {r: t for t, (f, r, o) in TARGETS.items() if not o}
            if runtime not in inverse:
                raise BenchError(f"unknown runtime '{runtime}'", f"use one of {', '.join(inverse)}")
            targets = [inverse[runtime]]
        subjects = model_subjects(spec, targets or ["torch"], workdir, flags, weights, on_status, max_batch)
    for s in subjects:
        s.spec = spec
    return subjects
