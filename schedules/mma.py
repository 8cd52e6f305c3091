"""INT8 tensor-core intrinsics for CUDA: one warp computes a 16x16 int32 tile from a 16x32 s8 A
tile and a 16x32 s8 B tile (B as [n, k], k contiguous: the `.col` operand of `mma.sync`).

The fragments live in "warp" buffers ([32 lanes, per-lane elements], TVM lowers them to registers):
- A and B: 16 bytes a lane, loaded from shared memory by one `ldmatrix.x4` each. The x4 form
  loads four 8x16-byte sub-matrices, sub-matrix s into register s (bytes 4s..4s+3), lane l
  holding bytes 4*(l % 4).. of row l // 4 of each; which 8 rows x 16 k each sub-matrix covers is
  `_sub_matrix`. A orders them rows first and B k first, so that every `mma.sync` finds the
  registers it takes (PTX ISA, "Matrix Fragments for mma.m16n8k32" / ".m8n8k16") side by side.
- C: 8 int32 a lane, element (i, j) in lane 4*(i % 8) + (j % 8) // 2 at 4*(j // 8) + 2*(i // 8) +
  j % 2: the accumulator fragments of the n8 halves one after the other, each holding PTX's
  c0..c3 (m16n8) or the two m8 halves' c0, c1 (m8n8).
- The product is `mma.sync` of the arch's shape (`mma_shape`): m16n8k32 twice on sm_80+, m8n8k16
  eight times on sm_75 (which has no k32 int8 shape).
TVM ships such intrinsics in s_tir.tensor_intrin.cuda, but importing it registers every CUDA
intrinsic first (about 40 s), and its fragment maps describe B's registers in another order
than its ldmatrix fills them; here the maps are what the hardware does.
"""

from __future__ import annotations

from collections.abc import Callable

from tvm import s_tir
from tvm.script import tirx as T

WARP = 32
TILE_M, TILE_N, TILE_K = 16, 16, 32  # one warp's tile (elements)
OPERAND_BYTES = TILE_M * TILE_K // WARP  # per lane, of A's or B's tile: 16
C_VALUES = TILE_M * TILE_N // WARP  # per lane: 8

SHAPE_MNK = {"m8n8k16": (8, 8, 16), "m16n8k32": (16, 8, 32)}  # mma.sync s8 x s8 -> s32 shapes used

LDMATRIX_A = "ibert_ldmatrix_s8_a"
LDMATRIX_B = "ibert_ldmatrix_s8_b"


def mma_shape(arch: int) -> str | None:
    """The mma.sync shape for SM version `arch` (75 for sm_75): m16n8k32 from sm_80 on, m8n8k16 on
    sm_75 (its int8 shape; ldmatrix too starts there); None before (no int8 tensor cores used)."""
    return "m16n8k32" if arch >= 80 else "m8n8k16" if arch >= 75 else None


def mma_intrin(shape: str) -> str:
    """The name of the warp-tile product made of `shape` instructions (registered below)."""
    return f"ibert_mma_s8s8s32_{shape}"


def _sub_matrix(s, rows_first: bool):
    """(first row, first k) of the 8x16-byte sub-matrix that ldmatrix.x4 loads into register s."""
    lo, hi = s % 2, s // 2
    return (8 * lo, 16 * hi) if rows_first else (8 * hi, 16 * lo)


