"""Cached virtualenvs with chosen packages from a package index, for tests that run code where the
compiler (torch, transformers, TVM's compiler) is absent.

Each venv lives under ~/.cache/ibert-tvm/ (IBERT_TVM_CACHE), keyed by a digest of what it installs.
When pip cannot reach a package index the calling test fails under CI=true and is skipped elsewhere,
with a warning (conftest.ci_setup_failed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from conftest import ci_setup_failed

from ibert_tvm.files import cache_dir

# what pip (and scripts/gpu_bundle.py, which shows pip's error) prints when no package index answers
NO_INDEX = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
            "Max retries exceeded", "ConnectTimeout", "ProxyError")


def digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()[:16]


def clean_env() -> dict[str, str]:
    """This process's environment without what would let a child see this venv's packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PYTHONNOUSERSITE": "1"}


def index_unreachable(what: str, stderr: str) -> None:
    """ci_setup_failed when `stderr` says no package index answered; otherwise nothing."""
    if any(s in stderr for s in NO_INDEX):
        ci_setup_failed(f"{what}: pip cannot reach a package index: {stderr[-300:]}")


def pip(python: Path, *args: str) -> None:
    res = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                         capture_output=True, text=True, env=clean_env())
    if res.returncode:
        index_unreachable(f"venv {python.parents[1].name}", res.stderr)
        pytest.fail(f"pip install {' '.join(args)} failed:\n{res.stderr[-3000:]}")


def cached_venv(name: str, packages: list[str]) -> Path:
    """The python of a venv (this interpreter's version) holding `packages` and their dependencies,
    built on first use; a changed package list makes a new one."""
    venv = cache_dir() / f"{name}-{digest(p.encode() for p in packages)}"
    python = venv / "bin" / "python"
    if not (venv / ".deps-ok").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip(python, *packages)
        (venv / ".deps-ok").write_text("\n".join(packages))
    return python
