"""What a user types first: the version, the top-level import, output piped into `head`."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

import ibert_tvm
from ibert_tvm import cli


def test_version_and_top_level_runner(capsys):
    from importlib import metadata

    assert ibert_tvm.__version__ == metadata.version("ibert-tvm")
    try:
        cli.main(["--version"])
    except SystemExit as done:
        assert done.code == 0
    assert capsys.readouterr().out.strip() == f"ibert-tvm {ibert_tvm.__version__}"
    from ibert_tvm import Runner
    from ibert_tvm.runner import Runner as Direct

    assert Runner is Direct


def test_top_level_import_is_light():
    code = "import sys, ibert_tvm; print(sorted(m for m in ('tvm', 'torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_closed_pipe_is_not_an_error():
    """`ibert-tvm targets --json | head -0`: the reader is gone before anything is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        res = subprocess.run([sys.executable, "-m", "ibert_tvm.cli", "targets", "--json"], stdout=write,
                             stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120)
    finally:
        os.close(write)
    assert res.returncode == 0 and res.stderr == "", res.stderr
