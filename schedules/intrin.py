"""INT8 tensor intrinsics. 16x4 dot products: 16 int32 accumulators (a local register tile), each
adding a 4-element product of one A group (broadcast) with a 16x4 packed B tile.

- x86 VNNI `vpdpbusd` (u8 x s8). TVM's stock `dot_16x4_vnni` passes it an int32x16 operand where
  LLVM 22's declaration wants <64 x i8>, and fails verification; here both operands are bytes.
- ARM `sdot` (s8 x s8): four 4-lane instructions per tile. TVM's stock 4x4 intrinsic writes a
  global-scope C, which does not match our local accumulator.
- x86 AVX2 without VNNI (s8 x s8), two ways. Exact for every operand: both widened to int16 and
  multiplied in pairs by `vpmaddwd` (a pair's sum reaches at most 2 * 128 * 128), the pairs of
  each column added by `vphaddd`, whose lane order a permutation undoes. Twice as fast where B
  never holds -128: `vpmaddubsw` multiplies u8 by s8 into int16 pairs with saturation, so it takes
  |a| and b * sign(a) (`vpsignb`): a pair is then at most 2 * 128 * 127 = 32512, exact unless b is
  -128 (whose sign flip wraps). Linear weights never are (HF's clamp to [-127, 126]); the
  schedule uses it on kernels that say so (`relay_ops.gemm.B_ABOVE_INT8_MIN`); `vpmaddwd` by ones
  then widens the pairs into the int32 sums.
And a 32-row block over the whole reduction on Intel AMX tiles (`tdpbssd` s8 x s8, or `tdpbusd`
u8 x s8), below.
"""

import functools

from tvm import s_tir
from tvm.ir.prim.expr import Shuffle
from tvm.script import tirx as T

VNNI_INTRIN = "ibert_dot_16x4_u8i8i32_vnni"
SDOT_INTRIN = "ibert_dot_16x4_i8i8i32_sdot"
AVX2_INTRIN = "ibert_dot_16x4_i8i8i32_avx2"
AVX2_SIGN_INTRIN = "ibert_dot_16x4_i8i8i32_avx2_sign"  # B above -128 only


def _desc(a_dtype: str):
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


@T.prim_func(s_tir=True)
def _vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(a, 16), dtype="uint8x64"),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _sdot(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16")
        for j in T.unroll(4):
            C[T.ramp(j * 4, 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([j * 4], dtype="int32x4"),
                a,
                B.vload([j * 4, 0], dtype="int8x16"),
                dtype="int32x4",
            )


@T.prim_func(s_tir=True)
def _avx2(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a = T.reinterpret(T.broadcast(T.reinterpret(T.Cast("int16x4", A.vload([0], "int8x4")), dtype="int64"), 4),
                          dtype="int16x16")
        for h in T.unroll(2):  # 8 columns x 4 k each, as two products of 4 columns
            pairs = [T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                                             T.Cast("int16x16", B.vload([h * 8 + q * 4, 0], dtype="int8x16")), a,
                                             dtype="int32x8") for q in range(2)]
            # columns 0 1 4 5 | 2 3 6 7 of the eight (vphaddd adds within 128-bit lanes)
            sums = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.phadd.d"), pairs[0], pairs[1],
                                           dtype="int32x8")
            C[T.ramp(h * 8, 1, 8)] = C.vload([h * 8], dtype="int32x8") + Shuffle([sums], [0, 1, 4, 5, 2, 3, 6, 7])


@T.prim_func(s_tir=True)
def _avx2_sign(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 8), dtype="int8x32")
        magnitude = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b"), a, a,
                                            dtype="int8x32")  # -128 becomes 0x80: 128 as u8
        for h in T.unroll(2):  # 8 columns x 4 k each
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                magnitude,
                T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.psign.b"),
                                        B.vload([h * 8, 0], dtype="int8x32"), a, dtype="int8x32"),
                dtype="int16x16",
            )
            C[T.ramp(h * 8, 1, 8)] = C.vload([h * 8], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                pairs,
                T.broadcast(T.int16(1), 16),
                dtype="int32x8",
            )


s_tir.TensorIntrin.register(VNNI_INTRIN, _desc("uint8"), _vnni)
s_tir.TensorIntrin.register(SDOT_INTRIN, _desc("int8"), _sdot)
s_tir.TensorIntrin.register(AVX2_INTRIN, _desc("int8"), _avx2)
s_tir.TensorIntrin.register(AVX2_SIGN_INTRIN, _desc("int8"), _avx2_sign)


