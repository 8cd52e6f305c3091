"""Relax module -> scheduled module -> compiled executable, for a target preset."""

from __future__ import annotations

from pathlib import Path

import tvm
from tvm import relax

from ibert_tvm.schedules import cpu, tuning

from . import targets
from .graph import Graph


def schedule_module(mod: tvm.IRModule, preset: targets.Preset, records: Path | None = None) -> tvm.IRModule:
    """Replace every integer kernel by its hand-scheduled version, with tuned tiles if recorded
    (shipped, overlaid by `records`' or, by default, the user's cache's: `tuning.load`)."""
    sched = preset.device_kind.scheduler(preset, records or tuning.user_records())
    out = tvm.IRModule()
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and "ibert.kind" in func.attrs:
            func = sched(func, gv.name_hint)
        out[gv] = func
    return out


def tune_graph(graph: Graph, preset: targets.Preset, trials: int | None = None, tracker: str | None = None,
               key: str | None = None, records: Path | None = None, progress: bool = True,
               seconds: float | None = None) -> dict[str, list[int]]:
    """Tune this graph's GEMM tiles (for at most `seconds` if given: `tuning.tune`); records go to
    `records`/<cpu>.json (default: the user's cache).

    Here, kernels are timed with the thread count the runner will use (every CPU of this process);
    with `tracker` (HOST:PORT) and `key`, on a device of that kind from the RPC tracker."""
    from . import remote
    from .threads import use_threads

    if not preset.device_kind.tunable:
        raise ValueError(f"tile tuning measures CPU kernels; {preset.name} is a {preset.device} target")
    target = targets.tvm_target(preset)
    if tracker:
        if not key:
            raise ValueError("tuning through an RPC tracker needs the device key (--key)")
        remote.check_tracker(tracker, key)  # fail fast, with the address, if nobody answers
        measure = tuning.rpc_measure(target, preset.device_kind.compile, remote.parse_address(tracker), key,
                                      preset.cross_compiler())
    else:
        targets.check_runnable(preset.arch, list(preset.cpu_flags))
        use_threads()
        measure = tuning.local_measure(target, preset.device_kind.compile)
    return tuning.tune(graph.module, preset.target["mcpu"], cpu.ISAS[preset.isa], measure, trials, records, progress,
                       seconds)


def compile_graph(graph: Graph, preset: targets.Preset, threads: int | None = None,
                  records: Path | None = None) -> relax.VMExecutable:
    mod = schedule_module(graph.module, preset, records)
    return preset.device_kind.compile(mod, targets.tvm_target(preset, threads))
