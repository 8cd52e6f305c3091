"""Run Python on aarch64 under qemu-user, in the cached sysroot of scripts/aarch64_sysroot.sh.

`import tvm` takes about 20 s there (emulated); with TVM_USE_RUNTIME_LIB=1 about 5 s, enough
for tvm.runtime.load_module and tvm.runtime.vm.VirtualMachine (not tvm.relax, which needs the compiler).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from conftest import ci_setup_failed

REPO = Path(__file__).resolve().parents[1]
OFFLINE = ("Temporary failure resolving", "Could not resolve", "Could not connect", "Network is unreachable",
           "NewConnectionError", "Temporary failure in name resolution", "Max retries exceeded",
           "ConnectTimeout", "ProxyError")


@functools.cache
def _build_sysroot() -> Path | str:
    """The wrapper's path, or why the build could not reach its servers. Cached either way, so that
    an offline machine runs the script once, not once per test and fixture that needs it."""
    res = subprocess.run(["bash", str(REPO / "scripts" / "aarch64_sysroot.sh")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    if res.returncode:
        tail = res.stderr[-2000:]
        if any(s in res.stderr for s in OFFLINE):
            return f"aarch64 sysroot: apt or pip cannot reach its server, so no ARM library ran under qemu:\n{tail}"
        raise RuntimeError(f"scripts/aarch64_sysroot.sh failed ({res.returncode}):\n{tail}")
    return Path(res.stdout.splitlines()[-1])


def sysroot_python() -> Path:
    """The aarch64 `python` wrapper, building the sysroot on first use (about a minute)."""
    built = _build_sysroot()
    if isinstance(built, str):
        ci_setup_failed(built)
    return built


def run_aarch64(script: str, *args: str, timeout: int = 600, env: dict[str, str] | None = None
                ) -> subprocess.CompletedProcess:
    """Run `script` (Python source; sys.argv[1:] = args) on aarch64 with the repository importable;
    `env` adds variables (TVM_USE_RUNTIME_LIB=1: the TVM runtime alone, as on a board)."""
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run([str(sysroot_python()), "-c", script, *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {}), "PYTHONPATH": str(REPO), "PYTHONNOUSERSITE": "1"})
