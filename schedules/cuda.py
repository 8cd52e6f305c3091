"""CUDA schedules for the TE kernels of `relay_ops` (the device's toolchain and runtime side are
in `ibert_tvm.device_cuda`).

`schedule(func)` picks:
- gemm: a kernel whose blocks carry GEMM roles (`parts.gemm_parts`): the accumulator
  `C[.., i, j] += int32(A[.., i, k]) * int32(B[.., j, k])` with 8-bit A, B. C is tiled per thread
  block (blockIdx) and per thread (a register tile of accumulators, "local"); the operand tiles
  of each k-chunk are staged in shared memory (the activation stage and a weight packed at run
  time are computed there; a weight parameter is cache-read there); the innermost 4 k are one
  `__dp4a` (sm_61+) when K % 4 == 0. The epilogue runs in the same thread on the accumulator
  tile. The other blocks (column sums) get `_generic`.
- rowwise: every block computed under the output's row loop (one thread block per row), row
  reductions across threads (TVM's cross-thread allreduce), per-row intermediates in shared
  (an allreduce result is written by thread 0 only, so "local" would be wrong for its readers).
- generic: every block its own kernel, spatial loops over blockIdx.x x threadIdx.x.
Nothing is inlined: relay_ops chains stages that read their input more than once (Newton
steps), and inlining those grows the expression exponentially (LowerIntrin then never ends).
All of it is TIR schedule primitives, which preserve the function's semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.script import tirx as T

from .parts import gemm_parts

THREADS = 256  # threads per block for rowwise / generic kernels
SPATIAL = 0  # IterVar.iter_type
OPAQUE = 8  # relax OpPatternKind: keeps FuseOps from merging scheduled kernels


def _dp4a(a_dtype: str, b_dtype: str) -> str:
    """C[0] += dot(A[0:4], B[0:4]) as one `__dp4a` (TVM's CUDA header declares the mixed-sign
    overloads). TVM ships the same in s_tir.tensor_intrin, but importing that package registers
    every CUDA MMA intrinsic first: about 40 s."""
    vec = {"int8": "int8x4", "uint8": "uint8x4"}

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), a_dtype, offset_factor=1, align=4, scope="shared"),
        B: T.Buffer((4,), b_dtype, offset_factor=1, align=4, scope="shared"),
        C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            for i in range(4):
                with T.sblock("update"):
                    vi = T.axis.remap("R", [i])
                    C[0] = C[0] + T.cast(A[vi], "int32") * T.cast(B[vi], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4,), a_dtype, offset_factor=1, align=4, scope="shared"),
        B: T.Buffer((4,), b_dtype, offset_factor=1, align=4, scope="shared"),
        C: T.Buffer((1,), "int32", offset_factor=1, align=4, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0], A[0:4], B[0:4])
            T.writes(C[0])
            C[0] += T.call_pure_extern("__dp4a", A.vload([0], vec[a_dtype]), B.vload([0], vec[b_dtype]), T.int32(0),
                                       dtype="int32")

    name = f"ibert_dp4a_{a_dtype}_{b_dtype}_int32"
    s_tir.TensorIntrin.register(name, desc, impl, override=True)
    return name


DP4A = {(a, b): _dp4a(a, b) for a, b in (("int8", "int8"), ("uint8", "int8"), ("int8", "uint8"))}


@dataclass(frozen=True)
class GemmTiles:
    """Thread block = threads_i x threads_j threads, each owning micro_i x micro_j accumulators."""

    threads_i: int = 8
    threads_j: int = 16
    micro_i: int = 4
    micro_j: int = 4
    k_chunk: int = 32  # k per shared-memory stage


def schedule(func: tirx.PrimFunc, tiles: GemmTiles = GemmTiles()) -> tirx.PrimFunc:
    """The first schedule that applies; attr "ibert.cuda_schedule" says which."""
    for name, attempt in (("gemm", lambda s: _gemm(s, tiles)), ("rowwise", _rowwise)):
        sch = s_tir.Schedule(func)
        try:
            how = attempt(sch)
        except RuntimeError:  # ScheduleError, InternalError: a precondition failed, try the next
            how = None
        if how:
            return _done(sch, f"{name}{how}")
    sch = s_tir.Schedule(func)
    _generic(sch, sch.get_child_blocks(sch.get_sblock("root")))
    return _done(sch, "generic")


def _done(sch: s_tir.Schedule, how: str) -> tirx.PrimFunc:
    """Marked so that relax's CUDA pipeline neither reschedules it (dlight skips
    tirx.is_scheduled) nor fuses it with its neighbours into an unscheduled function."""
    return sch.mod["main"].with_attrs({"ibert.cuda_schedule": how, "tirx.is_scheduled": True, "op_pattern": OPAQUE})


# --- block analysis ---------------------------------------------------------------------------


def _kinds(sch: s_tir.Schedule, blk) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(blk).iter_vars]


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _below(sch: s_tir.Schedule, blk, loop) -> list:
    """The block's loops nested inside `loop`."""
    loops = sch.get_loops(blk)
    at = next(i for i, l in enumerate(loops) if sch.get(l).same_as(sch.get(loop)))
    return loops[at + 1 :]


