"""Model intake: one loader per kind of ``--model``, each returning a Backbone.

=====================  ==========================================================
``zoo:<name>``         a reference backbone shipped with vitc (``vitc info`` lists them)
``hf:<dir>``           a transformers image classifier saved with ``save_pretrained``
``timm:<name>``        a timm model, weights from ``--weights FILE``
``pkg.module:factory`` any ``nn.Module`` a user can construct, weights from ``--weights``
``FILE.pt2``           a ``torch.export`` ExportedProgram
``FILE.pt``/``.ts``    a TorchScript module
``FILE.onnx``          an ONNX graph, for the steps that run artifacts (export checks, bench)
=====================  ==========================================================

Preprocessing comes from the source's own config (transformers' ``preprocessor_config.json``,
timm's ``pretrained_cfg``, the zoo card); flags (``PreprocessFlags``) override it and are
required where the source carries none.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from vitc.backbone import Backbone
from vitc.errors import MissingExtraError, VitcError
from vitc.models.loaders import find_loader
from vitc.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from vitc.models.wrappers import LogitsModule, logits_of

MODEL_FORMS = "zoo:<name>, hf:<dir>, timm:<name> --weights FILE, pkg.module:factory --weights FILE, FILE.pt2, FILE.pt (TorchScript), FILE.onnx"


@dataclass(frozen=True)
class PreprocessFlags:
    """Preprocessing given on the command line; ``None`` fields keep the source's values."""

    input_size: int | None = None
    resize: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: str | None = None
    fit: str | None = None  # "crop" | "letterbox"

    def given(self) -> bool:
        return any(v is not None for v in (self.input_size, self.resize, self.mean, self.std, self.interpolation, self.fit))

    def apply(self, base: Preprocess | None, source: str) -> tuple[Preprocess, str]:
        if base is None:
            if self.input_size is None:
                raise VitcError(f"{source} carries no preprocessing", "pass --input-size (and --mean/--std if it was not trained with ImageNet statistics)")
            base = Preprocess(self.input_size, self.resize or self.input_size, fit=self.fit or "crop")
            origin = "flags"
        else:
            origin = "flags" if self.given() else "config"
        size = self.input_size or base.input_size
        resize = self.resize or (base.resize if self.input_size is None else round(size * base.resize / base.input_size))
        return Preprocess(size, resize, tuple(self.mean or base.mean), tuple(self.std or base.std),
                          self.interpolation or base.interpolation, self.fit or base.fit), origin


def load_model(spec: str, weights: str | None = None, flags: PreprocessFlags | None = None) -> Backbone:
    """Load ``spec`` (see the module docstring) into a Backbone."""
    flags = flags or PreprocessFlags()
    spec = str(spec)
    if spec.startswith("zoo:"):
        return _load_zoo(spec[4:], flags)
    if spec.startswith("hf:"):
        folder = Path(spec[3:]).expanduser()
        saved = find_loader(folder) if folder.is_dir() else None  # a folder vitc prune/sparsify wrote
        return saved.load(folder, flags) if saved else _load_hf(folder, flags, spec)
    if spec.startswith("timm:"):
        return _load_timm(spec[5:], weights, flags)
    path = Path(spec).expanduser()
    saved = find_loader(path) if path.is_dir() or (path.suffix == ".json" and path.is_file()) else None
    if saved is not None:  # written by a vitc pass (quantize, prune, sparsify, merge): its own loader
        return saved.load(path, flags)
    if path.suffix == ".onnx":
        return _load_onnx(path, flags)
    if path.suffix == ".json":
        _check_file(path, "model description")
        raise VitcError(f"{path} is not a model description vitc wrote", "pass a file written by vitc merge -o FILE.json")
    if path.suffix == ".pt2":
        return _load_exported(path, flags)
    if path.suffix in (".pt", ".pth", ".ts", ".jit", ".torchscript"):
        return _load_torchscript(path, flags)
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        return _load_factory(spec, weights, flags)
    if path.suffix or "/" in spec:
        _check_file(path, "model")
    raise VitcError(f"cannot tell what kind of model '{spec}' is", f"use one of: {MODEL_FORMS}")


def file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise VitcError(f"{what} file {path} does not exist", "check the path")
    if path.is_dir():
        raise VitcError(f"{what} path {path} is a folder, not a file", "for a transformers folder use hf:<dir>")
    try:
        with open(path, "rb") as f:
            first = f.read(1)
    except OSError as exc:
        raise VitcError(f"cannot read {what} file {path} ({exc.strerror})", "check its permissions") from exc
    if not first:
        raise VitcError(f"{what} file {path} is empty (0 bytes)", "write it again; an interrupted copy or save leaves empty files")


