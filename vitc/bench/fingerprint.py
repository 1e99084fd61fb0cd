"""The environment a latency was measured in, and whether two environments are comparable.

Stored results are only comparable on the same CPU model and flags, the same allowed cores
and memory, the same OS kernel and the same library versions: a number from another machine
or another onnxruntime says nothing about a regression here.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata

# The fields that must agree for `vitc bench check`; the rest (hostname, load) is context.
COMPARABLE = ("cpu_model", "cpu_flags_sha", "cpus_allowed", "memory_gib", "os", "machine", "python", "versions", "thread_env")
# Variables that change how many threads the math libraries under each runtime start.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "KMP_AFFINITY", "OMP_PROC_BIND", "ORT_NUM_THREADS")
RUNTIME_PACKAGES = ("vitc", "torch", "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "coremltools")
# CPU flags that change which kernels a runtime picks (shown in the fingerprint; all flags are hashed).
NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")


def allowed_cpus() -> int:
    """CPUs this process may run on (its affinity), never the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.processor() or platform.machine()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:  # pragma: no cover - not Linux
        pass
    return model, sorted(flags)


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:  # pragma: no cover
        pass
    return None


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return None


def _governor() -> str | None:
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") as f:
            return f.read().strip()
    except OSError:
        return None


def _versions() -> dict[str, str]:
    out = {}
    for name in RUNTIME_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def fingerprint() -> dict:
    model, flags = _cpuinfo()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    fp = {
        "cpu_model": model,
        "cpu_flags": [f for f in NOTABLE_FLAGS if f in flags],
        "cpu_flags_sha": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
        "cpus_allowed": allowed_cpus(),
        "cpus_host": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": _versions(),
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "cpu_governor": _governor(),
        "hostname": platform.node(),
        "load_average": load,
    }
    fp["id"] = fingerprint_id(fp)
    return fp


def fingerprint_id(fp: dict) -> str:
    key = {k: fp.get(k) for k in COMPARABLE}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def differences(stored: dict, current: dict) -> list[str]:
    """Human-readable reasons two fingerprints are not comparable (empty when they are)."""
    out = []
    for key in COMPARABLE:
        a, b = stored.get(key), current.get(key)
        if key == "versions":
            a, b = a or {}, b or {}
            for pkg in sorted(set(a) | set(b)):
                if a.get(pkg) != b.get(pkg):
                    out.append(f"{pkg} {a.get(pkg, 'absent')} -> {b.get(pkg, 'absent')}")
        elif key == "thread_env" and (a or {}) != (b or {}):
            out.append(f"thread variables {a or {}} -> {b or {}}")
        elif a != b:
            out.append(f"{key} {a!r} -> {b!r}")
    return out
