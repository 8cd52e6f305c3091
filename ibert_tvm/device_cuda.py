"""NVIDIA GPUs through CUDA: thread-block schedules (`schedules.cuda`), SASS from nvcc embedded
in the library (checked), the GPU that runs it.

Compiling works on a machine without a GPU. TVM embeds a device binary (an nvcc fatbin) only when
libtvm_runtime_cuda.so is loaded: it registers ffi.Module.create.cuda, which calls nvcc. Without
it a CUDA export silently holds CUDA source. That library needs the driver's libcuda.so.1; where
none is installed, a stub (scripts/cuda_stub.sh: every call returns CUDA_ERROR_NO_DEVICE) is
loaded by absolute path first, and the loader then resolves the NEEDED entry by its soname: no
LD_LIBRARY_PATH, no re-exec.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .device import Device, KernelSchedule, tvm_compile

if TYPE_CHECKING:
    import tvm
    from tvm import relax

    from .manifest import Target
    from .targets import Preset

REPO = Path(__file__).resolve().parent.parent


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
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)  # a real driver
    except OSError:
        if not allow_stub:
            raise RuntimeError("this CUDA library needs an NVIDIA GPU; this machine has no CUDA driver") from None
        stub_dir = subprocess.run([str(REPO / "scripts" / "cuda_stub.sh")], check=True, capture_output=True, text=True,
                                  env={**os.environ, "PYTHON": sys.executable}).stdout.strip()
        ctypes.CDLL(str(Path(stub_dir) / "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(runtime_dir / "libtvm_runtime_cuda.so"), mode=ctypes.RTLD_LOCAL)
    if tvm.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise RuntimeError("libtvm_runtime_cuda.so loaded but registered no CUDA module factory")


def gpu_for(arch: str) -> tvm.runtime.Device:
    """The GPU that runs a library built for `arch` ("sm_75"), or an error that says why none does.
    nvcc embeds SASS only (no PTX), which runs on the same major version at an equal or newer minor."""
    from tvm import runtime

    load_cuda_runtime(allow_stub=False)
    dev = runtime.cuda(0)
    if not dev.exist:
        raise RuntimeError(f"this CUDA library ({arch}) needs an NVIDIA GPU; the driver sees none")
    major, minor = (int(v) for v in dev.compute_version.split("."))
    want = int(arch.removeprefix("sm_"))
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


def device_images(path: str | os.PathLike) -> list[DeviceImage]:
    """Every image of every fatbin embedded in a file (an exported library).

    Fatbin layout: header {u32 magic, u16 version, u16 header size, u64 payload size}, then
    entries {u16 kind (1 PTX, 2 ELF), u16, u32 entry header size, u64 size, ..., u32 arch @28}.
    """
    data = Path(path).read_bytes()
    images = []
    at = data.find(struct.pack("<I", FATBIN_MAGIC))
    while at >= 0:
        _, _, head, size = struct.unpack_from("<IHHQ", data, at)
        entry, end = at + head, at + head + size
        while entry + 32 <= min(end, len(data)):
            kind, _, ehead, esize = struct.unpack_from("<HHIQ", data, entry)
            (arch,) = struct.unpack_from("<I", data, entry + 28)
            payload = data[entry + ehead : entry + ehead + 4]
            if kind in (1, 2):
                images.append(DeviceImage("ptx" if kind == 1 else "elf", arch,
                                          compressed=kind == 2 and payload != ELF_MAGIC))
            if ehead == 0:
                break
            entry += ehead + esize
        at = data.find(struct.pack("<I", FATBIN_MAGIC), max(end, at + 4))
    return images


def check_device_binary(path: str | os.PathLike, arch: str) -> list[DeviceImage]:
    """Raise unless the library embeds SASS for `arch` ("sm_75"); CUDA source alone does not count."""
    want = int(arch.removeprefix("sm_").rstrip("a"))
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
    """One schedule for every GPU: nothing is tuned, so records do not apply."""
    from ibert_tvm.schedules import cuda

    return lambda func, name: cuda.schedule(func)


def _compile(mod: tvm.IRModule, target: tvm.target.Target) -> relax.VMExecutable:
    ensure_cuda_codegen()
    return tvm_compile(mod, target)


def _export(executable: relax.VMExecutable, path: Path, preset: Preset) -> None:
    """Linked by the native compiler; never ships CUDA source where a device binary was asked for."""
    executable.export_library(str(path))
    check_device_binary(path, preset.target["arch"])


def _runtime_device(target: Target) -> tvm.runtime.Device:
    return gpu_for(target.tvm["arch"])


# dp4a takes s8 x s8: activations unshifted
CUDA = Device("cuda", tunable=False, a_shift=lambda preset: 0, tvm_target=_tvm_target, scheduler=_scheduler,
              compile=_compile, export=_export, runtime_device=_runtime_device)
