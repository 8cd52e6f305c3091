"""Relax module -> scheduled module -> compiled executable, for a target preset."""

from __future__ import annotations

import tvm
from tvm import relax

from schedules import cpu, tuning

from . import targets
from .graph import Graph


def schedule_module(mod: tvm.IRModule, preset: targets.Preset) -> tvm.IRModule:
    """Replace every integer kernel by its hand-scheduled version, with tuned tiles if recorded."""
    if preset.device == "cuda":
        from schedules import cuda

        sched = cuda.schedule
    else:
        isa, records = cpu.ISAS[preset.isa], tuning.load(preset.target["mcpu"])

        def sched(func: tvm.tirx.PrimFunc, name: str) -> tvm.tirx.PrimFunc:
            shape = cpu.gemm_shape(func)
            tiles = records.get(tuning.key(name, shape)) if shape else None
            return cpu.schedule(func, isa, tuple(tiles) if tiles else None)

    out = tvm.IRModule()
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and "ibert.kind" in func.attrs:
            func = sched(func, gv.name_hint)
        out[gv] = func
    return out


def tune_graph(graph: Graph, preset: targets.Preset, progress: bool = True) -> dict[str, list[int]]:
    """Tune this graph's GEMM tiles on this machine; records go to schedules/records/<cpu>.json.

    Kernels are timed with the thread count the runner will use (every CPU of this process)."""
    from .runner import use_threads

    if preset.device != "cpu":
        raise ValueError(f"tile tuning measures CPU kernels on this machine; {preset.name} is a {preset.device} target")
    targets.check_runnable(preset.arch, list(preset.cpu_flags))
    use_threads()
    return tuning.tune(graph.module, preset.target["mcpu"], targets.tvm_target(preset), cpu.ISAS[preset.isa],
                       progress=progress)


def compile_graph(graph: Graph, preset: targets.Preset, threads: int | None = None) -> relax.VMExecutable:
    mod = schedule_module(graph.module, preset)
    target = targets.tvm_target(preset, threads)
    with target:
        return tvm.compile(mod, target=target)
