"""NVIDIA GPUs through CUDA: thread-block schedules (`schedules.cuda`), SASS from nvcc embedded
in the library (checked), the GPU that runs it.

Compiling works on a machine without a GPU. TVM embeds a device binary (an nvcc fatbin) only when
libtvm_runtime_cuda.so is loaded: it registers ffi.Module.create.cuda, which calls nvcc. Without
it a CUDA export silently holds CUDA source. That library needs the driver's libcuda.so.1; where
none is installed, a stub (`cuda_stub`: every call returns CUDA_ERROR_NO_DEVICE, built once with
gcc into the user's cache) is loaded by absolute path first, and the loader then resolves the
NEEDED entry by its soname: no LD_LIBRARY_PATH, no re-exec. Never put the stub on the library path
of a machine with a real driver: it would shadow it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .device import Device, KernelSchedule, tvm_compile
from .files import atomic_file, cache_dir, write_atomic

if TYPE_CHECKING:
    import tvm
    from tvm import relax

    from .manifest import Target
    from .targets import Preset

log = logging.getLogger(__name__)

# cudart dlopens libcuda.so.1 and asks for these: the stub has them so that it fails with an error
# rather than a missing-symbol abort
CUDART_ENTRY_POINTS = ("cuInit", "cuDriverGetVersion", "cuGetProcAddress", "cuGetProcAddress_v2", "cuGetExportTable")
NO_DEVICE = 100  # CUDA_ERROR_NO_DEVICE


def ensure_cuda_codegen() -> None:
    """Make `tvm.compile` for CUDA embed an nvcc fatbin, in this process, with or without a driver."""
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")  # the default NVRTC needs cuda-bindings
    cuda_path = os.environ.setdefault("CUDA_PATH", "/usr/local/cuda")
    if shutil.which("nvcc") is None:  # tvm runs plain "nvcc"
        os.environ["PATH"] = f"{cuda_path}/bin{os.pathsep}{os.environ.get('PATH', '')}"
    if shutil.which("nvcc") is None:
        raise FileNotFoundError(f"CUDA targets need nvcc from the CUDA toolkit: not on PATH nor in {cuda_path}/bin")
    load_cuda_runtime(allow_stub=True)


def load_cuda_runtime(allow_stub: bool) -> None:
    """Load libtvm_runtime_cuda.so (CUDA modules and devices), on the real driver if there is one."""
    import tvm
    from tvm.base import _LOADED_LIBS

    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)  # a real driver
    except OSError:
        if not allow_stub:
            raise RuntimeError("this CUDA library needs an NVIDIA GPU; this machine has no CUDA driver") from None
        ctypes.CDLL(str(cuda_stub(runtime_dir)), mode=ctypes.RTLD_GLOBAL)
    _load_cudart(runtime_dir / "libtvm_runtime_cuda.so")
    _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(runtime_dir / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_LOCAL)
    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise RuntimeError("libtvm_runtime_cuda.so loaded but registered no CUDA module factory")


def _load_cudart(tvm_cuda: Path) -> None:
    """Load the CUDA runtime that `tvm_cuda` needs (libcudart.so.N) where the dynamic loader would not
    find it: a CUDA toolkit whose lib folder is not on the loader's path, or the copy that PyTorch's
    pip packages bring (nvidia/*/lib). Once loaded under its soname, it satisfies `tvm_cuda`'s need."""
    found = re.search(rb"libcudart\.so\.\d+", tvm_cuda.read_bytes())
    if found is None:
        return
    name = found[0].decode()
    cuda = os.environ.get("CUDA_PATH", "/usr/local/cuda")
    places = [Path(name), *(Path(cuda, d, name) for d in ("lib64", "lib", "targets/x86_64-linux/lib"))]
    places += [p for entry in sys.path if entry for p in sorted(Path(entry).glob(f"nvidia/*/lib/{name}"))]
    for place in places:
        try:
            ctypes.CDLL(str(place), mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


def _driver_symbols(libdir: Path) -> set[str]:
    """Driver functions (cu[A-Z]*) that the TVM libraries in `libdir` import; cudart's own (cuda*)
    are versioned and resolved by the real libcudart."""
    try:
        out = subprocess.run(["nm", "-D", "--undefined-only", *map(str, sorted(libdir.glob("*.so")))],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f"listing the CUDA driver functions TVM imports needs binutils' nm: {err}") from None
    return {m[1] for m in re.finditer(r"^\s*U (cu[A-Z]\w*)$", out, re.MULTILINE)}


def _stub_source(symbols: list[str]) -> str:
    lines = ["/* ibert-tvm's stub libcuda (device_cuda.cuda_stub): no device, every call fails */"]
    for s in symbols:
        if s in ("cuGetErrorName", "cuGetErrorString"):  # called on the failure path, their output read
            lines.append(f"int {s}(int e, const char **p) {{ (void)e; "
                         f'if (p) *p = "CUDA_ERROR_NO_DEVICE (ibert-tvm stub libcuda)"; return 0; }}')
        else:
            lines.append(f"int {s}(void) {{ return {NO_DEVICE}; }}")
    return "\n".join(lines) + "\n"


def cuda_stub(libdir: Path) -> Path:
    """A stub libcuda.so.1 that satisfies the loader of the TVM libraries in `libdir`: it defines the
    driver functions they import and every one returns CUDA_ERROR_NO_DEVICE, so nothing runs on it,
    but compiling and exporting do not need the driver. Built with gcc into the user's cache, again
    only when the function list changes (a TVM upgrade); returns the library's path."""
    symbols = sorted(_driver_symbols(libdir) | set(CUDART_ENTRY_POINTS))
    folder = cache_dir() / "cuda-stub"
    lib, listed = folder / "libcuda.so.1", folder / "symbols.txt"
    if lib.exists() and listed.exists() and set(listed.read_text().split()) == set(symbols):
        return lib

    def build(tmp: Path) -> None:
        cmd = ["gcc", "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-x", "c", "-", "-o", str(tmp)]
        try:
            subprocess.run(cmd, input=_stub_source(symbols), capture_output=True, text=True, check=True)
        except OSError as err:
            raise RuntimeError(f"compiling for CUDA without a driver builds a stub libcuda with gcc: {err}") from None
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"building the stub libcuda failed:\n{err.stderr[-2000:]}") from None

    atomic_file(lib, build)
    write_atomic(listed, "\n".join(symbols) + "\n")
    log.info("no CUDA driver here: built a stub libcuda (%d functions) in %s", len(symbols), folder)
    return lib


def sm_version(arch: str) -> int:
    """The SM version of an arch name: 75 for "sm_75" (and 90 for "sm_90a")."""
    return int(arch.removeprefix("sm_").rstrip("a"))


def gpu_for(arch: str) -> tvm.runtime.Device:
    """The GPU that runs a library built for `arch` ("sm_75"), or an error that says why none does.
    nvcc embeds SASS only (no PTX), which runs on the same major version at an equal or newer minor."""
    from tvm import runtime

    load_cuda_runtime(allow_stub=False)
    dev = runtime.cuda(0)
    if not dev.exist:
        raise RuntimeError(f"this CUDA library ({arch}) needs an NVIDIA GPU; the driver sees none")
    major, minor = (int(v) for v in dev.compute_version.split("."))
    want = sm_version(arch)
    if major != want // 10 or minor < want % 10:
        raise RuntimeError(f"this CUDA library holds {arch} code only; the GPU is sm_{major}{minor}")
    return dev


FATBIN_MAGIC = 0xBA55ED50
ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class DeviceImage:
    kind: str  # "elf" (SASS cubin) or "ptx"
    arch: int  # e.g. 75
    compressed: bool


def fatbins(path: str | os.PathLike) -> list[bytes]:
    """Every nvcc fatbin embedded in a file (an exported library: TVM keeps it inside its own
    serialized module, where cuobjdump does not look), each as a file of its own would hold it.
    Header: {u32 magic, u16 version, u16 header size, u64 payload size}."""
    data = Path(path).read_bytes()
    found = []
    at = data.find(struct.pack("<I", FATBIN_MAGIC))
    while at >= 0:
        _, _, head, size = struct.unpack_from("<IHHQ", data, at)
        found.append(data[at : at + head + size])
        at = data.find(struct.pack("<I", FATBIN_MAGIC), max(at + head + size, at + 4))
    return found


def device_images(path: str | os.PathLike) -> list[DeviceImage]:
    """Every image of every fatbin embedded in a file (an exported library). Fatbin entries:
    {u16 kind (1 PTX, 2 ELF), u16, u32 entry header size, u64 size, ..., u32 arch @28}."""
    images = []
    for fatbin in fatbins(path):
        _, _, head, _ = struct.unpack_from("<IHHQ", fatbin)
        entry = head
        while entry + 32 <= len(fatbin):
            kind, _, ehead, esize = struct.unpack_from("<HHIQ", fatbin, entry)
            (arch,) = struct.unpack_from("<I", fatbin, entry + 28)
            payload = fatbin[entry + ehead : entry + ehead + 4]
            if kind in (1, 2):
                images.append(DeviceImage("ptx" if kind == 1 else "elf", arch,
                                          compressed=kind == 2 and payload != ELF_MAGIC))
            if ehead == 0:
                break
            entry += ehead + esize
    return images


def check_device_binary(path: str | os.PathLike, arch: str) -> list[DeviceImage]:
    """Raise unless the library embeds SASS for `arch` ("sm_75"); CUDA source alone does not count."""
    want = sm_version(arch)
    images = device_images(path)
    if not any(i.kind == "elf" and i.arch == want for i in images):
        hint = " (it holds CUDA source: was libtvm_runtime_cuda loaded?)" if b"__global__" in Path(path).read_bytes() else ""
        raise RuntimeError(f"{path}: no {arch} cubin among {images}{hint}")
    return images


def _tvm_target(preset: Preset, threads: int | None) -> tvm.target.Target:
    """The GPU's thread counts are the schedules' own; the host side (the VM) is plain LLVM."""
    import tvm

    return tvm.target.Target(preset.target, host={"kind": "llvm"})


def _scheduler(preset: Preset, records: Path) -> KernelSchedule:
    """One schedule per GPU arch (its tensor-core instructions): nothing is tuned, so records do not apply."""
    from ibert_tvm.schedules import cuda

    arch = sm_version(preset.target["arch"])
    return lambda func, name: cuda.schedule(func, arch)


TIR_PIPELINE = "ibert_cuda"
MAX_WARP_BUFFERS = 8  # per kernel; the tensor-core GEMMs have 3 (A, B and C fragments)


def _register_tir_pipeline() -> None:
    """TVM's s_tir pipeline, fixed for kernels with several "warp" buffers (the tensor-core
    fragments of `schedules.mma`): LowerWarpMemory turns only the first warp allocation of a
    statement sequence into registers (the others would stay per-thread copies of the whole warp's
    buffer, in local memory), so it runs until none is left."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    if TIR_PIPELINE in tirx.compilation_pipeline.PIPELINE_MAP:
        return

    @tvm.transform.module_pass(opt_level=0, name="ibert.LowerEveryWarpMemory")
    def lower_every_warp_buffer(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        lower = tirx.transform.LowerWarpMemory()
        for _ in range(MAX_WARP_BUFFERS):
            lowered = lower(mod)
            if tvm_ffi.structural_equal(lowered, mod):
                return mod
            mod = lowered
        raise RuntimeError(f"a CUDA kernel has more than {MAX_WARP_BUFFERS} warp buffers")

    def pipeline() -> tuple:
        passes, host, device = tirx.get_tir_pipeline("s_tir")
        return passes, host, lambda: tvm.transform.Sequential([lower_every_warp_buffer, device()])

    tirx.register_tir_pipeline(TIR_PIPELINE, pipeline)


def _compile(mod: tvm.IRModule, target: tvm.target.Target) -> relax.VMExecutable:
    """tvm.compile through `TIR_PIPELINE`, without TIR's common-subexpression elimination: it
    hoists warp-buffer indices into variables, which LowerWarpMemory (after it) cannot split into
    lane and register (nvcc eliminates common subexpressions itself)."""
    import tvm

    ensure_cuda_codegen()
    _register_tir_pipeline()
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        return tvm_compile(mod, target, TIR_PIPELINE)


def _export(executable: relax.VMExecutable, path: Path, preset: Preset) -> None:
    """Linked by the native compiler; never ships CUDA source where a device binary was asked for."""
    executable.export_library(str(path))
    check_device_binary(path, preset.target["arch"])


def _runtime_device(target: Target) -> tvm.runtime.Device:
    return gpu_for(target.tvm["arch"])


# dp4a takes s8 x s8: activations unshifted
# attention stays three kernels: the MMA schedules take one product and no row-wise stages
CUDA = Device("cuda", tunable=False, a_shift=lambda preset: 0, fused_attention=False, tvm_target=_tvm_target,
              scheduler=_scheduler, compile=_compile, export=_export, runtime_device=_runtime_device)
