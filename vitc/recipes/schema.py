"""The recipe schema: parse a YAML recipe (or the manifest of an artifact a recipe made),
check it completely before anything runs, and resolve it into a canonical dict.

Every error names the file and the line of the offending node (yaml's marks), so a user can
go straight to it. The resolved form fills every default, so a manifest that embeds it
reproduces the artifact without the original file. See docs/recipes.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vitc.errors import VitcError

RECIPE_VERSION = 1

# name -> (module, config class, what the pass does). Imported on use, so a pass whose module is
# missing from this installation is reported by name, not as an ImportError.
PASSES: dict[str, tuple[str, str, str]] = {
    "merge": ("vitc.compress.tokens.api", "MergeConfig", "token merging / pruning / transforming"),
    "prune": ("vitc.compress.prune.api", "PruneConfig", "structured pruning"),
    "sparsify": ("vitc.compress.sparsity.api", "SparsityConfig", "2:4 sparsity"),
    "quantize": ("vitc.compress.quantize", "QuantConfig", "post-training quantization (simulated, QDQ export)"),
    "integer": ("vitc.compress.integer", "IntegerConfig", "integer-only quantization"),
}
QUANTIZING = ("quantize", "integer")
EXPORT_TARGETS = ("onnx", "openvino", "tensorrt", "coreml")

TOP_KEYS = {"vitc_recipe", "model", "seed", "threads", "calibration", "passes", "export", "evaluate", "bench"}
SECTION_DEFAULTS = {
    "calibration": {"data": "bundled:calib", "size": 128, "seed": 0},
    "export": {"targets": [], "precision": None, "check": True, "parity_data": "bundled:eval", "parity_size": 64,
               "dynamic_batch": True, "opset": 17},
    "evaluate": {"data": None, "size": None, "seed": 0, "batch_size": 100},
    "bench": {"batch": [1], "threads": 1, "min_samples": 50, "min_time_s": 1.0, "max_time_s": 10.0,
              "target_rel_ci": 0.01},
}
SECTION_TYPES = {
    "calibration": {"data": "str", "size": "int", "seed": "int"},
    "export": {"targets": "list[str]", "precision": "str | None", "check": "bool", "parity_data": "str",
               "parity_size": "int", "dynamic_batch": "bool", "opset": "int"},
    "evaluate": {"data": "str | None", "size": "int | None", "seed": "int", "batch_size": "int"},
    "bench": {"batch": "list[int]", "threads": "int", "min_samples": "int", "min_time_s": "float",
              "max_time_s": "float", "target_rel_ci": "float"},
}


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-5 as a float (YAML 1.1 wants a dot in the mantissa)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


@dataclass
class Source:
    """Where each node of the document sits: ``lines[path] = line`` (1-based), for messages."""

    name: str
    lines: dict = field(default_factory=dict)
    prefix: tuple = ()

    def at(self, *path) -> str:
        full = (*self.prefix, *path)
        while full and full not in self.lines:
            full = full[:-1]
        line = self.lines.get(full)
        return f"{self.name} line {line}" if line else self.name

    def error(self, path: tuple, problem: str, fix: str | None = None) -> VitcError:
        return VitcError(f"{self.at(*path)}: {problem}", fix)


def _marks(node, path: tuple, out: dict) -> None:
    """Record the line of every child of ``node`` (a mapping entry's line is its key's)."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.start_mark.line)
            out[(*path, key)] = k.start_mark.line + 1
            _marks(v, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[(*path, i)] = v.start_mark.line + 1
            _marks(v, (*path, i), out)


def load_document(path: Path | str, kind: str = "recipe") -> tuple[dict, Source]:
    """(data, Source) of a YAML or JSON file; a file that does not parse is a one-line error."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise VitcError(f"cannot read the {kind} {path} ({exc.strerror or exc})", f"pass an existing {kind} file") from exc
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path} line {mark.line + 1}" if mark else str(path)
        raise VitcError(f"{where}: the {kind} does not parse ({exc.problem or exc.context})",
                        "fix the YAML syntax (indentation, colons, quotes)") from None
    except yaml.YAMLError as exc:
        raise VitcError(f"{path}: the {kind} does not parse ({str(exc).splitlines()[0]})", "fix the YAML syntax") from None
    except json.JSONDecodeError as exc:
        raise VitcError(f"{path} line {exc.lineno}: the {kind} does not parse ({exc.msg})", "fix the JSON syntax") from None
    lines: dict = {}
    if node is not None:
        lines[()] = node.start_mark.line + 1
        _marks(node, (), lines)
    if not isinstance(data, dict):
        raise VitcError(f"{path}: a {kind} is a mapping of settings, not {type(data).__name__}",
                        f"see docs/recipes.md for the {kind} format")
    return data, Source(str(path), lines)


# ------------------------------------------------------------------------------ value checks

def _type_ok(value, annotation: str) -> bool:
    """Does ``value`` fit a dataclass annotation written as text (``int | None``, ``list[str]``, ...)?"""
    for alt in (a.strip() for a in annotation.split("|")):
        if alt == "None" and value is None:
            return True
        if alt == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if alt == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if alt == "bool" and isinstance(value, bool):
            return True
        if alt == "str" and isinstance(value, str):
            return True
        m = re.fullmatch(r"list\[(.+)\]", alt)
        if m and isinstance(value, list) and all(_type_ok(v, m.group(1)) for v in value):
            return True
    return False


def _check_fields(values: dict, types: dict, src: Source, path: tuple, what: str) -> None:
    for key, value in values.items():
        if key not in types:
            raise src.error((*path, key), f"unknown {what} setting '{key}'", f"use: {', '.join(sorted(types))}")
        if not _type_ok(value, types[key]):
            raise src.error((*path, key), f"{what} setting {key}: {value!r} is not {types[key]}",
                            f"give {key} a value of type {types[key]}")


def pass_config_class(name: str, src: Source | None = None, path: tuple = ()):
    """The config dataclass of pass ``name``; an unknown or missing pass is a one-line error."""
    if name not in PASSES:
        err = f"unknown pass '{name}'"
        fix = f"use one of: {', '.join(PASSES)}"
        raise src.error(path, err, fix) if src else VitcError(err, fix)
    module, cls, _ = PASSES[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        err = f"the {name} pass is not installed in this vitc ({module}.{cls} cannot be imported: {exc})"
        fix = "install a vitc that ships it, or remove the pass from the recipe"
        raise src.error(path, err, fix) if src else VitcError(err, fix) from None


def _field_types(cls) -> dict[str, str]:
    return {f.name: f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            for f in dataclasses.fields(cls)}


def build_pass_config(name: str, settings: dict, src: Source | None = None, path: tuple = ()):
    """The pass's own config object from recipe settings (``quantize`` also takes ``bits``: both widths)."""
    src = src or Source("recipe")
    cls = pass_config_class(name, src, path)
    settings = dict(settings or {})
    if name == "quantize" and "bits" in settings:
        bits = settings.pop("bits")
        if not _type_ok(bits, "int"):
            raise src.error((*path, "bits"), f"quantize setting bits: {bits!r} is not int", "give bits 8, 6 or 4")
        settings.setdefault("wbits", bits)
        settings.setdefault("abits", bits)
    _check_fields(settings, _field_types(cls), src, path, name)
    try:
        config = cls(**settings)
        validate = getattr(config, "validate", None)
        if validate is not None:
            validate()
    except VitcError as exc:
        key = next((k for k in settings if k in str(exc.problem)), None)
        raise src.error((*path, key) if key else path, f"{name}: {exc.problem}", exc.fix) from None
    return config


def config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)


