"""Relax module -> scheduled module -> compiled executable, for a target preset."""

from __future__ import annotations

import tvm
from tvm import relax

from schedules import x86

from . import targets
from .graph import Graph


def schedule_module(mod: tvm.IRModule, preset: targets.Preset) -> tvm.IRModule:
    """Replace every integer kernel by its hand-scheduled version for the preset's CPU."""
    if preset.target["kind"] != "llvm" or preset.arch != "x86_64":
        raise ValueError(f"no schedules for target {preset.name} yet")
    vnni = targets.has_vnni(preset)
    out = tvm.IRModule()
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and "ibert.kind" in func.attrs:
            func = x86.schedule(func, vnni)
        out[gv] = func
    return out


def compile_graph(graph: Graph, preset: targets.Preset, threads: int | None = None) -> relax.VMExecutable:
    mod = schedule_module(graph.module, preset)
    target = targets.tvm_target(preset, threads)
    with target:
        return tvm.compile(mod, target=target)
