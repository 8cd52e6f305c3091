"""`ibert-tvm profile`: where one forward of a compiled artifact spends its time, kernel by kernel.

TVM 0.27's Relax VM has no profiler (no `profile=True`, no `tvm.runtime.profiling`); it has
`set_instrument`, a callback before and after every call the VM makes. One forward under it records
the kernels the forward calls, in order, with their arguments; the forward is then replayed, kernel
by kernel, on those same tensors (intermediates that share memory in the forward share it here too)
and on the runner's library thread, each call timed alone (its call from Python included: a few
microseconds), each replay after a plain forward. Times are grouped by role (`names.kernel_kind`:
`qkv` of `b1_s128_l3_qkv`). Timing between the callbacks instead would count their Python work,
the conversion of every argument included: 5-12% of each kernel's time on MiniLM, more for small
ones. The forward's own time is measured without any of this, and what the kernels leave of it is
the runner's and the VM's share.
A GEMM's throughput is set against the same products run by `torch._int_mm` (oneDNN) at the same
thread count, repeated on the same operands (their best time): the machine's INT8 floor. Two
fractions: our time in the forward against it (our operands as cold as the forward leaves them,
oneDNN's hot), and our kernels' own calls repeated the same way (both hot: kernel against kernel).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .. import artifact
from ..names import bucket_symbol, function_name, kernel_kind
from ..targets import DEVICE_KINDS
from .bench import SETTLE_S, WARMUP, bars, cpu_model, install_hint, int8_gemms, pyplot, save, timings

# every kernel the graph emits, by role (graph.build_graph and its heads): the linear layers (int8
# weight `{kernel}.0` [N, K] in any layout, int32 bias `{kernel}.1` [N]) and the rest
LINEAR = ("qkv", "attn_out", "inter", "ffn_out", "pooler", "cls_dense", "cls_out", "lm_dense", "lm_decoder", "tok_out",
          "qa_start", "qa_end")
ROLES = frozenset((*LINEAR, "embed", "embed_ln", "scores", "softmax", "context", "attention", "attn_ln", "ffn_ln",
                   "lm_ln"))
ABOUT = {"attention": "attention (QK^T, softmax, PV)", "inter": "inter (+GELU)", "attn_out": "attn_out (+residual)",
         "ffn_out": "ffn_out (+residual)", "pooler": "pooler (+tanh)", "cls_dense": "cls_dense (+tanh)",
         "lm_dense": "lm_dense (+GELU)"}
OTHER = "other (runner, VM)"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gemm:
    """`count` independent INT8 products [M, K] x [K, N] in one call of a kernel."""

    count: int
    m: int
    k: int
    n: int

    @property
    def ops(self) -> int:
        return 2 * self.count * self.m * self.k * self.n


@dataclass(frozen=True)
class Role:
    name: str
    calls: int  # kernel calls of this role in one forward
    ms: float  # their time in one forward (median over the timed forwards)
    gemm: Gemm | None  # the products of one call; None: not a matrix product
    hot_ms: float | None = None  # GEMMs: each call repeated on its operands (best of the reps), summed
    floor_ms: float | None = None  # torch._int_mm on the same products, `calls` times (best of the reps)

    @property
    def gops(self) -> float | None:
        return self.gemm.ops * self.calls / self.ms / 1e6 if self.gemm and self.ms > 0 else None

    @property
    def of_floor(self) -> float | None:
        """Our throughput in the forward as a fraction of oneDNN's on the same products, hot."""
        return self.floor_ms / self.ms if self.floor_ms is not None and self.ms > 0 else None

    @property
    def hot_of_floor(self) -> float | None:
        """Our kernels' throughput as a fraction of oneDNN's, both repeated on their operands."""
        return self.floor_ms / self.hot_ms if self.floor_ms is not None and self.hot_ms else None


@dataclass(frozen=True)
class Profile:
    artifact: Path
    function: str
    batch: int
    seq: int
    threads: int
    cpu: str
    forward_ms: float  # median of plain (uninstrumented) forwards through the runner
    roles: list[Role]  # slowest first
    symbols: list[str]  # the kernels one forward called, in order
    replayed: list[float]  # ms of all kernels, each replay of the forward
    strays: list[str]  # other functions the forward called: not timed as kernels, in `other`
    floor: str | None = None  # why the floor is missing, if it is

    @property
    def kernels_ms(self) -> float:
        return sum(r.ms for r in self.roles)


def pick_bucket(m: artifact.Manifest, batch: int | None, seq: int | None) -> tuple[int, int]:
    """(batch, seq) of a compiled bucket: by default the longest length at batch 1, else the smallest batch."""
    seq = m.seq_len if seq is None else seq
    batch = (1 if 1 in m.batches else m.batches[0]) if batch is None else batch
    if not any(b.batch == batch and b.seq_len == seq for b in m.buckets):
        have = ", ".join(f"{b.batch}x{b.seq_len}" for b in m.buckets)
        raise ValueError(f"no compiled bucket batch {batch} x length {seq}; this artifact has {have} (batch x length)")
    return batch, seq