# ------------------------------------------------------------------------------ the recipe

@dataclass
class Recipe:
    """A validated recipe: every section with its defaults filled in."""

    model: str | None
    seed: int
    threads: int
    calibration: dict
    passes: list[tuple[str, object]]  # (name, config object)
    export: dict
    evaluate: dict
    bench: dict | None
    origin: str = "recipe"
    pass_where: list[str] = field(default_factory=list)  # "<file> line N" of each pass, for errors found once the model loads

    def to_dict(self) -> dict:
        return {
            "vitc_recipe": RECIPE_VERSION, "model": self.model, "seed": self.seed, "threads": self.threads,
            "calibration": dict(self.calibration),
            "passes": [{name: config_dict(cfg)} for name, cfg in self.passes],
            "export": dict(self.export), "evaluate": dict(self.evaluate),
            "bench": dict(self.bench) if self.bench is not None else None,
        }

    def digest(self) -> str:
        """sha256 of the canonical resolved recipe (model included)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def pass_names(self) -> list[str]:
        return [n for n, _ in self.passes]


def check_order(names: list[str], src: Source, base: tuple = ("passes",)) -> None:
    """Refuse orders that cannot work: a pass after quantization (its integer grids and, for
    integer-only, its integer program take no further float rewrite), two quantizations, a
    pass twice, pruning after 2:4 (removing channels breaks the groups of four)."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise src.error((*base, i), f"pass '{name}' appears twice (first as pass {seen[name] + 1})",
                            "list each pass once, with all its settings")
        quant = next((q for q in QUANTIZING if q in seen), None)
        if quant is not None:
            what = "integer-only quantization" if quant == "integer" else "quantization"
            raise src.error((*base, i), f"'{name}' cannot come after {what} ('{quant}', pass {seen[quant] + 1})",
                            "put quantization last; only export follows it")
        if name == "prune" and "sparsify" in seen:
            raise src.error((*base, i), "'prune' cannot come after 'sparsify': removing channels breaks the 2:4 groups",
                            "prune first, then sparsify")
        seen[name] = i


def _section(data: dict, key: str, src: Source) -> dict:
    raw = data.get(key)
    if raw is None:
        return dict(SECTION_DEFAULTS[key])
    if not isinstance(raw, dict):
        raise src.error((key,), f"'{key}' must be a mapping of settings, not {type(raw).__name__}",
                        f"see docs/recipes.md for the {key} section")
    _check_fields(raw, SECTION_TYPES[key], src, (key,), key)
    return {**SECTION_DEFAULTS[key], **raw}


