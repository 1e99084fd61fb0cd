"""Where sweep jobs run: a local process pool, or a Ray cluster.

Both give the runner the same two calls: ``compress(jobs)`` yields records as jobs finish
(many at a time), ``measure(job)`` times one artifact on the device's one measuring worker. The
local executor also has ``measure_many``: all pending artifacts timed together in interleaved
rounds (a Ray device worker times one artifact per call).
The runner only calls ``measure`` once every compression job of the batch has finished, so a
latency is never taken while compression loads the machine.
"""
from __future__ import annotations

import contextlib
import os
import platform
import socket
import sys
import time
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


def _split(address: str) -> tuple[str, int]:
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise VitcError(f"Ray address '{address}' is not host:port", "pass e.g. --ray 10.0.0.5:6379, ray://head:10001, auto or local")
    return host, int(port)


def check_reachable(address: str) -> None:
    """Fail fast, in one line, when nothing answers at a Ray address (ray.init would wait long)."""
    if address in ("auto", "local"):
        return
    host, port = _split(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise VitcError(f"the Ray cluster at {address} does not answer ({exc.strerror or type(exc).__name__} "
                        f"within {CONNECT_TIMEOUT_S:g} s)", "start it (ray start --head) or pass the head's address") from None
    if not address.startswith("ray://"):
        _gcs_client(address)


# ------------------------------------------------------------------ joining a cluster: auth, versions, devices
#
# Ray 2.59 turned token authentication on by default for clusters ``ray.init()`` starts, and
# writes their token to ~/.ray/auth_token; ``ray start --head`` then turns it on whenever a token
# exists (that file, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH). But ``ray.init(address=...)`` with an
# explicit address never turns it on by itself, so a driver joining such a head sends no token
# and the head answers InvalidAuthToken (ray-project/ray#64755, review thread). vitc asks the head
# first: when it wants a token and one is set here, token mode is turned on for this process
# (as Ray does for address="auto"); when none is set, or the head rejects it, one line says so.

TOKEN_HELP = ("on the head, `RAY_AUTH_MODE=token ray get-auth-token` prints its token; give it to this machine "
              "as RAY_AUTH_TOKEN=... or in ~/.ray/auth_token, and export RAY_AUTH_MODE=token on every node and here")


def _unauthenticated(exc: BaseException) -> bool:
    text = str(exc)
    return "Unauthenticated" in text or "AuthToken" in text or type(exc).__name__ == "AuthenticationError"


def token_source() -> str | None:
    """Where Ray would read this process's token from (its precedence), or None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() and default.read_text().strip() else None


def _token_mode() -> bool:
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError:  # pragma: no cover - a Ray before token authentication (< 2.52)
        return False
    return get_authentication_mode() == AuthenticationMode.TOKEN


def _enable_token_mode() -> None:
    """Token mode for this process and the Ray workers it starts (what ``RAY_AUTH_MODE=token`` does)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # re-read RAY_AUTH_MODE into Ray's cached config
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for the block (C++ code writes there, not to sys.stderr)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # pragma: no cover - no real fd 2 (embedded interpreters)
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _gcs_client(address: str):
    """A client of the head's GCS, authenticated the way ray.init will be (token mode turned on here
    when the head wants a token and one is set); every failure is one line."""
    host, port = _split(address)
    try:
        from ray._raylet import InnerGcsClient  # Ray's own GCS client, with a timeout

        connect = InnerGcsClient.standalone
    except (ImportError, AttributeError):  # pragma: no cover - another Ray version: ray.init decides
        return None

    def attempt():
        try:
            with _quiet_stderr():  # Ray's C++ client logs each refused try; the outcome is said in one line below
                return connect(f"{host}:{port}", None, int(CONNECT_TIMEOUT_S * 1000))
        except TypeError:  # pragma: no cover - another signature in another Ray version
            return None

    try:
        return attempt()
    except Exception as exc:
        if not _unauthenticated(exc):
            first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise VitcError(f"the Ray cluster at {address} does not answer as a Ray head ({first})",
                            "pass the head's GCS address (ray start --head prints it, port 6379 by default)") from None
    source = token_source()
    if source is None:
        raise VitcError(f"the Ray cluster at {address} requires token authentication and no token is set here", TOKEN_HELP)
    if not _token_mode():
        _enable_token_mode()
        try:
            return attempt()
        except Exception as exc:
            if not _unauthenticated(exc):
                first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
                raise VitcError(f"the Ray cluster at {address} does not answer as a Ray head ({first})",
                                "pass the head's GCS address (ray start --head prints it)") from None
    raise VitcError(f"the Ray cluster at {address} rejects this machine's token (from {source}): it is not the head's",
                    TOKEN_HELP) from None


def check_versions(cluster: dict, here: dict | None = None) -> None:
    """Refuse a cluster whose Ray or Python (major.minor) differs from this process's: Ray's own
    check would fail later, in several lines, or a task would fail to unpickle on a worker."""
    here = here or {"ray_version": _ray_version(), "python_version": ".".join(map(str, sys.version_info[:3]))}
    theirs_py, ours_py = str(cluster.get("python_version", "?")), here["python_version"]
    if cluster.get("ray_version") != here["ray_version"]:
        raise VitcError(f"the Ray cluster runs Ray {cluster.get('ray_version')} and this machine Ray {here['ray_version']}",
                        f"install the cluster's version here (pip install 'ray=={cluster.get('ray_version')}') "
                        "or start the cluster with this one")
    if theirs_py.split(".")[:2] != ours_py.split(".")[:2]:
        raise VitcError(f"the Ray cluster runs Python {theirs_py} and this machine Python {ours_py}",
                        f"run vitc with Python {'.'.join(theirs_py.split('.')[:2])}, the cluster's")


def _ray_version() -> str:
    import ray

    return ray.__version__


def device_tags(nodes: list[dict]) -> list[str]:
    return sorted({k.split(":", 1)[1] for n in nodes for k in n["resources"] if k.startswith("device:")})


def check_device(nodes: list[dict], device: str) -> None:
    """Refuse, before any work, a device tag that no alive node advertises; name the ones that exist."""
    if any(n["resources"].get(f"device:{device}", 0) >= 1 for n in nodes):
        return
    tags = device_tags(nodes)
    have = f"its nodes advertise {', '.join('device:' + t for t in tags)}" if tags else "no node advertises any device:<tag>"
    raise VitcError(f"no node of the Ray cluster advertises device:{device} ({have})",
                    f"pass --device {tags[0]}" if len(tags) == 1 else
                    f"pass one of --device {', '.join(tags)}, or start a node on that hardware with: "
                    f"ray start --address HEAD:PORT --resources '{{\"device:{device}\": 1}}'")


def cluster_nodes(address: str) -> list[dict]:
    """The alive nodes of the cluster at ``address`` (id, ip, resources), asked of its GCS before joining."""
    client = _gcs_client(address)
    if client is None:  # pragma: no cover - another Ray version
        return []
    return _alive_nodes(client)


def _alive_nodes(client) -> list[dict]:
    out = []
    for info in client.get_all_node_info(timeout=CONNECT_TIMEOUT_S).values():
        if info.state == 0:  # GcsNodeState.ALIVE
            out.append({"id": info.node_id.hex(), "ip": info.node_manager_address, "head": info.is_head_node,
                        "resources": dict(info.resources_total)})
    return sorted(out, key=lambda n: (not n["head"], n["ip"], n["id"]))


def inspect_cluster(address: str, device: str) -> list[dict]:
    """Everything checked before joining: the head answers, accepts this token, runs our Ray and
    Python, and a node advertises the device. Returns the alive nodes."""
    check_reachable(address)
    if address in ("auto", "local") or address.startswith("ray://"):
        return []
    client = _gcs_client(address)
    if client is None:  # pragma: no cover - another Ray version
        return []
    import json

    raw = client.internal_kv_get(b"CLUSTER_METADATA", namespace=b"cluster", timeout=CONNECT_TIMEOUT_S)
    if raw:
        check_versions(json.loads(raw))
    nodes = _alive_nodes(client)
    check_device(nodes, device)
    return nodes


MAX_ATTEMPTS = 3  # a point is given up (an error record) after its task was lost this many times
DEVICE_GRACE_S = 20.0  # how long tasks may wait with no alive node that has their resource (device, CPU)


class RayExecutor:
    """Compression and evaluation as Ray tasks (one CPU each); latency as tasks that need the
    custom resource ``device:<name>``, which only workers on that hardware advertise.

    Lost work is resubmitted by vitc, not by Ray (``max_retries=0``): a task whose worker, node or
    result was lost (a node that went away mid-sweep) is submitted again, up to ``MAX_ATTEMPTS``
    times, and its record says so (``retried``: each lost attempt, its node and Ray's error), so
    the sweep can report which points were retried. Records are appended by the driver once a
    result has arrived, so a point lost and redone is still stored exactly once."""

    name = "ray"

    def __init__(self, address: str, jobs: int, device: str, log=None, inspected: bool = False):
        from vitc.errors import require

        ray = require("ray", "ray")
        self.ray, self.device, self.started = ray, device, False
        self.log = log or (lambda text: None)
        if not ray.is_initialized():
            if address != "local" and not inspected:
                inspect_cluster(address, device)  # auth, versions, device: one line each, before joining
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
        try:
            check_device(self.nodes(), device)  # again after joining: ``auto`` and ray:// are not inspected before
        except VitcError:
            self.close()
            raise
        resource = f"device:{device}"
        # max_retries=0: vitc resubmits lost tasks itself (see the class docstring)
        self._compress = ray.remote(num_cpus=1, max_retries=0)(J.compress_job_remote)
        # the whole device resource: one measurement at a time on each machine that has it
        self._measure = ray.remote(num_cpus=1, resources={resource: 1}, max_retries=0)(J.measure_job_remote)

    def nodes(self) -> list[dict]:
        return [{"id": n["NodeID"], "ip": n["NodeManagerAddress"], "head": "node:__internal_head__" in n["Resources"],
                 "resources": n["Resources"]} for n in self.ray.nodes() if n["Alive"]]

    def _lost(self, exc: BaseException) -> bool:
        """A task lost to the cluster (worker, node or result gone), not an error of the job itself."""
        exceptions = self.ray.exceptions
        return isinstance(exc, exceptions.RayError) and not isinstance(exc, exceptions.RayTaskError)

    @staticmethod
    def _loss(exc: BaseException, attempt: int) -> dict:
        import re

        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        node = re.search(r"Node IP: ([0-9A-Fa-f.:]+)", str(exc))  # NodeDiedError names the node; others do not
        return {"attempt": attempt, "error": type(exc).__name__, "node": node.group(1) if node else None, "detail": first}

    def compress(self, jobs: list[dict]) -> Iterator[dict]:
        ray = self.ray
        refs = {self._compress.remote(job): (job, []) for job in jobs}
        while refs:
            ref = self._wait_one(list(refs), "CPU", "compression")
            job, losses = refs.pop(ref)
            try:
                record, files = ray.get(ref)
            except Exception as exc:
                if not self._lost(exc):
                    raise
                losses.append(self._loss(exc, len(losses) + 1))
                if len(losses) < MAX_ATTEMPTS:
                    self.log(f"point {job['id']}: its task was lost ({type(exc).__name__}); submitted again "
                             f"(attempt {len(losses) + 1} of {MAX_ATTEMPTS})")
                    refs[self._compress.remote(job)] = (job, losses)
                    continue
                record, files = ({"id": job["id"], "params": job["params"], "rung": job.get("rung"), "kind": "error",
                                  "error": f"its task was lost {MAX_ATTEMPTS} times (last: {losses[-1]['error']}: "
                                           f"{losses[-1]['detail']})"}, {})
            if losses:
                record["retried"] = losses
            if files and job.get("point_dir"):
                from vitc.artifacts import atomic_path

                with atomic_path(Path(job["point_dir"]), force=True, is_dir=True) as tmp:
                    J.unpack(files, tmp)
            yield record

    def measure(self, job: dict, point_dir: Path, artifact_rel: str) -> list[dict]:
        files = J.pack(point_dir / Path(artifact_rel).parts[0])
        rel = str(Path(*Path(artifact_rel).parts[1:])) or "."
        losses: list[dict] = []
        while True:
            ref = self._measure.remote(job, files, rel)
            try:
                rows = self._get_on_device(ref)
            except VitcError:
                raise
            except Exception as exc:
                if not self._lost(exc):
                    raise
                losses.append(self._loss(exc, len(losses) + 1))
                if len(losses) >= MAX_ATTEMPTS:
                    raise VitcError(f"the latency task of point {point_dir.name} was lost {MAX_ATTEMPTS} times "
                                    f"(last: {type(exc).__name__})", "the compressed points are stored: run the same "
                                    "command again once the cluster is steady, and it times only what is missing") from None
                self.log(f"latency of {point_dir.name}: its task was lost ({type(exc).__name__}); submitted again")
                continue
            for r in rows:
                if losses:
                    r["retried"] = losses
            return rows

    def _get_on_device(self, ref):
        return self.ray.get(self._wait_one([ref], f"device:{self.device}", "latency"))

    def _wait_one(self, refs: list, resource: str, stage: str):
        """The first of ``refs`` to finish; one line instead of waiting forever when no alive node
        has ``resource`` any more (the tasks would wait for a resource that left with its node)."""
        gone_since = None
        while True:
            done, _ = self.ray.wait(refs, num_returns=1, timeout=2.0)
            if done:
                return done[0]
            if any(n["resources"].get(resource, 0) >= 1 for n in self.nodes()):
                gone_since = None
                continue
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > DEVICE_GRACE_S:
                for ref in refs:
                    self.ray.cancel(ref, force=True)
                what = f"the node advertising {resource}" if resource.startswith("device:") else f"every node with a {resource}"
                raise VitcError(f"{what} left the Ray cluster during {stage}",
                                "the finished points are stored: run the same command again once such a node has joined, "
                                "and it does only what is missing")

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False
