"""CPU schedules (x86 and ARM): tensorized register tiles for INT8 GEMMs, parallel + vector loops
elsewhere.

GEMM kernels (their stages found by the roles `relay_ops.gemm` gives them: `parts.gemm_parts`)
are tiled MB rows x NB*16 columns; the accumulator is a per-tile local buffer (registers)
computed under the epilogue's tile loop, so the epilogue (requantization, GELU, residual) reads
it straight back.
Each kernel has a single parallel loop; its operand stages are computed inside it.
The inner 16x4 product is an ISA's dot-product intrinsic (x86 `vpdpbusd`, ARM `sdot`, AVX2's
`vpmaddwd` pairs, or `vpmaddubsw` pairs where B never holds -128); without one (plain NEON) LLVM
vectorizes the same tile with widening multiplies. With Intel AMX, a
GEMM whose shape fits takes 32x32 blocks, each one call of the tile intrinsic over all of K.
The fused attention kernel is one such GEMM (P V) whose activation has producers: the row-wise
softmax stages and a first GEMM (Q K^T), all computed under its row tile (`_first_gemm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import takewhile

import tvm_ffi
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad

from ibert_tvm.relay_ops.gemm import B_ABOVE_INT8_MIN, FIRST_PART_KEY, GROUP, LANES, U8_SHIFT, packable

from .intrin import AMX_K, AMX_M, AMX_N, AVX2_INTRIN, AVX2_SIGN_INTRIN, SDOT_INTRIN, VNNI_INTRIN, amx_intrin
from .parts import GemmParts, epilogue_loops, gemm_parts


@dataclass(frozen=True)
class Isa:
    """What a GEMM register tile is made of on one instruction set."""

    name: str
    intrin: str | None  # 16x4 tensor intrinsic; None: LLVM vectorizes the tile
    regs_per_group: int  # vector registers that hold 16 int32 accumulators
    registers: int  # vector registers of the ISA
    a_shift: int  # the activations' operand form (relay_ops.gemm): u8 (+128) or s8 (0)
    matrix: bool = False  # AMX tiles for the GEMMs whose shape fits them (amx_fits), `intrin` for the rest
    b_above_min_intrin: str | None = None  # a faster `intrin`, exact on kernels marked B_ABOVE_INT8_MIN

    def intrin_for(self, func: tirx.PrimFunc) -> str | None:
        """The tile intrinsic for this kernel, None where LLVM vectorizes its tile."""
        if self.b_above_min_intrin and func.attrs.get(B_ABOVE_INT8_MIN, False):
            return self.b_above_min_intrin
        return self.intrin


ISAS = {
    i.name: i
    for i in (
        Isa("vnni", VNNI_INTRIN, 1, 32, U8_SHIFT),
        Isa("amx", VNNI_INTRIN, 1, 32, U8_SHIFT, matrix=True),
        Isa("avx2", AVX2_INTRIN, 2, 16, 0, b_above_min_intrin=AVX2_SIGN_INTRIN),
        Isa("sdot", SDOT_INTRIN, 4, 32, 0),
        Isa("neon", None, 4, 32, 0),
    )
}

# Without a tuning record: the largest of these that fits the registers; on AVX-512 8 x 3 where the
# columns divide (MiniLM's GEMMs 1-8% faster than 8 x 2 once the staged rows were on the stack:
# `stack_buffers`), what the tuner picks for most shapes there, else 8 x 2.
ROW_TILES = (8, 4, 2, 1)
COL_TILES = (3, 2, 1)
Tiles = tuple[int, int]  # (rows, 16-column groups) of one register tile


def gemm_shape(func: tirx.PrimFunc) -> tuple[int, ...] | None:
    """(*batch, M, N, K) of a GEMM kernel, read off its accumulator block; None for other kernels."""
    sch = s_tir.Schedule(func)
    parts = gemm_parts(sch)
    return tuple(_extents(sch, parts.accumulator)) if parts else None


AMX_MIN_K = 256  # below, a block's few tile products do not pay for its configuration and C traffic:
# attention's scores (K = head size 64) ran 1.4x slower on the tiles than on vpdpbusd
AMX_MIN_N = 128  # attention's context (N = head size 64) in the fused kernel ran 1.3x slower on the tiles
# at 256 keys, 1.1x at 512: their 32-row tiles make the softmax's rows overflow L1


L2_WEIGHT = 1 << 20  # bytes of weight kept in L2 across row tiles: half of every AVX-512 server CPU's L2
ROW_GROUPS = 4  # row groups per column block in a column-first GEMM's parallel loop


def amx_fits(m: int, n: int, k: int) -> bool:
    return m % AMX_M == 0 and n % AMX_N == 0 and k % AMX_K == 0 and k >= AMX_MIN_K and n >= AMX_MIN_N


def amx_columns(n: int, parallel: bool) -> int:
    """Columns of one AMX intrinsic call: the most (each call reloads the tile configuration) that
    divide N, up to 256 (a 32 KiB accumulator block, which the epilogue reads back from L1); when
    the blocks are the parallel loop, an even count of them first (two cores)."""
    widths = [c for c in (256, 192, 128, 96, 64, 32) if n % c == 0]
    return next((c for c in widths if not parallel or (n // c) % 2 == 0), widths[0])


def tuned(isa: Isa, shape: tuple[int, ...]) -> bool:
    """Whether a GEMM of this (*batch, M, N, K) takes register tiles (tunable): AMX blocks are fixed."""
    return packable(*shape[-2:]) and not (isa.matrix and amx_fits(*shape[-3:]))


def _fits(isa: Isa, r: int, c: int) -> bool:
    """Accumulators leave 4 registers for operands, and fill at least 4 (enough independent chains)."""
    return 4 <= r * c * isa.regs_per_group <= isa.registers - 4


def tile_candidates(m: int, n: int, isa: Isa) -> list[Tiles]:
    """Register tiles that divide the shape and fit the ISA's vector registers."""
    rows = [t for t in (1, 2, 3, 4, 6, 8) if m % t == 0]
    cols = [t for t in (1, 2, 3, 4, 6, 8) if (n // LANES) % t == 0]
    return [(r, c) for r in rows for c in cols if _fits(isa, r, c)]


def default_tiles(m: int, n: int, isa: Isa) -> Tiles:
    fitting = ((r, c) for r in ROW_TILES for c in COL_TILES if m % r == 0 and (n // LANES) % c == 0 and _fits(isa, r, c))
    return next(fitting, (1, 1))


def schedule(func: tirx.PrimFunc, isa: Isa, tiles: Tiles | None = None) -> tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    parts = gemm_parts(sch)
    if parts and _gemm(sch, parts, isa, isa.intrin_for(func), tiles):
        main = sch.mod["main"]
        return main.with_body(tvm_ffi.structural_map(main.body, (s_tir.SBlock, _drop_own_init)))
    sch = s_tir.Schedule(func)
    if func.attrs["ibert.kind"] == "rowwise" and _rowwise(sch):
        return sch.mod["main"]
    sch = s_tir.Schedule(func)
    generic(sch)
    return sch.mod["main"]


# A tensorized block whose intrinsic zeroes the accumulators itself (AMX's `tilezero`). TVM keeps
# the reduction's init on the block it tensorizes, which lowers to a memset of C that the tiles
# never read: 5-10% of a GEMM at K = 384-768.
ZEROES_OWN_INIT = "ibert.zeroes_own_init"


def _drop_own_init(block: s_tir.SBlock) -> s_tir.SBlock:
    """A block annotated ZEROES_OWN_INIT without its init; any other block as it is."""
    if ZEROES_OWN_INIT not in block.annotations:
        return block
    return s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, block.body, None,
                        block.alloc_buffers, block.match_buffers, block.annotations)


def _extents(sch: s_tir.Schedule, block) -> list[int]:
    return [int(sch.get(l).extent) for l in sch.get_loops(block)]


def _gemm(sch: s_tir.Schedule, parts: GemmParts, isa: Isa, intrin: str | None, tiles: Tiles | None) -> bool:
    c = parts.accumulator
    *batch, m, n, k = _extents(sch, c)
    if not packable(n, k):
        return False
    amx = isa.matrix and amx_fits(m, n, k)
    mb, nb = (AMX_M, amx_columns(n, not batch) // LANES) if amx else tiles or default_tiles(m, n, isa)
    *bl, oi, oj = epilogue_loops(sch, parts)
    oi0, oi1 = sch.split(oi, [None, mb])
    oj0, oj1 = sch.split(oj, [None, nb * LANES])
    # A linear layer whose weight outgrows L2 takes column blocks outermost, each block read from
    # memory once for every row tile (the u8 activations staged whole first); row tiles outermost
    # read all of the weight again for each. Measured on AMX, and on the VNNI register tiles
    # (roberta-base's forward 15% faster at 8x128, 22% at 1x128). One that fits takes row tiles
    # outermost, like the kernels around it: each core then reads the rows it wrote itself
    # (MiniLM at 8x128 on AMX: 7% faster whole; its VNNI GEMMs 10-30% slower column-first).
    # A single row tile (the pooler's first tokens) takes column blocks outermost too: else its
    # one parallel iteration leaves every core but one idle.
    columns_first = not bl and (n * k > L2_WEIGHT or m <= mb)
    outer, inner = (oj0, oi0) if columns_first else (oi0, oj0)
    sch.reorder(outer, inner, oi1, oj1)
    if columns_first:
        # The parallel loop takes each column block with a few row groups, in that order: on two
        # cores each thread still streams whole blocks, and up to ROW_GROUPS times more cores than
        # blocks get work (on AMX roberta-base's ffn_out has 4). Every row tile a parallel
        # iteration of its own ran 10% slower.
        group, inner = sch.split(inner, [math.gcd(ROW_GROUPS, int(sch.get(inner).extent)), None])
    sch.compute_at(c, inner)
    sch.set_scope(c, 0, "local")  # the accumulator shrinks to one register tile per iteration
    rows, a1, a2 = _tile_loops(sch, c, inner)
    # One parallel loop per kernel (each parallel region costs a barrier): over heads (attention)
    # or the outer tiles. Per-head operands (packed K/V, key sums) and each row tile's staged
    # activations are computed inside it, once, and reused by every column tile.
    par = sch.fuse(*bl) if bl else sch.fuse(outer, group) if columns_first else outer
    a_dtype = str(sch.get(parts.activation).writes[0].source.dtype)
    # s8 on the tiles: an activation that is a plain read needs no stage, the tiles load it in place
    activation = parts.activation
    if amx and a_dtype == "int8" and _plain_read(sch, activation):
        sch.compute_inline(activation)
        activation = None
    staged = [(blk, at) for blk, at in ((parts.weight, par), (parts.weight_sums, par),
                                         (activation, None if columns_first else oi0)) if blk is not None]
    for blk, at in staged:
        if at is None:
            parallel_vector(sch, blk)
        else:
            sch.compute_at(blk, at, preserve_unit_loops=False)
    # Fused attention: the activation is the softmax of a first GEMM (Q K^T), all of it computed
    # row tile by row tile with the activation; the first GEMM's operands per head, like ours.
    first = gemm_parts(sch, FIRST_PART_KEY)
    if first is not None and not packable(*_extents(sch, first.accumulator)[-2:]):
        return False
    rowwise = _row_stages(sch, [b for b in parts.others if FIRST_PART_KEY not in sch.get(b).annotations])
    for blk in reversed(rowwise):
        sch.compute_at(blk, oi0, preserve_unit_loops=False)
    first_tile = _first_gemm(sch, first, par, oi0, isa) if first is not None else None
    sch.parallel(par)  # before any tensorize: a tensorized reduction is no longer one TVM can check
    if first_tile is not None:
        _register_tile(sch, *first_tile, intrin)
    if amx:  # the whole block's reduction, its init included, is one intrinsic call
        tile = sch.blockize(rows)
        sch.tensorize(tile, amx_intrin(k, nb * LANES, a_dtype))
        sch.annotate(tile, ZEROES_OWN_INIT, 1)
    else:
        _register_tile(sch, c, rows, a1, a2, nb, intrin)
    groups = _vectorize_columns(sch, oj1, nb)
    if not amx:
        # A register tile's epilogue group by group of 16 columns, its rows unrolled: a per-channel
        # multiplier is then loaded where it is used. In a loop over the rows LLVM hoisted the
        # multiplier's sign extension out of it, and the high half of a product with it
        # (`relay_ops.common.high_half`) lost its two-`vpmuldq` form for a 64-bit one of twice the
        # instructions (MiniLM's attn_out and ffn_out 2-3% faster on VNNI).
        if groups is not None:
            sch.reorder(groups, oi1)
        sch.unroll(oi1)
    for blk, at in staged:
        if at is not None:
            _vectorize_inner(sch, blk)
    _vectorize_rows(sch, rowwise)
    return True


def _plain_read(sch: s_tir.Schedule, blk) -> bool:
    """Whether a block only copies its source element for element (no re-indexing, no arithmetic)."""
    block = sch.get(blk)
    value = block.body.value
    return (isinstance(value, TensorLoad) and len(value.indices) == len(block.iter_vars)
            and all(i.same_as(iv.var) for i, iv in zip(value.indices, block.iter_vars)))


def _below(sch: s_tir.Schedule, blk, loop) -> list:
    """The loops of a block inside `loop`."""
    loops = sch.get_loops(blk)
    at = next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(loop)))
    return loops[at + 1 :]


def _tile_loops(sch: s_tir.Schedule, c, tile_loop) -> tuple:
    """An accumulator's loops under its tile loop: rows (None: a one-row tile has no row loop of
    its own), columns, reduction."""
    own = _below(sch, c, tile_loop)
    rows, cols, red = ([None] if len(own) == 2 else own[:1]) + own[-2:]
    return rows, cols, red


def _vectorize_columns(sch: s_tir.Schedule, cols, nb: int):
    """An epilogue's nb*16 columns 16 at a time: wider int64 vectors than that spill registers.
    Returns the loop over the groups of 16, None for one group."""
    if nb == 1:
        sch.vectorize(cols)
        return None
    groups, lanes = sch.split(cols, [None, LANES])
    sch.vectorize(lanes)
    return groups


def _register_tile(sch: s_tir.Schedule, c, rows, a1, a2, nb: int, intrin: str | None) -> None:
    """An accumulator computed under its tile loop (rows x nb*16 columns, reduction a2) as a
    register tile: the reduction outermost, the 16x4 inner product the ISA's intrinsic."""
    a10, a11 = sch.split(a1, [nb, LANES])
    k0, k1 = sch.split(a2, [None, GROUP])
    sch.reorder(*[l for l in (k0, rows, a10, a11, k1) if l is not None])
    if intrin is None:  # LLVM vectorizes the 16 lanes; must precede decompose_reduction
        sch.reorder(k1, a11)
        sch.vectorize(a11)
    init = sch.decompose_reduction(c, k0)
    if intrin is not None:
        sch.tensorize(a11, intrin)
    for loop in (rows, a10):
        if loop is not None:
            sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])


