"""ARM: libraries cross-compiled here run under qemu-user with the aarch64 TVM runtime alone, and
give the same bits as the x86 library and the integer reference."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time

import numpy as np
import pytest
from aarch64 import run_aarch64, sysroot_python
from conftest import KINDS, random_inputs

from ibert_tvm import reference
from ibert_tvm.runner import Runner

pytestmark = pytest.mark.slow
PRESETS = ("arm64-dotprod", "arm64-neon")
QEMU_TIMEOUT = 120  # an emulated server forks an emulated Python per session

PROBE = r"""
import sys
import numpy as np
from ibert_tvm.runner import Runner
inputs, out, *paths = sys.argv[1:]
d = np.load(inputs)
res = {}
for i, path in enumerate(paths):
    for name, v in Runner(path).run_integer(d["ids"], d["mask"]).items():
        if name != "scales":
            res[f"{i}/{name}"] = v
np.savez(out, **res)
"""


@pytest.fixture(scope="session")
def arm_artifacts(artifacts, tmp_path_factory) -> dict[tuple[str, str], object]:
    """The session's tiny artifacts' programs, cross-compiled for each ARM preset."""
    from ibert_tvm.compile import CompileOptions, compile_program

    sysroot_python()  # also installs the cross toolchain on a fresh machine
    root = tmp_path_factory.mktemp("arm")
    out = {}
    for preset in PRESETS:
        for kind in KINDS:
            a = artifacts[kind]
            opt = CompileOptions(model=str(a.checkpoint), target=preset, batch=2, seq_len=16,
                                 out=root / f"{preset}-{kind}", progress=False)
            out[preset, kind] = compile_program(a.program, a.checkpoint, opt)
    return out


def test_arm_libraries_are_aarch64_shared_objects(arm_artifacts):
    for path in arm_artifacts.values():
        head = (path / "model.so").read_bytes()[:20]
        assert head[:4] == b"\x7fELF" and struct.unpack("<H", head[18:20])[0] == 183  # EM_AARCH64


def test_arm_artifact_refused_on_x86(arm_artifacts):
    with pytest.raises(RuntimeError, match="compiled for aarch64, this machine is x86_64"):
        Runner(arm_artifacts["arm64-dotprod", "IBertModel"])


def test_arm_runs_under_qemu_bit_identical_to_x86_and_reference(arm_artifacts, artifacts, tmp_path):
    ids, mask = random_inputs(np.random.default_rng(5), 3, 13, pads=[0, 5, 13])
    np.savez(tmp_path / "in.npz", ids=ids, mask=mask)
    keys = list(arm_artifacts)
    res = run_aarch64(PROBE, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), *map(str, arm_artifacts.values()),
                      env={"TVM_USE_RUNTIME_LIB": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for i, (preset, kind) in enumerate(keys):
        a = artifacts[kind]
        want = reference.run(a.program, ids, mask)
        x86 = Runner(a.path).run_integer(ids, mask)
        for name in a.program.outputs:
            arm = got[f"{i}/{name}"]
            assert arm.dtype == x86[name].dtype
            np.testing.assert_array_equal(arm, x86[name], err_msg=f"{preset} {kind} {name} vs x86")
            np.testing.assert_array_equal(arm, want[name], err_msg=f"{preset} {kind} {name} vs reference")


def test_missing_cross_compiler_names_the_debian_package(artifact, tmp_path, monkeypatch):
    from ibert_tvm import targets
    from ibert_tvm.compile import CompileOptions, compile_model

    monkeypatch.setattr(targets.shutil, "which", lambda name: None)
    opt = CompileOptions(model=str(artifact.checkpoint), target="arm64-neon", out=tmp_path / "x", progress=False)
    with pytest.raises(FileNotFoundError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        compile_model(opt)
    assert not (tmp_path / "x").exists()


# -- remote boards over TVM RPC (an aarch64 RPC server under qemu on loopback) -------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """A socket listens on `port` (read from /proc: a probing connection would take the server's
    only session)."""
    rows = [line.split() for line in open("/proc/net/tcp").read().splitlines()[1:]]
    return any(int(r[1].split(":")[1], 16) == port and r[3] == "0A" for r in rows)


@pytest.fixture(scope="session")
def arm_board(tmp_path_factory):
    """HOST:PORT of `python -m tvm.exec.rpc_server` running on aarch64 (qemu), runtime only."""
    port, log = free_port(), tmp_path_factory.mktemp("rpc") / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    server = subprocess.Popen(
        [str(sysroot_python()), "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**env, "TVM_USE_RUNTIME_LIB": "1"},
    )
    deadline = time.time() + QEMU_TIMEOUT
    while not listening(port):  # it binds first and listens seconds later, in a child process
        assert server.poll() is None and time.time() < deadline, f"no RPC server:\n{log.read_text()[-2000:]}"
        time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    server.kill()
    server.wait()


def test_run_over_rpc_on_arm_board_is_bit_identical(arm_board, arm_artifacts, artifacts):
    ids, mask = random_inputs(np.random.default_rng(6), 3, 16, pads=[0, 7, 2])
    for kind in KINDS:
        with Runner(arm_artifacts["arm64-dotprod", kind], rpc=arm_board, rpc_timeout=QEMU_TIMEOUT) as r:
            remote = r.run_integer(ids, mask)
        want = reference.run(artifacts[kind].program, ids, mask)
        for name in artifacts[kind].program.outputs:
            np.testing.assert_array_equal(remote[name], want[name], err_msg=f"{kind} {name}")


def test_cli_run_over_rpc_matches_local_run(arm_board, arm_artifacts, artifacts, capsys):
    from ibert_tvm import cli

    texts = ["the film was good", "a dull plot"]
    assert cli.main(["run", str(arm_artifacts["arm64-neon", "IBertForSequenceClassification"]), *texts, "--json",
                     "--rpc", arm_board, "--rpc-timeout", str(QEMU_TIMEOUT)]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert cli.main(["run", str(artifacts["IBertForSequenceClassification"].path), *texts, "--json"]) == 0
    assert remote == json.loads(capsys.readouterr().out)


def test_rpc_server_that_is_down_or_silent_fails_clearly(artifact):
    with pytest.raises(ConnectionError, match=f"RPC server 127.0.0.1:{(port := free_port())} failed"):
        Runner(artifact.path, rpc=f"127.0.0.1:{port}")
    with socket.socket() as silent:  # accepts connections, never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        address = "127.0.0.1:%d" % silent.getsockname()[1]
        start = time.time()
        with pytest.raises(TimeoutError, match=f"RPC server {address} did not answer within 1 s"):
            Runner(artifact.path, rpc=address, rpc_timeout=1)
        assert time.time() - start < 10
    with pytest.raises(ValueError, match="HOST:PORT"):
        Runner(artifact.path, rpc="no-port")
