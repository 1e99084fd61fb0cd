"""CPU instruction-set guard for int8 runtimes (OpenVINO's oneDNN kernels)."""
from __future__ import annotations

from pathlib import Path

_ISA_CHECKED = False


def guard_int8_isa() -> str | None:
    """Cap oneDNN below AMX where the CPU advertises AMX but faults on it; return the cap set.

    OpenVINO's CPU plugin picks AMX int8 kernels for QDQ graphs wherever ``/proc/cpuinfo`` lists
    ``amx_int8``; some virtual machines list it without enabling the tile state, and the first
    int8 inference dies with SIGILL. A PyTorch bf16 matmul (also AMX there) in a child process
    tells the two apart; call this before OpenVINO runs an int8 model.
    """
    import os
    import subprocess
    import sys

    global _ISA_CHECKED
    if _ISA_CHECKED or os.environ.get("ONEDNN_MAX_CPU_ISA"):
        return os.environ.get("ONEDNN_MAX_CPU_ISA")
    _ISA_CHECKED = True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    if "amx_int8" not in flags:
        return None
    probe = "import torch; a = torch.ones(32, 32, dtype=torch.bfloat16); (a @ a).sum().item()"
    try:
        if subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120).returncode == 0:
            return None
    except subprocess.TimeoutExpired:
        pass  # undecided on a loaded machine: the cap only forgoes AMX, it never crashes
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_BF16"
    return os.environ["ONEDNN_MAX_CPU_ISA"]
