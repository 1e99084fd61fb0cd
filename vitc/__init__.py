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
    from vitc.backbone import Backbone
    from vitc.compress.quantize import QuantConfig, apply

    if isinstance(model, str):
        from vitc.models.intake import load_model

        model = load_model(model)
    if not isinstance(model, Backbone):
        from vitc.errors import VitcError

        raise VitcError(f"vitc.quantize takes a Backbone or a model spec, not {type(model).__name__}",
                        "load it with vitc.models.intake.load_model('zoo:vit-c10') or pass the spec string")
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


def export(model, target: str = "onnx", path=None, **options):
    """Export and check (``vitc export``); see ``vitc.api.export``."""
    from vitc import api

    return api.export(model, target, path, **options)


def bench(model, targets=("torch",), batches=(1,), threads=None, data=None, **harness):
    """Latency (``vitc bench``); see ``vitc.api.bench``."""
    from vitc import api

    return api.bench(model, targets, batches, threads, data, **harness)


def evaluate(model, data: str = "bundled:eval", size=None, batch_size: int = 64, seed: int = 0) -> dict:
    """Top-1/top-5 (``vitc eval``); see ``vitc.api.evaluate``. (Importing the module ``vitc.evaluate``
    replaces this attribute; that module is callable and forwards here, so ``vitc.evaluate(...)`` always works.)"""
    from vitc import api

    return api.evaluate(model, data, size, batch_size, seed)