def operand_fragment(row, k, rows_first: bool):
    """(lane, byte) that holds element (row, k) of a 16x32 operand tile after ldmatrix.x4."""
    s = (row // 8 + 2 * (k // 16)) if rows_first else (2 * (row // 8) + k // 16)
    return 4 * (row % 8) + (k % 16) // 4, 4 * s + k % 4


def acc_fragment(i, j):
    """(lane, index) that holds element (i, j) of the 16x16 int32 accumulator tile."""
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + 2 * (i // 8) + j % 2


def _ldmatrix(rows_first: bool):
    @T.prim_func(s_tir=True)
    def desc(warp_handle: T.handle, shared_handle: T.handle) -> None:
        shared = T.match_buffer(shared_handle, (TILE_M, TILE_K), "int8", align=16, offset_factor=16, scope="shared")
        warp = T.match_buffer(warp_handle, (WARP, OPERAND_BYTES), "int8", align=16, offset_factor=16,
                              scope="warp")
        with T.sblock("root"):
            T.reads(shared[0:TILE_M, 0:TILE_K])
            T.writes(warp[0:WARP, 0:OPERAND_BYTES])
            for r, c in T.grid(TILE_M, TILE_K):
                with T.sblock("load"):
                    vr, vc = T.axis.remap("SS", [r, c])
                    lane, byte = T.meta_var(operand_fragment(vr, vc, rows_first))
                    T.reads(shared[vr, vc])
                    T.writes(warp[lane, byte])
                    warp[lane, byte] = shared[vr, vc]

    @T.prim_func(s_tir=True)
    def impl(warp_handle: T.handle, shared_handle: T.handle) -> None:
        s0 = T.int32()
        s1 = T.int32()
        l0 = T.int32()
        l1 = T.int32()
        shared = T.match_buffer(shared_handle, (TILE_M, TILE_K), "int8", align=16, offset_factor=16, scope="shared",
                                strides=[s0, s1])
        warp = T.match_buffer(warp_handle, (WARP, OPERAND_BYTES), "int8", align=16, offset_factor=16,
                              scope="warp", strides=[l0, l1])
        with T.sblock("root"):
            T.reads(shared[0:TILE_M, 0:TILE_K])
            T.writes(warp[0:WARP, 0:OPERAND_BYTES])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                # lane tx gives the address of row tx % 8 of sub-matrix tx // 8
                row, col = T.meta_var(_sub_matrix(tx // 8, rows_first))
                T.evaluate(T.ptx_legacy.ldmatrix(False, 4, ".b16", warp.data, warp.elem_offset + l0 * tx,
                                                 shared.access_ptr("r"), (row + tx % 8) * s0 + col, dtype="int8"))

    return desc, impl


def _mma(shape: str):
    m, n, k = SHAPE_MNK[shape]

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (WARP, OPERAND_BYTES), "int8", align=16, offset_factor=16, scope="warp")
        B = T.match_buffer(b, (WARP, OPERAND_BYTES), "int8", align=16, offset_factor=16, scope="warp")
        C = T.match_buffer(c, (WARP, C_VALUES), "int32", align=16, offset_factor=8, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:C_VALUES], A[0:WARP, 0:OPERAND_BYTES], B[0:WARP, 0:OPERAND_BYTES])
            T.writes(C[0:WARP, 0:C_VALUES])
            for i, j, kk in T.grid(TILE_M, TILE_N, TILE_K):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, kk])
                    lc, ic = T.meta_var(acc_fragment(vi, vj))
                    la, ia = T.meta_var(operand_fragment(vi, vk, True))
                    lb, ib = T.meta_var(operand_fragment(vj, vk, False))
                    T.reads(C[lc, ic], A[la, ia], B[lb, ib])
                    T.writes(C[lc, ic])
                    C[lc, ic] = C[lc, ic] + T.cast(A[la, ia], "int32") * T.cast(B[lb, ib], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        a0 = T.int32()
        a1 = T.int32()
        b0 = T.int32()
        b1 = T.int32()
        c0 = T.int32()
        c1 = T.int32()
        A = T.match_buffer(a, (WARP, OPERAND_BYTES), "int8", align=16, offset_factor=16, scope="warp",
                           strides=[a0, a1])
        B = T.match_buffer(b, (WARP, OPERAND_BYTES), "int8", align=16, offset_factor=16, scope="warp",
                           strides=[b0, b1])
        C = T.match_buffer(c, (WARP, C_VALUES), "int32", align=16, offset_factor=8, scope="warp", strides=[c0, c1])
        with T.sblock("root"):
            T.reads(C[0:WARP, 0:C_VALUES], A[0:WARP, 0:OPERAND_BYTES], B[0:WARP, 0:OPERAND_BYTES])
            T.writes(C[0:WARP, 0:C_VALUES])
            for tx in T.thread_binding(0, WARP, "threadIdx.x"):
                # one instruction per (m, n, k) sub-tile; its registers start where its first element is
                for mi in T.unroll(TILE_M // m):
                    for ni in T.unroll(TILE_N // n):
                        for ki in T.unroll(TILE_K // k):
                            ia = T.meta_var(operand_fragment(m * mi, k * ki, True)[1])
                            ib = T.meta_var(operand_fragment(n * ni, k * ki, False)[1])
                            ic = T.meta_var(acc_fragment(m * mi, n * ni)[1])
                            T.evaluate(T.ptx_legacy.mma(shape, "row", "col", "int8", "int8", "int32",
                                                        A.data, A.elem_offset + a0 * tx + ia,
                                                        B.data, B.elem_offset + b0 * tx + ib,
                                                        C.data, C.elem_offset + c0 * tx + ic, False,
                                                        dtype="int32"))

    return desc, impl


def register_intrinsics() -> None:
    """(Re)register the intrinsics from the fragment maps above; done on import."""
    s_tir.TensorIntrin.register(LDMATRIX_A, *_ldmatrix(rows_first=True), override=True)
    s_tir.TensorIntrin.register(LDMATRIX_B, *_ldmatrix(rows_first=False), override=True)
    for shape in SHAPE_MNK:
        s_tir.TensorIntrin.register(mma_intrin(shape), *_mma(shape), override=True)


def fits(m: int, n: int, k: int) -> bool:
    """Whether a GEMM's extents are whole warp tiles."""
    return m % TILE_M == 0 and n % TILE_N == 0 and k % TILE_K == 0


def operand_layout(rows_first: bool, frags: int) -> Callable[..., tuple]:
    """[.., rows, k] -> [.., warp's rows, k tile, lane, fragment * 16 + byte]: an operand's warp
    buffer, each warp `frags` tiles of 16 rows. Lanes come before the fragments: TVM's
    LowerWarpMemory turns a warp buffer into registers when its index is lane * (elements per lane)
    + register, and leaves lane arithmetic in the register index (local memory) otherwise."""
    def f(*iv):
        *lead, r, k = iv
        lane, byte = operand_fragment(r % TILE_M, k % TILE_K, rows_first)
        return (*lead, r // (TILE_M * frags), k // TILE_K, lane, r // TILE_M % frags * OPERAND_BYTES + byte)
    return f


def acc_layout(frags_i: int, frags_j: int) -> Callable[..., tuple]:
    """[.., i, j] -> [.., warp's rows, warp's columns, lane, fragment * 8 + index]: the
    accumulator's warp buffer, each warp frags_i x frags_j tiles."""
    def f(*iv):
        *lead, i, j = iv
        lane, index = acc_fragment(i % TILE_M, j % TILE_N)
        tile = i // TILE_M % frags_i * frags_j + j // TILE_N % frags_j
        return (*lead, i // (TILE_M * frags_i), j // (TILE_N * frags_j), lane, tile * C_VALUES + index)
    return f


register_intrinsics()