# ---------------------------------------------------------------- weights files

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``torch.save``'d dict (weights only)."""
    _check_file(Path(path), "weights")
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise VitcError(f"weights file {path} is not a valid safetensors file ({str(exc).splitlines()[0]})",
                            "re-save it with safetensors.torch.save_file") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VitcError(f"weights file {path} is neither safetensors nor a PyTorch state dict",
                        "save the weights with safetensors.torch.save_file or torch.save(model.state_dict())") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VitcError(f"weights file {path} does not hold a state dict", "save model.state_dict(), not the model object")
    return obj


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], path: Path | str) -> None:
    """Load ``state`` strictly, with one-line errors for missing/unexpected keys and shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise VitcError(f"weights {path} do not match the model: keys {', '.join(parts)}",
                        "check that the weights belong to this architecture and config")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise VitcError(f"weights {path} do not match the model: {k} has shape {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model",
                            "check the model config (sizes, number of classes)")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


# ---------------------------------------------------------------- loaders

def _load_zoo(name: str, flags: PreprocessFlags) -> Backbone:
    from vitc.models.zoo import REAL_ENTRIES, get_entry

    if name in REAL_ENTRIES:  # rebuilt from a PyPI wheel (vitc[real]) and cached
        from vitc.models.real import load_real

        return load_real(name, flags)

    entry = get_entry(name)
    card = entry.card()
    if card is None or not (entry.folder / "model.safetensors").exists():
        raise VitcError(f"zoo model '{name}' has no trained weights in this install",
                        f"train them with: python -m vitc.models.train_zoo --model {name}")
    if entry.conv_stem:
        # not a stock transformers architecture (a ViT with a conv stem): build it, then load strictly
        from vitc.models.zoo import build_model

        model = build_model(entry)
        wfile = entry.folder / "model.safetensors"
        load_weights(model, read_state_dict(wfile), wfile)
        pre, origin = flags.apply(entry.preprocess, f"zoo:{name}")
        return Backbone(module=LogitsModule(model.eval()).eval(), preprocess=pre, labels=list(model.config.id2label.values()),
                        source=f"zoo:{name}", source_hash=file_sha256(wfile), preprocess_origin=origin, card=card)
    backbone = _load_hf(entry.folder, flags, f"zoo:{name}", preprocess=entry.preprocess)
    backbone.card = card
    return backbone


def _hf_preprocess(folder: Path, config) -> Preprocess | None:
    """Preprocess from a transformers ``preprocessor_config.json`` (ViT, DeiT, ConvNeXt, MobileViT styles)."""
    p = folder / "preprocessor_config.json"
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    size = d.get("size", {})
    crop = d.get("crop_size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    interpolation = {3: "bicubic", 2: "bilinear"}.get(d.get("resample", 2), "bilinear")
    if crop:
        input_size = crop.get("height") or crop.get("width")
        resize = size.get("shortest_edge") or size.get("height") or input_size
    elif "shortest_edge" in size:
        input_size = size["shortest_edge"]
        crop_pct = d.get("crop_pct")
        resize = round(input_size / crop_pct) if crop_pct and input_size < 384 else input_size
    else:
        input_size = resize = size.get("height") or getattr(config, "image_size", 224)
    if d.get("do_normalize", True) and "image_mean" in d:
        mean, std = tuple(d["image_mean"]), tuple(d["image_std"])
    elif d.get("do_normalize", True):
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if d.get("do_flip_channel_order"):
        raise VitcError(f"{p} asks for BGR channel order, which vitc does not support yet",
                        "re-save the processor with do_flip_channel_order=false and fine-tune, or convert the model's first conv")
    return Preprocess(int(input_size), int(resize), mean, std, interpolation)


def _load_hf(folder: Path, flags: PreprocessFlags, spec: str, preprocess: Preprocess | None = None) -> Backbone:
    return load_hf_folder(folder, flags, spec, preprocess)


def load_hf_folder(folder: Path, flags: PreprocessFlags, spec: str, preprocess: Preprocess | None = None,
                   shrink=None, transforms: list | None = None) -> Backbone:
    """A transformers classifier folder as a Backbone. ``shrink(model)``: reshape a freshly built
    model before its weights load strictly (a pass's loader passes it for a model it resized)."""
    try:
        import transformers
    except ImportError as exc:
        raise MissingExtraError("transformers", "hf") from exc
    if not folder.is_dir():
        raise VitcError(f"{spec}: {folder} is not a folder", "pass hf:<folder written by save_pretrained>")
    if not (folder / "config.json").exists():
        raise VitcError(f"{spec}: {folder} has no config.json", "pass a folder written by model.save_pretrained(...)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise VitcError(f"{spec}: cannot read {folder / 'config.json'} ({str(exc).splitlines()[0]})", "re-save the model with save_pretrained") from exc
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModelForImageClassification
    weight_files = [folder / "model.safetensors", folder / "pytorch_model.bin"]
    wfile = next((w for w in weight_files if w.exists()), None)
    if wfile is None:
        raise VitcError(f"{spec}: {folder} has no model.safetensors or pytorch_model.bin", "save the model with save_pretrained")
    read_state_dict(wfile)  # a corrupt file gets vitc's one-line error, not transformers' traceback
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if shrink is not None:  # layer widths may differ from config.json
        model = shrink(cls(config))
        load_weights(model, read_state_dict(wfile), wfile)
    else:
        # Load through transformers so that its checkpoint key conversions (v4 names in v5) apply;
        # mismatches come back in the loading info and become one-line errors.
        try:
            model, info = cls.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                              ignore_mismatched_sizes=True, dtype=torch.float32)
        except ValueError as exc:
            raise VitcError(f"{spec}: {type(config).__name__} is not an image classifier transformers knows",
                            "pass an image-classification checkpoint") from exc
        if info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]:
            parts = []
            for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
                keys = sorted(map(str, info[what]))
                if keys:
                    parts.append(f"{len(keys)} {what.split('_')[0]} (e.g. {keys[0]})")
            raise VitcError(f"weights {wfile} do not match the model in {folder / 'config.json'}: keys {', '.join(parts)}",
                            "check that config.json and the weights come from the same save_pretrained call")
    model.eval()
    pre, origin = flags.apply(preprocess or _hf_preprocess(folder, config) or _config_preprocess(config), spec)
    if preprocess is None and not (folder / "preprocessor_config.json").exists() and not flags.given():
        origin = "defaults"
    labels = [config.id2label[i] for i in range(config.num_labels)] if config.id2label else [str(i) for i in range(config.num_labels)]
    return Backbone(module=LogitsModule(model).eval(), preprocess=pre, labels=labels, source=spec,
                    source_hash=file_sha256(wfile), preprocess_origin=origin,
                    transforms=list(transforms or []))


