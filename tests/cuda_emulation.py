"""The warp-level PTX instructions that `schedules.mma`'s intrinsics emit, emulated for the CPU.

`emulated(name)` registers, next to a CUDA tensor intrinsic, one with the same description whose
implementation is the real one with every `ldmatrix` / `mma.sync` call replaced by what the
instruction does to the registers of the whole warp: each of the 32 lanes passes its own register
offset (the call's offset with the lane for threadIdx.x), and which lane holds which matrix element
is written out below from the PTX ISA's tables, independently of the schedules. A fragment layout
or register offset that is wrong in the schedule therefore gives wrong integers on the CPU too.
"""

from __future__ import annotations

from collections.abc import Callable

from tvm import s_tir, tirx
from tvm.ir.expr import Call
from tvm.s_tir.stmt import SBlock, SBlockRealize
from tvm.tirx import Evaluate, For, ForKind, SeqStmt, Stmt

WARP = 32
I32 = "int32"

# PTX ISA 9.7.14.5, "Matrix Fragments for mma.m8n8k16" and "... for mma.m16n8k32" (.s8 operands,
# .s32 accumulators): for A, B and C, the elements a lane holds (low to high) and where element
# i of lane (g * 4 + t) sits in the matrix, (row, column); B is K x N.
Fragment = tuple[int, Callable]
FRAGMENTS: dict[str, tuple[tuple[int, int, int], Fragment, Fragment, Fragment]] = {
    "m8n8k16": (
        (8, 8, 16),
        (4, lambda g, t, i: (g, t * 4 + i)),
        (4, lambda g, t, i: (t * 4 + i, g)),
        (2, lambda g, t, i: (g, t * 2 + i)),
    ),
    "m16n8k32": (
        (16, 8, 32),
        (16, lambda g, t, i: (g + 8 * (i // 4 % 2), t * 4 + i % 4 + 16 * (i // 8))),
        (8, lambda g, t, i: (t * 4 + i % 4 + 16 * (i // 4), g)),
        (4, lambda g, t, i: (g + 8 * (i // 2), t * 2 + i % 2)),
    ),
}


def _at_lane(expr, lane_var: tirx.Var, lane) -> tirx.PrimExpr:
    """`expr` with the lane given for the implementation's threadIdx.x."""
    return tirx.IndexMap([lane_var], [expr], None).map_indices([lane])[0]


def _flat(ptr: tirx.PrimExpr, dtype: str) -> tuple[tirx.Buffer, Stmt]:
    """A flat view of the buffer whose data pointer is `ptr` (the calls pass pointer and offset),
    and its declaration."""
    view = tirx.decl_buffer((1 << 30,), dtype, name="registers", data=ptr)
    return view, tirx.DeclBuffer(view, data=ptr)


def _loops(extents: tuple[int, ...], body: Callable[..., Stmt]) -> Stmt:
    """for v0, v1, .. in grid(*extents): body(v0, v1, ..)"""
    vs = [tirx.Var(f"e{i}", I32) for i in range(len(extents))]
    stmt = body(*vs)
    for v, n in reversed(list(zip(vs, extents))):
        stmt = For(v, 0, n, ForKind.SERIAL, stmt)
    return stmt


def _store(buf: tirx.Buffer, value, *index) -> Stmt:
    return tirx.BufferStore(buf, value, list(index))


def _load(buf: tirx.Buffer, *index) -> tirx.PrimExpr:
    return tirx.BufferLoad(buf, list(index))


def _ldmatrix(call: Call, lane_var: tirx.Var) -> Stmt:
    """ldmatrix.sync.aligned.m8n8.xN.shared.b16: matrix j (8 rows of 16 bytes) has the row addresses
    of lanes 8j..8j+7; lane l receives bytes 4 * (l % 4).. of row l // 4 of matrix j in register j."""
    trans, num, kind, local_ptr, local_off, smem, smem_off = call.args
    assert not bool(trans) and kind.value == ".b16", call
    dtype = str(call.ty)
    (local, decl_local), (shared, decl_shared) = _flat(local_ptr, dtype), _flat(smem.args[1], dtype)
    base = smem.args[2]

    def copy(lane, j, b):
        row = base + _at_lane(smem_off, lane_var, 8 * j + lane // 4)
        return _store(local, _load(shared, row + 4 * (lane % 4) + b), _at_lane(local_off, lane_var, lane) + 4 * j + b)

    return SeqStmt([decl_local, decl_shared, _loops((WARP, int(num), 4), copy)])


def _mma(call: Call, lane_var: tirx.Var) -> Stmt:
    """mma.sync.aligned.{shape}.row.col.s32.s8.s8.s32, D = A B + C in C's registers: the lanes'
    fragments gathered into the matrices, multiplied, and D scattered back into C's registers."""
    shape, _, _, a_ty, b_ty, c_ty, a_ptr, a_off, b_ptr, b_off, c_ptr, c_off, _ = call.args
    assert (a_ty.value, b_ty.value, c_ty.value) == ("int8", "int8", "int32"), call
    (m, n, k), (na, fa), (nb, fb), (nc, fc) = FRAGMENTS[shape.value]
    regs = [(_flat(a_ptr, "int8"), a_off), (_flat(b_ptr, "int8"), b_off), (_flat(c_ptr, I32), c_off)]
    mats = [tirx.decl_buffer(s, d, name=nm) for s, d, nm in (((m, k), "int8", "A_mat"), ((k, n), "int8", "B_mat"),
                                                                ((m, n), I32, "D_mat"))]

    def element(frag: Callable, lane, i):
        return frag(lane // 4, lane % 4, i)

    def gather(mat, count, frag, reg, off):
        return _loops((WARP, count), lambda lane, i: _store(
            mat, _load(reg, _at_lane(off, lane_var, lane) + i), *element(frag, lane, i)))

    ((a, decl_a), ao), ((b, decl_b), bo), ((c, decl_c), co) = regs
    am, bm, dm = mats
    product = _loops((m, n, k), lambda r, col, kk: _store(
        dm, _load(dm, r, col) + _load(am, r, kk).astype(I32) * _load(bm, kk, col).astype(I32), r, col))
    scatter = _loops((WARP, nc), lambda lane, i: _store(c, _load(dm, *element(fc, lane, i)),
                                                        _at_lane(co, lane_var, lane) + i))
    return SeqStmt([decl_a, decl_b, decl_c, *(tirx.AllocBuffer(mt) for mt in mats),
                    gather(am, na, fa, a, ao), gather(bm, nb, fb, b, bo), gather(dm, nc, fc, c, co), product,
                    scatter])


EMULATIONS = {"tirx.ptx_legacy.ldmatrix": _ldmatrix, "tirx.ptx_legacy.mma": _mma}


def _replace_calls(stmt: Stmt, lane_var: tirx.Var) -> Stmt:
    """The implementation's per-lane body with each warp instruction emulated for the whole warp."""
    if isinstance(stmt, Evaluate) and isinstance(stmt.value, Call) and stmt.value.op.name in EMULATIONS:
        return EMULATIONS[stmt.value.op.name](stmt.value, lane_var)
    if isinstance(stmt, SeqStmt):
        return SeqStmt([_replace_calls(s, lane_var) for s in stmt.seq])
    if isinstance(stmt, For):
        return For(stmt.loop_var, stmt.min, stmt.extent, ForKind.SERIAL, _replace_calls(stmt.body, lane_var))
    raise TypeError(f"no emulation for {type(stmt).__name__} in a CUDA intrinsic: {stmt}")


def emulated(name: str) -> str:
    """The name of the emulated twin of tensor intrinsic `name`, registered from its current
    implementation."""
    intrin = s_tir.TensorIntrin.get(name)
    realize = intrin.impl.body
    root = realize.block
    lanes = root.body
    assert isinstance(lanes, For) and lanes.kind == ForKind.THREAD_BINDING and int(lanes.extent) == WARP, lanes
    block = SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, _replace_calls(lanes.body, lanes.loop_var),
                   root.init, root.alloc_buffers, root.match_buffers, root.annotations)
    impl = intrin.impl.with_body(SBlockRealize(realize.iter_values, realize.predicate, block))
    s_tir.TensorIntrin.register(f"{name}_cpu_emulation", intrin.desc, impl, override=True)
    return f"{name}_cpu_emulation"
