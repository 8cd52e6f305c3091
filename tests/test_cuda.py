"""CUDA targets without a GPU: the compiled library embeds a device binary (SASS) for the asked
arch, GEMMs use dp4a, the CUDA schedules' loop nests compute the reference's integers (checked on
the CPU with thread bindings made serial), and the runner refuses the library on a machine without
a GPU, clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ALL_KINDS, CHOICES, KINDS, Spec, calibrated, random_inputs, recompile

from ibert_tvm import reference, targets

pytestmark = pytest.mark.slow
ARCHS = ("cuda-sm75", "cuda-sm80", "cuda-sm90")


@pytest.fixture(scope="session")
def cuda_artifacts(artifacts, tmp_path_factory):
    plan = [(p, k) for p in ARCHS for k in (KINDS if p == "cuda-sm75" else KINDS[:1])]
    return recompile(artifacts, tmp_path_factory.mktemp("cuda"), plan)


def test_library_holds_sass_for_its_arch_only(cuda_artifacts):
    from ibert_tvm.device_cuda import device_images

    for (preset, _), path in cuda_artifacts.items():
        images = device_images(path / "model.so")
        want = int(targets.get(preset).target["arch"].removeprefix("sm_"))
        assert images and {(i.kind, i.arch) for i in images} == {("elf", want)}, (preset, images)


def test_every_gemm_uses_dp4a(artifacts):
    from ibert_tvm.build import schedule_module
    from ibert_tvm.graph import build_graph

    preset = targets.get("cuda-sm75")
    mod = schedule_module(build_graph(artifacts["IBertModel"].program, 2, 16, preset.a_shift).module, preset)
    how = {gv.name_hint: str(f.attrs["ibert.cuda_schedule"]) for gv, f in mod.functions.items() if "ibert.kind" in f.attrs}
    gemms = [n for n, f in mod.functions.items() if "ibert.kind" in f.attrs and f.attrs["ibert.kind"] == "gemm"]
    assert gemms and all(how[g.name_hint] == "gemm-dp4a" for g in gemms), how
    assert how["l0_softmax"].startswith("rowwise") and how["l0_attn_ln"].startswith("rowwise")


def choices(program) -> int:
    return CHOICES if program.multiple_choice else 1


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_cuda_loop_nests_equal_reference_on_cpu(kind, monkeypatch):
    """The CUDA schedules with bind and tensorize made no-ops (threads run as serial loops, dp4a's
    4-element loop stays a loop), compiled for this CPU: the same integers as the reference.
    Barriers and TVM's cross-thread reduction lowering are only exercised on a GPU."""
    import tvm
    from tvm import relax, s_tir

    from ibert_tvm.build import schedule_module
    from ibert_tvm.graph import build_graph

    monkeypatch.setattr(s_tir.Schedule, "bind", lambda self, loop, thread: None)
    monkeypatch.setattr(s_tir.Schedule, "tensorize", lambda self, *a, **k: None)
    program = calibrated(kind, Spec())[1]
    graph = build_graph(program, 2, 16, targets.get("cuda-sm75").a_shift, choices=choices(program))
    mod = schedule_module(graph.module, targets.get("cuda-sm75"))
    ex = tvm.compile(mod, targets.tvm_target(targets.get("host")))
    rows = 2 * choices(program)
    ids, mask = random_inputs(np.random.default_rng(4), rows, 16, pads=[0, 6, 3, 0, 9, 1][:rows])
    ids, mask = (a.reshape(program.input_shape(2, 16, choices(program))) for a in (ids, mask))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    outs = vm["main"](*[tvm.runtime.tensor(a) for a in (ids, mask, np.zeros_like(ids))],
                      *[tvm.runtime.tensor(a) for _, a in graph.params])
    want = reference.run(program, ids, mask)
    for name, out in zip(program.outputs, outs):
        np.testing.assert_array_equal(out.numpy(), want[name], err_msg=name)


def test_multiple_choice_compiles_to_sass(tmp_path):
    """The one class with Relax reshapes around the encoder ([batch, choices, seq] in, [batch, choices] out)."""
    from ibert_tvm.build import compile_graph
    from ibert_tvm.device_cuda import check_device_binary
    from ibert_tvm.graph import build_graph

    preset = targets.get("cuda-sm75")
    program = calibrated("IBertForMultipleChoice", Spec())[1]
    executable = compile_graph(build_graph(program, 2, 16, preset.a_shift, choices=CHOICES), preset)
    preset.device_kind.export(executable, tmp_path / "mc.so", preset)
    assert check_device_binary(tmp_path / "mc.so", "sm_75")


def test_binary_check_refuses_cuda_source(tmp_path):
    """What the export step checks: CUDA source where a device binary was asked for is an error."""
    from ibert_tvm.device_cuda import check_device_binary

    (tmp_path / "src.so").write_bytes(b"\x7fELF extern \"C\" __global__ void k() {}")
    with pytest.raises(RuntimeError, match=r"no sm_75 cubin among \[\] \(it holds CUDA source"):
        check_device_binary(tmp_path / "src.so", "sm_75")


def gpu_present() -> bool:
    """The driver counts a GPU, asked in a fresh process: this one may hold the stub libcuda that
    compiling loads (it answers to the same soname and sees no device)."""
    probe = ("import ctypes, sys; cuda = ctypes.CDLL('libcuda.so.1'); n = ctypes.c_int(0); "
             "sys.exit(cuda.cuInit(0) or cuda.cuDeviceGetCount(ctypes.byref(n)) or n.value == 0)")
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False).returncode == 0


def test_runner_refuses_cuda_library_without_gpu(cuda_artifacts):
    from ibert_tvm.runner import Runner

    if gpu_present():
        pytest.skip("this machine has an NVIDIA GPU: the refusal is for machines without one")
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        Runner(cuda_artifacts["cuda-sm75", "IBertModel"])


def test_stub_libcuda_is_built_once_into_the_cache_and_fails_every_call(tmp_path, monkeypatch):
    """What lets a machine without a driver compile for CUDA (device_cuda.cuda_stub, no script outside
    the package): a libcuda.so.1 with every driver function TVM's libraries import, each failing."""
    import ctypes

    import tvm  # noqa: F401  (loads the runtime libraries)
    from tvm.base import _LOADED_LIBS

    from ibert_tvm.device_cuda import NO_DEVICE, cuda_stub

    monkeypatch.setenv("IBERT_TVM_CACHE", str(tmp_path))
    libdir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    lib = cuda_stub(libdir)
    assert lib == tmp_path / "cuda-stub" / "libcuda.so.1"  # built in the user's cache
    built = lib.stat().st_mtime_ns
    assert cuda_stub(libdir) == lib and lib.stat().st_mtime_ns == built  # reused while TVM's imports are the same

    def nm(*args: str) -> set[str]:
        out = subprocess.run(["nm", "-D", *args], capture_output=True, text=True, check=True).stdout
        return {line.split()[-1] for line in out.splitlines() if line.strip() and ":" not in line}

    needed = {s for s in nm("--undefined-only", str(libdir / "libtvm_runtime_cuda.so")) if s[:2] == "cu" and
              s[2:3].isupper()}
    assert needed and needed <= nm("--defined-only", str(lib))
    stub = ctypes.CDLL(str(lib))
    assert stub.cuInit(0) == NO_DEVICE
    text = ctypes.c_char_p()
    assert stub.cuGetErrorString(NO_DEVICE, ctypes.byref(text)) == 0 and b"stub" in text.value
