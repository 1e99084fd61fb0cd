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


def save_backbone(backbone, folder: Path) -> None:
    """Write ``backbone`` (a transformers classifier, possibly pruned) into ``folder``."""
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
