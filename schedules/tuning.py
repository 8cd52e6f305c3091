"""Tile-size tuning for the GEMM kernels, with records kept per CPU so builds do not re-tune.

The search space is small (register tiles that fit 32 vector registers), so the tuner measures
every candidate on this machine. A record maps "role:shape" (role = kernel name without its
layer prefix, since every layer has the same shapes) to the fastest tile. Records live in
`schedules/records/<cpu>.json`; the default model's shapes are shipped for this project's CPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import tvm
from tqdm import tqdm

from relay_ops.gemm import packable

from . import cpu

RECORDS = Path(__file__).parent / "records"


def record_file(cpu_name: str, folder: Path = RECORDS) -> Path:
    return folder / f"{cpu_name}.json"


def load(cpu_name: str, folder: Path = RECORDS) -> dict[str, list[int]]:
    f = record_file(cpu_name, folder)
    return json.loads(f.read_text()) if f.exists() else {}


def key(name: str, shape: tuple[int, ...]) -> str:
    return f"{re.sub(r'^l[0-9]+_', '', name)}:{'x'.join(map(str, shape))}"


def _time(func: tvm.tirx.PrimFunc, target: tvm.target.Target, args: list) -> float:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target).jit()
    return lib.time_evaluator("main", tvm.cpu(), number=10, repeat=3)(*args).median


def tune(mod: tvm.IRModule, cpu_name: str, target: tvm.target.Target, isa: cpu.Isa, folder: Path = RECORDS,
         progress: bool = True) -> dict[str, list[int]]:
    """Measure every tile candidate of each GEMM shape not yet recorded; save and return records."""
    records = load(cpu_name, folder)
    todo = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and "ibert.kind" in func.attrs:
            shape = cpu.gemm_shape(func)
            if shape and packable(shape[-2], shape[-1]) and key(gv.name_hint, shape) not in records:
                todo.setdefault(key(gv.name_hint, shape), (func, shape))
    rng = np.random.default_rng(0)
    for k, (func, shape) in tqdm(todo.items(), desc="tuning GEMM tiles", disable=not progress):
        args = [tvm.runtime.tensor(rng.integers(-3, 3, [int(d) for d in b.shape]).astype(b.dtype)) for b in func.params]
        timings = [(_time(cpu.schedule(func, isa, t), target, args), t) for t in cpu.tile_candidates(*shape[-3:-1], isa)]
        records[k] = list(min(timings)[1])
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(records.items())]
        record_file(cpu_name, folder).write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return records
