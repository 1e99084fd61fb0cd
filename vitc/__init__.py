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
