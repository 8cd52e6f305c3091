"""Target presets: a name users type -> a TVM target and the CPU features the library needs."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    target: dict[str, Any]
    arch: str  # platform.machine() of machines that can run the library
    cpu_flags: tuple[str, ...] = field(default=())  # /proc/cpuinfo flags the code needs


PRESETS = {
    p.name: p
    for p in (
        Preset(
            "x86-avx512-vnni",
            "x86-64 with AVX-512 VNNI (Cascade Lake and later Xeons, Ice Lake+, Zen 4+): INT8 GEMMs on vpdpbusd",
            {"kind": "llvm", "mcpu": "cascadelake"},
            "x86_64",
            ("avx512f", "avx512bw", "avx512_vnni"),
        ),
        Preset(
            "x86-avx2",
            "x86-64 with AVX2 only (Haswell and later, Zen 1-3): vectorized INT8 GEMMs without VNNI",
            {"kind": "llvm", "mcpu": "haswell"},
            "x86_64",
            ("avx2", "fma"),
        ),
    )
}
ALIASES = {"x86": "host"}


def host_preset() -> Preset:
    """The machine this runs on: LLVM's name for its CPU, all cores."""
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    flags = tuple(sorted(set(cpu_flags()) & {"avx512f", "avx512bw", "avx512_vnni", "avx2", "fma"}))
    return Preset("host", f"this machine ({cpu})", {"kind": "llvm", "mcpu": cpu}, platform.machine(), flags)


def get(name: str) -> Preset:
    name = ALIASES.get(name, name)
    if name == "host":
        return host_preset()
    if name not in PRESETS:
        known = ", ".join(["host", "x86", *PRESETS])
        raise ValueError(f"unknown target {name!r}; known targets: {known}")
    return PRESETS[name]


def tvm_target(p: Preset, threads: int | None = None) -> "tvm.target.Target":  # noqa: F821
    import tvm

    return tvm.target.Target({**p.target, "num-cores": threads or os.cpu_count() or 1})


def has_vnni(p: Preset) -> bool:
    return "avx512_vnni" in p.cpu_flags


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_runnable(arch: str, flags: list[str]) -> None:
    """Raise if a library built for (arch, flags) cannot run on this machine."""
    here = platform.machine()
    if arch != here:
        raise RuntimeError(f"artifact was compiled for {arch}, this machine is {here}")
    missing = sorted(set(flags) - cpu_flags())
    if missing:
        raise RuntimeError(f"artifact needs CPU features this machine lacks: {', '.join(missing)}")
