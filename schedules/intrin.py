"""16x4 INT8 dot-product tensor intrinsics: 16 int32 accumulators (a local register tile), each
adding a 4-element product of one A group (broadcast) with a 16x4 packed B tile.

- x86 VNNI `vpdpbusd` (u8 x s8). TVM's stock `dot_16x4_vnni` passes it an int32x16 operand where
  LLVM 22's declaration wants <64 x i8>, and fails verification; here both operands are bytes.
- ARM `sdot` (s8 x s8): four 4-lane instructions per tile. TVM's stock 4x4 intrinsic writes a
  global-scope C, which does not match our local accumulator.
"""

from tvm import s_tir
from tvm.script import tirx as T

VNNI_INTRIN = "ibert_dot_16x4_u8i8i32_vnni"
SDOT_INTRIN = "ibert_dot_16x4_i8i8i32_sdot"


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


s_tir.TensorIntrin.register(VNNI_INTRIN, _desc("uint8"), _vnni)
s_tir.TensorIntrin.register(SDOT_INTRIN, _desc("int8"), _sdot)
