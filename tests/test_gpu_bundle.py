"""The one-call GPU check (scripts/gpu_bundle.py builds, the bundle's run.py runs): the bundle fits
the device tool's 64 MiB and carries TVM's runtime without its compiler; its run.py checks a library
bit for bit in a Python with no TVM, torch or transformers installed, and fails when an integer
differs. Here the libraries are a tiny model's, for the CPU (and one for CUDA, which must refuse
this GPU-less machine clearly); the GPU half runs on a GPU machine. Building downloads the tvm_ffi
wheel and the bare venv comes from a package index: without one the tests fail under CI=true and
are skipped elsewhere (conftest.ci_setup_failed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, save_checkpoint
from test_cuda import gpu_present
from venvs import cached_venv, clean_env, index_unreachable

from ibert_tvm.evaluation import gpu_check

pytestmark = pytest.mark.slow
GRID = ["--batches", "1", "2", "--seq-lens", "8", "16"]  # the tiny model has 64 positions
SHAPES = ["1x8", "2x8", "1x16", "2x16"]
BARE = ["numpy", "tokenizers", "safetensors"]  # what the GPU machine's Python has of the runtime's needs


def build(out: Path, target: str, checkpoint: Path) -> Path:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"  # the bare venv's, whose tvm_ffi wheel is packed
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))  # this checkout's package
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_bundle.py"), "build", "--target", target,
                          "--model", str(checkpoint), *GRID, "--python-version", python, "--out", str(out)],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": path})
    if res.returncode:
        index_unreachable("gpu bundle (the tvm_ffi wheel)", res.stderr)
        pytest.fail(f"gpu_bundle.py build failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    assert re.search(r"bundle \d+\.\d MiB \(limit 64 MiB\)", res.stdout), res.stdout
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), "IBertModel", calibrate=True)


@pytest.fixture(scope="module")
def host_bundle(tmp_path_factory, checkpoint) -> Path:
    return build(tmp_path_factory.mktemp("bundles") / "host", "host", checkpoint)


@pytest.fixture(scope="module")
def bare_python() -> Path:
    """A Python with the runtime's third-party needs but no TVM, torch or transformers."""
    python = cached_venv("bundle-venv", BARE)
    for name in ("tvm", "tvm_ffi", "torch", "transformers", "ibert_tvm"):
        res = subprocess.run([str(python), "-c", f"import {name}"], capture_output=True, env=clean_env(), cwd="/")
        assert res.returncode != 0, f"{name} is importable in the bare venv"
    return python


def run(python: Path, bundle: Path, out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in clean_env().items() if k != "OUT"}
    return subprocess.run([str(python), str(bundle / "run.py"), "--out", str(out), "--reps", "3"],
                          capture_output=True, text=True, env=env, cwd=out.parent, timeout=300)


def payload_names(bundle: Path) -> list[str]:
    with tarfile.open(bundle / gpu_check.PAYLOAD) as tar:
        return tar.getnames()


def test_bundle_fits_and_carries_the_runtime_without_the_compiler(host_bundle):
    size = sum(p.stat().st_size for p in host_bundle.rglob("*") if p.is_file())
    assert size <= gpu_check.LIMIT_MIB << 20
    names = payload_names(host_bundle)
    assert {"site/tvm/lib/libtvm_runtime.so", "site/tvm/__init__.py", "artifact/model.so",
            "fp32-model/config.json"} <= set(names)
    assert not [n for n in names if "compiler" in n.rsplit("/", 1)[-1] and n.endswith(".so")]
    (wheel,) = host_bundle.glob(gpu_check.FFI_WHEEL)
    assert f"-cp{sys.version_info.major}{sys.version_info.minor}-" in wheel.name
    assert (host_bundle / "src" / "ibert_tvm" / "runner.py").is_file()
    # the default output folder is ignored by git, so that it travels only as a carried path
    res = subprocess.run(["git", "check-ignore", "-q", "bundle/gpu-check/run.py"], cwd=REPO)
    assert res.returncode == 0, "bundle/ is not git-ignored"


def test_fp32_model_is_the_checkpoint_in_bfloat16(host_bundle, checkpoint, tmp_path):
    import torch

    from ibert_tvm.evaluation.fp32 import fp32_model

    with tarfile.open(host_bundle / gpu_check.PAYLOAD) as tar:
        tar.extractall(tmp_path, members=[m for m in tar.getmembers() if m.name.startswith("fp32-model")],
                       filter="data")
    carried = fp32_model(str(tmp_path / "fp32-model"), "IBertModel").float().state_dict()
    original = fp32_model(str(checkpoint), "IBertModel").state_dict()
    assert carried.keys() == original.keys()
    for name, value in original.items():
        want = value.to(torch.bfloat16).to(value.dtype) if value.is_floating_point() else value
        assert carried[name].dtype == value.dtype and torch.equal(carried[name], want), name


