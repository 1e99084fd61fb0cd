"""Compression passes: one package per transform family, each a config dataclass and
``apply(backbone, config, data=None) -> Backbone``."""