def _first_gemm(sch: s_tir.Schedule, first: GemmParts, par, row_tile, isa: Isa) -> tuple:
    """The first GEMM of a fused kernel under the second's row tile: its epilogue (the scores of
    the tile's rows, all keys) in register tiles, each computed where it is stored. Returns the
    `_register_tile` arguments of its accumulator, bar the intrinsic."""
    out, c = first.epilogue, first.accumulator
    sch.compute_at(out, row_tile, preserve_unit_loops=False)
    *i, j = _below(sch, out, row_tile)  # no row loop when the tile has one row
    m, n = (int(sch.get(i[0]).extent) if i else 1), int(sch.get(j).extent)
    r, nb = default_tiles(m, n, isa)
    j0, j1 = sch.split(j, [None, nb * LANES])
    if i:
        i0, i1 = sch.split(i[0], [None, r])
        sch.reorder(i0, j0, i1, j1)
    sch.compute_at(c, j0)
    sch.set_scope(c, 0, "local")
    rows, a1, a2 = _tile_loops(sch, c, j0)
    for blk, at in ((first.weight, par), (first.weight_sums, par), (first.activation, row_tile)):
        if blk is not None:
            sch.compute_at(blk, at, preserve_unit_loops=False)
            _vectorize_inner(sch, blk)
    _vectorize_columns(sch, j1, nb)
    return c, rows, a1, a2, nb


