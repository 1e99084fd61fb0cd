"""Run a validated recipe: load the model, apply its passes in order, save the weights, export
each target (the recipe embedded in every manifest), evaluate and time the artifacts.

The output folder is written atomically::

    OUT/model.safetensors        the compressed PyTorch model's state dict
    OUT/manifest.json            recipe (resolved), transforms, hashes, eval, bench, versions
    OUT/<target>/model.*         each export, with <stem>.manifest.json embedding the recipe

Runs are deterministic for a given machine and library versions: the seed is set before every
pass and the thread count comes from the recipe, so ``vitc compress --recipe OUT/manifest.json``
rewrites the same weights bit for bit.
"""
from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

from vitc.errors import VitcError

from .schema import Recipe, config_dict

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
OUTPUT_FORMAT = "vitc-compressed/1"

# export target -> (runtime session name, module that must import, platform it needs or None)
TARGET_RUNTIMES = {
    "onnx": ("onnxruntime", "onnxruntime", None),
    "openvino": ("openvino", "openvino", None),
    "tensorrt": ("tensorrt", "tensorrt", None),
    "coreml": ("coreml", "coremltools", "darwin"),
}


def runtime_missing(target: str) -> str | None:
    """Why ``target``'s artifacts cannot run on this machine (None when they can)."""
    if target not in TARGET_RUNTIMES:
        return f"'{target}' is not an export target"
    _, module, system = TARGET_RUNTIMES[target]
    if importlib.util.find_spec(module) is None:
        return f"its runtime ({module}) is not installed"
    if system is not None and sys.platform != system:
        return f"its runtime runs on {system} only"
    return None


def require_runtimes(targets: list[str], why: str) -> None:
    for t in targets:
        reason = runtime_missing(t)
        if reason:
            raise VitcError(f"target {t} cannot be {why} here: {reason}",
                            f"drop {t} from the targets, or run where its runtime is installed")


def calibration_images(backbone, recipe: Recipe):
    """The recipe's calibration images, preprocessed once (every pass keeps the input format)."""
    from vitc.calibration.data import DataSpec, load_tensors

    c = recipe.calibration
    source = DataSpec(c["data"], None, c["size"], c["seed"], True, size_flag=f"{recipe.origin}: calibration size").open()
    return load_tensors(source, backbone.preprocess, True)[0]


def check_passes_fit(backbone, recipe: Recipe) -> None:
    """Check the passes whose validity depends on the model (token counts) right after it loads,
    before calibration and the passes run, and name the recipe line of the one that does not fit."""
    for i, (name, config) in enumerate(recipe.passes):
        if name != "merge":
            continue
        from vitc.compress.tokens.api import plan

        try:
            plan(backbone, config)
        except VitcError as exc:
            where = recipe.pass_where[i] if i < len(recipe.pass_where) else recipe.origin
            raise VitcError(f"{where}: merge does not fit {backbone.source}: {exc.problem}", exc.fix) from None


def apply_passes(backbone, recipe: Recipe, images, progress=None):
    """``backbone`` after every pass of ``recipe``, in order; each pass gets the same images."""
    import torch

    from .schema import PASSES

    for name, config in recipe.passes:
        torch.manual_seed(recipe.seed)
        module = importlib.import_module(PASSES[name][0])
        task = progress.add_task(f"pass {name}", total=None) if progress is not None else None
        try:
            backbone = module.apply(backbone, config, images)
        except VitcError as exc:
            raise VitcError(f"pass {name} failed on {backbone.source}: {exc.problem}", exc.fix) from exc
        if task is not None:
            progress.remove_task(task)
    return backbone


def save_weights(backbone, path: Path) -> str:
    """Write the module's state dict as safetensors; returns its sha256."""
    from safetensors.torch import save_file

    from vitc.export.manifest import sha256_of

    module = backbone.require_module("saving weights")
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": OUTPUT_FORMAT})
    return sha256_of(path)


def embed_recipe(manifest_path: Path, recipe: dict, digest: str) -> dict:
    """Add the recipe to an export manifest (its file hashes do not cover the manifest itself)."""
    from vitc.artifacts import write_json

    manifest = json.loads(Path(manifest_path).read_text())
    manifest["recipe"] = recipe
    manifest["recipe_sha256"] = digest
    write_json(manifest_path, manifest)
    return manifest


def evaluate_model(backbone, data: str, size: int | None, seed: int, batch_size: int, progress=None) -> dict:
    from vitc.calibration.data import DataSpec
    from vitc.evaluate import evaluate

    source = DataSpec(data, None, size, seed, True).open()
    r = evaluate(backbone, source, backbone.preprocess, backbone.labels, batch_size, True, progress)
    return {"data": data, "images": r["images"], "top1": r["top1"], "top5": r["top5"], "seed": seed}


