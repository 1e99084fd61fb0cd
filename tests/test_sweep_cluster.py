"""``vitc sweep --ray`` on a real two-node Ray cluster: a head (127.0.0.2) and a second node
(127.0.0.3), each a separate ``ray start`` process with its own temp dir, process session and
custom resources, token authentication on (as Ray 2.59+ does by default). The sweep runs as the
user types it (``python -m vitc.cli sweep``, its own process); the second node's raylet is killed
mid-sweep; the bad inputs of issue 21 (no/wrong token, a device no node has, another Ray
version) are each one line, exit 2, nothing written.

Cost: ~2-3 minutes on a 2-core machine (a cluster start, three 4-point sweeps of zoo:vit-c10 on
64 images of the bundled slice); each node is capped at one CPU and torch at one thread.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'vitc[ray]'")

from vitc.cli import run  # noqa: E402
from vitc.sweep.cluster import LocalCluster, NodeSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEAD, SECOND = "127.0.0.2", "127.0.0.3"
SPACE = """\
base:
  calibration: {size: 16}
  passes:
    - quantize: {calibrator: minmax}
  export: {parity_size: 8}
  bench: {max_time_s: 0.3, min_time_s: 0.1, min_samples: 10}
params:
  merge.r: [null, 4]
  quantize.bits: [null, 8]
"""
EVAL = "64"
POINTS = 4


def _sweep_args(space: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--model", "zoo:vit-c10", "--space", str(space), "--eval-size", EVAL, "--targets", "onnx",
            "--out-dir", str(out), *extra]


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "space.yaml"
    path.write_text(SPACE)
    return path


@pytest.fixture(scope="module")
def local(space, tmp_path_factory) -> dict:
    """The same sweep run locally (one process): the reference every cluster run must match."""
    out = tmp_path_factory.mktemp("local") / "res"
    assert run(_sweep_args(space, out, "--jobs", "1")) == 0
    return {r["id"]: r for r in _records(out) if r["kind"] == "eval"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two nodes, one CPU each; the head advertises device:loop-head, the second device:loop-worker.
    Torn down (every process of both node sessions killed) however the tests end."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the nodes use 127.0.0.2 and 127.0.0.3, which only Linux routes to loopback by default")
    root = Path(tmp_path_factory.mktemp("rc"))
    c = LocalCluster([NodeSpec(HEAD, 1, {"device:loop-head": 1}), NodeSpec(SECOND, 1, {"device:loop-worker": 1})],
                     root=root, extra_env={"PYTHONPATH": str(ROOT)})
    try:
        c.start()
        yield c
    finally:
        c.stop()
        deadline = time.monotonic() + 20  # killed processes can take a moment to leave the process table
        while _pids_with(str(root)) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftover = [pid for pid in _pids_with(str(root))]
        assert not leftover, f"processes of the test cluster survived its teardown: {leftover}"


def _pids_with(text: str) -> list[int]:
    from vitc.sweep.cluster import _pids_mentioning

    return _pids_mentioning(text)


def _driver_env(cluster: LocalCluster, home: Path, **auth) -> dict:
    """A driver's environment: no RAY_AUTH_* unless given, its own HOME (so ~/.ray/auth_token is ours)."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    home.mkdir(parents=True, exist_ok=True)
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), COLUMNS="200", **auth)
    return env


def _cli(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitc.cli", *args], env=env, cwd=str(ROOT), capture_output=True,
                          text=True, timeout=timeout)