def _rows_by_k(row: int):
    """Block iters (*batch, i, j, k) -> (*batch, row iter, k): an operand tile's cache layout."""
    return lambda *iv: (*iv[:-3], iv[row], iv[-1])


def _fit(extent: int, threads: int, micro: int) -> tuple[int, int]:
    """(threads, micro) no larger than asked, halved until their product divides the extent."""
    while extent % (threads * micro):
        if micro > 1 and micro >= threads // 4:
            micro //= 2
        elif threads > 1:
            threads //= 2
        else:
            micro //= 2
    return threads, micro


# --- gemm -------------------------------------------------------------------------------------


def _gemm(sch: s_tir.Schedule, t: GemmTiles) -> str | None:
    parts = gemm_parts(sch)
    if parts is None:
        return None
    c, out = parts.accumulator, parts.epilogue
    a_buf = sch.get(parts.activation).writes[0].source
    reads = [r.source for r in sch.get(c).reads]
    b_buf = next(b for b in reads if not b.same_as(a_buf))  # the accumulator reads A and B only
    *batch, li, lj, lk = sch.get_loops(c)
    m, n, k = (_extent(sch, l) for l in (li, lj, lk))
    ti, vi = _fit(m, t.threads_i, t.micro_i)
    tj, vj = _fit(n, t.threads_j, t.micro_j)
    intrin = DP4A.get((str(a_buf.dtype), str(b_buf.dtype))) if k % 4 == 0 else None
    kc = next(d for d in (t.k_chunk, 16, 8, 4, 2, 1) if k % d == 0 and (intrin is None or d % 4 == 0))

    # The epilogue is tiled over blocks and threads, and C computed per thread inside it: its
    # accumulator tile stays in registers. (C is moved to the epilogue, not the reverse: the
    # epilogue may read other producers, e.g. column sums, that come after C.)
    sch.set_scope(c, 0, "local")
    *ob, oi, oj = sch.get_loops(out)
    bi, ti_l, vi_l = sch.split(oi, [None, ti, vi])
    bj, tj_l, vj_l = sch.split(oj, [None, tj, vj])
    sch.reorder(bi, bj, ti_l, tj_l, vi_l, vj_l)
    sch.bind(sch.fuse(*ob, bi) if ob else bi, "blockIdx.y")
    sch.bind(bj, "blockIdx.x")
    sch.bind(ti_l, "threadIdx.y")
    sch.bind(tj_l, "threadIdx.x")
    sch.unroll(vi_l)
    sch.unroll(vj_l)
    sch.compute_at(c, tj_l, preserve_unit_loops=True)
    *_, ci, cj, ck = sch.get_loops(c)
    ko, ki = sch.split(ck, [None, kc])
    k4 = None
    if intrin:
        ki, k4 = sch.split(ki, [None, 4])
    sch.reorder(ko, ki, ci, cj, *([k4] if k4 else []))

    # Operand tiles of one k-chunk in shared memory, loaded by all threads of the block. A stage
    # block (the activation, a weight packed at run time) is computed there; a weight parameter
    # is copied there as [.., rows, k] whatever its layout (packed included).
    for produced, buf, row in ((parts.activation, a_buf, -3), (parts.weight, b_buf, -2)):
        if produced is not None:
            stage, vec = produced, 1  # its source indexing is arbitrary: no vector loads
            sch.set_scope(stage, 0, "shared")
        else:
            index = next(i for i, b in enumerate(reads) if b.same_as(buf))
            layout = tirx.IndexMap.from_func(_rows_by_k(row), ndim=len(batch) + 3)
            stage = sch.reindex_cache_read(c, index, "shared", layout)
            vec = 4 if k % 4 == 0 else 1  # 4 bytes along k: aligned in a contiguous tensor
        sch.compute_at(stage, ko, preserve_unit_loops=True)
        ndim = len(sch.get(stage).writes[0].source.shape)
        if ndim >= 2 and kc % 4 == 0:
            sch.storage_align(stage, 0, ndim - 2, 32, 4)  # rows 4 bytes off a bank multiple
        own = _below(sch, stage, ko)
        fused = sch.fuse(*own) if len(own) > 1 else own[0]
        if _extent(sch, fused) % (ti * tj * vec):
            vec = 1
        *_, fy, fx, fv = sch.split(fused, [None, ti, tj, vec])
        sch.bind(fy, "threadIdx.y")
        sch.bind(fx, "threadIdx.x")
        if vec > 1:
            sch.vectorize(fv)

    init = sch.decompose_reduction(c, ko)
    for loop in [*sch.get_loops(init)[-2:], ci, cj]:
        sch.unroll(loop)
    if intrin:
        sch.tensorize(k4, intrin)
    _generic(sch, [b for b in (parts.weight_sums, *parts.others) if b is not None])  # kernels of their own
    return "-dp4a" if intrin else "-simt"


