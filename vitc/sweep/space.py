"""The search space: a base recipe plus lists of values for recipe parameters, and the strategy.

    vitc_space: 1
    base:                       # a recipe without a model: fixed settings of every pass
      calibration: {size: 128}
      passes:
        - merge: {method: tome}
        - quantize: {calibrator: minmax}
    params:
      merge.r: [null, 4, 8]     # null: the pass is left out at that point
      prune.mlp: [null, 0.75]
      quantize.bits: [null, 8, 6]
      sparsify: [off, on]       # a pass name alone toggles the pass
    strategy: grid              # grid | random | halving
    samples: 8                  # random: points drawn from the grid
    seed: 0
    halving: {eta: 2, rungs: 3, min_images: 64}

A point is one value per parameter; its recipe is the base with those values set (passes
named only in ``params`` are inserted in the canonical order merge, prune, sparsify,
quantize). Every point's recipe is validated before any job starts.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from vitc.errors import VitcError
from vitc.recipes.schema import PASSES, Source, load_document, parse_recipe

SPACE_VERSION = 1
STRATEGIES = ("grid", "random", "halving")
TOP_KEYS = {"vitc_space", "base", "params", "strategy", "samples", "seed", "halving"}
HALVING_DEFAULTS = {"eta": 2, "rungs": 3, "min_images": 64}
ON, OFF = (True, "on", "yes"), (False, "off", "no", None)


@dataclass
class Space:
    base: dict
    params: dict[str, list]  # "pass.field" or "pass" -> values
    strategy: str = "grid"
    samples: int = 8
    seed: int = 0
    halving: dict = field(default_factory=lambda: dict(HALVING_DEFAULTS))
    origin: str = "space"

    def grid(self) -> list[dict]:
        keys = list(self.params)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.params[k] for k in keys))]

    def to_dict(self) -> dict:
        return {"vitc_space": SPACE_VERSION, "base": self.base, "params": self.params, "strategy": self.strategy,
                "samples": self.samples, "seed": self.seed, "halving": self.halving}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def _pass_of(key: str) -> tuple[str, str | None]:
    name, _, fld = key.partition(".")
    return name, fld or None


def point_recipe(space: Space, point: dict, model: str) -> dict:
    """The recipe document of one point: the base with the point's values set."""
    doc = copy.deepcopy(space.base)
    doc["model"] = model
    passes = {}
    for entry in doc.get("passes") or []:
        name, settings = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        passes[name] = dict(settings or {})
    dropped = set()
    for key, value in point.items():
        name, fld = _pass_of(key)
        if fld is None:
            if value in OFF:
                dropped.add(name)
            else:
                passes.setdefault(name, {})
        elif value is None:
            dropped.add(name)
        else:
            passes.setdefault(name, {})[fld] = value
    order = list(PASSES)
    names = sorted((n for n in passes if n not in dropped), key=lambda n: order.index(n) if n in order else len(order))
    doc["passes"] = [{n: passes[n]} for n in names]
    return doc


def point_id(recipe_doc: dict) -> str:
    return hashlib.sha256(json.dumps(recipe_doc, sort_keys=True, default=str).encode()).hexdigest()[:12]


def parse_space(data: dict, src: Source) -> Space:
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise src.error((unknown[0],), f"unknown space section '{unknown[0]}'", f"use: {', '.join(sorted(TOP_KEYS))}")
    if data.get("vitc_space", SPACE_VERSION) != SPACE_VERSION:
        raise src.error(("vitc_space",), f"space format {data['vitc_space']!r} is not one this vitc reads ({SPACE_VERSION})",
                        f"write vitc_space: {SPACE_VERSION}")
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise src.error(("base",), "'base' must be a recipe (a mapping)", "see docs/recipes.md")
    if "model" in base:
        raise src.error(("base", "model"), "the space's base recipe names a model", "pass the model with --model")
    params = data.get("params")
    if not isinstance(params, dict) or not params:
        raise src.error(("params",), "'params' must map recipe parameters to lists of values",
                        "write e.g. params: {merge.r: [null, 4, 8], quantize.bits: [null, 8]}")
    for key, values in params.items():
        name, fld = _pass_of(key)
        if name not in PASSES:
            raise src.error(("params", key), f"parameter '{key}' names no pass ('{name}')", f"use pass.field with a pass of: {', '.join(PASSES)}")
        if not isinstance(values, list) or not values:
            raise src.error(("params", key), f"parameter '{key}' needs a non-empty list of values", f"write e.g. {key}: [a, b]")
        if fld is None and any(v not in ON + OFF for v in values):
            raise src.error(("params", key), f"'{key}' toggles the pass: its values are on/off", f"write {key}: [off, on]")
    strategy = data.get("strategy", "grid")
    if strategy not in STRATEGIES:
        raise src.error(("strategy",), f"unknown strategy '{strategy}'", f"use one of: {', '.join(STRATEGIES)}")
    samples = data.get("samples", 8)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise src.error(("samples",), f"samples {samples!r} is not a positive integer", "pass e.g. samples: 8")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise src.error(("seed",), f"seed {seed!r} is not an integer", "pass e.g. seed: 0")
    halving = {**HALVING_DEFAULTS, **(data.get("halving") or {})}
    for k, v in halving.items():
        if k not in HALVING_DEFAULTS or not isinstance(v, int) or isinstance(v, bool) or v < (2 if k == "eta" else 1):
            raise src.error(("halving", k), f"halving setting {k}: {v!r} is not valid",
                            "use eta >= 2, rungs >= 1 and min_images >= 1 (integers)")
    space = Space(base=base, params=params, strategy=strategy, samples=samples, seed=seed, halving=halving, origin=src.name)
    # every point must be a valid recipe before any job starts; errors name the parameter's line
    for point in space.grid():
        doc = point_recipe(space, point, "model")
        doc.pop("bench", None)  # checked on its own below: a sweep's points time nothing themselves
        try:
            parse_recipe(doc, Source(src.name, src.lines, ("base",)))
        except VitcError as exc:
            where = ", ".join(f"{k}={v}" for k, v in point.items())
            key = next((k for k in point if _pass_of(k)[1] and str(_pass_of(k)[1]) in exc.problem), next(iter(point)))
            raise VitcError(f"{src.at('params', key)}: the point {where} is not a valid recipe ({exc.problem})", exc.fix) from None
    bench = base.get("bench")
    if bench is not None:
        from vitc.recipes.schema import SECTION_TYPES, _check_fields

        if not isinstance(bench, dict):
            raise src.error(("base", "bench"), "'bench' must be a mapping of settings", "see docs/recipes.md")
        _check_fields(bench, SECTION_TYPES["bench"], src, ("base", "bench"), "bench")
    return space


def load_space(path: Path | str) -> Space:
    data, src = load_document(path, "space")
    return parse_space(data, src)


def sample_points(space: Space) -> list[dict]:
    """The points a grid or random search visits (halving starts from the whole grid)."""
    grid = space.grid()
    if space.strategy == "random":
        rng = random.Random(space.seed)
        return rng.sample(grid, min(space.samples, len(grid)))
    return grid