def _home_with_token(tmp_path: Path, token: str) -> Path:
    """The case that failed before (InvalidAuthToken): the token only in ~/.ray/auth_token, no
    RAY_AUTH_MODE, as a head started with ``ray start --head`` after ``ray.init()`` left that file."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token)
    return home


def _same_as_local(records: list[dict], local: dict) -> None:
    evals = [r for r in records if r["kind"] == "eval"]
    assert sorted(r["id"] for r in evals) == sorted(local)  # every point, each exactly once
    for r in evals:
        ref = local[r["id"]]
        assert r["top1"] == ref["top1"] and r["top5"] == ref["top5"], r["id"]
        assert r["weights_sha256"] == ref["weights_sha256"], r["id"]
        # every exported file (model.onnx, its manifest...) bit for bit
        assert r["artifacts"]["onnx"]["files"] == ref["artifacts"]["onnx"]["files"], r["id"]
    lats = [r for r in records if r["kind"] == "latency"]
    assert sorted(r["id"] for r in lats) == sorted(local)


# ------------------------------------------------------------------ refused before any work

def test_device_no_node_advertises_is_refused_before_any_work(cluster, space, tmp_path):
    jobs = cluster.jobs()
    t0 = time.perf_counter()
    out = _cli(_sweep_args(space, tmp_path / "r", "--ray", cluster.address, "--device", "jetson-orin"),
               _driver_env(cluster, tmp_path / "h", RAY_AUTH_TOKEN=cluster.token))
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, out.stderr
    assert "no node of the Ray cluster advertises device:jetson-orin" in err[0]
    assert "device:loop-head, device:loop-worker" in err[0]
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "r").exists()
    assert cluster.jobs() == jobs  # it never joined the cluster: no driver, no task


@pytest.mark.parametrize("case", ["no token", "wrong token"])
def test_token_problems_are_one_line(cluster, space, tmp_path, case):
    auth = {} if case == "no token" else {"RAY_AUTH_TOKEN": "0" * 64, "RAY_AUTH_MODE": "token"}
    out = _cli(_sweep_args(space, tmp_path / "r", "--ray", cluster.address, "--device", "loop-head"),
               _driver_env(cluster, tmp_path / "h", **auth))
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, out.stderr
    if case == "no token":
        assert f"the Ray cluster at {cluster.address} requires token authentication and no token is set here" in err[0]
    else:
        assert f"the Ray cluster at {cluster.address} rejects this machine's token (from RAY_AUTH_TOKEN)" in err[0]
    assert "ray get-auth-token" in err[0]
    assert not (tmp_path / "r").exists()


def test_other_ray_version_on_the_cluster_is_one_line(cluster, space, tmp_path):
    """This process claims Ray 2.59.0 (faked); the cluster runs the installed one."""
    import ray

    code = ("import sys\nimport vitc.sweep.executors as E\nE._ray_version = lambda: '2.59.0'\n"
            "from vitc.cli import run\nsys.exit(run(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, *_sweep_args(space, tmp_path / "r", "--ray", cluster.address,
                                                                    "--device", "loop-head")],
                         env=_driver_env(cluster, tmp_path / "h", RAY_AUTH_TOKEN=cluster.token), cwd=str(ROOT),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1, out.stderr
    assert f"the Ray cluster runs Ray {ray.__version__} and this machine Ray 2.59.0" in err[0]
    assert f"pip install 'ray=={ray.__version__}'" in err[0]
    assert not (tmp_path / "r").exists()


def test_version_check_names_the_problem_and_the_fix():
    from vitc.errors import VitcError
    from vitc.sweep.executors import check_versions

    here = {"ray_version": "2.60.0", "python_version": "3.11.7"}
    check_versions({"ray_version": "2.60.0", "python_version": "3.11.9"}, here)  # a patch apart: Ray accepts it
    with pytest.raises(VitcError, match=r"the Ray cluster runs Ray 2\.61\.0 and this machine Ray 2\.60\.0; "
                                        r"install the cluster's version here \(pip install 'ray==2\.61\.0'\)"):
        check_versions({"ray_version": "2.61.0", "python_version": "3.11.7"}, here)
    with pytest.raises(VitcError, match=r"the Ray cluster runs Python 3\.12\.1 and this machine Python 3\.11\.7; "
                                        r"run vitc with Python 3\.12"):
        check_versions({"ray_version": "2.60.0", "python_version": "3.12.1"}, here)


# ------------------------------------------------------------------ the sweep on two nodes

def test_sweep_spreads_over_both_nodes_and_times_on_the_tagged_one(cluster, space, local, tmp_path):
    """Joined with the token only in ~/.ray/auth_token (the InvalidAuthToken case of before)."""
    out_dir = tmp_path / "ray"
    out = _cli(_sweep_args(space, out_dir, "--ray", cluster.address, "--device", "loop-head", "--out",
                           str(tmp_path / "s.json")), _driver_env(cluster, _home_with_token(tmp_path, cluster.token)))
    assert out.returncode == 0, out.stderr[-3000:]
    records = _records(out_dir)
    _same_as_local(records, local)
    compress_nodes = {r["node"]["ip"] for r in records if r["kind"] == "eval"}
    assert compress_nodes == {HEAD, SECOND}  # compression and evaluation on both nodes
    lats = [r for r in records if r["kind"] == "latency"]
    assert {r["node"]["ip"] for r in lats} == {HEAD}  # latency only where device:loop-head is
    assert all(r["executor"] == "ray" and r["device"] == "loop-head" for r in lats)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["retried"] == []
    assert {k.split()[0] for k in summary["nodes"]} == {HEAD, SECOND}
    assert sum(v["compress"] for v in summary["nodes"].values()) == POINTS
    assert "ran on: 127.0.0.2" in out.stdout and "retried" not in out.stdout


def test_sweep_survives_losing_the_second_node(cluster, space, local, tmp_path):
    """The second node's raylet is killed while it compresses a point: that point is submitted
    again, finishes on the head, and every point is stored exactly once, as the local run has it.
    Runs last: the cluster has one node afterwards."""
    out_dir = tmp_path / "ray"
    proc = subprocess.Popen([sys.executable, "-m", "vitc.cli", *_sweep_args(space, out_dir, "--ray", cluster.address,
                                                                             "--device", "loop-head", "--out",
                                                                             str(tmp_path / "s.json"))],
                            env=_driver_env(cluster, tmp_path / "h", RAY_AUTH_TOKEN=cluster.token), cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not cluster.task_running_on(1, "compress_job_remote"):
            assert proc.poll() is None, "the sweep ended before the second node ran a compression task"
            assert time.monotonic() < deadline, "the second node never ran a compression task"
            time.sleep(0.1)
        time.sleep(1.0)  # inside the task (a point takes several seconds)
        cluster.kill_raylet(1)
        stdout, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout[-3000:]
    records = _records(out_dir)
    _same_as_local(records, local)  # 4 of 4 points, each once, the same numbers and files
    summary = json.loads((tmp_path / "s.json").read_text())
    retried = summary["retried"]
    assert retried, "the point lost with the second node is not reported as retried"
    by_id = {r["id"]: r for r in records if r["kind"] == "eval"}
    for r in retried:
        assert r["stage"] == "compress and evaluate" and r["attempts"] >= 2
        assert r["lost"][0]["error"] in ("NodeDiedError", "WorkerCrashedError", "ObjectLostError", "OwnerDiedError",
                                         "LocalRayletDiedError", "RaySystemError")
        assert by_id[r["id"]]["node"]["ip"] == HEAD  # redone on the node that remained
    # NodeDiedError names the node; a WorkerCrashedError (Ray not yet sure the node died) names none
    assert all(x.get("node") in (SECOND, None) for r in retried for x in r["lost"])
    assert "retried: " in stdout and all(r["id"] in stdout for r in retried)
    assert {r["node"]["ip"] for r in records if r["kind"] == "latency"} == {HEAD}


# ------------------------------------------------------------------ resubmission, without a cluster

class _FakeRay:
    """Ray's calls the executor makes, with results scripted per submission (real Ray exceptions)."""

    def __init__(self, outcomes, alive_device=True):
        import ray

        self.exceptions = ray.exceptions
        self.outcomes, self.submitted, self.cancelled = list(outcomes), [], []
        self.alive_device = alive_device

    def remote(self, *args):
        ref = object()
        self.submitted.append((ref, args))
        return ref

    def wait(self, refs, num_returns=1, timeout=None):
        if not self.outcomes:  # nothing will ever come back (a task waiting for a resource that left)
            time.sleep(timeout or 0)
            return [], list(refs)
        return [refs[0]], list(refs[1:])

    def get(self, ref):
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def nodes(self):
        res = {"CPU": 1.0, **({"device:loop-head": 1.0} if self.alive_device else {})}
        return [{"NodeID": "ab" * 28, "NodeManagerAddress": HEAD, "Alive": True, "Resources": res}]

    def cancel(self, ref, force=False):
        self.cancelled.append(ref)


