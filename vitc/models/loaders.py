"""Loaders of saved artifacts, registered by the passes that write them.

A pass that saves a model (quantize, prune/sparsify, merge) registers how to load it:
``register_loader(tag, loader, meta_file=...)``. Intake looks a saved folder (or a JSON
description) up by the format tag in its metadata and calls the loader, so ``models/``
never imports ``compress/``: the dependency points from the pass down to this registry.

The composition root (``vitc/__init__.py``) names the modules that register loaders
(``register_module``); they are imported on the first lookup, so ``import vitc`` stays fast.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vitc.errors import VitcError


@dataclass(frozen=True)
class Loader:
    tag: str  # format tag prefix, e.g. "vitc-quant/"
    load: Callable  # (path, flags) -> Backbone
    meta_file: str | None  # file inside a saved folder that holds the tag; None: the path is a JSON file
    key: str = "format"  # field of the metadata that holds the tag


_LOADERS: list[Loader] = []
_MODULES: list[str] = []
_imported: set[str] = set()


def register_loader(tag: str, load: Callable, meta_file: str | None = None, key: str = "format") -> None:
    """Register ``load(path, flags) -> Backbone`` for artifacts whose metadata ``key`` starts with ``tag``."""
    global _LOADERS
    _LOADERS = [x for x in _LOADERS if not (x.tag == tag and x.meta_file == meta_file)] + [Loader(tag, load, meta_file, key)]


def register_module(module: str) -> None:
    """Name a module whose import registers loaders (imported on the first lookup)."""
    if module not in _MODULES:
        _MODULES.append(module)


def _import_registered() -> None:
    for m in _MODULES:
        if m not in _imported:
            _imported.add(m)
            importlib.import_module(m)


def _tag(path: Path, key: str) -> str | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VitcError(f"cannot read {path} ({exc})", "save the model again with the vitc command that wrote it") from exc
    return str(meta.get(key)) if isinstance(meta, dict) and meta.get(key) is not None else None


def find_loader(path: Path) -> Loader | None:
    """The registered loader for a saved folder or JSON description at ``path``, or None."""
    path = Path(path)
    _import_registered()
    for ld in reversed(_LOADERS):
        if ld.meta_file is not None and path.is_dir() and (path / ld.meta_file).exists():
            tag = _tag(path / ld.meta_file, ld.key)
            if tag is not None and tag.startswith(ld.tag):
                return ld
        elif ld.meta_file is None and path.is_file() and path.suffix == ".json":
            tag = _tag(path, ld.key)
            if tag is not None and tag.startswith(ld.tag):
                return ld
    return None


def registered() -> list[Loader]:
    _import_registered()
    return list(_LOADERS)
