"""The Python verbs behind ``vitc.<verb>``: one per CLI verb, each taking a model spec string,
a Backbone, or any ``nn.Module``.

A raw ``nn.Module`` becomes a Backbone through ``as_backbone``: its forward must map a
normalised image batch (N, 3, H, W) to its output; the preprocessing is stated by the caller
(``input_size``, ``mean``, ``std``, ...) and defaults to 224 px with ImageNet mean/std, said in
``preprocess_origin="defaults"``. Such a Backbone has no spec to rebuild it from, so it can be
compressed, exported, evaluated and benchmarked, but a pruned/sparse copy of it cannot be
saved as a folder (load it from a spec for that).
"""
from __future__ import annotations

from dataclasses import asdict

import torch.nn as nn

from vitc.errors import VitcError


def as_backbone(model, *, weights: str | None = None, input_size: int | None = None, resize: int | None = None,
                mean=None, std=None, interpolation: str | None = None, fit: str | None = None, labels=None):
    """A Backbone from a spec string, a Backbone (returned as is) or an ``nn.Module`` (wrapped)."""
    from vitc.backbone import Backbone
    from vitc.models.intake import PreprocessFlags, load_model
    from vitc.models.preprocess import Preprocess

    flags = PreprocessFlags(input_size, resize, tuple(mean) if mean else None, tuple(std) if std else None, interpolation, fit)
    if isinstance(model, Backbone):
        return model
    if isinstance(model, str):
        return load_model(model, weights, flags)
    if isinstance(model, nn.Module):
        from vitc.models.wrappers import LogitsModule

        base = Preprocess(input_size or 224, resize or input_size or 224)
        pre, origin = flags.apply(base, type(model).__name__)
        if not flags.given():
            origin = "defaults"
        module = LogitsModule(model).eval()
        if labels is None:
            import torch

            with torch.no_grad():
                n = module(torch.zeros(1, 3, pre.input_size, pre.input_size)).shape[-1]
            labels = [str(i) for i in range(n)]
        return Backbone(module=module, preprocess=pre, labels=list(labels), source=f"python:{type(model).__name__}",
                        preprocess_origin=origin)
    raise VitcError(f"a model must be a spec string, a Backbone or an nn.Module, not {type(model).__name__}",
                    "pass e.g. 'zoo:vit-c10', load_model(...), or your nn.Module")


def _config(cls, config, settings: dict):
    if config is None:
        config = cls()
    elif isinstance(config, dict):
        config = cls(**config)
    if settings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(settings) - known)
        if unknown:
            raise VitcError(f"unknown {cls.__name__} setting '{unknown[0]}'", f"use some of: {', '.join(sorted(known))}")
        config = cls(**{**asdict(config), **settings})
    return config


def _images(data, backbone, size: int = 128, seed: int = 0):
    """Calibration images: None, a tensor, an ImageSource, or a ``--data`` spec string."""
    if data is None or not isinstance(data, str):
        return data
    from vitc.calibration.data import DataSpec, load_tensors

    return load_tensors(DataSpec(data, None, size, seed).open(), backbone.preprocess)[0]


def prune(model, data=None, config=None, **settings):
    """Structured pruning, as ``vitc prune`` does it: ``vitc.prune('hf:dir', 'bundled:calib', flops=0.6)``.

    ``data``: calibration images (needed by activation/Taylor scores; None with importance='magnitude').
    Returns the pruned Backbone; save it with ``vitc.save(pruned, folder)``.
    """
    from vitc.compress.prune import PruneConfig, apply

    backbone = as_backbone(model)
    config = _config(PruneConfig, config, settings)
    return apply(backbone, config, _images(data, backbone))


def sparsify(model, data=None, config=None, **settings):
    """2:4 sparsity, as ``vitc sparsify`` does it: ``vitc.sparsify(m, 'bundled:calib', method='wanda')``."""
    from vitc.compress.sparsity import SparsityConfig, apply

    backbone = as_backbone(model)
    config = _config(SparsityConfig, config, settings)
    return apply(backbone, config, _images(data, backbone))


def merge(model, config=None, **settings):
    """Token merging, as ``vitc merge`` does it: ``vitc.merge('zoo:vit-c10', r=8)``."""
    from vitc.compress.tokens import MergeConfig, apply

    backbone = as_backbone(model)
    return apply(backbone, _config(MergeConfig, config, settings))


def save(backbone, folder, force: bool = False) -> str:
    """Save a pruned/sparse Backbone as a folder; returns the ``--model`` spec that loads it again."""
    from pathlib import Path

    from vitc.artifacts import atomic_path
    from vitc.compress.prune.persist import check_savable, save_backbone

    check_savable(backbone)
    folder = Path(folder)
    with atomic_path(folder, force, is_dir=True) as tmp:
        spec = save_backbone(backbone, tmp)
    return f"hf:{folder}" if spec.startswith("hf:") else str(folder)


def export(model, target: str = "onnx", path=None, **options):
    """Export and check, as ``vitc export`` does it; returns the Artifact (``.path``, ``.parity``)."""
    from pathlib import Path

    from vitc.export import export_artifact

    backbone = as_backbone(model)
    if path is None:
        raise VitcError("vitc.export needs a path to write", "pass path='model.onnx' (or a folder for folder targets)")
    return export_artifact(backbone, target, Path(path), **options)


def evaluate(model, data: str = "bundled:eval", size: int | None = None, batch_size: int = 64, seed: int = 0) -> dict:
    """Top-1/top-5 on labelled images, as ``vitc eval`` does it: ``vitc.evaluate('zoo:vit-c10', size=200)``."""
    from vitc.calibration.data import DataSpec
    from vitc.evaluate import evaluate as run_eval

    backbone = as_backbone(model)
    backbone.require_module("evaluating")
    source = DataSpec(data, None, size, seed).open()
    return run_eval(backbone, source, backbone.preprocess, backbone.labels, batch_size)


def bench(model, targets=("torch",), batches=(1,), threads: int | None = None, data: str | None = None, **harness) -> dict:
    """Latency, as ``vitc bench`` does it; ``harness`` sets HarnessConfig fields (``max_time_s=2``...).

    A spec string is benchmarked as given; a Backbone or module is exported to each target in a
    temporary folder first (the ``torch`` target needs a spec, which the harness reloads).
    """
    import tempfile
    from pathlib import Path

    from vitc.bench.harness import HarnessConfig
    from vitc.bench.runner import run

    config = _config(HarnessConfig, None, harness)
    if isinstance(model, str):
        return run(model, list(targets), batches=tuple(batches), threads=threads, data=data, config=config)
    if "torch" in targets:
        raise VitcError("the torch target benchmarks a model it loads from a spec",
                        "pass the model spec string, or bench exported targets (targets=['onnx'])")
    backbone = as_backbone(model)
    from vitc.bench.subjects import TARGETS, export_for

    docs = []
    with tempfile.TemporaryDirectory(prefix="vitc-bench-") as tmp:
        for target in targets:
            if target not in TARGETS:
                raise VitcError(f"unknown target '{target}'", f"use any of {', '.join(TARGETS)}")
            fmt, runtime, _ = TARGETS[target]
            art = export_for(backbone, fmt, Path(tmp), max(batches))
            docs.append(run(str(art.path), None, runtime=runtime, batches=tuple(batches), threads=threads, data=data,
                            config=config))
    if len(docs) == 1:
        return docs[0]
    return {**docs[0], "results": [r for d in docs for r in d["results"]]}
