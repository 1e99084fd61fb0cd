"""The merge pass: ``apply(backbone, MergeConfig(...)) -> Backbone`` and its helpers."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from vitc.errors import VitcError

from .schedule import METHODS, check, largest_r, per_layer, token_counts

PASS = "merge"


@dataclass
class MergeConfig:
    """``r``: tokens each block removes (an int with ``schedule``/``layers``, or one value per
    block). ``k``/``temperature`` shape Token Transforming's many-to-many spread."""

    method: str = "tome"
    r: int | list[int] = 8
    schedule: str = "constant"
    layers: list[int] | None = None
    prop_attn: bool = True
    k: int = 4
    temperature: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MergeConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise VitcError(f"unknown merge setting(s): {', '.join(sorted(unknown))}", f"use: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class Plan:
    """What a config means for one model: removals and patch tokens per block, FLOPs."""

    removals: list[int]
    tokens: list[int]
    extra: dict = field(default_factory=dict)


def _stage(backbone):
    from .adapters import mergeable_stage

    backbone.require_module("token merging")
    # the first reducing block runs them all (block.py), so a head that reads an earlier block's
    # tokens inside the model would silently get the last block's instead, unless the model runs
    # the merged blocks itself (``reads_merged_tokens``: the dinov2s-c10 probe)
    taps = sorted({b for m in backbone.module.modules() if not getattr(m, "reads_merged_tokens", False)
                   for b in getattr(m, "intermediate_reads", ())})
    if taps:
        raise VitcError(f"{backbone.source}'s head reads the tokens of blocks {taps} as well as the last block's, and token "
                        "merging gives only the last block's tokens", "merge a model whose head reads the last block only")
    if any(t.get("pass") == PASS for t in backbone.transforms):
        raise VitcError(f"{backbone.source} is already token-merged", "merge the original model once, with the schedule you want")
    return mergeable_stage(backbone.structure, backbone.source)


def _layers(stage, layers: list[int] | None) -> list[int] | None:
    """Blocks that reduce when no ``--layers`` is given: every block with an attention
    sublayer (structured pruning may have removed some, and they have no keys to match)."""
    from .adapters import blocks_with_attention

    if layers is not None:
        return layers
    present = blocks_with_attention(stage)
    if not present:
        raise VitcError("no block of this model has an attention sublayer left, so there is nothing to merge tokens with",
                        "merge the model before removing attention sublayers")
    return None if len(present) == len(stage.blocks) else present


def plan(backbone, config: MergeConfig) -> Plan:
    from .adapters import blocks_with_attention

    stage = _stage(backbone)
    if config.k < 1 or config.temperature <= 0:
        raise VitcError("Token Transforming needs k >= 1 and temperature > 0", "pass a positive k and temperature")
    rs = check(config.method, config.r, len(stage.blocks), stage.tokens.num_patches, config.schedule, _layers(stage, config.layers))
    present = set(blocks_with_attention(stage))
    bad = [i for i, r in enumerate(rs) if r > 0 and i not in present]
    if bad:
        raise VitcError(f"block {bad[0]} ({stage.blocks[bad[0]].path}) has no attention sublayer (structured pruning removed it), "
                        "so it has no keys or attention to reduce tokens with",
                        f"reduce only in blocks with attention: --layers {','.join(map(str, sorted(present)))} or an r list with 0 there")
    return Plan(rs, token_counts(rs, stage.tokens.num_patches))


def apply(backbone, config: MergeConfig, data=None):
    """A new Backbone whose blocks reduce tokens as ``config`` says (training-free: ``data`` is unused)."""
    from .adapters import block_parts
    from .block import BlockPlan, ReducingBlock

    p = plan(backbone, config)
    stage = _stage(backbone)
    out = backbone.copy()
    module = out.module
    layout = stage.tokens
    chain = []
    for i, site in enumerate(stage.blocks):
        original = module.get_submodule(site.path)
        parts = block_parts(module, backbone.structure, site)
        bplan = BlockPlan(method=config.method, r=p.removals[i],
                          sizes_vary=any(p.removals[:i]), tokens=p.tokens[i] + layout.num_prefix, prop_attn=config.prop_attn, k=config.k,
                          temperature=config.temperature)
        heads, head_dim = (site.attention.num_heads, site.attention.head_dim) if site.attention else (1, layout.dim)
        new = ReducingBlock(original, parts, bplan, heads, head_dim, layout.num_prefix, layout.cls_index)
        parent, _, name = site.path.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, name, new)
        chain.append(new)
    chain[0].drive(chain)
    module.eval()
    record = {"pass": PASS, "config": config.to_dict(), "removals": p.removals, "tokens": [t + layout.num_prefix for t in p.tokens]}
    return out.with_module(module, record)


