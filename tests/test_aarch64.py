"""ARM: libraries cross-compiled here run under qemu-user with the aarch64 TVM runtime alone, and
give the same bits as the x86 library and the integer reference."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from aarch64 import run_aarch64, sysroot_python
from conftest import KINDS, random_inputs

from ibert_tvm import reference
from ibert_tvm.runner import Runner

pytestmark = pytest.mark.slow
PRESETS = ("arm64-dotprod", "arm64-neon")

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