def parse_recipe(data: dict, src: Source) -> Recipe:
    """Validate a recipe document (already loaded) completely; raise the first problem found."""
    if "recipe" in data and "vitc_recipe" not in data:  # an artifact manifest that embeds its recipe
        if not isinstance(data["recipe"], dict):
            raise src.error(("recipe",), "the manifest's recipe is not a mapping", "pass a manifest written by vitc compress")
        src = Source(src.name, src.lines, (*src.prefix, "recipe"))
        data = data["recipe"]
    elif "manifest_version" in data:
        raise VitcError(f"{src.name} is an artifact manifest without a recipe",
                        "pass a manifest written by vitc compress (it embeds the recipe), or the recipe file")
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise src.error((unknown[0],), f"unknown recipe section '{unknown[0]}'", f"use: {', '.join(sorted(TOP_KEYS))}")
    version = data.get("vitc_recipe", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise src.error(("vitc_recipe",), f"recipe format {version!r} is not one this vitc reads ({RECIPE_VERSION})",
                        f"write vitc_recipe: {RECIPE_VERSION}")
    for key, typ in (("model", "str | None"), ("seed", "int"), ("threads", "int")):
        if key in data and not _type_ok(data[key], typ):
            raise src.error((key,), f"{key}: {data[key]!r} is not {typ}", f"give {key} a value of type {typ}")
    threads = data.get("threads", 1)
    if threads < 1:
        raise src.error(("threads",), f"threads {threads} is not positive", "pass 1 or more")

    raw_passes = data.get("passes", [])
    if not isinstance(raw_passes, list):
        raise src.error(("passes",), "'passes' must be a list of one-key mappings", "write e.g. passes: [{merge: {r: 4}}]")
    names, passes = [], []
    for i, entry in enumerate(raw_passes):
        if isinstance(entry, str):
            name, settings = entry, {}
        elif isinstance(entry, dict) and len(entry) == 1:
            name, settings = next(iter(entry.items()))
        else:
            raise src.error(("passes", i), "each pass is one name with its settings, e.g. '- prune: {mlp: 0.75}'",
                            "write one pass per list item")
        pass_config_class(name, src, ("passes", i))
        if settings is not None and not isinstance(settings, dict):
            raise src.error(("passes", i, name), f"the settings of '{name}' must be a mapping, not {type(settings).__name__}",
                            "write e.g. '- quantize: {bits: 8}'")
        names.append(name)
    check_order(names, src)
    for i, name in enumerate(names):
        settings = next(iter(raw_passes[i].values())) if isinstance(raw_passes[i], dict) else {}
        passes.append((name, build_pass_config(name, settings or {}, src, ("passes", i, name))))

    calibration = _section(data, "calibration", src)
    if calibration["size"] < 1:
        raise src.error(("calibration", "size"), f"calibration size {calibration['size']} is not positive", "pass 1 or more")
    export = _section(data, "export", src)
    for j, t in enumerate(export["targets"]):
        if t not in EXPORT_TARGETS:
            raise src.error(("export", "targets", j), f"unknown export target '{t}'", f"use some of: {', '.join(EXPORT_TARGETS)}")
    if len(set(export["targets"])) != len(export["targets"]):
        raise src.error(("export", "targets"), "an export target is listed twice", "list each target once")
    if export["precision"] not in (None, "fp32", "fp16", "int8"):
        raise src.error(("export", "precision"), f"precision '{export['precision']}' is not known", "use fp32, fp16 or int8")
    if export["parity_size"] < 1:
        raise src.error(("export", "parity_size"), "parity_size is not positive", "pass 1 or more images")
    evaluate = _section(data, "evaluate", src)
    if evaluate["size"] is not None and evaluate["size"] < 1:
        raise src.error(("evaluate", "size"), "evaluate size is not positive", "pass 1 or more images, or null for all")
    bench = _section(data, "bench", src) if data.get("bench") is not None else None
    if bench is not None:
        if not bench["batch"] or any(b < 1 for b in bench["batch"]):
            raise src.error(("bench", "batch"), f"bench batch {bench['batch']} is not a list of positive sizes", "write e.g. batch: [1, 8]")
        if not 0 < bench["min_time_s"] <= bench["max_time_s"]:
            raise src.error(("bench", "max_time_s"), "bench needs 0 < min_time_s <= max_time_s", "e.g. min_time_s: 1, max_time_s: 10")
        if not export["targets"]:
            raise src.error(("bench",), "bench times exported artifacts, but export lists no targets",
                            "add export: {targets: [onnx]} or drop the bench section")
    return Recipe(model=data.get("model"), seed=data.get("seed", 0), threads=threads, calibration=calibration,
                  passes=passes, export=export, evaluate=evaluate, bench=bench, origin=src.name,
                  pass_where=[src.at("passes", i, name) for i, name in enumerate(names)])


def load_recipe(path: Path | str) -> Recipe:
    data, src = load_document(path, "recipe")
    return parse_recipe(data, src)


def recipe_from_dict(data: dict, name: str = "recipe") -> Recipe:
    return parse_recipe(data, Source(name))