def for_flops(backbone, method: str, ratio: float, schedule: str = "constant", layers: list[int] | None = None,
              **options) -> tuple[MergeConfig, float]:
    """The config with the smallest ``r`` whose FLOPs are at most ``ratio`` of the model's,
    and the ratio it reaches. FLOPs are counted, not estimated."""
    if not 0 < ratio <= 1:
        raise VitcError(f"--flops {ratio} is outside (0, 1]", "pass the FLOPs fraction to keep, e.g. --flops 0.6")
    stage = _stage(backbone)
    base = backbone.flops()
    hi = largest_r(method, len(stage.blocks), stage.tokens.num_patches, schedule, _layers(stage, layers))
    cache: dict[int, float] = {}

    def ratio_at(r: int) -> float:
        if r not in cache:
            cache[r] = apply(backbone, MergeConfig(method, r, schedule, layers, **options)).flops() / base if r else 1.0
        return cache[r]

    if ratio_at(hi) > ratio:
        raise VitcError(f"{method} cannot bring {backbone.source} to {ratio:.2f} of its FLOPs: the largest valid r ({hi}) keeps {ratio_at(hi):.2f}",
                        f"ask for --flops {ratio_at(hi):.2f} or more")
    lo = 0  # ratio_at(lo) > ratio or lo == 0; FLOPs fall as r grows
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ratio_at(mid) <= ratio:
            hi = mid
        else:
            lo = mid
    if ratio >= 1.0:
        hi = 0
    return MergeConfig(method, hi, schedule, layers, **options), ratio_at(hi)


# ---------------------------------------------------------------- reloadable description

def save_description(path: Path, backbone, weights: str | None = None) -> dict:
    """A small JSON that ``load_model`` turns back into the merged Backbone: the base model
    spec plus the merge config (the weights stay where they are)."""
    merges = [t for t in backbone.transforms if t.get("pass") == PASS]
    if not merges:
        raise VitcError("this model has no merge to describe", "apply the merge pass first")
    desc = {"vitc": "merged-model", "model": backbone.source, "weights": weights,
            "merge": merges[-1]["config"], "source_hash": backbone.source_hash}
    Path(path).write_text(json.dumps(desc, indent=2) + "\n")
    return desc


def load_description(path: Path, flags=None):
    from vitc.models.intake import load_model

    try:
        desc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise VitcError(f"cannot read merged-model description {path}", "write it again with vitc merge -o FILE.json") from exc
    if not isinstance(desc, dict) or desc.get("vitc") != "merged-model" or "model" not in desc or "merge" not in desc:
        raise VitcError(f"{path} is not a model description vitc wrote", "pass a file written by vitc merge -o FILE.json")
    base = load_model(desc["model"], desc.get("weights"), flags)
    if desc.get("source_hash") and base.source_hash and desc["source_hash"] != base.source_hash:
        raise VitcError(f"{path} was written for other weights of {desc['model']}", "merge the current model again")
    merged = apply(base, MergeConfig.from_dict(desc["merge"]))
    return replace(merged, source=str(path))


__all__ = ["MergeConfig", "METHODS", "apply", "plan", "for_flops", "per_layer", "save_description", "load_description"]


from vitc.models.loaders import register_loader  # noqa: E402

register_loader("merged-model", load_description, key="vitc")  # a JSON description written by vitc merge -o