def _config_preprocess(config) -> Preprocess | None:
    size = getattr(config, "image_size", None)
    if isinstance(size, int):
        return Preprocess(size, size)
    return None


def _load_timm(name: str, weights: str | None, flags: PreprocessFlags) -> Backbone:
    try:
        import timm
    except Exception as exc:  # ImportError, or torchvision's RuntimeError about missing ops
        raise VitcError(f"timm cannot be imported here ({str(exc).splitlines()[0][:120]})",
                        "install a matching timm and torchvision: pip install 'vitc[timm]'") from exc
    if weights is None:
        raise VitcError(f"timm:{name} needs --weights FILE", "vitc never downloads weights; pass a local safetensors or state-dict file")
    state = read_state_dict(Path(weights))
    head = next((k for k in ("head.weight", "fc.weight", "classifier.weight") if k in state), None)
    kwargs = {"num_classes": state[head].shape[0]} if head else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as exc:
        raise VitcError(f"timm has no model named '{name}'", "list names with timm.list_models()") from exc
    load_weights(model, state, weights)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    base = None
    if "input_size" in cfg:
        size = cfg["input_size"][-1]
        crop_pct = cfg.get("crop_pct", 1.0) or 1.0
        base = Preprocess(size, round(size / crop_pct), tuple(cfg.get("mean", IMAGENET_MEAN)),
                          tuple(cfg.get("std", IMAGENET_STD)), cfg.get("interpolation", "bicubic") if cfg.get("interpolation") in ("bilinear", "bicubic") else "bilinear")
    pre, origin = flags.apply(base, f"timm:{name}")
    n = getattr(model, "num_classes", 0) or 0
    return Backbone(module=model.eval(), preprocess=pre, labels=[str(i) for i in range(n)], source=f"timm:{name}",
                    source_hash=file_sha256(Path(weights)), preprocess_origin=origin, source_weights=str(weights))


