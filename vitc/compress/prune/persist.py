"""Save a pruned or sparsified Backbone as a folder that ``--model hf:<folder>`` loads again.

The folder is what ``save_pretrained`` writes (config.json, model.safetensors) plus the
preprocessing and ``vitc.json``: the transforms record and the pruning plan (kept channels per
group, removed attention sublayers). When the pruned widths are uniform the config already
describes the model and plain transformers loads it too; otherwise intake builds the model
from the config, shrinks it by the plan (``rebuild``) and loads the weights strictly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from vitc.errors import VitcError

PLAN_FILE = "vitc.json"


def merged_plan(transforms: list[dict]) -> dict:
    """The net shape plan of every prune pass in ``transforms`` (later passes win per group)."""
    channels: dict[str, int] = {}
    dropped: list[str] = []
    for t in transforms:
        if t.get("pass") == "prune":
            channels.update(t["plan"]["channels"])
            dropped += [d for d in t["plan"]["dropped_attention"] if d not in dropped]
    return {"channels": channels, "dropped_attention": dropped}


def save_backbone(backbone, folder: Path) -> str:
    """Write ``backbone`` (pruned and/or 2:4) into ``folder``; returns the ``--model`` spec that loads it.

    A transformers classifier pruned by its family adapter becomes a transformers folder
    (``hf:<folder>``); every other model (any source, graph-pruned, sparsified) the state
    format (``save_state``), which rebuilds the base from its spec.
    """
    root = backbone.require_module("saving")
    model = getattr(root, "model", None)
    graph_pruned = any(t.get("pass") == "prune" and t.get("groups_from") == "graph" for t in backbone.transforms)
    if model is None or not hasattr(model, "save_pretrained") or graph_pruned or not str(backbone.source).startswith(("hf:", "zoo:")):
        save_state(backbone, folder)
        return str(folder)
    _save_hf(backbone, folder)
    return f"hf:{folder}"


def _save_hf(backbone, folder: Path) -> None:
    root = backbone.require_module("saving")
    model = getattr(root, "model", None)
    if model is None or not hasattr(model, "save_pretrained"):
        raise VitcError(f"{backbone.source} is not a transformers model, so vitc cannot save it as a folder",
                        "prune or sparsify a transformers model (zoo:, hf:)")
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(folder))
    # the module's own key names: save_pretrained would rename them to the checkpoint layout of
    # older transformers, which intake's strict load of a rebuilt model would not recognise
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    p = backbone.preprocess
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "do_center_crop": True,
        "size": {"shortest_edge": p.resize}, "crop_size": {"height": p.input_size, "width": p.input_size},
        "resample": 3 if p.interpolation == "bicubic" else 2, "do_normalize": True,
        "image_mean": list(p.mean), "image_std": list(p.std)}, indent=2))
    (folder / PLAN_FILE).write_text(json.dumps({
        "format": 1, "base": backbone.source, "base_sha256": backbone.source_hash,
        "plan": merged_plan(backbone.transforms), "transforms": backbone.transforms}, indent=2, default=str))


def read_record(folder: Path) -> dict | None:
    path = Path(folder) / PLAN_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VitcError(f"{path} is not valid JSON ({exc.msg})", "save the model again with vitc prune/sparsify -o") from exc


def rebuild(model: nn.Module, plan: dict) -> nn.Module:
    """Shrink a freshly built transformers model to the shapes of ``plan`` (weights are loaded after)."""
    from vitc.models.adapters import discover
    from vitc.models.wrappers import LogitsModule

    from .adapters import conv_groups, drop_attention
    from .units import keep_channels, transformer_groups

    root = LogitsModule(model)
    structure = discover(root)
    for path in plan["dropped_attention"]:
        drop_attention(root, path, structure)
    groups = transformer_groups(structure, set(plan["dropped_attention"])) + conv_groups(root, structure)
    by_name = {g.name: g for g in groups}
    unknown = [n for n in plan["channels"] if n not in by_name]
    if unknown:
        raise VitcError(f"the pruning plan names {unknown[0]}, which this model does not have",
                        "check that config.json and vitc.json come from the same vitc prune -o")
    for name, channels in plan["channels"].items():
        g = by_name[name]
        if channels < g.channels(root):
            keep_channels(root, g, torch.arange(channels // g.unit_size))
    return root.model


def rebuild_hf(folder: Path, flags=None):
    """Load a transformers folder written by ``_save_hf``: build, shrink by the plan, load strictly."""
    from vitc.models.intake import PreprocessFlags, load_hf_folder

    record = read_record(folder)
    return load_hf_folder(Path(folder), flags or PreprocessFlags(), f"hf:{folder}", shrink=lambda m: rebuild(m, record["plan"]),
                          transforms=record["transforms"])


# ---------------------------------------------------------------- the state format (any source)

STATE_FORMAT = "vitc-state/1"
STATE_FILE = "vitc_model.json"
WEIGHTS_FILE = "model.safetensors"


def check_savable(backbone) -> None:
    """Fail before any work when the model could not be saved and loaded again."""
    backbone.require_module("saving")
    source = str(backbone.source)
    if source.startswith("python:"):
        raise VitcError(f"{source} was given as a Python object, so a saved copy could not rebuild it",
                        "pass a model spec (pkg.module:factory with --weights, hf:, zoo:, .pt2) instead of the module")


def head_counts(transforms: list[dict]) -> dict:
    heads: dict = {}
    for t in transforms:
        if t.get("pass") == "prune":
            heads.update(t["plan"].get("heads") or {})
    return heads


def save_state(backbone, folder: Path) -> None:
    """The whole state (strict-loadable) plus how to rebuild the base: its spec, weights file and sha256."""
    from safetensors.torch import save_file

    check_savable(backbone)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = backbone.module
    # clone: tied tensors would otherwise share storage, which safetensors refuses
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": STATE_FORMAT})
    (folder / STATE_FILE).write_text(json.dumps({
        "format": STATE_FORMAT,
        "base": {"spec": backbone.source, "weights": backbone.source_weights, "sha256": backbone.source_hash},
        "preprocess": backbone.preprocess.to_dict(), "labels": backbone.labels,
        "heads": head_counts(backbone.transforms), "transforms": backbone.transforms}, indent=2, default=str) + "\n")


def load_state(folder: Path, flags=None):
    """Rebuild the base from its spec, give its tensors the saved shapes, and load the state strictly."""
    from safetensors.torch import load_file

    from vitc.models.intake import file_sha256, load_model
    from vitc.models.preprocess import Preprocess

    from .generic import refresh
    from .units import set_head_count

    folder = Path(folder)
    try:
        meta = json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VitcError(f"cannot read {folder / STATE_FILE} ({exc})", "save the model again with vitc prune/sparsify -o") from exc
    if not (folder / WEIGHTS_FILE).exists():
        raise VitcError(f"{folder} has no {WEIGHTS_FILE}", "save the model again with vitc prune/sparsify -o")
    base_spec = meta["base"]
    base = load_model(base_spec["spec"], base_spec.get("weights"))
    if base_spec.get("sha256") and base.source_hash and base_spec["sha256"] != base.source_hash:
        raise VitcError(f"{folder} was saved from other weights of {base_spec['spec']}",
                        "load it where its base model is unchanged, or compress the current model again")
    module = base.require_module("loading a saved model")
    state = load_file(str(folder / WEIGHTS_FILE))
    own = dict(module.state_dict(keep_vars=True))
    touched = set()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):  # pruned: give the tensor its saved shape
            path, _, name = k.rpartition(".")
            mod = module.get_submodule(path) if path else module
            if name in mod._parameters:
                mod._parameters[name] = torch.nn.Parameter(torch.empty(v.shape, dtype=own[k].dtype))
            else:
                mod._buffers[name] = torch.empty(v.shape, dtype=own[k].dtype)
            touched.add(path)
    for path in touched:
        refresh(module.get_submodule(path))
    for path, h in (meta.get("heads") or {}).items():
        set_head_count(module.get_submodule(path), h["heads"], h["head_dim"])
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise VitcError(f"{folder} does not fit its base model {base_spec['spec']} ({str(exc).splitlines()[0][:160]})",
                        "load it with the base model it was saved from") from exc
    from dataclasses import replace

    return replace(base, module=module.eval(), preprocess=Preprocess.from_dict(meta["preprocess"]), labels=meta["labels"],
                   source=str(folder), source_hash=file_sha256(folder / WEIGHTS_FILE), transforms=meta["transforms"],
                   preprocess_origin="config", source_weights=None)


def _register() -> None:
    from vitc.models.loaders import register_loader

    register_loader(STATE_FORMAT.split("/")[0] + "/", load_state, STATE_FILE)
    register_loader("1", rebuild_hf, PLAN_FILE)  # transformers folders written by a family-adapter prune


_register()
