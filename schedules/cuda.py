"""CUDA schedules for the TE kernels of `relay_ops` (the device's toolchain and runtime side are
in `ibert_tvm.device_cuda`).

`schedule(func, arch)` picks:
- gemm: a kernel whose blocks carry GEMM roles (`parts.gemm_parts`): the accumulator
  `C[.., i, j] += int32(A[.., i, k]) * int32(B[.., j, k])` with 8-bit A, B. The operand tiles of
  each k-chunk are staged in shared memory (the activation stage and a weight packed at run time
  are computed there; a weight parameter is cache-read there), and the epilogue runs on the
  accumulators where they are, in registers. Two forms:
  - mma (s8 x s8 whose M, N are multiples of 16 and K of 32: every linear layer and attention
    product of the usual models): tensor cores, `schedules.mma`. Each warp owns a few 16x16
    accumulator tiles, loads its operand fragments from shared memory with `ldmatrix` and runs
    `mma.sync` (m16n8k32 on sm_80+, m8n8k16 on sm_75); each lane then runs the epilogue on the
    accumulator elements it holds.
  - dp4a (the rest: heads whose M is the batch or N the labels, attention with 16-wide heads):
    C is tiled per thread block and per thread (a register tile of accumulators, "local"); the
    innermost 4 k are one `__dp4a` (sm_61+) when K % 4 == 0.
  The other blocks (column sums) get `_generic`.
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

from ibert_tvm.relay_ops.gemm import unpack_index

from . import mma
from .parts import GemmParts, epilogue_loops, gemm_parts

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


@dataclass(frozen=True)
class MmaTiles:
    """Thread block = warps_i x warps_j warps, each owning frags_i x frags_j warp tiles (16x16)."""

    warps_i: int = 2
    warps_j: int = 2
    frags_i: int = 2
    frags_j: int = 2
    k_chunk: int = 64  # k per shared-memory stage, a multiple of mma.TILE_K


def schedule(func: tirx.PrimFunc, arch: int, tiles: GemmTiles = GemmTiles(),
             mma_tiles: MmaTiles = MmaTiles()) -> tirx.PrimFunc:
    """The first schedule that applies, for SM version `arch` (75 for sm_75); attr
    "ibert.cuda_schedule" says which. A GEMM kernel gets its GEMM schedule or an error: a slow
    fallback would hide what went wrong."""
    sch = s_tir.Schedule(func)
    how = _gemm(sch, arch, tiles, mma_tiles)
    if how:
        return _done(sch, f"gemm{how}")
    sch = s_tir.Schedule(func)
    try:
        how = _rowwise(sch)
    except RuntimeError:  # ScheduleError, InternalError: a precondition failed
        how = None
    if how:
        return _done(sch, f"rowwise{how}")
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


def _operands(sch: s_tir.Schedule, parts: GemmParts) -> tuple[tirx.Buffer, tirx.Buffer]:
    """A and B: the buffers the accumulator reads (it reads nothing else)."""
    a_buf = sch.get(parts.activation).writes[0].source
    return a_buf, next(r.source for r in sch.get(parts.accumulator).reads if not r.source.same_as(a_buf))


def _mnk(sch: s_tir.Schedule, parts: GemmParts) -> tuple[int, int, int]:
    return tuple(_extent(sch, l) for l in sch.get_loops(parts.accumulator)[-3:])


def _gemm(sch: s_tir.Schedule, arch: int, t: GemmTiles, tm: MmaTiles) -> str | None:
    parts = gemm_parts(sch)
    if parts is None:
        return None
    a_buf, b_buf = _operands(sch, parts)
    m, n, k = _mnk(sch, parts)
    shape = mma.mma_shape(arch)
    if shape and mma.fits(m, n, k) and (str(a_buf.dtype), str(b_buf.dtype)) == ("int8", "int8"):
        _gemm_mma(sch, parts, shape, tm)
        return f"-mma-{shape}"
    return _gemm_dp4a(sch, parts, t)


def _stage_operands(sch: s_tir.Schedule, parts: GemmParts, ko, kc: int, threads: tuple[int, int], align: int,
                    unpack: bool) -> list:
    """Operand tiles of one k-chunk in shared memory, loaded by all threads of the block (threadIdx.y
    x threadIdx.x = `threads`); returns the stage blocks (A's, B's). A stage block (the activation,
    a weight packed at run time) is computed there; a weight parameter is copied there as
    [.., rows, k] whatever its layout (packed included); `unpack` lays a packed stage out so too.
    Rows start `align` bytes past a multiple of 32 (bank conflicts)."""
    c = parts.accumulator
    a_buf, b_buf = _operands(sch, parts)
    reads = [r.source for r in sch.get(c).reads]
    k = int(a_buf.shape[-1])
    stages = []
    for produced, buf, row in ((parts.activation, a_buf, -3), (parts.weight, b_buf, -2)):
        if produced is not None:
            stage, vec = produced, 1  # its source indexing is arbitrary: no vector loads
            if unpack and produced.same_as(parts.weight) and len(buf.shape) == len(a_buf.shape) + 2:
                sch.transform_layout(stage, ("write", 0), unpack_index)
            sch.set_scope(stage, 0, "shared")
        else:
            index = next(i for i, b in enumerate(reads) if b.same_as(buf))
            layout = tirx.IndexMap.from_func(_rows_by_k(row), ndim=len(a_buf.shape) + 1)
            stage = sch.reindex_cache_read(c, index, "shared", layout)
            vec = 4 if k % 4 == 0 else 1  # 4 bytes along k: aligned in a contiguous tensor
        sch.compute_at(stage, ko, preserve_unit_loops=True)
        ndim = len(sch.get(stage).writes[0].source.shape)
        if ndim >= 2 and kc % 4 == 0:
            sch.storage_align(stage, 0, ndim - 2, 32, align)
        own = _below(sch, stage, ko)
        fused = sch.fuse(*own) if len(own) > 1 else own[0]
        if _extent(sch, fused) % (threads[0] * threads[1] * vec):
            vec = 1
        *_, fy, fx, fv = sch.split(fused, [None, *threads, vec])
        sch.bind(fy, "threadIdx.y")
        sch.bind(fx, "threadIdx.x")
        if vec > 1:
            sch.vectorize(fv)
        stages.append(stage)
    return stages


def _gemm_dp4a(sch: s_tir.Schedule, parts: GemmParts, t: GemmTiles) -> str:
    """Register tiles of `__dp4a` (or plain multiply-adds), one thread per micro tile."""
    c = parts.accumulator
    a_buf, b_buf = _operands(sch, parts)
    m, n, k = _mnk(sch, parts)
    ti, vi = _fit(m, t.threads_i, t.micro_i)
    tj, vj = _fit(n, t.threads_j, t.micro_j)
    intrin = DP4A.get((str(a_buf.dtype), str(b_buf.dtype))) if k % 4 == 0 else None
    kc = next(d for d in (t.k_chunk, 16, 8, 4, 2, 1) if k % d == 0 and (intrin is None or d % 4 == 0))

    # The epilogue is tiled over blocks and threads, and C computed per thread inside it: its
    # accumulator tile stays in registers. (C is moved to the epilogue, not the reverse: the
    # epilogue may read other producers, e.g. column sums, that come after C.)
    sch.set_scope(c, 0, "local")
    *ob, oi, oj = epilogue_loops(sch, parts)
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
    _stage_operands(sch, parts, ko, kc, (ti, tj), 4, unpack=False)

    init = sch.decompose_reduction(c, ko)
    for loop in [*sch.get_loops(init)[-2:], ci, cj]:
        sch.unroll(loop)
    if intrin:
        sch.tensorize(k4, intrin)
    _generic(sch, [b for b in (parts.weight_sums, *parts.others) if b is not None])  # kernels of their own
    return "-dp4a" if intrin else "-simt"


def _gemm_mma(sch: s_tir.Schedule, parts: GemmParts, shape: str, t: MmaTiles) -> None:
    """Warp tiles of `mma.sync` (schedules.mma): each warp owns fi x fj accumulator tiles in its
    lanes' registers, loads its A and B fragments from the shared stages with `ldmatrix` per 32 k,
    and runs the epilogue on the accumulator fragments, each lane on the elements it holds."""
    c = parts.accumulator
    m, n, k = _mnk(sch, parts)
    wi, fi = _fit(m // mma.TILE_M, t.warps_i, t.frags_i)
    wj, fj = _fit(n // mma.TILE_N, t.warps_j, t.frags_j)
    kc = next(d for d in (t.k_chunk, mma.TILE_K) if k % d == 0)

    sch.set_scope(c, 0, "warp")
    *ob, oi, oj = epilogue_loops(sch, parts)
    bi, wi_l, fi_l, ii = sch.split(oi, [None, wi, fi, mma.TILE_M])
    bj, wj_l, fj_l, jj = sch.split(oj, [None, wj, fj, mma.TILE_N])
    sch.reorder(bi, bj, wi_l, wj_l, fi_l, fj_l, ii, jj)
    sch.bind(sch.fuse(*ob, bi) if ob else bi, "blockIdx.y")
    sch.bind(bj, "blockIdx.x")
    warp = sch.fuse(wi_l, wj_l)
    sch.bind(warp, "threadIdx.y")
    _bind_lanes(sch, fi_l, fj_l, ii, jj)
    sch.compute_at(c, warp, preserve_unit_loops=True)
    *_, ci, cj, ck = sch.get_loops(c)
    cfi, cii = sch.split(ci, [None, mma.TILE_M])
    cfj, cjj = sch.split(cj, [None, mma.TILE_N])
    ko, kw, kk = sch.split(ck, [None, kc // mma.TILE_K, mma.TILE_K])
    sch.reorder(ko, kw, cfi, cfj, cii, cjj, kk)
    stages = _stage_operands(sch, parts, ko, kc, (wi * wj, mma.WARP), 16, unpack=True)

    # each warp's fragments of one 32-k step, loaded by ldmatrix from the shared stages
    fragments = []
    for stage, rows_first, frags, intrin in zip(stages, (True, False), (fi, fj), (mma.LDMATRIX_A, mma.LDMATRIX_B)):
        shared = sch.get(stage).writes[0].source
        frag = sch.cache_read(c, next(i for i, r in enumerate(sch.get(c).reads) if r.source.same_as(shared)), "warp")
        sch.compute_at(frag, kw, preserve_unit_loops=True)
        sch.transform_layout(frag, ("write", 0), mma.operand_layout(rows_first, frags))
        _, tile = sch.split(sch.get_loops(frag)[-2], [None, mma.TILE_M])
        fragments.append((tile, intrin))
    sch.transform_layout(c, ("write", 0), mma.acc_layout(fi, fj))

    init = sch.decompose_reduction(c, ko)
    _bind_lanes(sch, *sch.get_loops(init)[-4:])
    for loop, intrin in fragments:
        sch.tensorize(loop, intrin)
    sch.tensorize(cii, mma.mma_intrin(shape))
    _generic(sch, [b for b in (parts.weight_sums, *parts.others) if b is not None])


def _bind_lanes(sch: s_tir.Schedule, fi, fj, ii, jj) -> None:
    """Loops over fi x fj accumulator tiles (ii, jj: 16 each) -> each lane (threadIdx.x) over the
    elements its fragments hold (mma.acc_fragment: lane 4 * (i % 8) + (j % 8) // 2)."""
    i_hi, i_lo = sch.split(ii, [2, 8])
    j_hi, j_mid, j_lo = sch.split(jj, [2, 4, 2])
    sch.reorder(i_lo, j_mid, fi, fj, i_hi, j_hi, j_lo)
    sch.bind(sch.fuse(i_lo, j_mid), "threadIdx.x")
    for loop in (fi, fj, i_hi, j_hi, j_lo):
        sch.unroll(loop)


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
