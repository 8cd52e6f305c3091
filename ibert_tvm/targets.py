"""Target presets: a name users type -> a TVM target, its device (schedules, toolchain, runtime:
`device.Device`), and what the machine that runs the library needs (architecture, CPU features)."""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .device import Device
from .device_cpu import CPU
from .device_cuda import CUDA

if TYPE_CHECKING:
    from .relay_ops.gemm import Shift

CROSS_PACKAGES = {"aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}  # compiler -> Debian package
ARM64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    target: dict[str, Any]
    arch: str  # platform.machine() of machines that can run the library
    cpu_flags: tuple[str, ...] = field(default=())  # CPU features the code needs (Linux names)
    isa: str | None = None  # schedules.cpu.ISAS key of the GEMM tiles (CPU targets)
    cross: str | None = None  # C++ compiler that links the library when built on another arch
    device_kind: Device = CPU

    @property
    def device(self) -> str:
        """The device's name, as manifests record it ("cpu", "cuda")."""
        return self.device_kind.name

    @property
    def a_shift(self) -> Shift:
        """How the GEMMs take activations (relay_ops.gemm): u8 (+128) or s8 (0), all alike or by shape."""
        return self.device_kind.a_shift(self)

    def cross_compiler(self) -> str | None:
        """The compiler that links the library here, or None for the native one; raises if missing."""
        if self.cross is None or platform.machine() == self.arch:
            return None
        if shutil.which(self.cross) is None:
            package = CROSS_PACKAGES.get(self.cross, self.cross)
            raise FileNotFoundError(f"target {self.name} needs the cross-compiler {self.cross}: apt-get install {package}")
        return self.cross


def _cuda(sm: int, boards: str) -> Preset:
    return Preset(f"cuda-sm{sm}", f"NVIDIA sm_{sm} ({boards}); x86-64 host", {"kind": "cuda", "arch": f"sm_{sm}"},
                  "x86_64", device_kind=CUDA)


AMX_FLAGS = ("amx_tile", "amx_int8")
PRESETS = {
    p.name: p
    for p in (
        Preset(
            "x86-amx",
            "x86-64 with AMX-INT8 (Sapphire Rapids and later Xeons): INT8 GEMMs on tile matrix multiplies "
            "(tdpbusd), vpdpbusd where a shape does not fill the tiles",
            {"kind": "llvm", "mcpu": "sapphirerapids"}, "x86_64", ("avx512f", "avx512bw", "avx512_vnni", *AMX_FLAGS),
            "amx",
        ),
        Preset(
            "x86-avx512-vnni",
            "x86-64 with AVX-512 VNNI (Cascade Lake and later Xeons, Ice Lake+, Zen 4+): INT8 GEMMs on vpdpbusd",
            {"kind": "llvm", "mcpu": "cascadelake"}, "x86_64", ("avx512f", "avx512bw", "avx512_vnni"), "vnni",
        ),
        Preset(
            "x86-avx2",
            "x86-64 with AVX2 only (Haswell and later, Zen 1-3): vectorized INT8 GEMMs without VNNI",
            {"kind": "llvm", "mcpu": "haswell"}, "x86_64", ("avx2", "fma"), "avx2",
        ),
        Preset(
            "arm64-dotprod",
            "AArch64 with the dot-product extension (Cortex-A76/A78, Neoverse: Raspberry Pi 5, Jetson Orin CPU, "
            "Graviton 2/3): INT8 GEMMs on sdot",
            {**ARM64, "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"]}, "aarch64", ("asimd", "asimddp"), "sdot",
            "aarch64-linux-gnu-g++",
        ),
        Preset(
            "arm64-neon",
            "AArch64 NEON without dot product (Cortex-A72/A53: Raspberry Pi 4): INT8 GEMMs by widening multiplies",
            {**ARM64, "mcpu": "cortex-a72", "mattr": ["+neon"]}, "aarch64", ("asimd",), "neon", "aarch64-linux-gnu-g++",
        ),
        _cuda(75, "T4, RTX 20xx"),
        _cuda(80, "A100, RTX 30xx"),
        _cuda(90, "H100, H200"),
    )
}
ALIASES = {"x86": "host"}
# manifest target.device -> its device: every kind some preset builds for
DEVICE_KINDS = {p.device: p.device_kind for p in PRESETS.values()}
# Linux arm64 AT_HWCAP bits of the features the presets name
HWCAP_BITS = {"asimd": 1 << 1, "asimddp": 1 << 20}


def host_preset() -> Preset:
    """The machine this runs on: LLVM's name for its CPU, the best GEMM tiles it has."""
    from tvm.target import codegen

    cpu, arch, flags = codegen.llvm_get_system_cpu(), platform.machine(), cpu_flags()
    if arch == "aarch64":
        isa = "sdot" if "asimddp" in flags else "neon"
        target = {**ARM64, "mcpu": cpu, "mattr": ["+neon", "+dotprod"] if isa == "sdot" else ["+neon"]}
        needs = ("asimd", "asimddp") if isa == "sdot" else ("asimd",)
    else:
        amx = "avx512_vnni" in flags and set(AMX_FLAGS) <= flags and amx_permitted()
        isa = "amx" if amx else "vnni" if "avx512_vnni" in flags else "avx2"
        # a virtual machine may report an older CPU model than the features it passes through
        target = {"kind": "llvm", "mcpu": cpu, **({"mattr": ["+amx-tile", "+amx-int8"]} if amx else {})}
        needs = tuple(sorted(flags & {"avx512f", "avx512bw", "avx512_vnni", "avx2", "fma", *AMX_FLAGS}))
    return Preset("host", f"this machine ({cpu})", target, arch, needs, isa)


def get(name: str) -> Preset:
    name = ALIASES.get(name, name)
    if name == "host":
        return host_preset()
    if name not in PRESETS:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(known())}")
    return PRESETS[name]


def known() -> list[str]:
    return ["host", *ALIASES, *PRESETS]


def tvm_target(p: Preset, threads: int | None = None) -> "tvm.target.Target":  # noqa: F821
    return p.device_kind.tvm_target(p, threads)


def cpu_flags() -> set[str]:
    if platform.machine() == "aarch64":
        # the auxiliary vector, not /proc/cpuinfo: under qemu-user that file is the host's
        import ctypes

        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype = ctypes.c_ulong
        hwcap = getauxval(16)  # AT_HWCAP
        return {name for name, bit in HWCAP_BITS.items() if hwcap & bit}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def amx_permitted() -> bool:
    """Ask Linux for this process's permission to use the AMX tile data (>= 5.16; without it the
    first tile instruction kills the process). Granted once, it holds for every thread."""
    import ctypes

    arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18
    return platform.machine() == "x86_64" and ctypes.CDLL(None).syscall(arch_prctl, req_xcomp_perm, xtiledata) == 0


def check_runnable(arch: str, flags: list[str]) -> None:
    """Raise if a library built for (arch, flags) cannot run on this machine (and obtain what it
    needs from the OS: AMX tiles)."""
    here = platform.machine()
    if arch != here:
        raise RuntimeError(f"artifact was compiled for {arch}, this machine is {here}")
    missing = sorted(set(flags) - cpu_flags())
    if missing:
        raise RuntimeError(f"artifact needs CPU features this machine lacks: {', '.join(missing)}")
    if set(AMX_FLAGS) <= set(flags) and not amx_permitted():
        raise RuntimeError("artifact uses AMX tiles and Linux refused their permission (arch_prctl "
                           "ARCH_REQ_XCOMP_PERM; a kernel >= 5.16 grants it)")
