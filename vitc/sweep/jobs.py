"""The two kinds of job a sweep runs, as plain functions of plain data (picklable for process
pools and Ray): ``compress_job`` (recipe -> weights, exports, top-1) and ``measure_job``
(artifact -> latency through vitc's bench harness)."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path


def compress_job(job: dict) -> dict:
    """Run one point's recipe into ``job["point_dir"]`` (a temporary folder when None) and
    return its record. A point the passes refuse (e.g. r too large for the model) comes back
    as an ``error`` record; the sweep goes on."""
    import torch

    from vitc.errors import VitcError
    from vitc.recipes import compress, recipe_from_dict

    torch.set_num_threads(1)
    base = {"id": job["id"], "params": job["params"], "rung": job.get("rung")}
    t0 = time.perf_counter()
    try:
        recipe = recipe_from_dict(job["recipe"], f"point {job['id']}")
        with tempfile.TemporaryDirectory(prefix="vitc-point-") as tmp:
            out = Path(job["point_dir"]) if job.get("point_dir") else Path(tmp) / "point"
            manifest = compress(recipe, out, force=True, measure=False)
    except VitcError as exc:
        return {**base, "kind": "error", "error": str(exc), "seconds": round(time.perf_counter() - t0, 3)}
    except Exception as exc:  # one point's crash must not end a sweep of many: record it and go on
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        return {**base, "kind": "error", "error": f"unexpected {type(exc).__name__}: {first}",
                "seconds": round(time.perf_counter() - t0, 3)}
    ev = manifest["evaluate"] or {}
    return {
        **base,
        "kind": job["kind"],
        "passes": [next(iter(p)) for p in manifest["recipe"]["passes"]],
        "recipe": manifest["recipe"],
        "top1": ev.get("top1"), "top5": ev.get("top5"), "images": ev.get("images"),
        "flops": manifest["flops"], "params_count": manifest["params"],
        "weights_sha256": manifest["weights"]["sha256"],
        # "files": each artifact file's sha256, so runs on different machines can be compared bit for bit
        "artifacts": {t: {k: a[k] for k in ("path", "precision", "status", "size_bytes", "parity", "files") if k in a}
                      for t, a in manifest["artifacts"].items()},
        "sensitivity": manifest["sensitivity"],
        "compress_s": manifest["compress_s"],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _artifact(job: dict) -> tuple[Path, str, object]:
    """(artifact path, target, preprocessing) of a measuring job, from the export manifest beside it."""
    from vitc.models.preprocess import Preprocess

    artifact = Path(job["artifact"])
    folder = artifact if artifact.is_dir() else artifact.parent
    manifest = json.loads(next(folder.glob("*.manifest.json")).read_text())
    return artifact, job["target"], Preprocess.from_dict(manifest["preprocess"])


def measure_job(job: dict) -> list[dict]:
    """Time one artifact (``job["artifact"]``, its export manifest beside it) at each bench batch."""
    from vitc.recipes.runner import measure_artifact

    return measure_artifact(*_artifact(job), job["bench"], job.get("data"))


def measure_jobs(jobs: list[dict]) -> list[list[dict]]:
    """Time several artifacts together in interleaved rounds (one list of rows per job)."""
    from vitc.recipes.runner import measure_artifacts

    return measure_artifacts([_artifact(job) for job in jobs], jobs[0]["bench"], jobs[0].get("data"))


# --------------------------------------------------------------- Ray: files travel with the jobs

def pack(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def unpack(files: dict[str, bytes], folder: Path) -> None:
    for rel, data in files.items():
        dest = Path(folder) / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)


def ray_node() -> dict:
    """The Ray node this task runs on (its id and address): where each record's work was done."""
    import ray

    return {"id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}


def compress_job_remote(job: dict) -> tuple[dict, dict[str, bytes]]:
    """``compress_job`` on a worker that may not share the driver's disk: the point folder comes back as bytes."""
    with tempfile.TemporaryDirectory(prefix="vitc-ray-point-") as tmp:
        point = Path(tmp) / "point"
        record = compress_job({**job, "point_dir": str(point) if job.get("point_dir") else None})
        files = pack(point) if record["kind"] != "error" and point.exists() else {}
    record["node"] = ray_node()
    return record, files


def measure_job_remote(job: dict, files: dict[str, bytes], artifact_rel: str) -> list[dict]:
    """``measure_job`` on the worker that advertises the device: the artifact arrives as bytes."""
    with tempfile.TemporaryDirectory(prefix="vitc-ray-bench-") as tmp:
        unpack(files, Path(tmp))
        rows = measure_job({**job, "artifact": str(Path(tmp) / artifact_rel)})
    import platform

    node = ray_node()
    for r in rows:
        r["host"], r["node"] = platform.node(), node
    return rows
