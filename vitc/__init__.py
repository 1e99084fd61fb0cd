"""vitc: compress vision backbones, export them, check parity, and gate latency.

The Python API mirrors the CLI. Each verb imports its machinery on first call, so
``import vitc`` stays fast.
"""
from __future__ import annotations

from vitc.models import loaders as _loaders

# The composition root: each pass that saves an artifact registers its loader in its own module;
# these are the modules, imported on the first lookup of a saved artifact (so models/ never
# imports compress/, and ``import vitc`` stays fast).
for _m in ("vitc.compress.quantize.saved", "vitc.compress.prune.persist", "vitc.compress.tokens.api"):
    _loaders.register_module(_m)


def quantize(model, calibration_data, config=None, **settings):
    """Post-training quantization, as ``vitc quantize`` does it.

    ``model``: a Backbone or a ``--model`` spec (``"zoo:vit-c10"``, ``"hf:dir"``, ...);
    ``calibration_data``: preprocessed images (N, 3, H, W), an ImageSource or a ``--data``
    spec (``"bundled:calib"``, a folder, an archive); ``config``: a ``QuantConfig``, a dict of
    its fields, or None for the defaults (W8A8); ``settings`` override single fields
    (``vitc.quantize(m, data, wbits=4, abits=4)``). Returns the quantized Backbone; save it
    with ``vitc.compress.quantize.saved.save_quantized``.
    """
    from vitc.api import as_backbone
    from vitc.compress.quantize import QuantConfig, apply

    model = as_backbone(model)  # a spec string, a Backbone, or any nn.Module (224 px, ImageNet mean/std unless wrapped)
    if config is None:
        config = QuantConfig()
    elif isinstance(config, dict):
        config = QuantConfig.from_dict(config)
    if settings:
        config = QuantConfig.from_dict({**config.to_dict(), **settings})
    return apply(model, config, calibration_data)


def prune(model, data=None, config=None, **settings):
    """Structured pruning (``vitc prune``); see ``vitc.api.prune``."""
    from vitc import api

    return api.prune(model, data, config, **settings)


def sparsify(model, data=None, config=None, **settings):
    """2:4 sparsity (``vitc sparsify``); see ``vitc.api.sparsify``."""
    from vitc import api

    return api.sparsify(model, data, config, **settings)


def merge(model, config=None, **settings):
    """Token merging (``vitc merge``); see ``vitc.api.merge``."""
    from vitc import api

    return api.merge(model, config, **settings)


def save(backbone, folder, force: bool = False) -> str:
    """Save a pruned/sparse Backbone (``-o``); returns the spec that loads it; see ``vitc.api.save``."""
    from vitc import api

    return api.save(backbone, folder, force)


def _verb_export(model, target: str = "onnx", path=None, **options):
    """Export and check (``vitc export``); see ``vitc.api.export``."""
    from vitc import api

    return api.export(model, target, path, **options)


def _verb_bench(model, targets=("torch",), batches=(1,), threads=None, data=None, **harness):
    """Latency (``vitc bench``); see ``vitc.api.bench``."""
    from vitc import api

    return api.bench(model, targets, batches, threads, data, **harness)


def _verb_evaluate(model, data: str = "bundled:eval", size=None, batch_size: int = 64, seed: int = 0) -> dict:
    """Top-1/top-5 (``vitc eval``); see ``vitc.api.evaluate``."""
    from vitc import api

    return api.evaluate(model, data, size, batch_size, seed)


# ``export``, ``bench`` and ``evaluate`` are also the names of vitc's subpackages/modules, and
# importing one (``import vitc.export``) sets the package attribute to it. So the attribute is
# made a module that is also callable: ``vitc.export(...)`` runs the verb whichever came first,
# and ``vitc.export.pipeline`` stays the module it always was.
import sys as _sys  # noqa: E402
import types as _types  # noqa: E402

_SHARED = {"export": _verb_export, "bench": _verb_bench, "evaluate": _verb_evaluate}


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _SHARED[self.__name__.rsplit(".", 1)[1]](*args, **kwargs)


class _Package(_types.ModuleType):
    def __setattr__(self, name, value):
        if name in _SHARED and type(value) is _types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


export, bench, evaluate = _verb_export, _verb_bench, _verb_evaluate
_sys.modules[__name__].__class__ = _Package
for _name in _SHARED:  # already imported (by a module vitc/__init__ imported): make them callable too
    if f"vitc.{_name}" in _sys.modules:
        _sys.modules[f"vitc.{_name}"].__class__ = _CallableModule
        setattr(_sys.modules[__name__], _name, _sys.modules[f"vitc.{_name}"])