def _vectorize_inner(sch: s_tir.Schedule, blk) -> None:
    """A fully spatial block's innermost loop in 16 lanes, when it divides and is the block's own
    (never its only loop, the parallel one, nor a tile loop it shares with other stages)."""
    loops = sch.get_loops(blk)
    spatial = all(iv.iter_type == 0 for iv in sch.get(blk).iter_vars)
    own = isinstance(sch.get(loops[-1]).body, s_tir.SBlockRealize) if loops else False
    if len(loops) > 1 and own and spatial and int(sch.get(loops[-1]).extent) % LANES == 0:
        sch.vectorize(sch.split(loops[-1], [None, LANES])[1])


def parallel_vector(sch: s_tir.Schedule, blk) -> None:
    """Leading spatial loops run in parallel; a fully spatial block's last loop in 16 lanes."""
    loops = sch.get_loops(blk)
    kinds = [iv.iter_type for iv in sch.get(blk).iter_vars]
    lead = len(list(takewhile(lambda t: t == 0, kinds)))
    if lead == len(loops) and lead > 1:
        outer = loops[:-1]
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        _vectorize_inner(sch, blk)
    elif lead:
        sch.parallel(sch.fuse(*loops[:lead]) if lead > 1 else loops[0])


def _row_stages(sch: s_tir.Schedule, blocks) -> list:
    """The stages of a row-wise computation, each row reduction split into 16 vector lanes of
    partial results (rfactor; its block precedes the final 16-element step)."""
    stages = []
    for blk in blocks:
        kinds = [iv.iter_type for iv in sch.get(blk).iter_vars]
        last = sch.get_loops(blk)[-1]
        extent = int(sch.get(last).extent)
        if kinds[-1] == 2 and all(k == 0 for k in kinds[:-1]) and extent % LANES == 0 and extent > LANES:
            stages.append(sch.rfactor(sch.split(last, [None, LANES])[1], factor_axis=len(kinds) - 1))
        stages.append(blk)
    return stages


