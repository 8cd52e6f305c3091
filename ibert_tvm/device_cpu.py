"""CPUs (x86-64, AArch64) through LLVM: register-tile schedules with tuned tiles, native or
cross-linked libraries, TVM's CPU thread pool at run time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .device import Device, KernelSchedule, tvm_compile

if TYPE_CHECKING:
    import tvm
    from tvm import relax

    from .manifest import Target
    from .relay_ops.gemm import Shift
    from .targets import Preset


def _a_shift(preset: Preset) -> Shift:
    """The operand form of the preset's GEMM instructions: `vpdpbusd` multiplies u8 by s8; ARM's
    `sdot`, AVX2's sign trick and the AMX tiles' `tdpbssd` take s8 x s8. With AMX, the GEMMs that
    fit the tiles take s8 (no staging pass), the rest u8 on `vpdpbusd`."""
    from ibert_tvm.schedules.cpu import ISAS, amx_fits

    isa = ISAS[preset.isa]
    if not isa.matrix:
        return isa.a_shift
    return lambda m, n, k: 0 if amx_fits(m, n, k) else isa.a_shift


def _tvm_target(preset: Preset, threads: int | None) -> tvm.target.Target:
    import tvm

    return tvm.target.Target({**preset.target, "num-cores": threads or os.cpu_count() or 1})


def _scheduler(preset: Preset, records: Path) -> KernelSchedule:
    from ibert_tvm.schedules import cpu, tuning

    isa, tiles_of = cpu.ISAS[preset.isa], tuning.load(preset.target["mcpu"], records)

    def schedule(func: tvm.tirx.PrimFunc, name: str) -> tvm.tirx.PrimFunc:
        shape = cpu.gemm_shape(func)
        tiles = tiles_of.get(tuning.key(name, shape)) if shape else None
        return cpu.schedule(func, isa, tuple(tiles) if tiles else None)

    return schedule


TIR_PIPELINE = "ibert_cpu"


def _register_tir_pipeline() -> None:
    """TVM's s_tir pipeline, with the kernels' own buffers on the stack (`schedules.stack_buffers`)
    before the host's builtins are lowered."""
    import tvm
    from tvm import tirx

    from ibert_tvm.schedules.stack_buffers import stack_buffers

    if TIR_PIPELINE in tirx.compilation_pipeline.PIPELINE_MAP:
        return

    def pipeline() -> tuple:
        passes, host, device = tirx.get_tir_pipeline("s_tir")
        return passes, lambda: tvm.transform.Sequential([stack_buffers, host()]), device

    tirx.register_tir_pipeline(TIR_PIPELINE, pipeline)


def _compile(mod: tvm.IRModule, target: tvm.target.Target) -> relax.VMExecutable:
    _register_tir_pipeline()
    return tvm_compile(mod, target, TIR_PIPELINE)


def _export(executable: relax.VMExecutable, path: Path, preset: Preset) -> None:
    from tvm.support import cc

    cross = preset.cross_compiler()
    executable.export_library(str(path), fcompile=cc.cross_compiler(cross) if cross else None)


def _runtime_device(target: Target) -> tvm.runtime.Device:
    from tvm import runtime

    return runtime.cpu()


CPU = Device("cpu", tunable=True, a_shift=_a_shift, fused_attention=True, tvm_target=_tvm_target,
             scheduler=_scheduler, compile=_compile, export=_export, runtime_device=_runtime_device)
