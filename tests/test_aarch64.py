"""ARM: libraries cross-compiled here run under qemu-user with the aarch64 TVM runtime alone, and
give the same bits as the x86 library and the integer reference. The sysroot comes from Debian's
and PyPI's servers: when they cannot be reached the tests fail under CI=true (a green CI means ARM
ran) and are skipped elsewhere with a warning (conftest.ci_setup_failed)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from aarch64 import run_aarch64, sysroot_python
from conftest import CALIB_TEXTS, KINDS, linear_past_l2, random_inputs, recompile

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


KERNEL_PROBE = r"""
import sys
import numpy as np
import tvm
library, inputs, out, shape = sys.argv[1:]
d = np.load(inputs)
result = tvm.runtime.tensor(np.zeros(tuple(map(int, shape.split(","))), np.int32))
tvm.runtime.load_module(library)["main"](*(tvm.runtime.tensor(d[f"arr_{i}"]) for i in range(len(d.files))), result)
np.save(out, result.numpy())
"""


@pytest.fixture(scope="session")
def arm_artifacts(artifacts, tmp_path_factory) -> dict[tuple[str, str], object]:
    """The session's tiny artifacts' programs, cross-compiled for each ARM preset."""
    sysroot_python()  # also installs the cross toolchain on a fresh machine
    return recompile(artifacts, tmp_path_factory.mktemp("arm"), [(p, k) for p in PRESETS for k in KINDS])


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


def test_arm_column_first_register_tiles_under_qemu(tmp_path):
    """sdot register tiles over a weight past L2_WEIGHT (column tiles outermost, in row groups; the
    model tests' weights are smaller), cross-compiled and run under qemu: exact."""
    sysroot_python()
    import tvm
    from tvm.support import cc

    from ibert_tvm import targets
    from ibert_tvm.schedules import cpu

    p = targets.get("arm64-dotprod")
    m = 32
    kern, x, want = linear_past_l2(p.a_shift, m, 3)
    n = kern.out_shape[1]
    isa = cpu.ISAS[p.isa]
    func = cpu.schedule(kern.func, isa)
    cols = cpu.default_tiles(m, n, isa)[1]
    assert f"T.parallel({n // (cols * 16) * cpu.ROW_GROUPS})" in func.script()  # column tiles outermost
    lib = tvm.compile(tvm.IRModule({"main": func}), targets.tvm_target(p))
    lib.export_library(str(tmp_path / "g.so"), fcompile=cc.cross_compiler(p.cross_compiler()))
    np.savez(tmp_path / "in.npz", x, *kern.consts)
    res = run_aarch64(KERNEL_PROBE, str(tmp_path / "g.so"), str(tmp_path / "in.npz"), str(tmp_path / "out.npy"),
                      f"{m},{n}", env={"TVM_USE_RUNTIME_LIB": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)


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


def arm_rpc_server(port: int, log: Path, *extra: str) -> subprocess.Popen:
    """`python -m tvm.exec.rpc_server` on aarch64 (qemu), with the TVM runtime alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.Popen(
        [str(sysroot_python()), "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
         "--port-end", str(port + 1), *extra],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**env, "TVM_USE_RUNTIME_LIB": "1"},
        start_new_session=True,  # its own process group: stop() also ends the workers it spawns
    )


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_until(ready, server: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + QEMU_TIMEOUT
    while not ready():
        assert server.poll() is None and time.time() < deadline, f"no RPC server:\n{log.read_text()[-2000:]}"
        time.sleep(0.5)


@pytest.fixture(scope="session")
def arm_board(tmp_path_factory):
    """HOST:PORT of an aarch64 RPC server."""
    port, log = free_port(), tmp_path_factory.mktemp("rpc") / "server.log"
    server = arm_rpc_server(port, log)
    wait_until(lambda: listening(port), server, log)  # it binds first, listens seconds later
    yield f"127.0.0.1:{port}"
    stop(server)


@pytest.fixture(scope="session")
def arm_farm(tmp_path_factory):
    """(HOST:PORT of an RPC tracker with one aarch64 board registered as "arm64", the board's log)."""
    from ibert_tvm import remote

    root = tmp_path_factory.mktemp("farm")
    port = free_port()
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                                "--port-end", str(port + 1)], stdout=(root / "tracker.log").open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    address = f"127.0.0.1:{port}"
    board = arm_rpc_server(free_port(), root / "board.log", "--tracker", address, "--key", "arm64")

    def registered() -> bool:
        try:
            remote.check_tracker(address, "arm64")
            return True
        except (ValueError, ConnectionError, TimeoutError):
            return False

    wait_until(registered, board, root / "board.log")
    yield address, root / "board.log"
    for proc in (board, tracker):
        stop(proc)


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


def test_tune_on_a_board_through_the_tracker(arm_farm, artifact, tmp_path, capsys):
    """MetaSchedule's RPC runner measures cross-compiled tile candidates on the farm's board."""
    tracker, board_log = arm_farm
    loaded = board_log.read_text().count("load_module")
    from ibert_tvm import cli
    from ibert_tvm.schedules import cpu, tuning
    from ibert_tvm.targets import PRESETS

    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(CALIB_TEXTS))
    argv = ["tune", "--model", str(artifact.checkpoint), "--target", "arm64-dotprod", "--batch", "2", "--seq-len", "16",
            "--calib-texts", str(texts), "--records", str(tmp_path / "rec"), "--rpc-tracker", tracker, "--key", "arm64",
            "--trials", "8"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert board_log.read_text().count("load_module") - loaded == 8  # every trial ran on the board
    records = tuning.load(PRESETS["arm64-dotprod"].target["mcpu"], tmp_path / "rec")
    assert {k.split(":")[0] for k in records} >= {"qkv", "inter", "ffn_out"}
    for k, tiles in records.items():
        m, n = map(int, k.split(":")[1].split("x")[-3:-1])
        assert tuple(tiles) in cpu.tile_candidates(m, n, cpu.ISAS["sdot"]), k


def test_tune_with_unknown_key_or_silent_tracker_fails_clearly(arm_farm, artifact, tmp_path, capsys):
    from ibert_tvm import cli

    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(CALIB_TEXTS))
    base = ["tune", "--model", str(artifact.checkpoint), "--target", "arm64-dotprod", "--seq-len", "16",
            "--calib-texts", str(texts), "--records", str(tmp_path / "rec")]
    assert cli.main([*base, "--rpc-tracker", arm_farm[0], "--key", "pi5"]) == 2
    assert "has no device with key 'pi5' (it has: arm64)" in capsys.readouterr().err
    assert cli.main([*base, "--rpc-tracker", f"127.0.0.1:{free_port()}", "--key", "arm64"]) == 2
    assert "RPC tracker 127.0.0.1:" in capsys.readouterr().err
    assert not (tmp_path / "rec").exists()