def _vectorize_rows(sch: s_tir.Schedule, stages: list) -> None:
    """Row stages computed under their row loop: partial results over 16 lanes, the rest 16 at a time."""
    for blk in stages:
        if sch.get(blk).name_hint.endswith("_rf"):
            lanes, steps = _lanes_and_steps(sch, blk)
            sch.reorder(steps, lanes)
            sch.vectorize(lanes)  # before decompose_reduction, which TVM requires
            init = sch.decompose_reduction(blk, steps)
            sch.vectorize(sch.get_loops(init)[-1])
        else:
            _vectorize_inner(sch, blk)


def _lanes_and_steps(sch: s_tir.Schedule, rf) -> tuple:
    """The loops of an rfactor block over its 16 partial results (the last axis it writes) and
    over its reduction: compute_at orders a block's loops by its iteration variables, not by role."""
    block, loops = sch.get(rf), sch.get_loops(rf)
    values = sch.get(loops[-1]).body.iter_values  # the block's bindings, in iter_vars' order
    lane = block.writes[0].region[-1].min

    def loop_of(index: int):
        return next(lp for lp in loops if sch.get(lp).loop_var.same_as(values[index]))

    ivs = list(block.iter_vars)
    return (loop_of(next(i for i, iv in enumerate(ivs) if iv.var.same_as(lane))),
            loop_of(next(i for i, iv in enumerate(ivs) if iv.iter_type == 2)))


def _rowwise(sch: s_tir.Schedule) -> bool:
    """Row-wise kernels (LayerNorm, softmax, embeddings): every stage computed row by row under
    the output's parallel row loop, so a row's statistics and values stay in L1 (`_row_stages`)."""
    *stages, out = sch.get_child_blocks(sch.get_sblock("root"))
    stages = _row_stages(sch, stages)
    loops = sch.get_loops(out)
    if len(loops) < 2:
        return False
    row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    try:
        for blk in reversed(stages):
            sch.compute_at(blk, row, preserve_unit_loops=False)
    except s_tir.ScheduleError:
        return False
    sch.parallel(row)
    _vectorize_rows(sch, [*stages, out])
    return True


def generic(sch: s_tir.Schedule) -> None:
    """Every block: its leading spatial loops in parallel, its last spatial loop vectorized."""
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get_loops(blk):
            parallel_vector(sch, blk)
