"""The export pipeline shared by every target: pick the precision, stage the files in a
temporary folder, check parity on the staged artifact, write the manifest, move into place.

Artifacts that fail parity are still moved into place, with ``"status": "failed"`` in their
manifest, so a user can inspect them; ``export_artifact`` then raises ``ParityError``.
Anything else that goes wrong leaves nothing behind.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from vitc.errors import VitcError

TARGETS = ("onnx", "openvino", "tensorrt", "coreml")


@dataclass
class ExportOptions:
    """Everything a target needs besides the backbone; serialised into the manifest."""

    precision: str
    dynamic_batch: bool = True
    opset: int = 17
    simplify: bool = False
    max_batch: int = 64  # top of the batch range: CoreML's RangeDim, TensorRT's optimisation profile
    opt_batch: int = 8  # the batch TensorRT tunes its kernels for
    workspace_mib: int = 1024  # TensorRT builder memory pool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Staged:
    """What a target wrote into the staging folder."""

    primary: Path  # the file (or folder) a runtime loads
    info: dict = field(default_factory=dict)  # exporter, graph facts, target-specific checks
    open_session: Callable[[Path], object] | None = None  # a runtime session over ``primary``, when it runs here
    not_run_reason: str | None = None  # why parity cannot run here, when open_session is None
    runtime_checks: Callable[[object], dict] | None = None  # extra checks on the open session (int8 layers kept, ...)
    parity_subject: str | None = None  # what parity ran on, when that is not the artifact itself
    fallback: Callable[[], "Staged"] | None = None  # a more conservative write, used when this one fails parity


@dataclass
class Artifact:
    path: Path
    target: str
    precision: str
    manifest: dict
    parity: dict | None
    files: list[Path] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.manifest["status"]

    @property
    def manifest_path(self) -> Path:
        return self.files[-1]


class TargetUnavailable(VitcError):
    """The target cannot take this kind of model at all (not a fault of its options)."""


class ParityError(VitcError):
    """The artifact was written but disagrees with PyTorch past the tolerance."""

    exit_code = 3

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        p = artifact.parity or {}
        super().__init__(
            f"{artifact.target} artifact {artifact.path} failed the parity check: {p.get('failure', 'see its manifest')}",
            "it is kept and marked failed in its manifest; try another --precision, or check the model with vitc eval")


def target_module(target: str):
    if target not in TARGETS:
        raise VitcError(f"unknown export target '{target}'", f"use one of: {', '.join(TARGETS)}, all")
    return importlib.import_module(f"vitc.export.{target}")


def quantization_record(backbone) -> dict | None:
    """The transform that makes the model integer (``quantize`` or ``integer``), if any."""
    for t in reversed(backbone.transforms):
        if t.get("pass") in ("quantize", "integer"):
            return t
    return None


def resolve_output(output_path: Path | str, target: str) -> tuple[Path, str]:
    """(folder, stem) of the artifact: ``X.<suffix>`` names the file; an existing folder or a
    path without a suffix is a folder that receives ``model.<suffix>``."""
    mod = target_module(target)
    path = Path(output_path)
    if mod.SUFFIX is None:  # a target whose artifact is a folder of files
        if path.suffix in getattr(mod, "REFUSED_SUFFIXES", ()):
            raise VitcError(f"the {target} target writes a folder, not {path.name}", f"pass a folder, e.g. -o {path.with_suffix('')}")
        return path, "model"
    if path.suffix == mod.SUFFIX:
        return path.parent, path.stem
    if path.is_dir() or not path.suffix:
        return path, "model"
    raise VitcError(f"-o {path} does not end in {mod.SUFFIX}, which the {target} target writes",
                    f"pass a path ending in {mod.SUFFIX}, or a folder")


def artifact_name(stem: str, target: str) -> str:
    """The artifact's own name in its folder (``X.onnx``, ``X.xml``); a folder target's stem."""
    return f"{stem}{target_module(target).SUFFIX or ''}"


def manifest_name(stem: str, target: str) -> str:
    """Manifests are named after the artifact file (``X.onnx.manifest.json``, ``X.xml.manifest.json``), so
    two targets exported into one folder never share (and overwrite) one manifest."""
    return f"{artifact_name(stem, target)}.manifest.json"


def claim_path(output_path, target: str) -> Path:
    """The path whose claim (vitc.artifacts.claim) guards an export to ``output_path``."""
    folder, stem = resolve_output(output_path, target)
    return folder / artifact_name(stem, target)


def planned_paths(output_path, target: str) -> list[Path]:
    """Every path an export to ``output_path`` may write (the artifact, its sidecars, the manifest)."""
    folder, stem = resolve_output(output_path, target)
    return [folder / name for name in (*target_module(target).output_names(stem), manifest_name(stem, target))]


def export_artifact(backbone, target: str, output_path, *, force: bool = False, check: bool = True,
                    data: str = "bundled:eval", eval_size: int | None = None, precision: str | None = None,
                    dynamic_batch: bool = True, opset: int = 17, simplify: bool = False, progress=None,
                    batch_size: int = 64, **target_options) -> Artifact:
    """Write ``backbone`` as a ``target`` artifact at ``output_path`` and check it (see the module docstring)."""
    from vitc.export import manifest as manifest_mod
    from vitc.export import parity as parity_mod

    mod = target_module(target)
    known = {f.name for f in fields(ExportOptions)} - {"precision", "dynamic_batch", "opset", "simplify"}
    unknown = sorted(set(target_options) - known)
    if unknown:
        raise VitcError(f"unknown export option '{unknown[0]}'", f"known options: {', '.join(sorted(known))}")
    if opset < 17:
        raise VitcError(f"opset {opset} is older than vitc exports", "use --opset 17 or newer")
    quant = quantization_record(backbone)
    opts = ExportOptions(precision=mod.pick_precision(precision, quant), dynamic_batch=dynamic_batch, opset=opset,
                         simplify=simplify, **target_options)
    if opts.max_batch < 1 or not 1 <= opts.opt_batch <= opts.max_batch:
        raise VitcError(f"batch range opt {opts.opt_batch}, max {opts.max_batch} is not valid", "use 1 <= opt_batch <= max_batch")
    mod.preflight(backbone, opts, quant)
    from vitc.numerics import check_weights

    check_weights(backbone)  # a NaN weight would export "fine" and fail parity with 100% agreement

    from vitc.artifacts import claim

    folder, stem = resolve_output(output_path, target)
    with claim(claim_path(output_path, target), force):  # held by the command already when run from the CLI
        return _export_claimed(backbone, mod, target, folder, stem, output_path, opts, quant, force, check, data, eval_size,
                               progress, batch_size, parity_mod, manifest_mod)


def _export_claimed(backbone, mod, target, folder: Path, stem: str, output_path, opts, quant, force, check, data, eval_size,
                    progress, batch_size, parity_mod, manifest_mod) -> Artifact:
    from vitc.artifacts import JOURNAL, check_writable, disk_error, fault_point, find_disk_error, honour_umask, staging_prefix

    manifest_file = manifest_name(stem, target)
    for path in planned_paths(output_path, target):
        check_writable(path, force)
    first_existing = next(p for p in (folder, *folder.parents) if p.exists())
    folder.mkdir(parents=True, exist_ok=True)
    # the pid in the name lets the next run on this path recognise the staging of a killed run
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(folder / artifact_name(stem, target)), dir=folder))
    moved: list[Path] = []
    try:
        staged: Staged = mod.write(backbone, staging, stem, opts, quant, progress=progress)
        fault_point("export:staged")
        parity = None
        if not check:
            parity = {"skipped": "--no-check: the artifact was not compared with PyTorch"}
        elif staged.open_session is None:
            parity = {"skipped": staged.not_run_reason}
        else:
            def run_parity(staged):
                return parity_mod.check(backbone, staged.open_session(staged.primary), opts.precision, data=data,
                                        eval_size=eval_size, batch_size=batch_size, progress=progress,
                                        extra_checks=staged.runtime_checks, session_batch=None if opts.dynamic_batch else 1)

            parity = run_parity(staged)
            if not parity.get("passed", True) and staged.fallback is not None:
                first, staged = parity, staged.fallback()
                parity = run_parity(staged)
                parity["fallback"] = {"first_write_failed": first.get("failure"),
                                      "first_write": {k: v for k, v in first.items() if isinstance(v, (int, float))}}
            if staged.parity_subject:
                parity["checked"] = staged.parity_subject
        manifest = manifest_mod.build(backbone, target, stem, staging, staged, opts, parity, quant)
        manifest_mod.write(staging / manifest_file, manifest)
        honour_umask(staging)
        order = sorted(staging.iterdir(), key=lambda p: p.name == manifest_file)  # the manifest lands last
        # a run killed while moving leaves this journal: the next run on the path rolls the move back
        (staging / JOURNAL).write_text(json.dumps({"dests": [str(folder / e.name) for e in order],
                                                   "last": str(folder / manifest_file)}))
        fault_point("export:manifest")
        for entry in order:
            dest = folder / entry.name
            if dest.exists():
                shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
            os.replace(entry, dest)
            moved.append(dest)
            fault_point("export:moving")
    except BaseException as exc:
        for dest in moved:
            shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        _remove_created_dirs(folder, first_existing)
        full = find_disk_error(exc) if isinstance(exc, Exception) else None
        if full is not None:  # exporters wrap ENOSPC in their own errors: blame the disk, not the model
            raise disk_error(full, folder / artifact_name(stem, target)) from exc
        raise
    shutil.rmtree(staging, ignore_errors=True)
    artifact = Artifact(path=folder / staged.primary.relative_to(staging), target=target, precision=opts.precision,
                        manifest=manifest, parity=parity, files=moved)
    if manifest["status"] == "failed":
        raise ParityError(artifact)
    return artifact


def _remove_created_dirs(folder: Path, first_existing: Path) -> None:
    """Remove the folders this export created (``folder`` up to ``first_existing``), when empty."""
    try:
        while folder != first_existing and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    except OSError:
        pass
