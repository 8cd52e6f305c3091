"""Tile-size tuning for the GEMM kernels, with records kept per CPU so builds do not re-tune.

The search space is small (register tiles that fit the vector registers), so the tuner measures
every candidate (or a trial budget of them): on this machine, or on a board of a device farm
through MetaSchedule's RPC runner and a tracker. A record maps "role:shape" (role = kernel name without its
length and layer prefixes, since every layer has the same shapes) to the fastest tile, in `<cpu>.json` files:
the package ships some (`schedules/records`: the default model's shapes on the CPUs this project measured),
`tune` writes the user's (`~/.cache/ibert-tvm/records`, or a folder given), never into the package.
Compiling reads both; the user's record of a shape wins.
"""

from __future__ import annotations

import itertools
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm
from tqdm import tqdm

from ibert_tvm.files import cache_dir, write_atomic
from ibert_tvm.names import kernel_kind

from . import cpu

log = logging.getLogger(__name__)
RECORDS = Path(__file__).parent / "records"  # shipped with the package: read, never written


def user_records() -> Path:
    """Where `tune` writes unless given a folder: the user's cache."""
    return cache_dir() / "records"


def record_file(cpu_name: str, folder: Path) -> Path:
    return folder / f"{cpu_name}.json"


def record_files(cpu_name: str, folder: Path | None = None) -> list[Path]:
    """The record files that exist for a CPU (LLVM's -mcpu name), in the order `load` reads them:
    the shipped one, then `folder`'s (default: the user's cache). Empty: no tuned tiles for it."""
    return [f for f in (record_file(cpu_name, RECORDS), record_file(cpu_name, folder or user_records())) if f.exists()]


def _read(f: Path) -> dict[str, list[int]]:
    if not f.exists():
        return {}
    try:
        records = json.loads(f.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"tuning records {f} are unreadable: {err}") from None
    if isinstance(records, dict):
        return records
    raise ValueError(f"tuning records {f}: expected an object of \"role:shape\": [rows, columns], got {records!r:.80}")


def load(cpu_name: str, folder: Path | None = None) -> dict[str, list[int]]:
    """A CPU's tile records: the shipped ones, overlaid by `folder`'s (default: the user's cache)."""
    records: dict[str, list[int]] = {}
    for f in record_files(cpu_name, folder):
        records |= _read(f)
    return records


def _write(records: dict[str, list[int]], f: Path) -> None:
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(records.items())]
    write_atomic(f, "{\n" + ",\n".join(lines) + "\n}\n")


def key(name: str, shape: tuple[int, ...]) -> str:
    return f"{kernel_kind(name)}:{'x'.join(map(str, shape))}"


Measure = Callable[[tvm.tirx.PrimFunc], float]  # seconds per call of one scheduled kernel


def _random_args(shapes: list[tuple[list[int], str]], device: tvm.runtime.Device) -> list[tvm.runtime.Tensor]:
    rng = np.random.default_rng(0)
    return [tvm.runtime.tensor(rng.integers(-3, 3, shape).astype(dtype), device) for shape, dtype in shapes]


def _signature(func: tvm.tirx.PrimFunc) -> list[tuple[list[int], str]]:
    return [([int(d) for d in b.shape], str(b.dtype)) for b in func.params]


Compile = Callable[[tvm.IRModule, tvm.target.Target], tvm.runtime.Executable]  # the device's (`Device.compile`)


def local_measure(target: tvm.target.Target, build: Compile) -> Measure:
    """Time kernels, built as `build` builds them, on this machine (the thread count is whatever
    the pool was given)."""
    def measure(func: tvm.tirx.PrimFunc) -> float:
        lib = build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target).jit()
        args = _random_args(_signature(func), tvm.cpu())
        return lib.time_evaluator("main", tvm.cpu(), number=10, repeat=3)(*args).median
    return measure