# Intel AMX: eight tile registers of 16 rows x 64 bytes, configured alike (one 64-byte config):
# tmm0-3 accumulate 32x32 int32 of the block, tmm4-5 hold two 16-row A tiles (64 k each), tmm6-7
# two 16-column B tiles (16 groups of 4 k: exactly 16 rows of the packed [N/16, K/4, 16, 4]).
AMX_M = AMX_N = 32
AMX_K = 64
# palette 1; bytes per row of tiles 0-7 (uint16 pairs, words 4-7); rows of tiles 0-7 (words 12-13)
_AMX_CONFIG = {0: 1, 4: 0x00400040, 5: 0x00400040, 6: 0x00400040, 7: 0x00400040, 12: 0x10101010, 13: 0x10101010}


def _config_word(i):
    word = T.int32(0)
    for j, v in _AMX_CONFIG.items():
        word = T.Select(i == j, T.int32(v), word)
    return word


_AMX_PRODUCT = {"uint8": "llvm.x86.tdpbusd", "int8": "llvm.x86.tdpbssd"}  # by A's dtype; B is s8


@functools.cache
def amx_intrin(k: int, n: int, a_dtype: str = "uint8") -> str:
    """C[32, n] int32 = A[32, k] (u8 or s8) x B (s8, packed [n/16, k/4, 16, 4]), the whole
    reduction on the tiles, 32 columns at a time.

    Operands are addressed with `address_of` rather than `access_ptr`: TVM's storage rewrite may
    place a staged operand in another dtype's buffer, which an access_ptr's element type then
    contradicts (the fused attention's s8 probabilities at 256 keys).

    Tile state is per thread and a kernel's blocks run on any thread of the pool, so every call
    loads the configuration (a few hundred cycles: a call covers many columns to amortize it).
    The description includes the reduction's init, so the accumulators start as `tilezero` and C
    is never loaded onto the tiles; the tensorized block is annotated `ZEROES_OWN_INIT` so that the
    CPU schedule drops the init TVM keeps on it.
    """
    groups = k // 4

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (AMX_M, k), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (n // 16, groups, 16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (AMX_M, n), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(A[0:AMX_M, 0:k], B[0 : n // 16, 0:groups, 0:16, 0:4])
            T.writes(C[0:AMX_M, 0:n])
            for m, j, kk in T.grid(AMX_M, n, k):
                with T.sblock("update"):
                    vm, vj, vk = T.axis.remap("SSR", [m, j, kk])
                    T.reads(C[vm, vj], A[vm, vk], B[vj // 16, vk // 4, vj % 16, vk % 4])
                    T.writes(C[vm, vj])
                    with T.init():
                        C[vm, vj] = 0
                    C[vm, vj] = C[vm, vj] + T.cast(A[vm, vk], "int32") * T.cast(B[vj // 16, vk // 4, vj % 16, vk % 4], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa, sb0, sb1, sb2, sc = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (AMX_M, k), a_dtype, offset_factor=1, strides=[sa, 1])
        B = T.match_buffer(b, (n // 16, groups, 16, 4), "int8", offset_factor=1, strides=[sb0, sb1, sb2, 1])
        C = T.match_buffer(c, (AMX_M, n), "int32", offset_factor=1, scope="local", strides=[sc, 1])
        with T.sblock("root"):
            T.reads(A[0:AMX_M, 0:k], B[0 : n // 16, 0:groups, 0:16, 0:4])
            T.writes(C[0:AMX_M, 0:n])
            cfg = T.decl_buffer((16,), "int32", scope="local")
            for i in T.unroll(16):
                cfg[i] = _config_word(i)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", T.address_of(cfg[0])))
            for j in range(n // AMX_N):
                for t in T.unroll(4):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.int8(t)))
                for kc in range(k // AMX_K):
                    for r in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(4 + r),
                                                      T.address_of(A[r * 16, kc * AMX_K]), T.int64(sa)))
                    for g in T.unroll(2):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.int8(6 + g),
                                                      T.address_of(B[2 * j + g, kc * 16, 0, 0]), T.int64(sb1)))
                    for t in T.unroll(4):
                        T.evaluate(T.call_llvm_intrin("void", _AMX_PRODUCT[a_dtype], T.int8(t), T.int8(4 + t // 2),
                                                      T.int8(6 + t % 2)))
                for t in T.unroll(4):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.int8(t),
                                                  T.address_of(C[t // 2 * 16, j * AMX_N + t % 2 * 16]),
                                                  T.int64(sc * 4)))

    name = f"ibert_amx_32x{n}x{k}_{a_dtype}_i8i32"
    s_tir.TensorIntrin.register(name, desc, impl)
    return name