def gemm_of(kind: str, kernel: str, shapes: list[tuple[int, ...]], params: dict[str, tuple[int, ...]]) -> Gemm | None:
    """The products of one call of `kernel` (role `kind`), from its parameters and the shapes of
    the buffers it was called with (the output last)."""
    out = shapes[-1]
    if kind in LINEAR:
        n = params[f"{kernel}.1"][0]  # the bias: one per output column, whatever the weight's layout
        return Gemm(1, math.prod(out) // n, math.prod(params[f"{kernel}.0"]) // n, n)
    if kind == "scores":  # [rows, 3 * hidden] -> [flat, heads, seq, seq]: Q K^T per head
        flat, heads, seq, _ = out
        return Gemm(flat * heads, seq, shapes[0][-1] // 3 // heads, seq)
    if kind == "context":  # probs [flat, heads, seq, seq] -> [flat, seq, heads, d]: P V per head
        flat, seq, heads, d = out
        return Gemm(flat * heads, seq, seq, d)
    return None


class _KernelRecorder:
    """The VM instrument: every call of a kernel of one function, with its function and arguments."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.calls: list[tuple[str, Any, tuple[Any, ...]]] = []
        self.strays: set[str] = set()  # calls neither of the function's kernels nor VM builtins

    def __call__(self, func: Any, symbol: str, before: bool, ret: Any, *args: Any) -> int:
        if before and symbol.startswith(self.prefix):
            self.calls.append((symbol, func, args))
        elif before and not symbol.startswith("vm.builtin."):
            self.strays.add(symbol)
        return 0  # VMInstrumentReturnKind.NO_OP: run the call


def _replay(calls: list[tuple[str, Any, tuple[Any, ...]]]) -> list[int]:
    """ns of each recorded kernel call, made again in order on its recorded arguments."""
    out = []
    for _, func, args in calls:
        start = time.perf_counter_ns()
        func(*args)
        out.append(time.perf_counter_ns() - start)
    return out


def _hot_ms(calls: list[tuple[str, Any, tuple[Any, ...]]], reps: int) -> float:
    """ms of recorded kernel calls, each repeated on its recorded arguments: its best time, summed."""
    return sum(min(timings(partial(func, *args), reps, warmup=WARMUP)) for _, func, args in calls) * 1e3


def profile(path: Path, batch: int | None = None, seq: int | None = None, threads: int | None = None,
            reps: int = 20, floor: bool = True) -> Profile:
    """Time `reps` forwards of one bucket of the artifact at `path`, kernel by kernel."""
    from ..runner import Runner

    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    path = Path(path)
    m = artifact.read(path, check_files=False)  # the runner checks every file as it reads it
    kind = DEVICE_KINDS.get(m.target.device)
    if kind is None or not kind.tunable:  # the devices whose kernels a host clock times: those tune measures
        raise ValueError(f"{path} targets {m.target.device}; profile times CPU kernels (its clock would measure "
                         "launches, not kernels)")
    batch, seq = pick_bucket(m, batch, seq)
    params = dict(zip(m.params, artifact.load_params(path, m, lambda a: a.shape)))
    shape = (batch, *([m.choices] if m.choices else []), seq)
    ids = np.random.default_rng(0).integers(0, m.vocab_size, shape, dtype=np.int64)
    with Runner(path, threads=threads) as r:
        forward = partial(r.run_integer, ids)
        for _ in range(WARMUP):
            forward()
        recorder = _KernelRecorder(bucket_symbol(batch, seq, ""))
        r.set_instrument(recorder)  # the runner's VM: what it runs is what is timed
        forward()
        r.set_instrument(None)
        used = r.threads
        replay = partial(r.on_library_thread, partial(_replay, recorder.calls))
        for _ in range(WARMUP):
            replay()
        plain, replays = [], []
        for _ in range(reps):  # interleaved: drift hits both alike
            plain += timings(forward, 1)
            replays.append(replay())
        symbols = [s for s, _, _ in recorder.calls]
        by_kind = defaultdict(list)  # role -> its calls, in order (its kernels share their shapes)
        for call in recorder.calls:
            by_kind[kernel_kind(call[0])].append(call)
        gemms = {kind: gemm_of(kind, s.removeprefix(recorder.prefix), [tuple(a.shape) for a in args], params)
                 for kind, [(s, _, args), *_] in by_kind.items()}
        hot = {kind: r.on_library_thread(partial(_hot_ms, by_kind[kind], reps))
               for kind, g in gemms.items() if g is not None}
    per_forward = [defaultdict(int) for _ in replays]
    for totals, times in zip(per_forward, replays):
        for s, ns in zip(symbols, times):
            totals[kernel_kind(s)] += ns
    roles = []
    for kind, calls in by_kind.items():
        if kind not in ROLES:  # still timed; its products, if any, are not counted
            log.warning("kernel kind %r is no role profile knows (evaluation/profile.py ROLES)", kind)
        roles.append(Role(kind, len(calls),
                          statistics.median(t[kind] for t in per_forward) / 1e6, gemms[kind], hot.get(kind)))
    why = None if floor else "not measured (--no-floor)"
    if floor and importlib.util.find_spec("torch") is None:
        why = f"not measured: it {install_hint(['torch'])}"
    if why is None:
        roles = _with_floor(roles, used, reps)
    return Profile(path, function_name(batch, seq), batch, seq, used, cpu_model(), statistics.median(plain) * 1e3,
                   sorted(roles, key=lambda r: -r.ms), symbols, [sum(t) / 1e6 for t in replays],
                   sorted(recorder.strays), why)


def _with_floor(roles: list[Role], threads: int, reps: int) -> list[Role]:
    """Each GEMM role with the time oneDNN takes for its products, measured after the library ran
    (its idle pool spinning beside PyTorch's would slow both). The best of `reps`: what the machine
    can do (on a busy CPU a descheduled thread stalls a whole parallel call, and medians swung 10x)."""
    import torch

    torch.set_num_threads(threads)
    time.sleep(SETTLE_S)
    out = []
    for r in roles:
        if r.gemm is not None:
            g = r.gemm
            run = int8_gemms([(g.m, g.k, g.n)] * g.count, r.calls)
            r = replace(r, floor_ms=min(timings(run, reps, warmup=WARMUP)) * 1e3)
        out.append(r)
    return out


def table(p: Profile) -> str:
    """The markdown report: a heading naming the machine and bucket, then one row per role."""
    lines = [(f"ibert-tvm profile of {p.artifact} ({p.function}) on {p.cpu}: {p.threads} threads, "
              f"batch x seq {p.batch}x{p.seq}"),
             (f"forward {p.forward_ms:.2f} ms (median), kernels {p.kernels_ms:.2f} ms ({len(p.symbols)} calls, "
              "replayed one by one)"
              + (f"; INT8 GEMM floor {p.floor}" if p.floor else "")
              + (f"; untimed calls (in {OTHER}): {', '.join(p.strays)}" if p.strays else "")),
             "",
             "| role | calls | total ms | % of forward | GOP/s | fraction of floor | hot ms | hot fraction of floor |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(v: float | None, form: str) -> str:
        return "" if v is None else format(v, form)

    rows = [(ABOUT.get(r.name, r.name), str(r.calls), r.ms, r.gops, r.of_floor, r.hot_ms, r.hot_of_floor)
            for r in p.roles]
    rows.append((OTHER, "", p.forward_ms - p.kernels_ms, None, None, None, None))
    for name, calls, ms, gops, of_floor, hot, hot_of_floor in sorted(rows, key=lambda row: -row[2]):
        lines.append(f"| {name} | {calls} | {ms:.3f} | {ms / p.forward_ms:.1%} | {cell(gops, '.1f')} | "
                     f"{cell(of_floor, '.0%')} | {cell(hot, '.3f')} | {cell(hot_of_floor, '.0%')} |")
    lines += ["", (f"GOP/s: 2*M*N*K over the role's time in the forward; floor: torch._int_mm (oneDNN) on the same "
                   f"products at {p.threads} threads, repeated on the same operands (best time); fraction of floor: "
                   "its time over ours in the forward (our operands as cold as the forward leaves them); hot: our "
                   "kernels' calls repeated the same way (kernel against kernel). "
                   f"{OTHER}: the forward less its kernels (input checks, padding, the VM's allocations and copies).")]
    return "\n".join(lines)


def plot(p: Profile, png: Path) -> None:
    """Horizontal bars of the roles' times, slowest on top, each labelled with its ms, share of
    the forward and, for GEMMs, GOP/s and fraction of the floor; titled with the CPU and bucket."""
    heading = (f"ibert-tvm profile on {p.cpu}\n{p.function}: batch x seq {p.batch}x{p.seq}, {p.threads} threads, "
               f"forward {p.forward_ms:.2f} ms")
    names = [ABOUT.get(r.name, r.name) for r in p.roles]
    ms = [r.ms for r in p.roles]
    labels = [f"{r.ms:.2f} ms ({r.ms / p.forward_ms:.0%})" + (f", {r.gops:.0f} GOP/s" if r.gops else "")
              + (f", {r.of_floor:.0%} of floor ({r.hot_of_floor:.0%} hot)" if r.of_floor and r.hot_of_floor else "")
              for r in p.roles]
    fig, ax = pyplot().subplots(figsize=(9, 1.2 + 0.35 * len(names)))
    bars(ax, names, ms, labels, [bool(r.gemm) for r in p.roles],
         "ms per forward, all calls of the role (orange: INT8 GEMMs)", 1.6)
    save(fig, png, heading)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="a compiled artifact folder")
    p.add_argument("--batch", type=int,
                   help="compiled batch size to profile (default: 1 if compiled, else the smallest)")
    p.add_argument("--seq-len", type=int, help="compiled length to profile (default: the longest)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads of the library and the floor")
    p.add_argument("--reps", type=int, default=20, help=f"timed forwards, each way (after {WARMUP} untimed)")
    p.add_argument("--no-floor", action="store_true", help="skip the torch._int_mm floor (needs PyTorch)")
    p.add_argument("--png", help="also draw the roles as a bar chart into this file (needs matplotlib)")
