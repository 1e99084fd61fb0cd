"""Atomic writes: a failure never leaves a half-written file or folder behind, and two runs never
write the same path at once.

* ``claim(path)`` holds the exclusive right to write ``path`` for a block: an ``flock`` on a
  hidden lock file beside it (``.<name>.vitc-lock``), so a second vitc process asking for the
  same path fails at once with a one-line error (exit 2), before doing any work. The kernel
  drops the lock when its holder dies, so a killed run never blocks the next one.
* Staging paths carry the writer's pid (``.<name>.<pid>.…``). The next run that claims the
  path removes staging left by a writer that is no longer alive (a SIGKILL, an OOM kill).
* ``atomic_path`` stages beside the target and renames into place only if its block succeeds.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from vitc.errors import VitcError

LOCK_SUFFIX = ".vitc-lock"
_HELD: dict[str, int] = {}  # absolute path -> fd of its lock file, for the claims this process holds
_TERMINATING: list[int] = []  # the termination signal received, once one arrived (see ``terminate``)


def terminate(signum: int, frame=None) -> None:
    """The SIGTERM handler: unwind like an exception, so staging paths and claims are removed.

    Python drops an exception raised while a finalizer (``__del__``) or a library callback runs
    (measured: a SIGTERM that landed in ``regex``'s ``Group.__del__`` let the export finish and
    publish its artifact), so the signal is also recorded: ``atomic_path`` refuses to publish
    afterwards and ``cli.run`` exits with 128 + signum whatever happened in between."""
    _TERMINATING.append(signum)
    raise SystemExit(128 + signum)


def terminated() -> int | None:
    """The exit code a received termination signal asks for, or None."""
    return 128 + _TERMINATING[0] if _TERMINATING else None


def check_writable(path: Path, force: bool = False) -> None:
    path = Path(path)
    if path.exists() and not force:
        raise VitcError(f"{path} already exists", "pass --force to overwrite it, or choose another -o/--output")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise VitcError(f"cannot write into {parent}", "choose a writable -o/--output")
    if parent.exists() and not parent.is_dir():
        raise VitcError(f"{parent} is a file, not a folder", "choose an -o/--output inside a folder")


def _check_parent(path: Path) -> None:
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise VitcError(f"{parent} is a file, not a folder", "choose an -o/--output inside a folder")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise VitcError(f"cannot write into {parent}", "choose a writable -o/--output")


def staging_prefix(path: Path) -> str:
    """Name prefix of this process's staging entries for ``path`` (``.<name>.<pid>.``)."""
    return f".{Path(path).name}.{os.getpid()}."


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that its parent has not reaped yet is a zombie: dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stale_entries(path: Path) -> list[Path]:
    """Staging entries beside ``path`` whose writer (the pid in their name) is no longer alive."""
    path = Path(path)
    prefix = f".{path.name}."
    out = []
    if not path.parent.is_dir():
        return out
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix) or entry.name.endswith(LOCK_SUFFIX):
            continue
        pid = entry.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            out.append(entry)
    return out


JOURNAL = ".vitc-moving.json"  # in a staging folder while its files move into place: {"dests": [...], "last": path}


def remove_stale(path: Path) -> list[Path]:
    """Remove what killed writers of ``path`` left behind; returns what was removed. A writer killed
    while moving several files into place (an export: artifact, sidecars, manifest last) left a
    journal in its staging folder: unless the last file (the manifest) made it, the files it had
    already moved are incomplete and are removed too."""
    removed = stale_entries(path)
    for entry in removed:
        journal = entry / JOURNAL if entry.is_dir() else None
        if journal is not None and journal.exists():
            try:
                moving = json.loads(journal.read_text())
            except (OSError, ValueError):
                moving = {}
            if moving.get("last") and not Path(moving["last"]).exists():
                for dest in map(Path, moving.get("dests", [])):
                    if dest.parent == path.parent:  # never anything outside the claimed folder
                        shutil.rmtree(dest, ignore_errors=True) if dest.is_dir() else dest.unlink(missing_ok=True)
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
    return removed