def alloc_remote_args(session, device, args_info, alloc_repeat: int) -> list[list[tvm.runtime.Tensor]]:
    """MetaSchedule's f_alloc_argument without `random_fill`, which a runtime-only board lacks."""
    shapes = [(list(shape), dtype) for _, dtype, shape in args_info]
    return [_random_args(shapes, device) for _ in range(alloc_repeat)]


def rpc_measure(target: tvm.target.Target, build: Compile, tracker: tuple[str, int], key: str, cross: str | None,
                timeout: float = 300) -> Measure:
    """Time kernels on a device of kind `key` from an RPC tracker, with MetaSchedule's RPC runner:
    each kernel is built here as `build` builds it (cross-linked if needed), uploaded and timed there."""
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
        lib = build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
        lib.export_library(str(path), fcompile=cc.cross_compiler(cross) if cross else None)
        result = runner.run([ms.runner.RunnerInput(str(path), "cpu", ms.arg_info.ArgInfo.from_prim_func(func))])[0].result()
        path.unlink()
        if result.error_msg:
            raise RuntimeError(f"measuring on the {key!r} device failed: {result.error_msg.strip().splitlines()[-1]}")
        return float(np.median([float(t) for t in result.run_secs]))
    return measure


def tune(mod: tvm.IRModule, cpu_name: str, isa: cpu.Isa, measure: Measure, trials: int | None = None,
         folder: Path | None = None, progress: bool = True, seconds: float | None = None) -> dict[str, list[int]]:
    """Measure the tile candidates of each GEMM shape not yet recorded, shipped or in `folder` (with
    `trials`, that many spread over the shapes, the default tile first and at least it); add them to
    `folder`'s records (default: the user's cache) and return what that file then holds.

    With `seconds`, shapes are measured largest first until that time is spent; only shapes whose
    candidates were all measured are recorded, so a later call carries on where this one stopped."""
    folder = folder or user_records()
    known = load(cpu_name, folder)
    records = _read(record_file(cpu_name, folder))
    todo = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and "ibert.kind" in func.attrs:
            shape = cpu.gemm_shape(func)
            if shape and cpu.tuned(isa, shape) and key(gv.name_hint, shape) not in known:
                todo.setdefault(key(gv.name_hint, shape), (func, shape))
    todo = dict(sorted(todo.items(), key=lambda kv: -int(np.prod(kv[1][1], dtype=np.int64))))
    plans = {}
    for k, (func, shape) in todo.items():
        first = cpu.default_tiles(*shape[-3:-1], isa)
        plans[k] = [first, *(t for t in cpu.tile_candidates(*shape[-3:-1], isa) if t != first)]
    if trials is not None:  # round robin over the shapes until the budget is spent
        share = [min(len(c), (trials + i) // max(1, len(plans))) for i, c in enumerate(plans.values())]
        plans = {k: c[: max(1, n)] for (k, c), n in zip(plans.items(), share)}
    if not todo:
        log.info("nothing to measure: every tunable GEMM shape of this model has a %s record", cpu_name)
        return records
    log.info("measuring %d tile candidates for %d GEMM shapes on %s%s", sum(map(len, plans.values())), len(plans),
             cpu_name, f" (for at most {seconds:.0f} s)" if seconds is not None else "")
    deadline = None if seconds is None else time.monotonic() + seconds
    done = 0
    with tqdm(total=sum(map(len, plans.values())), desc="tuning GEMM tiles", disable=not progress) as bar:
        for k, candidates in plans.items():
            timings = []
            for t in candidates:
                if deadline is not None and time.monotonic() > deadline:
                    break
                timings.append((measure(cpu.schedule(todo[k][0], isa, t)), t))
                bar.update()
            if len(timings) < len(candidates):
                break
            records[k] = list(min(timings)[1])
            done += 1
            _write(records, record_file(cpu_name, folder))  # each shape as it is done: an interrupt keeps them
    if done < len(plans):
        log.warning("tuned %d of %d GEMM shapes in the %.0f s allowed; the next compile (or `ibert-tvm tune`) "
                    "measures the rest", done, len(plans), seconds)
    if done:
        log.info("wrote %s", record_file(cpu_name, folder))
    return records
