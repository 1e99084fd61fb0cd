"""The saved form of a quantized model: a folder with

* ``model.safetensors``: quantized weights as int8 codes (``<layer>.weight_codes``) beside their
  per-channel scales (``<layer>.weight_scale``), every activation quantizer's scale / zero point,
  and the float tensors (norms after reparameterisation, folded biases, embeddings);
* ``vitc_quant.json``: the format tag, the base model's spec and sha256, the config, the
  structural plan (folded BatchNorms, attention adapters), the per-layer scheme, the transforms
  record and the preprocessing.

Loading rebuilds the base architecture from its spec, redoes the structural plan and loads the
state strictly, so ``vitc eval``/``vitc export`` take the folder as ``--model``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from vitc.artifacts import atomic_path
from vitc.backbone import Backbone
from vitc.errors import VitcError

from .config import QuantConfig
from .modules import set_mode, weighted_layers
from .ptq import PASS_NAME, install, load_specs

FORMAT = "vitc-quant/1"
META_FILE = "vitc_quant.json"
WEIGHTS_FILE = "model.safetensors"


def quant_record(backbone: Backbone) -> dict:
    for t in reversed(backbone.transforms):
        if t.get("pass") == PASS_NAME:
            return t
    raise VitcError(f"{backbone.source} is not quantized", "quantize it first (vitc quantize)")


def save_quantized(backbone: Backbone, folder: Path | str, force: bool = False, weights: str | Path | None = None) -> Path:
    """Write the quantized ``backbone`` to ``folder``; ``weights``: the --weights file its base was
    built with (a module:factory or timm: model), recorded so that loading rebuilds the same base."""
    from safetensors.torch import save_file

    record = quant_record(backbone)
    if record.get("weight_only"):  # weight-only int4/int8 (weight_only.py) has its own layer form
        from . import weight_only

        return weight_only.save(backbone, Path(folder), record, force, weights)
    earlier = [t["pass"] for t in backbone.transforms[:backbone.transforms.index(record)]]
    # a merge loaded from its description (vitc merge -o X.json) comes back when the spec is reloaded
    merged_from_description = earlier == ["merge"] and str(backbone.source).endswith(".json")
    if earlier and not merged_from_description:
        raise VitcError(f"saving a model quantized after {', '.join(earlier)} is not supported yet",
                        "quantize the base model, or export the pipeline's result with vitc export")
    module = backbone.require_module("saving")
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    for name, layer in weighted_layers(module).items():
        state.pop(f"{name}.weight")
        state[f"{name}.weight_codes"] = layer.weight_codes().to(torch.int8).contiguous()
    for key, codes in _graph_weight_codes(module).items():
        state.pop(key)
        state[f"{key}.codes"] = codes
    meta = {
        "format": FORMAT,
        "base": {"spec": backbone.source, "sha256": backbone.source_hash,
                 "weights": str(Path(weights).resolve()) if weights else None},
        "config": record["config"],
        "plan": record["plan"],
        "layers": record["layers"],
        "transforms": backbone.transforms,
        "preprocess": backbone.preprocess.to_dict(),
        "labels": backbone.labels,
    }
    if record.get("sites") == "graph":
        # how the base is rebuilt: recapture, the same structural rewrites, then this plan
        meta.update(sites="graph", quant_plan=record["quant_plan"], coverage=record["coverage"])
    elif "coverage" in record:
        meta["coverage"] = record["coverage"]
    folder = Path(folder)
    with atomic_path(folder, force=force, is_dir=True) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def is_saved_quantized(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).exists()


def load_base(meta: dict) -> Backbone:
    """The float model a saved one was made from, built with the preprocessing it was saved with:
    a source that carries none (a ``pkg.module:factory`` model given ``--input-size``) needs it."""
    from vitc.models.intake import PreprocessFlags, load_model

    pre = meta.get("preprocess")
    flags = PreprocessFlags(**{k: tuple(v) if k in ("mean", "std") else v for k, v in pre.items()}) if pre else None
    return load_model(meta["base"]["spec"], meta["base"].get("weights"), flags)


def load_quantized(folder: Path | str) -> Backbone:
    from safetensors.torch import load_file

    from vitc.models.intake import file_sha256, load_model
    from vitc.models.preprocess import Preprocess

    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VitcError(f"cannot read {folder / META_FILE} ({exc})", "save the quantized model again with vitc quantize") from exc
    from . import weight_only

    if meta.get("format") == weight_only.FORMAT:
        return weight_only.load(folder, meta)
    if meta.get("format") != FORMAT:
        raise VitcError(f"{folder} holds format {meta.get('format')!r}, not {FORMAT}", "save it again with this vitc")
    if not (folder / WEIGHTS_FILE).exists():
        raise VitcError(f"{folder} has no {WEIGHTS_FILE}", "save the quantized model again with vitc quantize")
    base = load_base(meta)
    if meta.get("sites") == "graph":
        return _load_graph(folder, meta, base)
    config = QuantConfig.from_dict(meta["config"])
    module = base.copy().require_module("loading a quantized model")
    install(module, base.structure, config, folded_bn=meta["plan"]["folded_bn"])
    load_specs(module, meta["layers"])
    state = load_file(str(folder / WEIGHTS_FILE))
    layers = weighted_layers(module)
    for name, layer in layers.items():
        codes = state.pop(f"{name}.weight_codes", None)
        scale = state.get(f"{name}.weight_scale")
        if codes is None or scale is None:
            raise VitcError(f"{folder / WEIGHTS_FILE} has no weights for {name}", "save the quantized model again")
        state[f"{name}.weight"] = codes.float() * scale.reshape(-1, *[1] * (codes.dim() - 1))
        if f"{name}.bias" in state and layer.bias is None:  # added by bias correction / reparameterisation
            layer.bias = nn.Parameter(torch.zeros(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise VitcError(f"{folder} does not fit its base model {meta['base']['spec']} ({str(exc).splitlines()[0][:160]})",
                        "load it with the base model it was quantized from") from exc
    set_mode(module, "quant")
    return Backbone(module=module.eval(), preprocess=Preprocess.from_dict(meta["preprocess"]), labels=meta["labels"],
                    source=str(folder), source_hash=file_sha256(folder / WEIGHTS_FILE), transforms=meta["transforms"],
                    preprocess_origin="config", card=base.card)


def _graph_weight_codes(module: nn.Module) -> dict[str, torch.Tensor]:
    """{state key of a graph-path weight: its int8 codes} (empty for module-path models)."""
    from .modules import weight_quantizers
    from . import quantizers as Q

    gm = getattr(module, "graph_module", None)
    if gm is None:
        return {}
    out = {}
    for wq in weight_quantizers(module).values():
        if not wq.quantized or wq.wbits > 8:
            continue
        owner, _, leaf = wq.target.rpartition(".")
        w = getattr(gm.get_submodule(owner) if owner else gm, leaf).detach()
        shape = [1] * w.dim()
        shape[wq.axis % w.dim()] = -1
        qmin, qmax = Q.int_range(wq.wbits, True, restricted=True)
        out[f"graph_module.{wq.target}"] = torch.clamp(torch.round(w / wq.weight_scale.reshape(shape)), qmin, qmax).to(torch.int8).contiguous()
    return out


def _load_graph(folder: Path, meta: dict, base: Backbone) -> Backbone:
    """A graph-path model: recapture the base, redo the rewrites, reinstall the plan, load the state strictly."""
    from safetensors.torch import load_file

    from vitc.models.intake import file_sha256
    from vitc.models.preprocess import Preprocess

    from .modules import weight_quantizers
    from .torch_graph import rebuild

    preprocess = Preprocess.from_dict(meta["preprocess"])
    size = preprocess.input_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    record = next(t for t in reversed(meta["transforms"]) if t.get("pass") == PASS_NAME)
    module = rebuild(base.require_module("loading a quantized model"), example, record)
    state = load_file(str(folder / WEIGHTS_FILE))
    for wq in weight_quantizers(module).values():
        key = f"graph_module.{wq.target}"
        codes, scale = state.pop(f"{key}.codes", None), None
        if codes is None:
            continue
        for name, q in module.named_modules():
            if q is wq:
                scale = state[f"{name}.weight_scale"]
        shape = [1] * codes.dim()
        shape[wq.axis % codes.dim()] = -1
        state[key] = codes.float() * scale.reshape(shape)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise VitcError(f"{folder} does not fit its base model {meta['base']['spec']} ({str(exc).splitlines()[0][:160]})",
                        "load it with the base model (and --weights) it was quantized from") from exc
    set_mode(module, "quant")
    return Backbone(module=module.eval(), preprocess=preprocess, labels=meta["labels"], source=str(folder),
                    source_hash=file_sha256(folder / WEIGHTS_FILE), transforms=meta["transforms"],
                    preprocess_origin="config", card=base.card)


def model_size(backbone: Backbone) -> int:
    """Bytes of the model's tensors: quantized weights at their bit width plus fp32 scales, the
    rest (and every weight of a float model) in fp32."""
    module = backbone.require_module("measuring size")
    from . import weight_only

    if weight_only.weight_only_layers(module):
        return weight_only.model_size(backbone)
    quantized = {id(l.weight): l for l in weighted_layers(module).values() if l.quantized}
    gm = getattr(module, "graph_module", None)
    if gm is not None:
        from .modules import weight_quantizers

        for wq in weight_quantizers(module).values():
            owner, _, leaf = wq.target.rpartition(".")
            if wq.quantized:
                quantized[id(getattr(gm.get_submodule(owner) if owner else gm, leaf))] = wq
    total = 0.0
    for p in module.parameters():
        layer = quantized.get(id(p))
        total += p.numel() * layer.wbits / 8 if layer else p.numel() * 4
    for name, b in module.named_buffers():
        if not name.endswith("num_batches_tracked"):
            total += b.numel() * 4
    return int(total)


def _load_saved(folder, flags=None) -> Backbone:
    return load_quantized(folder)


from vitc.models.loaders import register_loader  # noqa: E402

register_loader(FORMAT.split("/")[0] + "/", _load_saved, META_FILE)
# weight-only folders share the meta file and are told apart inside load_quantized
register_loader("vitc-woq/", _load_saved, META_FILE)