def _load_factory(spec: str, weights: str | None, flags: PreprocessFlags) -> Backbone:
    mod_name, fn_name = spec.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise VitcError(f"cannot import module '{mod_name}' ({exc})", "check that it is on PYTHONPATH") from exc
    factory = getattr(mod, fn_name, None)
    if not callable(factory):
        raise VitcError(f"module '{mod_name}' has no callable '{fn_name}'", "name a function or class that builds the nn.Module")
    model = factory()
    if not isinstance(model, nn.Module):
        raise VitcError(f"{spec} returned {type(model).__name__}, not an nn.Module", "make the factory return the model")
    digest = ""
    if weights is not None:
        load_weights(model, read_state_dict(Path(weights)), weights)
        digest = file_sha256(Path(weights))
    module = LogitsModule(model) if getattr(model, "main_input_name", None) == "pixel_values" else _MaybeLogits(model)
    pre, origin = flags.apply(getattr(model, "vitc_preprocess", None), spec)
    return Backbone(module=module.eval(), preprocess=pre, labels=_labels_from(model, module, pre), source=spec,
                    source_hash=digest, preprocess_origin=origin, source_weights=str(weights) if weights else None)


class _MaybeLogits(LogitsModule):
    """Wrap a model called positionally whose output may be a tensor, a dict or a ModelOutput."""

    def forward(self, pixel_values):
        return logits_of(self.model(pixel_values))


def _labels_from(model: nn.Module, module: nn.Module, pre: Preprocess) -> list[str]:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "id2label", None):
        return [config.id2label[i] for i in range(len(config.id2label))]
    with torch.no_grad():
        n = module.eval()(torch.zeros(1, 3, pre.input_size, pre.input_size)).shape[-1]
    return [str(i) for i in range(n)]


def _load_exported(path: Path, flags: PreprocessFlags) -> Backbone:
    _check_file(path, "model")
    import logging

    # torch.export.load logs the whole traceback of a corrupt archive as a warning before raising
    quiet = logging.getLogger("torch.export")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        ep = torch.export.load(str(path))
    except Exception as exc:
        raise VitcError(f"{path} is not a readable torch.export program ({str(exc).splitlines()[0][:100]})",
                        "save it with torch.export.save(torch.export.export(model, (x,)), 'model.pt2')") from exc
    finally:
        quiet.setLevel(level)
    module = ep.module()
    shapes = [tuple(t.shape) for t in (ep.example_inputs[0] if ep.example_inputs else []) if hasattr(t, "shape")]
    base = None
    if shapes and len(shapes[0]) == 4:
        base = Preprocess(int(shapes[0][-1]), int(shapes[0][-1]))
    pre, origin = flags.apply(base, str(path))
    if base is not None and not flags.given():
        origin = "defaults"
    module = _ExportedLogits(module)
    # the program may have a static batch: probe the class count with its own example batch size
    probe_batch = int(shapes[0][0]) if shapes else 1
    with torch.no_grad():
        n = module(torch.zeros(probe_batch, 3, pre.input_size, pre.input_size)).shape[-1]
    return Backbone(module=module, preprocess=pre, labels=[str(i) for i in range(n)], source=str(path),
                    source_hash=file_sha256(path), preprocess_origin=origin)


class _ExportedLogits(_MaybeLogits):
    """An ExportedProgram's module: it is always in eval mode and refuses ``train()``, so do not recurse."""

    def train(self, mode: bool = True):
        self.training = mode
        return self


def _load_torchscript(path: Path, flags: PreprocessFlags) -> Backbone:
    _check_file(path, "model")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise VitcError(f"{path} is not a TorchScript module",
                        "for a state dict pass pkg.module:factory --weights FILE; for torch.export use a .pt2 file") from exc
    pre, origin = flags.apply(None, str(path))
    module = _MaybeLogits(module.eval())
    return Backbone(module=module, preprocess=pre, labels=_labels_from(module, module, pre), source=str(path),
                    source_hash=file_sha256(path), preprocess_origin=origin)


def _load_onnx(path: Path, flags: PreprocessFlags) -> Backbone:
    from vitc.models import onnx_source

    # read() refuses, naming the file, what the runtimes cannot run (see models/onnx_source.py)
    src = onnx_source.read(path, flags.input_size)
    size = src.input_size
    base, origin = Preprocess(size, size), "guess"
    from vitc.artifacts import manifest_beside

    manifest = manifest_beside(path)
    if manifest is not None:  # written by vitc export: carries the real preprocessing
        m = json.loads(manifest.read_text())
        if "preprocess" in m:
            base, origin = Preprocess.from_dict(m["preprocess"]), "manifest"
    pre, flag_origin = flags.apply(base, str(path))
    if flags.given():
        origin = "flags" if origin == "guess" else f"{origin} + flags"
    out = src.outputs[0]["shape"] if src.outputs else []
    # class labels only for (N, classes) logits; a dense map or several outputs have none
    n = out[-1] if len(out) == 2 and isinstance(out[-1], int) and len(src.outputs) == 1 else 0
    return Backbone(module=None, preprocess=pre, labels=[str(i) for i in range(n)], source=str(path),
                    source_hash=file_sha256(path), preprocess_origin=origin, onnx_path=path)