def harness_config(bench: dict):
    from vitc.bench.harness import HarnessConfig

    return HarnessConfig(min_samples=bench["min_samples"], min_time_s=bench["min_time_s"], max_time_s=bench["max_time_s"],
                         target_rel_ci=bench["target_rel_ci"], warmup_max_s=min(10.0, bench["max_time_s"]))


def measure_artifact(path: str | Path, target: str, preprocess, bench: dict, data: str | None = None) -> list[dict]:
    """Latency of one artifact through vitc's harness (one row per batch size): p50 and its CI in ms."""
    from vitc.bench.harness import build_pool, measure
    from vitc.bench.runner import load_images
    from vitc.runtimes import open_session

    runtime = TARGET_RUNTIMES[target][0]  # the OpenVINO session applies the CPU ISA guard itself
    config = harness_config(bench)
    images = load_images(data, preprocess, min(256, max(bench["batch"]) * config.pool_batches))
    session = open_session(str(path), runtime=runtime, threads=bench["threads"])
    rows = []
    for batch in bench["batch"]:
        r = measure(session, build_pool(images, batch, config.pool_batches), batch, config, label=target,
                    threads=bench["threads"])
        rows.append(_latency_row(target, bench["threads"], r))
    return rows


def _latency_row(target: str, threads: int, r: dict) -> dict:
    """A harness measurement as the row sweeps and recipes store: p50 and its CI in ms."""
    p50, steady = r["stats"]["p50"], r["phases"]["steady"]
    row = {"target": target, "batch": r["batch"], "threads": threads, "p50_ms": 1000 * p50["value"],
           "ci_ms": [1000 * p50["lo"], 1000 * p50["hi"]], "cv": r["stats"]["cv"], "samples": len(r["samples_s"]),
           "stopped_by": steady["stopped_by"], "warnings": r["warnings"]}
    if "interleaved_with" in steady:
        row["interleaved_with"] = steady["interleaved_with"]
    return row


def measure_artifacts(items: list[tuple[str | Path, str, object]], bench: dict, data: str | None = None) -> list[list[dict]]:
    """Latency of several artifacts ``(path, target, preprocess)`` timed in interleaved rounds
    (``harness.measure_interleaved``), one list of rows per artifact, as ``measure_artifact`` gives.
    Each artifact gets ``min_time_s`` of timed calls in all, spread over the whole measuring period."""
    import json as _json

    from vitc.bench.harness import build_pool, measure_interleaved
    from vitc.bench.runner import load_images
    from vitc.runtimes import open_session

    config = harness_config(bench)
    sessions, images, image_key = {}, {}, {}
    for i, (path, target, preprocess) in enumerate(items):
        sessions[i] = open_session(str(path), runtime=TARGET_RUNTIMES[target][0], threads=bench["threads"])
        image_key[i] = _json.dumps(preprocess.to_dict(), sort_keys=True)  # artifacts of one model share images
        if image_key[i] not in images:
            images[image_key[i]] = load_images(data, preprocess, min(256, max(bench["batch"]) * config.pool_batches))
    rows: list[list[dict]] = [[] for _ in items]
    for batch in bench["batch"]:
        pools = {i: build_pool(images[image_key[i]], batch, config.pool_batches) for i in sessions}
        results = measure_interleaved(sessions, pools, batch, config, threads=bench["threads"])
        for i, r in results.items():
            rows[i].append(_latency_row(items[i][1], bench["threads"], r))
    return rows


def parity_summary(parity: dict | None) -> dict | None:
    if not parity:
        return parity
    keep = ("passed", "skipped", "images", "top1_agreement", "max_abs_logit_error", "mean_abs_logit_error",
            "reference_top1", "artifact_top1", "failure")
    return {k: parity[k] for k in keep if k in parity}


def quant_sensitivity(backbone, worst: int = 8) -> list[dict]:
    """The quantize pass's per-layer SQNR, worst first (what ``vitc quantize`` prints as sensitivity)."""
    for t in reversed(backbone.transforms):
        if t.get("pass") == "quantize" and t.get("sqnr_db"):
            rows = sorted(((k, v) for k, v in t["sqnr_db"].items() if v is not None), key=lambda kv: kv[1])
            return [{"layer": k, "sqnr_db": v} for k, v in rows[:worst]]
    return []


