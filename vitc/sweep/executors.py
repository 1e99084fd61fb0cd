"""Where sweep jobs run: a local process pool, or a Ray cluster.

Both give the runner the same two calls: ``compress(jobs)`` yields records as jobs finish
(many at a time), ``measure(job)`` times one artifact on the device's one measuring worker. The
local executor also has ``measure_many``: all pending artifacts timed together in interleaved
rounds (a Ray device worker times one artifact per call).
The runner only calls ``measure`` once every compression job of the batch has finished, so a
latency is never taken while compression loads the machine.
"""
from __future__ import annotations

import platform
import socket
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Iterator

from vitc.errors import VitcError

from . import jobs as J

CONNECT_TIMEOUT_S = 3.0


def local_device() -> str:
    """The device tag of this machine: cpu-x86, cpu-arm64, ..."""
    arch = platform.machine().lower()
    return "cpu-" + {"x86_64": "x86", "amd64": "x86", "aarch64": "arm64", "arm64": "arm64"}.get(arch, arch)


class LocalExecutor:
    """Compression in a process pool of ``jobs`` workers (in this process when 1); latency here."""

    name = "local"

    def __init__(self, jobs: int, device: str):
        if device != local_device():
            raise VitcError(f"latency for device:{device} cannot be measured on this machine ({local_device()})",
                            "run the sweep with --ray ADDRESS on a cluster where a worker advertises that device")
        self.jobs, self.device = jobs, device

    def compress(self, jobs: list[dict]) -> Iterator[dict]:
        if self.jobs <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield J.compress_job(job)
            return
        import multiprocessing

        # spawn: a forked child of a process whose OpenMP pool already ran can deadlock
        with ProcessPoolExecutor(max_workers=min(self.jobs, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = {pool.submit(J.compress_job, job) for job in jobs}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()

    def measure(self, job: dict, point_dir: Path, artifact_rel: str) -> list[dict]:
        rows = J.measure_job({**job, "artifact": str(point_dir / artifact_rel)})
        for r in rows:
            r["host"] = platform.node()
        return rows

    def measure_many(self, items: list[tuple[dict, Path, str]]) -> list[list[dict]]:
        """Every pending artifact timed together in interleaved rounds, so all meet the same machine states."""
        out = J.measure_jobs([{**job, "artifact": str(point_dir / rel)} for job, point_dir, rel in items])
        for rows in out:
            for r in rows:
                r["host"] = platform.node()
        return out

    def close(self) -> None:
        pass


def check_reachable(address: str) -> None:
    """Fail fast, in one line, when nothing answers at a Ray address (ray.init would wait long)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise VitcError(f"Ray address '{address}' is not host:port", "pass e.g. --ray 10.0.0.5:6379, ray://head:10001, auto or local")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise VitcError(f"the Ray cluster at {address} does not answer ({exc.strerror or type(exc).__name__} "
                        f"within {CONNECT_TIMEOUT_S:g} s)", "start it (ray start --head) or pass the head's address") from None
    if not address.startswith("ray://"):
        _probe_gcs(address, host, int(port))


def _probe_gcs(address: str, host: str, port: int) -> None:
    """Ask the port for Ray's cluster id: something else listening there (a proxy, another server)
    would otherwise leave ray.init retrying for half a minute."""
    try:
        from ray._raylet import InnerGcsClient  # Ray's own GCS client, with a timeout

        probe = InnerGcsClient.standalone
    except (ImportError, AttributeError):  # pragma: no cover - another Ray version: ray.init decides
        return
    try:
        probe(f"{host}:{port}", None, int(CONNECT_TIMEOUT_S * 1000))
    except TypeError:  # pragma: no cover - another signature in another Ray version
        return
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        if "Unauthenticated" in first or "AuthToken" in first:
            return  # a Ray head that wants the credentials ray.init brings: it answered
        raise VitcError(f"the Ray cluster at {address} does not answer as a Ray head ({first})",
                        "pass the head's GCS address (ray start --head prints it, port 6379 by default)") from None


class RayExecutor:
    """Compression and evaluation as Ray tasks (one CPU each); latency as tasks that need the
    custom resource ``device:<name>``, which only workers on that hardware advertise."""

    name = "ray"

    def __init__(self, address: str, jobs: int, device: str):
        from vitc.errors import require

        ray = require("ray", "ray")
        self.ray, self.device, self.started = ray, device, False
        if not ray.is_initialized():
            check_reachable(address)
            try:
                if address == "local":
                    ray.init(num_cpus=max(1, jobs), resources={f"device:{device}": 1}, include_dashboard=False,
                             log_to_driver=False, configure_logging=False)
                else:
                    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            except Exception as exc:  # ray raises ConnectionError, RuntimeError, ... by version
                cause = exc.__cause__ or exc
                first = str(cause).splitlines()[0][:200] if str(cause) else type(cause).__name__
                raise VitcError(f"cannot join the Ray cluster at {address} ({first})",
                                "check the address and that the cluster runs the same Ray and Python versions") from None
            self.started = True
        resource = f"device:{device}"
        if ray.cluster_resources().get(resource, 0) < 1:
            self.close()
            raise VitcError(f"no worker of the Ray cluster advertises {resource}",
                            f"start one on that hardware with: ray start --address HEAD:6379 --resources '{{\"{resource}\": 1}}'")
        self._compress = ray.remote(num_cpus=1)(J.compress_job_remote)
        # the whole device resource: one measurement at a time on each machine that has it
        self._measure = ray.remote(num_cpus=1, resources={resource: 1})(J.measure_job_remote)

    def compress(self, jobs: list[dict]) -> Iterator[dict]:
        ray = self.ray
        refs = {self._compress.remote(job): job for job in jobs}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            record, files = ray.get(done[0])
            job = refs[done[0]]
            if files and job.get("point_dir"):
                from vitc.artifacts import atomic_path

                with atomic_path(Path(job["point_dir"]), force=True, is_dir=True) as tmp:
                    J.unpack(files, tmp)
            yield record

    def measure(self, job: dict, point_dir: Path, artifact_rel: str) -> list[dict]:
        files = J.pack(point_dir / Path(artifact_rel).parts[0])
        rel = str(Path(*Path(artifact_rel).parts[1:])) or "."
        return self.ray.get(self._measure.remote(job, files, rel))

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False
