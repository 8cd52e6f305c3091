"""What differs between the kinds of hardware a library is built for, behind one interface.

A target preset (`targets.Preset`) refers to its `Device`; the compiler, the tuner and the runner
ask the device instead of testing its name. A new kind of device is one module
(`ibert_tvm/device_<kind>.py`, defining a `Device`) plus the presets in `targets.PRESETS` that
refer to it; `targets.DEVICE_KINDS` finds it by the name manifests record.

Device modules import only the standard library at module level: `targets`, which the runner
imports, holds them, and the runner must start without the compiler (on a board: the TVM runtime
alone). Their compiling functions import ibert_tvm.schedules and codegen when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tvm
    from tvm import relax

    from .manifest import Target
    from .relay_ops.gemm import Shift
    from .targets import Preset

KernelSchedule = Callable[["tvm.tirx.PrimFunc", str], "tvm.tirx.PrimFunc"]  # (kernel, its name) -> scheduled


@dataclass(frozen=True)
class Device:
    name: str  # the manifest's target.device
    tunable: bool  # whether `ibert-tvm tune` measures its GEMM tiles (schedules.tuning)
    # how the GEMMs take activations (relay_ops.gemm): shifted to u8 by 128, or s8 as they are (0),
    # all alike or by shape
    a_shift: Callable[[Preset], Shift]
    # attention's scores, softmax and context as one kernel, row tile by row tile (graph.build_graph)
    fused_attention: bool
    # the TVM target, code for `threads` threads where the device has a thread pool (None: every CPU)
    tvm_target: Callable[[Preset, int | None], tvm.target.Target]
    # the hand schedule of each integer kernel (`ibert.kind`), with the tuning records in the folder
    scheduler: Callable[[Preset, Path], KernelSchedule]
    # tvm.compile of a scheduled module, with whatever toolchain setup the device's code needs
    compile: Callable[[tvm.IRModule, tvm.target.Target], relax.VMExecutable]
    # the shared library at the path, linked for the preset; raises unless it holds the device's code
    export: Callable[[relax.VMExecutable, Path, Preset], None]
    # where a library built for this manifest target runs on this machine; raises if nowhere
    runtime_device: Callable[[Target], tvm.runtime.Device]


def tvm_compile(mod: tvm.IRModule, target: tvm.target.Target, tir_pipeline: str = "default") -> relax.VMExecutable:
    """Inside `with target`: CUDA's export embedded an nvcc binary only when compiled this way."""
    import tvm

    with target:
        return tvm.compile(mod, target=target, tir_pipeline=tir_pipeline)
