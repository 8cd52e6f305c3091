"""Relax module -> scheduled module -> compiled executable, for a target preset."""

from __future__ import annotations

import tvm
from tvm import relax

from schedules import tuning, x86

from . import targets
from .graph import Graph


def schedule_module(mod: tvm.IRModule, preset: targets.Preset) -> tvm.IRModule:
    """Replace every integer kernel by its hand-scheduled version, with tuned tiles if recorded."""
    if preset.target["kind"] != "llvm" or preset.arch != "x86_64":
        raise ValueError(f"no schedules for target {preset.name} yet")
    vnni = targets.has_vnni(preset)
    records = tuning.load(preset.target["mcpu"])
    out = tvm.IRModule()
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and "ibert.kind" in func.attrs:
            shape = x86.gemm_shape(func)
            tiles = records.get(tuning.key(gv.name_hint, shape)) if shape else None
            func = x86.schedule(func, vnni, tuple(tiles) if tiles else None)
        out[gv] = func
    return out


def tune_graph(graph: Graph, preset: targets.Preset, progress: bool = True) -> dict[str, list[int]]:
    """Tune this graph's GEMM tiles on this machine; records go to schedules/records/<cpu>.json.

    Kernels are timed with the thread count the runner will use (every CPU of this process)."""
    from .runner import use_threads

    targets.check_runnable(preset.arch, list(preset.cpu_flags))
    use_threads()
    return tuning.tune(graph.module, preset.target["mcpu"], targets.tvm_target(preset), targets.has_vnni(preset),
                       progress=progress)


def compile_graph(graph: Graph, preset: targets.Preset, threads: int | None = None) -> relax.VMExecutable:
    mod = schedule_module(graph.module, preset)
    target = targets.tvm_target(preset, threads)
    with target:
        return tvm.compile(mod, target=target)