def _executor(fake):
    from vitc.sweep.executors import RayExecutor

    ex = object.__new__(RayExecutor)
    ex.ray, ex.device, ex.started, ex.log = fake, "loop-head", False, lambda text: None
    ex._compress = ex._measure = fake
    return ex


def _died(ip=SECOND):
    import ray

    return ray.exceptions.NodeDiedError(f"Task failed because the node it was running on is dead or unavailable. "
                                        f"Node IP: {ip}, node ID: {'cd' * 28}. This can happen if ...")


def test_a_lost_task_is_submitted_again_and_recorded_once():
    job = {"id": "p1", "params": {"merge.r": 4}, "rung": None, "kind": "eval", "point_dir": None}
    done = {"id": "p1", "params": {"merge.r": 4}, "rung": None, "kind": "eval", "node": {"ip": HEAD, "id": "ab" * 28}}
    fake = _FakeRay([_died(), (dict(done), {})])
    out = list(_executor(fake).compress([job]))
    assert len(fake.submitted) == 2 and len(out) == 1
    assert out[0]["kind"] == "eval" and out[0]["retried"] == [
        {"attempt": 1, "error": "NodeDiedError", "node": SECOND, "detail": str(_died()).splitlines()[0][:300]}]


def test_a_task_lost_every_time_becomes_the_points_error_record():
    import ray

    job = {"id": "p1", "params": {}, "rung": None, "kind": "eval", "point_dir": None}
    fake = _FakeRay([_died(), ray.exceptions.WorkerCrashedError(), _died()])
    out = list(_executor(fake).compress([job]))
    assert len(fake.submitted) == 3 and len(out) == 1
    assert out[0]["kind"] == "error" and "its task was lost 3 times (last: NodeDiedError" in out[0]["error"]
    assert [x["error"] for x in out[0]["retried"]] == ["NodeDiedError", "WorkerCrashedError", "NodeDiedError"]
    # an error of the job itself (Ray wraps it in RayTaskError) is not a lost task: not resubmitted
    fake = _FakeRay([ray.exceptions.RayTaskError("compress_job_remote", "tb", ValueError("bad"))])
    with pytest.raises(ray.exceptions.RayTaskError):
        list(_executor(fake).compress([job]))
    assert len(fake.submitted) == 1