def compress(recipe: Recipe, out_dir: Path, model: str | None = None, data: str | None = None, force: bool = False,
             progress=None, measure: bool = True, bench_data: str | None = None) -> dict:
    """Run ``recipe`` into ``out_dir``; returns the manifest written there.

    ``model``/``data`` override the recipe's model and evaluation data (the manifest records the
    ones used); ``measure=False`` skips the bench section (sweeps time artifacts separately).
    """
    import torch

    from vitc.artifacts import atomic_path, check_writable, write_json
    from vitc.export import export_artifact
    from vitc.export.manifest import library_versions, vitc_version
    from vitc.models.intake import load_model

    spec = model or recipe.model
    if not spec:
        raise VitcError(f"{recipe.origin} names no model", "pass --model, or add 'model: zoo:vit-c10' to the recipe")
    recipe.model = spec  # the manifest must reproduce what ran
    if data is not None:
        recipe.evaluate = {**recipe.evaluate, "data": data}
    if measure and recipe.bench is not None:
        require_runtimes(recipe.export["targets"], "timed")
    out_dir = Path(out_dir)
    check_writable(out_dir, force)
    resolved = recipe.to_dict()
    digest = recipe.digest()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    t0 = time.perf_counter()
    try:
        base = load_model(spec)
        check_passes_fit(base, recipe)  # e.g. merge r past the token count: the recipe's line, before calibration
        images = calibration_images(base, recipe) if recipe.passes else None
        compressed = apply_passes(base, recipe, images, progress)
        compress_s = time.perf_counter() - t0
        with atomic_path(out_dir, force=force, is_dir=True) as tmp:
            weights_sha = save_weights(compressed, tmp / WEIGHTS_FILE)
            artifacts = {}
            for target in recipe.export["targets"]:
                e = recipe.export
                art = export_artifact(compressed, target, tmp / target, check=e["check"], data=e["parity_data"],
                                      eval_size=e["parity_size"], precision=e["precision"],
                                      dynamic_batch=e["dynamic_batch"], opset=e["opset"], progress=progress)
                embed_recipe(art.manifest_path, resolved, digest)
                artifacts[target] = {"path": str(art.path.relative_to(tmp)), "precision": art.precision,
                                     "status": art.status, "files": art.manifest["files"],
                                     "size_bytes": sum(p.stat().st_size for p in (tmp / target).rglob("*")
                                                       if p.is_file() and not p.name.endswith(".manifest.json")),
                                     "manifest": str(art.manifest_path.relative_to(tmp)),
                                     "parity": parity_summary(art.parity)}
            evaluation = None
            if recipe.evaluate["data"]:
                ev = recipe.evaluate
                evaluation = evaluate_model(compressed, ev["data"], ev["size"], ev["seed"], ev["batch_size"], progress)
            bench = []
            if measure and recipe.bench is not None:
                torch.set_num_threads(threads_before)
                for target, a in artifacts.items():
                    bench.extend(measure_artifact(tmp / a["path"], target, compressed.preprocess, recipe.bench, bench_data))
            manifest = {
                "format": OUTPUT_FORMAT,
                "recipe": resolved,
                "recipe_sha256": digest,
                "source": {"model": spec, "sha256": base.source_hash},
                "transforms": compressed.transforms,
                "weights": {"file": WEIGHTS_FILE, "sha256": weights_sha},
                "artifacts": artifacts,
                "flops": compressed.flops() if compressed.module is not None and _countable(compressed) else None,
                "params": compressed.parameters_count(),
                "evaluate": evaluation,
                "bench": bench,
                "sensitivity": quant_sensitivity(compressed),
                "compress_s": round(compress_s, 3),
                "versions": {"vitc": vitc_version(), "python": platform.python_version(), "torch": torch.__version__,
                             **library_versions(["transformers", "onnx", "onnxruntime", "openvino", "safetensors"])},
                "host": {"machine": platform.machine(), "system": platform.system()},
            }
            write_json(tmp / MANIFEST_FILE, manifest)
    finally:
        torch.set_num_threads(threads_before)
    return manifest


def _countable(backbone) -> bool:
    """FLOPs are counted on float-structured models; the integer-only program has no float ops to count."""
    return not any(t.get("pass") == "integer" for t in backbone.transforms)


def reproduced(a: dict, b: dict) -> dict:
    """Which hashes of two manifests agree: the weights and every artifact file."""
    out = {"weights": a["weights"]["sha256"] == b["weights"]["sha256"]}
    for target, art in a.get("artifacts", {}).items():
        other = b.get("artifacts", {}).get(target, {})
        out[target] = art["files"] == other.get("files")
    return out


def describe_passes(recipe: Recipe) -> list[str]:
    return [f"{name}({', '.join(f'{k}={v}' for k, v in config_dict(cfg).items())})" for name, cfg in recipe.passes]