# --- rowwise ----------------------------------------------------------------------------------


def _rowwise(sch: s_tir.Schedule) -> str | None:
    """One thread block per row of the output ([*lead, C]); every other block computed inside it."""
    *stages, out = sch.get_child_blocks(sch.get_sblock("root"))
    loops = sch.get_loops(out)
    if len(loops) < 2 or any(kd != SPATIAL for kd in _kinds(sch, out)):
        return None
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    last = _extent(sch, loops[-1])
    for blk in reversed(stages):
        for i in range(len(sch.get(blk).writes)):
            sch.set_scope(blk, i, "shared")  # read by other threads of the block
        sch.compute_at(blk, row, preserve_unit_loops=False)
    # The widest per-row loop sets the thread count: every block of a kernel shares threadIdx.x.
    widths = [last] + [_extent(sch, l) for b in stages for l in sch.get_loops(b)[1:]]
    threads = min(THREADS, max(32, 1 << (max(widths) - 1).bit_length()))
    sch.bind(row, "blockIdx.x")
    for blk in [*stages, out]:
        own = sch.get_loops(blk)[1:]
        if not own:
            continue  # a per-row scalar: TVM lowers its shared write to thread 0 plus barriers
        if len(own) > 1:
            return None  # not one per-row axis (e.g. spatial and reduction loops left)
        serial, tx = sch.split(own[0], [None, threads])
        sch.reorder(tx, serial)
        sch.bind(tx, "threadIdx.x")  # on a reduction loop: a cross-thread allreduce
    return f"-{threads}"


# --- generic ----------------------------------------------------------------------------------


def _generic(sch: s_tir.Schedule, blocks: list) -> None:
    """Each block its own kernel: leading spatial loops fused over blockIdx.x x threadIdx.x,
    any reduction loops serial inside."""
    for blk in blocks:
        loops = sch.get_loops(blk)
        kinds = _kinds(sch, blk)
        lead = next((i for i, kd in enumerate(kinds) if kd != SPATIAL), len(kinds))
        lead = min(lead, len(loops))
        if lead:
            fused = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
        else:
            fused = sch.add_unit_loop(loops[0] if loops else blk)
        extent = _extent(sch, fused)
        bx, tx = sch.split(fused, [None, min(THREADS, extent)])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
