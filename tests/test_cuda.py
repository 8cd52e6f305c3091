"""CUDA targets without a GPU: the compiled library embeds a device binary (SASS) for the asked
arch, GEMMs run on tensor cores (IMMA in the SASS) where their shapes fit and on dp4a elsewhere,
the CUDA schedules' loop nests compute the reference's integers (checked on the CPU with thread
bindings made serial and the warp instructions emulated lane by lane, `cuda_emulation`), and the
runner refuses the library on a machine without a GPU, clearly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import ALL_KINDS, CHOICES, KINDS, Spec, calibrated, ci_setup_failed, random_inputs, recompile

from ibert_tvm import reference, targets

pytestmark = pytest.mark.slow
ARCHS = ("cuda-sm75", "cuda-sm80", "cuda-sm90")
# each arch's mma.sync shape and the SASS instruction it becomes
MMA = {"cuda-sm75": ("m8n8k16", "IMMA.8816.S8.S8"), "cuda-sm80": ("m16n8k32", "IMMA.16832.S8.S8"),
       "cuda-sm90": ("m16n8k32", "IMMA.16832.S8.S8")}
# head size 32 and 32 tokens: attention's products fill the 16 x 16 x 32 warp tiles too (Spec()'s
# 16-wide heads do not, and stay on dp4a, like the heads whose M is the batch)
MMA_SPEC, MMA_SEQ = Spec(hidden=64, heads=2, inter=128), 32
LINEAR_GEMMS = ("l0_qkv", "l0_attn_out", "l0_inter", "l0_ffn_out")
ATTENTION_GEMMS = ("l0_scores", "l0_context")


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


def choices(program) -> int:
    return CHOICES if program.multiple_choice else 1


def scheduled(program, preset: str, seq: int):
    """(graph, its module with the preset's schedules) for batch 2 x seq."""
    from ibert_tvm.build import schedule_module
    from ibert_tvm.graph import build_graph

    p = targets.get(preset)
    graph = build_graph(program, 2, seq, p.a_shift, choices=choices(program))
    return graph, schedule_module(graph.module, p)


def kernel_schedules(mod) -> dict[str, str]:
    """Each kernel's CUDA schedule ("ibert.cuda_schedule"), by kernel name."""
    return {gv.name_hint: str(f.attrs["ibert.cuda_schedule"]) for gv, f in mod.functions.items()
            if "ibert.kind" in f.attrs}


@pytest.mark.parametrize("preset", ARCHS[:2])
def test_gemms_use_tensor_cores_where_the_fragments_fit(preset):
    """Every linear layer and both attention products on mma.sync of the arch's shape; dp4a for
    the pooler (M = batch) and for 16-wide attention heads (K = 16 < 32)."""
    mma = f"gemm-mma-{MMA[preset][0]}"
    gemms = LINEAR_GEMMS + ATTENTION_GEMMS + ("pooler",)
    how = kernel_schedules(scheduled(calibrated("IBertModel", MMA_SPEC)[1], preset, MMA_SEQ)[1])
    assert {g: how[g] for g in gemms} == {**dict.fromkeys(gemms[:-1], mma), "pooler": "gemm-dp4a"}, how
    assert how["l0_softmax"].startswith("rowwise") and how["l0_attn_ln"].startswith("rowwise")
    how = kernel_schedules(scheduled(calibrated("IBertModel", Spec())[1], preset, 16)[1])
    assert {g: how[g] for g in gemms} == {**dict.fromkeys(LINEAR_GEMMS, mma),
                                          **dict.fromkeys(ATTENTION_GEMMS + ("pooler",), "gemm-dp4a")}, how


@pytest.fixture
def emulated_warps(monkeypatch):
    """The CUDA schedules made runnable on the CPU: thread bindings serial, the tensor-core
    intrinsics replaced by their lane-by-lane emulation, dp4a's 4-element loop left a loop."""
    from cuda_emulation import emulated
    from tvm import s_tir

    from ibert_tvm.schedules import cuda

    tensorize = s_tir.Schedule.tensorize
    dp4a = set(cuda.DP4A.values())
    monkeypatch.setattr(s_tir.Schedule, "bind", lambda self, loop, thread: None)
    monkeypatch.setattr(s_tir.Schedule, "tensorize", lambda self, loop, name, *a, **k:
                        None if name in dp4a else tensorize(self, loop, emulated(name), *a, **k))


@pytest.mark.parametrize("kind, spec, seq, preset", [
    *(pytest.param(k, Spec(), 16, "cuda-sm75", id=f"{k}-sm75") for k in ALL_KINDS),
    *(pytest.param("IBertModel", MMA_SPEC, MMA_SEQ, p, id=f"IBertModel-32-wide-heads-{p[5:]}") for p in ARCHS[:2]),
])
def test_cuda_loop_nests_equal_reference_on_cpu(kind, spec, seq, preset, emulated_warps):
    """The CUDA schedules compiled for this CPU (`emulated_warps`): the same integers as the
    reference. Barriers, warp-buffer lowering and TVM's cross-thread reduction lowering are only
    exercised on a GPU."""
    import tvm
    from tvm import relax

    program = calibrated(kind, spec)[1]
    graph, mod = scheduled(program, preset, seq)
    how = kernel_schedules(mod)
    assert all(how[g].startswith("gemm-mma") for g in LINEAR_GEMMS + (ATTENTION_GEMMS if spec == MMA_SPEC else ())), how
    rows = 2 * choices(program)
    ids, mask = random_inputs(np.random.default_rng(4), rows, seq, pads=[0, 6, 3, 0, 9, 1][:rows])
    ids, mask = (a.reshape(program.input_shape(2, seq, choices(program))) for a in (ids, mask))
    vm = relax.VirtualMachine(tvm.compile(mod, targets.tvm_target(targets.get("host"))), tvm.cpu())
    outs = vm["main"](*[tvm.runtime.tensor(a) for a in (ids, mask, np.zeros_like(ids))],
                      *[tvm.runtime.tensor(a) for _, a in graph.params])
    want = reference.run(program, ids, mask)
    for name, out in zip(program.outputs, outs):
        np.testing.assert_array_equal(out.numpy(), want[name], err_msg=name)


def gemm_on_cpu(preset: str, m: int, n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One GEMM kernel (bias, shift) through the CUDA schedule on the CPU, and the NumPy result."""
    import tvm
    from tvm import te

    from ibert_tvm.device_cuda import sm_version
    from ibert_tvm.relay_ops.common import Consts, make_kernel
    from ibert_tvm.relay_ops.gemm import int8_matmul, pack_weight
    from ibert_tvm.schedules import cuda

    w, x = (rng.integers(-128, 128, shape).astype(np.int8) for shape in ((n, k), (m, k)))
    bias = rng.integers(-1000, 1000, n).astype(np.int32)
    consts = Consts("t")
    wt, bt = consts.add(pack_weight(w), "w"), consts.add(bias, "b")
    xt = te.placeholder((m, k), "int8", name="x")
    out = int8_matmul((), m, n, k, lambda i, kk: xt[i, kk], wt, True, lambda acc, i, j: (acc + bt[j]) >> 3, "int32", 0)
    arch = sm_version(targets.get(preset).target["arch"])
    func = cuda.schedule(make_kernel("t", "gemm", [xt], out, consts).func, arch)
    assert str(func.attrs["ibert.cuda_schedule"]).startswith("gemm-mma")
    got = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    tvm.compile(tvm.IRModule({"main": func}), target="llvm")["main"](
        *(tvm.runtime.tensor(a) for a in (x, pack_weight(w), bias)), got)
    return got.numpy(), (x.astype(np.int64) @ w.T.astype(np.int64) + bias) >> 3


def b_in_a_order(real):
    """B's fragments in A's register order (what TVM's own int8 fragment maps say of B)."""
    return lambda row, k, rows_first: real(row, k, True)


def acc_lanes_transposed(real):
    """The accumulator's rows spread over consecutive lanes, where PTX puts its columns."""
    return lambda i, j: (i % 8 + 8 * (j % 8 // 2), real(i, j)[1])


@pytest.mark.parametrize("preset", ARCHS[:2])
@pytest.mark.parametrize("name, mutation", [("operand_fragment", b_in_a_order), ("acc_fragment", acc_lanes_transposed)])
def test_emulation_catches_a_wrong_fragment_layout(preset, name, mutation, emulated_warps):
    """The emulation checks the layouts, not only the arithmetic: with a fragment map that is
    consistent within the schedule (its intrinsics re-registered from it) but not what the
    hardware does, the integers are wrong."""
    from ibert_tvm.schedules import mma

    got, want = gemm_on_cpu(preset, 32, 48, 64, np.random.default_rng(1))
    np.testing.assert_array_equal(got, want)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mma, name, mutation(getattr(mma, name)))
        mma.register_intrinsics()
        try:
            got, want = gemm_on_cpu(preset, 32, 48, 64, np.random.default_rng(1))
        finally:
            mp.undo()
            mma.register_intrinsics()
    assert not np.array_equal(got, want)


def cuda_tools() -> Path:
    """The folder of cuobjdump and the nvdisasm it calls (PyPI's nvidia-cuda-cuobjdump and
    nvidia-cuda-nvdisasm, the test extra)."""
    from importlib import metadata

    try:
        bins = {f.name: Path(f.locate()) for d in ("nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm")
                for f in metadata.files(d) or () if f.parent.name == "bin"}
    except metadata.PackageNotFoundError as err:
        ci_setup_failed(f"reading SASS needs `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`: {err}")
    assert {"cuobjdump", "nvdisasm"} <= bins.keys() and bins["cuobjdump"].parent == bins["nvdisasm"].parent, bins
    return bins["cuobjdump"].parent


def sass_opcodes(library: Path, tmp_path: Path) -> dict[str, Counter]:
    """Each kernel's SASS instructions (opcode with its modifiers -> count), from cuobjdump on every
    fatbin embedded in the library."""
    from ibert_tvm.device_cuda import fatbins

    tools = cuda_tools()
    kernels: dict[str, Counter] = {}
    for i, fatbin in enumerate(fatbins(library)):
        (tmp_path / f"{i}.fatbin").write_bytes(fatbin)
        env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}"}  # cuobjdump runs nvdisasm
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(tmp_path / f"{i}.fatbin")], capture_output=True,
                              text=True, check=True, env=env)
        for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass.stdout, re.S):
            kernels[name] = Counter(re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", body, re.M))
    return kernels


@pytest.mark.parametrize("preset", ARCHS)
def test_sass_of_every_encoder_gemm_has_tensor_core_instructions(preset, tmp_path):
    """The library's SASS: each linear layer's and attention product's GEMM kernel runs the arch's
    IMMA (and ldmatrix: LDSM), keeps its fragments in registers (no local memory: LDL / STL);
    the pooler (M = batch) runs dp4a (IDP.4A)."""
    from ibert_tvm.build import compile_graph
    from ibert_tvm.graph import build_graph

    p = targets.get(preset)
    executable = compile_graph(build_graph(calibrated("IBertModel", MMA_SPEC)[1], 2, MMA_SEQ, p.a_shift), p)
    p.device_kind.export(executable, tmp_path / "model.so", p)
    kernels = sass_opcodes(tmp_path / "model.so", tmp_path)

    def gemm_kernel(name: str) -> Counter:
        """The kernel of a GEMM function that does the product (column sums may come first)."""
        ops = [c for k, c in kernels.items() if re.fullmatch(rf"{name}_kernel(_\d+)?", k) and
               any(op.startswith(("IMMA", "IDP")) for op in c)]
        assert len(ops) == 1, (name, sorted(kernels))
        return ops[0]

    for name in LINEAR_GEMMS + ATTENTION_GEMMS:
        ops = gemm_kernel(name)
        assert {op for op in ops if op.startswith("IMMA")} == {MMA[preset][1]} and ops["LDSM.16.M88.4"], (name, ops)
        assert not any(op.startswith(("LDL", "STL", "IDP")) for op in ops), (name, ops)
    assert gemm_kernel("pooler")["IDP.4A.S8.S8"] and not any(op.startswith("IMMA") for op in gemm_kernel("pooler"))


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