def fault_point(name: str) -> None:
    """Fault injection for tests/test_faults.py (a no-op unless asked): ``VITC_FAULT_KILL=<name>``
    SIGKILLs this process at the named point; ``VITC_FAULT_WAIT=<name>:<file>`` waits there until
    ``file`` exists (so a test can start a concurrent writer at a known moment)."""
    kill = os.environ.get("VITC_FAULT_KILL")
    if kill == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    wait = os.environ.get("VITC_FAULT_WAIT", "")
    if wait.startswith(f"{name}:"):
        import time

        flag = Path(wait[len(name) + 1:])
        Path(f"{flag}.reached").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def _lock_holder(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "?"
    except OSError:
        return "?"


@contextlib.contextmanager
def claim(path: Path | str, force: bool = False) -> Iterator[Path]:
    """Hold the exclusive right to write ``path`` (see the module docstring). Re-entrant within
    one process, so a command can claim its output early and the writer claim it again."""
    import fcntl

    path = Path(path).absolute()
    key = str(path)
    if key in _HELD:
        yield path
        return
    _check_parent(path)  # the full check comes once the lock is held and a dead run's debris is gone
    first_existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VitcError(f"cannot create the folder {path.parent} ({exc.strerror})", "choose a writable -o/--output") from exc
    lock = path.parent / f".{path.name}{LOCK_SUFFIX}"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise disk_error(exc, path) if exc.errno == errno.ENOSPC else \
                VitcError(f"cannot write into {path.parent} ({exc.strerror})", "choose a writable -o/--output") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VitcError(f"{path} is being written by another vitc run (pid {_lock_holder(lock)})",
                            "wait for it to finish, or choose another -o/--output") from None
        # The previous holder unlinks the lock file when it finishes: make sure we locked the file
        # that is still at that name, not an unlinked one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        remove_stale(path)
        check_writable(path, force)  # the run that held the lock before us may have just written it
        fault_point("claim:held")
    except BaseException:
        _release(lock, fd)
        _remove_created_dirs(path.parent, first_existing)
        raise
    _HELD[key] = fd
    try:
        yield path
    finally:
        del _HELD[key]
        _release(lock, fd)
        _remove_created_dirs(path.parent, first_existing)


_COMMAND: list[contextlib.ExitStack] = []  # the running CLI command's claims (see command_scope)


@contextlib.contextmanager
def command_scope() -> Iterator[None]:
    """Claims taken with ``hold`` during a CLI command are released when it ends (cli.run wraps every command)."""
    with contextlib.ExitStack() as stack:
        _COMMAND.append(stack)
        try:
            yield
        finally:
            _COMMAND.pop()


def hold(path: Path | str, force: bool = False) -> None:
    """Claim ``path`` now, before the work, and keep it until the command ends: a concurrent run on the
    same output fails at once (exit 2) instead of after the work. Outside a CLI command, only checks."""
    if _COMMAND:
        _COMMAND[-1].enter_context(claim(path, force))
    else:
        check_writable(Path(path), force)


def _release(lock: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        lock.unlink()
    os.close(fd)


def _remove_created_dirs(folder: Path, first_existing: Path) -> None:
    """Remove the folders a claim created (``folder`` up to ``first_existing``), when empty."""
    try:
        while folder != first_existing and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    except OSError:
        pass


def disk_error(exc: OSError, path: Path | str) -> VitcError:
    """A full disk (or quota) while writing ``path``: blame the disk, not the model."""
    what = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    return VitcError(f"{what} while writing {path}", "free some space there, or choose another -o/--output")


def find_disk_error(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT behind ``exc`` (libraries often wrap it), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc
        if "No space left on device" in str(exc) or "Errno 28" in str(exc):
            return OSError(errno.ENOSPC, "No space left on device")
        exc = exc.__cause__ or exc.__context__
    return None


def honour_umask(root: Path) -> None:
    """Give the files and folders under ``root`` the modes a plain open()/mkdir would: some writers
    (mkdtemp, safetensors) create them 0600/0700 whatever the umask says."""
    umask = os.umask(0)
    os.umask(umask)
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in entries:
        if p.is_symlink():
            continue
        executable = p.is_dir() or (p.stat().st_mode & 0o111)
        os.chmod(p, (0o777 if executable else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(path: Path, force: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    with claim(path, force):
        tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(path), dir=path.parent)) if is_dir else \
            path.parent / f"{staging_prefix(path)}tmp"
        try:
            try:
                yield tmp
            except OSError as exc:
                if find_disk_error(exc):
                    raise disk_error(exc, path) from exc
                raise
            if path.exists():
                if not force:  # cannot happen while we hold the claim, unless written by something else
                    raise VitcError(f"{path} appeared while it was being written", "pass --force to overwrite it, or choose another -o/--output")
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            honour_umask(tmp)
            fault_point("atomic:staged")
            if terminated() is not None:  # the signal's exception was swallowed on the way: do not publish
                raise SystemExit(terminated())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def write_json(path: Path | str, data: dict, force: bool = True) -> Path:
    """Write ``data`` as JSON atomically (``--out`` files are replaced by default). NaN and
    infinities, which JSON has no literal for, are written as null."""
    path = Path(path)
    text = dumps(data)
    with atomic_path(path, force=force) as tmp:
        try:
            tmp.write_text(text)
        except OSError as exc:
            raise disk_error(exc, path) if find_disk_error(exc) else exc
    return path


def dumps(data) -> str:
    """Strict JSON text (no NaN/Infinity literals: null instead), indented, with a final newline."""
    return json.dumps(_finite(data), indent=2, default=_jsonable, allow_nan=False) + "\n"


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__") or hasattr(obj, "tolist") or isinstance(obj, Path):
        return _finite(_jsonable(obj))
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):  # numpy scalars
        return _finite(obj.item())
    return obj


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def manifest_beside(path: Path | str) -> Path | None:
    """The manifest vitc export wrote for the artifact at ``path``: ``<name>.manifest.json``, or the
    older ``<stem>.manifest.json`` when it says it describes this very file."""
    path = Path(path)
    named = path.parent / f"{path.name}.manifest.json"
    if named.exists():
        return named
    legacy = path.with_suffix(".manifest.json")
    if legacy.exists():
        try:
            if json.loads(legacy.read_text()).get("artifact") == path.name:
                return legacy
        except (OSError, ValueError):
            return None
    return None


def onnx_precision(path: Path | str) -> str:
    """What an ONNX graph computes in, from the graph itself: int8 (Q/DQ or integer ops), fp16 or fp32."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger"}:
        return "int8"
    types = {i.data_type for i in model.graph.initializer}
    if onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types:
        return "fp16"
    return "fp32"
