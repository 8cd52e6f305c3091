"""Tile-size tuning for the GEMM kernels, with records kept per CPU so builds do not re-tune.

The search space is small (register tiles that fit the vector registers), so the tuner measures
every candidate (or a trial budget of them): on this machine, or on a board of a device farm
through MetaSchedule's RPC runner and a tracker. A record maps "role:shape" (role = kernel name without its
length and layer prefixes, since every layer has the same shapes) to the fastest tile. Records live in
`schedules/records/<cpu>.json`; the default model's shapes are shipped for this project's CPU.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm
from tqdm import tqdm

from ibert_tvm.files import write_atomic
from ibert_tvm.names import kernel_kind

from . import cpu

RECORDS = Path(__file__).parent / "records"


def record_file(cpu_name: str, folder: Path = RECORDS) -> Path:
    return folder / f"{cpu_name}.json"


def load(cpu_name: str, folder: Path = RECORDS) -> dict[str, list[int]]:
    f = record_file(cpu_name, folder)
    return json.loads(f.read_text()) if f.exists() else {}


def key(name: str, shape: tuple[int, ...]) -> str:
    return f"{kernel_kind(name)}:{'x'.join(map(str, shape))}"


Measure = Callable[[tvm.tirx.PrimFunc], float]  # seconds per call of one scheduled kernel


def _random_args(shapes: list[tuple[list[int], str]], device: tvm.runtime.Device) -> list[tvm.runtime.Tensor]:
    rng = np.random.default_rng(0)
    return [tvm.runtime.tensor(rng.integers(-3, 3, shape).astype(dtype), device) for shape, dtype in shapes]


def _signature(func: tvm.tirx.PrimFunc) -> list[tuple[list[int], str]]:
    return [([int(d) for d in b.shape], str(b.dtype)) for b in func.params]


def local_measure(target: tvm.target.Target) -> Measure:
    """Time kernels on this machine (the thread count is whatever the pool was given)."""
    def measure(func: tvm.tirx.PrimFunc) -> float:
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target).jit()
        args = _random_args(_signature(func), tvm.cpu())
        return lib.time_evaluator("main", tvm.cpu(), number=10, repeat=3)(*args).median
    return measure


def alloc_remote_args(session, device, args_info, alloc_repeat: int) -> list[list[tvm.runtime.Tensor]]:
    """MetaSchedule's f_alloc_argument without `random_fill`, which a runtime-only board lacks."""
    shapes = [(list(shape), dtype) for _, dtype, shape in args_info]
    return [_random_args(shapes, device) for _ in range(alloc_repeat)]


def rpc_measure(target: tvm.target.Target, tracker: tuple[str, int], key: str, cross: str | None,
                timeout: float = 300) -> Measure:
    """Time kernels on a device of kind `key` from an RPC tracker, with MetaSchedule's RPC runner:
    each kernel is built here (cross-compiled if needed), uploaded and timed there."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.support import cc

    runner = ms.runner.RPCRunner(
        ms.runner.RPCConfig(tracker_host=tracker[0], tracker_port=tracker[1], tracker_key=key, session_timeout_sec=timeout),
        ms.runner.EvaluatorConfig(number=10, repeat=3, min_repeat_ms=0, enable_cpu_cache_flush=False),
        f_alloc_argument=alloc_remote_args, max_workers=1,
    )
    work = Path(tempfile.mkdtemp(prefix="ibert-tvm-tune-"))
    built = itertools.count()

    def measure(func: tvm.tirx.PrimFunc) -> float:
        path = work / f"k{next(built)}.so"
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
        lib.export_library(str(path), fcompile=cc.cross_compiler(cross) if cross else None)
        result = runner.run([ms.runner.RunnerInput(str(path), "cpu", ms.arg_info.ArgInfo.from_prim_func(func))])[0].result()
        path.unlink()
        if result.error_msg:
            raise RuntimeError(f"measuring on the {key!r} device failed: {result.error_msg.strip().splitlines()[-1]}")
        return float(np.median([float(t) for t in result.run_secs]))
    return measure


def tune(mod: tvm.IRModule, cpu_name: str, isa: cpu.Isa, measure: Measure, trials: int | None = None,
         folder: Path = RECORDS, progress: bool = True) -> dict[str, list[int]]:
    """Measure the tile candidates of each GEMM shape not yet recorded (with `trials`, that many
    spread over the shapes, the default tile first and at least it); save and return the records."""
    records = load(cpu_name, folder)
    todo = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and "ibert.kind" in func.attrs:
            shape = cpu.gemm_shape(func)
            if shape and cpu.tuned(isa, shape) and key(gv.name_hint, shape) not in records:
                todo.setdefault(key(gv.name_hint, shape), (func, shape))
    plans = {}
    for k, (func, shape) in todo.items():
        first = cpu.default_tiles(*shape[-3:-1], isa)
        plans[k] = [first, *(t for t in cpu.tile_candidates(*shape[-3:-1], isa) if t != first)]
    if trials is not None:  # round robin over the shapes until the budget is spent
        share = [min(len(c), (trials + i) // max(1, len(plans))) for i, c in enumerate(plans.values())]
        plans = {k: c[: max(1, n)] for (k, c), n in zip(plans.items(), share)}
    bar = tqdm(total=sum(map(len, plans.values())), desc="tuning GEMM tiles", disable=not progress)
    for k, candidates in plans.items():
        func = todo[k][0]
        timings = []
        for t in candidates:
            timings.append((measure(cpu.schedule(func, isa, t)), t))
            bar.update()
        records[k] = list(min(timings)[1])
    bar.close()
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(records.items())]
        write_atomic(record_file(cpu_name, folder), "{\n" + ",\n".join(lines) + "\n}\n")
    return records