def test_run_py_without_tvm_checks_every_shape_and_passes(bare_python, host_bundle, tmp_path):
    out = tmp_path / "out"
    res = run(bare_python, host_bundle, out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "## ibert-tvm GPU check: PASS" in res.stdout
    for shape in SHAPES:
        assert re.search(rf"^\| {shape} \| 0 of [\d,]+ \| \d+\.\d+ \|$", res.stdout, re.M), shape
    where = re.search(r"TVM \S+ \(runtime only\) from (\S+)\.$", res.stdout, re.M)
    assert where and Path(where[1]).name == "tvm" and Path(where[1]).parent.name == "site", res.stdout
    assert (out / gpu_check.REPORT).read_text().strip() == res.stdout.strip()


def test_a_corrupted_expected_value_fails_the_run(bare_python, host_bundle, tmp_path):
    bundle = shutil.copytree(host_bundle, tmp_path / "bundle")
    expected = dict(np.load(bundle / gpu_check.EXPECTED))
    hidden = expected["2x16/out/last_hidden_state"]
    hidden[1, 3, 5] ^= 1
    np.savez_compressed(bundle / gpu_check.EXPECTED, **expected)
    res = run(bare_python, bundle, tmp_path / "out")
    assert res.returncode == gpu_check.EXIT_FAILED, res.stdout[-3000:] + res.stderr[-3000:]
    assert "## ibert-tvm GPU check: FAIL" in res.stdout
    assert re.search(r"^\| 2x16 \| 1 of ", res.stdout, re.M) and re.search(r"^\| 1x16 \| 0 of ", res.stdout, re.M)


FAKE_SANITIZER = """#!/bin/sh
# as compute-sanitizer: --tool TOOL --error-exitcode N APP ARGS...
tool=$2
shift 4
{body}
"""


@pytest.mark.parametrize("body, clean, summary", [
    ('"$@"; rc=$?; echo "========= ERROR SUMMARY: 0 errors"; exit $rc', True, "clean (0 errors)"),
    ('"$@"; echo "========= ERROR SUMMARY: 3 errors"; exit 86', False, "3 errors"),
    ('"$@"; echo "========= RACECHECK SUMMARY: 2 hazards displayed (0 errors, 2 warnings)"', True,
     "0 errors (2 warnings)"),
    ('echo "========= ERROR SUMMARY: 0 errors"', False, "did not finish"),  # the app never ran
    ('echo "Device not supported"; exit 1', None, "inconclusive: no summary"),
    ("sleep 60", None, "timed out"),
])
def test_sanitizer_verdicts(host_bundle, tmp_path, body, clean, summary):
    """The child that compute-sanitizer runs (run.py --oneshot, the bundle's runtime) and how its
    summary is read, with a stand-in for the sanitizer: the machine here has none."""
    exe = tmp_path / "compute-sanitizer"
    exe.write_text(FAKE_SANITIZER.format(body=body))
    exe.chmod(0o755)
    gpu_check.unpack(host_bundle, tmp_path / "unpacked")
    tool = "racecheck" if "RACECHECK" in body else "memcheck"
    timeout = 6 if "sleep" in body else 20
    got = gpu_check.sanitize(tool, str(exe), host_bundle, tmp_path / "unpacked", (2, 16), timeout, tmp_path)
    assert (got.clean, got.tool) == (clean, tool) and summary in got.summary, got
    assert (tmp_path / f"{tool}.log").exists()


@pytest.mark.skipif(gpu_present(), reason="this machine has an NVIDIA GPU: the refusal is for machines without one")
def test_cuda_bundle_holds_sass_and_says_when_there_is_no_gpu(bare_python, checkpoint, tmp_path):
    from ibert_tvm.device_cuda import device_images

    bundle = build(tmp_path / "cuda", "cuda-sm90", checkpoint)
    with tarfile.open(bundle / gpu_check.PAYLOAD) as tar:
        tar.extractall(tmp_path, members=[tar.getmember("artifact/model.so")], filter="data")
    assert {(i.kind, i.arch) for i in device_images(tmp_path / "artifact" / "model.so")} == {("elf", 90)}
    assert "site/tvm/lib/libtvm_runtime_cuda.so" in payload_names(bundle)
    res = run(bare_python, bundle, tmp_path / "out")
    assert res.returncode == gpu_check.EXIT_NOT_RUN, res.stdout[-3000:] + res.stderr[-3000:]
    assert "## ibert-tvm GPU check: NOT RUN" in res.stdout and "needs an NVIDIA GPU" in res.stdout, res.stdout
