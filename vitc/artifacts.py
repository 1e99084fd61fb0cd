"""Atomic writes: a failure never leaves a half-written file or folder behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from vitc.errors import VitcError


def check_writable(path: Path, force: bool = False) -> None:
    if path.exists() and not force:
        raise VitcError(f"{path} already exists", "pass --force to overwrite it, or choose another -o/--output")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise VitcError(f"cannot write into {parent}", "choose a writable -o/--output")


@contextlib.contextmanager
def atomic_path(path: Path, force: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) if is_dir else \
        path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if is_dir:  # mkdtemp creates 0700; give the artifact the permissions a plain mkdir would
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def write_json(path: Path | str, data: dict, force: bool = True) -> Path:
    """Write ``data`` as JSON atomically (``--out`` files are replaced by default)."""
    path = Path(path)
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
