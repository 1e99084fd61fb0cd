"""A real multi-node Ray cluster on one machine: each node a separate ``ray start --block``
process on its own loopback address (127.0.0.2, 127.0.0.3, ...), temp dir and process group,
with token authentication on. Tests and benchmarks use it to run ``vitc sweep --ray`` the way a
user's cluster runs (separate processes joined over the network, the device tag on one node),
and to take a node away mid-sweep.

Why not ``ray stop``: it stops every Ray process of the machine, other users' clusters too.
``stop()`` kills only the sessions this object started (``ray start`` with
``start_new_session``: the GCS, raylet, agents and workers of a node share its session; the
workers each lead a process group of their own, so a group kill would miss them).
Why 127.0.0.2 and up: Ray replaces 127.0.0.1 (and ``localhost``) by the machine's outward
address, so two nodes given 127.0.0.1 would advertise the same IP; other 127/8 addresses are
kept, and every node gets an address of its own.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# node death noticed within ~3 s instead of Ray's default ~30 s (a lost node's tasks are
# resubmitted as soon as Ray reports them lost; this only shortens the GCS's own bookkeeping)
FAST_HEALTH_CHECK = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                     "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@dataclass
class NodeSpec:
    ip: str
    num_cpus: int = 1
    resources: dict = field(default_factory=dict)


@dataclass
class Node:
    spec: NodeSpec
    proc: subprocess.Popen
    temp_dir: Path
    log: Path

    @property
    def sid(self) -> int:
        return self.proc.pid  # start_new_session: ``ray start`` leads the node's session


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalCluster:
    """``with LocalCluster([NodeSpec("127.0.0.2", 1, {"device:a": 1}), NodeSpec("127.0.0.3")]) as c:``
    ``c.address`` is the head's GCS address, ``c.env`` the environment a driver needs (the token)."""

    def __init__(self, nodes: list[NodeSpec], token: str | None = None, root: Path | str | None = None,
                 object_store_bytes: int = 150 * 2**20, fast_health_check: bool = True, start_timeout_s: float = 90.0,
                 extra_env: dict | None = None):
        self.specs = nodes
        self.extra_env = dict(extra_env or {})
        self.token = token or secrets.token_hex(32)
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="vitc-rc-"))
        self.own_root = root is None
        self.object_store_bytes = object_store_bytes
        self.fast_health_check = fast_health_check
        self.start_timeout_s = start_timeout_s
        self.port = free_port(nodes[0].ip)
        self.nodes: list[Node] = []

    @property
    def address(self) -> str:
        return f"{self.specs[0].ip}:{self.port}"

    @property
    def env(self) -> dict:
        """What every process of the cluster, and a driver joining it, is given: token auth on, the
        token, one torch/OpenMP thread per task (the machine is shared)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if self.fast_health_check:
            env.update(FAST_HEALTH_CHECK)
        env.update(self.extra_env)
        return env

    def _command(self, i: int, spec: NodeSpec, temp_dir: Path) -> list[str]:
        ray_cli = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())", "start"]
        cmd = ray_cli + ["--block", "--node-ip-address", spec.ip, "--num-cpus", str(spec.num_cpus),
                         "--num-gpus", "0", "--resources", json.dumps(spec.resources), "--temp-dir", str(temp_dir),
                         "--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats"]
        if i == 0:
            return cmd + ["--head", "--port", str(self.port), "--include-dashboard", "false"]
        return cmd + ["--address", self.address]

    def start(self) -> "LocalCluster":
        try:
            for i, spec in enumerate(self.specs):
                self._start_node(i, spec)
            self.wait_nodes(len(self.specs))
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, i: int, spec: NodeSpec) -> Node:
        temp_dir = self.root / f"n{i}"
        temp_dir.mkdir(parents=True, exist_ok=True)
        log = self.root / f"node{i}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(self._command(i, spec, temp_dir), stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        node = Node(spec, proc, temp_dir, log)
        self.nodes.append(node)
        deadline = time.monotonic() + self.start_timeout_s
        while b"Ray runtime started" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"ray start of node {i} ({spec.ip}) did not come up:\n{tail}")
            time.sleep(0.3)
        return node

    def _ask(self, expression: str):
        """Evaluate ``expression`` (JSON-able) in a fresh process with the cluster's token: this
        process's own Ray state (auth mode, a cluster of its own) stays as it is."""
        code = (f"import json\nfrom vitc.sweep.executors import _gcs_client, cluster_nodes\n"
                f"address = {self.address!r}\nprint(json.dumps({expression}))")
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60,
                             cwd=str(Path(__file__).resolve().parents[2]))
        if out.returncode != 0:
            raise RuntimeError(f"could not ask the cluster at {self.address}: {out.stderr.strip()[-500:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def node_info(self) -> list[dict]:
        """The alive nodes as the head's GCS lists them."""
        return self._ask("cluster_nodes(address)")

    def jobs(self) -> int:
        """How many drivers have joined the cluster so far (the GCS's job table)."""
        return self._ask("len(_gcs_client(address).get_all_job_info(timeout=5))")

    def wait_nodes(self, n: int, timeout_s: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = self.node_info()
            if len(nodes) >= n or time.monotonic() > deadline:
                if len(nodes) < n:
                    raise RuntimeError(f"{len(nodes)} of {n} nodes registered at {self.address} after {timeout_s:g} s")
                return nodes
            time.sleep(1.0)

    def raylet_pid(self, i: int) -> int | None:
        """The raylet of node ``i``: the process of its group whose command is Ray's raylet binary."""
        for pid in _session_pids(self.nodes[i].sid):
            try:
                exe = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if exe.endswith(b"/raylet"):
                return pid
        return None

    def task_running_on(self, i: int, name: str) -> bool:
        """Whether a Ray worker of node ``i`` is executing the task function ``name`` (its process title)."""
        for pid in _session_pids(self.nodes[i].sid):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(f"ray::{name}".encode()):
                    return True
            except OSError:
                continue
        return False

    def kill_raylet(self, i: int) -> int:
        pid = self.raylet_pid(i)
        if pid is None:
            raise RuntimeError(f"node {i} has no raylet running")
        os.kill(pid, signal.SIGKILL)
        return pid

    def stop(self) -> None:
        """Kill every process of the sessions this cluster started (SIGKILL: nothing of it is worth a clean exit)."""
        for node in reversed(self.nodes):
            for pid in [node.sid] + _session_pids(node.sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL of a live process
                pass
        # workers re-parented out of a group (none seen; belt and braces): any process whose
        # command line names this cluster's temp dir
        for pid in _pids_mentioning(str(self.root)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes = []
        if self.own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _session_pids(sid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                out.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return out


def _pids_mentioning(text: str) -> list[int]:
    me, out = os.getpid(), []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if needle in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                out.append(int(entry.name))
        except OSError:
            continue
    return out