def test_latency_waits_for_the_device_then_says_it_left(monkeypatch, tmp_path):
    from vitc.errors import VitcError
    from vitc.sweep import executors

    monkeypatch.setattr(executors, "DEVICE_GRACE_S", 0.5)
    (tmp_path / "p" / "onnx").mkdir(parents=True)
    (tmp_path / "p" / "onnx" / "model.onnx").write_bytes(b"x")
    fake = _FakeRay([], alive_device=False)
    with pytest.raises(VitcError, match=r"the node advertising device:loop-head left the Ray cluster during latency; "
                                        r"the finished points are stored: run the same command again"):
        _executor(fake).measure({"target": "onnx"}, tmp_path / "p", "onnx/model.onnx")
    assert len(fake.cancelled) == 1
    # compression waits the same way for a node with a CPU
    fake = _FakeRay([], alive_device=False)
    fake.nodes = lambda: [{"NodeID": "ab" * 28, "NodeManagerAddress": HEAD, "Alive": True, "Resources": {"CPU": 0.0}}]
    with pytest.raises(VitcError, match=r"every node with a CPU left the Ray cluster during compression"):
        list(_executor(fake).compress([{"id": "p1", "params": {}, "rung": None, "kind": "eval", "point_dir": None}]))
    # lost, then measured: the rows say it was retried
    rows = [{"batch": 1, "p50_ms": 1.0}]
    fake = _FakeRay([_died(HEAD), [dict(r) for r in rows]])
    got = _executor(fake).measure({"target": "onnx"}, tmp_path / "p", "onnx/model.onnx")
    assert len(fake.submitted) == 2 and got[0]["retried"][0]["node"] == HEAD


def test_summary_lists_retried_points_and_nodes():
    from vitc.sweep.runner import nodes_used, retried

    loss = {"attempt": 1, "error": "NodeDiedError", "node": SECOND, "detail": "Task failed ..."}
    node = {"ip": HEAD, "id": "ab" * 28}
    recs = [{"kind": "eval", "id": "a", "params": {"merge.r": 4}, "node": node, "retried": [loss]},
            {"kind": "eval", "id": "b", "params": {"merge.r": None}, "node": {"ip": SECOND, "id": "cd" * 28}},
            {"kind": "error", "id": "c", "params": {}, "error": "its task was lost 3 times (last: ...)", "retried": [loss] * 3},
            {"kind": "latency", "id": "a", "target": "onnx", "batch": 1, "node": node, "retried": [loss]}]
    got = retried(recs)
    assert [(r["id"], r["stage"], r["attempts"]) for r in got] == [
        ("a", "compress and evaluate", 2), ("c", "compress (given up)", 3), ("a", "latency (onnx, batch 1)", 2)]
    assert got[0]["params"] == {"merge.r": 4} and got[0]["lost"] == [loss]
    assert nodes_used(recs) == {f"{HEAD} abababab": {"compress": 1, "latency": 1}, f"{SECOND} cdcdcdcd": {"compress": 1, "latency": 0}}
