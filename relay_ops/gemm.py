"""INT8 x INT8 -> INT32 matrix products with a fused integer epilogue.

Layout, usable by every schedule; each stage carries its role as a block annotation (`Part`),
which is how the schedules of every device find them (the block names are for reading only):
- A, the activation, is staged (block "A", `Part.ACTIVATION`) as int8 + a_shift: x86 VNNI
  (`vpdpbusd`) multiplies u8 by s8, so there a_shift is 128 and A is u8; ARM `sdot`, CUDA `dp4a`
  and Intel AMX's `tdpbssd` take s8 x s8 and a_shift is 0. The stage also re-indexes its source
  (the CLS row) for free; with a_shift 0 and no re-indexing it is a plain read,
  which a schedule may inline. A target may shift some GEMMs and not others (`Shift`);
- B, the weight, is packed [N/16, K/4, 16, 4] (block "B_pack", `Part.WEIGHT`, when packed at run
  time; a constant weight is a parameter, packed ahead);
- the shift is undone by subtracting a_shift * sum_k B[n, k], folded into the bias for constant
  weights and computed per column for run-time operands (attention: block "ksum",
  `Part.WEIGHT_SUMS`). Every flavour therefore produces the same integers: the libraries of all
  targets are bit-identical;
- the accumulator (block "C", `Part.ACCUMULATOR`) feeds the epilogue (block "O", `Part.EPILOGUE`)
  tile by tile; the epilogue may lay its output out in another order of the accumulator's axes
  (attention's context: [B, S, heads, d], the next GEMM's plain rows), which a schedule undoes
  when it tiles the epilogue (`schedules.parts.epilogue_loops`).
Shapes whose N is not a multiple of 16 or K not a multiple of 4 use B unpacked.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum

import numpy as np
import tvm.ir.expr
from tvm import te
from tvm.te.tensor import TensorSlice

LANES, GROUP = 16, 4
U8_SHIFT = 128  # x86's a_shift

Expr = tvm.ir.expr.Expr

PART_KEY = "ibert.gemm_part"
# the same roles for the first of two GEMMs in one kernel (fused attention: Q K^T, whose softmax is
# the second's activation)
FIRST_PART_KEY = "ibert.first_gemm_part"
# kernel attribute: its B (a constant weight) never holds -128, which some ISAs' exact products need
B_ABOVE_INT8_MIN = "ibert.b_above_int8_min"


class Part(StrEnum):
    """The role of a GEMM kernel's stage, kept in its TIR block's annotations under `PART_KEY`."""

    ACTIVATION = "activation"
    WEIGHT = "weight"
    WEIGHT_SUMS = "weight_sums"
    ACCUMULATOR = "accumulator"
    EPILOGUE = "epilogue"

    def attrs(self, key: str = PART_KEY) -> dict[str, str]:
        """`te.compute(..., attrs=)` that mark a stage with this role under `key` (PART_KEY, or
        FIRST_PART_KEY for a kernel's first GEMM); create_prim_func turns them into the block's
        annotations."""
        return {key: self.value}


def packable(n: int, k: int) -> bool:
    return n % LANES == 0 and k % GROUP == 0


def pack_weight(w: np.ndarray) -> np.ndarray:
    """[..., N, K] -> [..., N/16, K/4, 16, 4] (the VNNI tile layout)."""
    *lead, n, k = w.shape
    t = w.reshape(*lead, n // LANES, LANES, k // GROUP, GROUP)
    return np.ascontiguousarray(np.swapaxes(t, -3, -2))


def unpack_index(*idx: Expr) -> tuple[Expr, ...]:
    """[..., N/16, K/4, 16, 4] -> [..., N, K]: where a packed element sits unpacked."""
    *lead, n0, k0, n1, k1 = idx
    return (*lead, n0 * LANES + n1, k0 * GROUP + k1)


# a_shift of every GEMM, or of each GEMM by its (m, n, k): x86 with AMX takes s8 on the tiles, u8
# on vpdpbusd
Shift = int | Callable[[int, int, int], int]


def shift_of(a_shift: Shift, m: int, n: int, k: int) -> int:
    return a_shift if isinstance(a_shift, int) else a_shift(m, n, k)


def compensation(w: np.ndarray, a_shift: int) -> np.ndarray:
    """a_shift * sum_k W[n, k]: what the shift of A adds to every output column."""
    return (a_shift * w.astype(np.int64).sum(-1)).astype(np.int32)


def b_reader(b: te.Tensor, packed: bool) -> Callable[..., Expr]:
    """B[..., n, k] as an int32 expression, whichever layout b has."""
    if packed:
        return lambda *idx: b[(*idx[:-2], idx[-2] // LANES, idx[-1] // GROUP, idx[-2] % LANES, idx[-1] % GROUP)].astype("int32")
    return lambda *idx: b[idx].astype("int32")


def int8_matmul(
    batch: tuple[int, ...],
    m: int,
    n: int,
    k: int,
    a_int8: Callable[..., Expr],
    b: te.Tensor,
    packed: bool,
    epilogue: Callable[..., Expr],
    out_dtype: str,
    a_shift: int,
    part_key: str = PART_KEY,
    out_axes: tuple[int, ...] | None = None,
) -> te.Tensor:
    """O[*batch, m, n] = epilogue(sum_k (A + a_shift)[.., m, k] * B[.., n, k], *batch, m, n).

    The epilogue receives the raw sum: it must subtract the compensation itself (it knows
    whether it is a constant folded into the bias or a run-time column sum). `out_axes`: O's
    axes as the accumulator's, O's axis i being the accumulator's axis out_axes[i].
    """
    def staged(*i: Expr) -> Expr:
        a = a_int8(*i)
        if a_shift:
            return (a.astype("int32") + a_shift).astype("uint8")
        return a if isinstance(a, TensorSlice) and a.dtype == "int8" else a.astype("int8")  # a read stays a read

    a = te.compute((*batch, m, k), staged, name="A", attrs=Part.ACTIVATION.attrs(part_key))
    rk = te.reduce_axis((0, k), name="k")
    read_b = b_reader(b, packed)
    acc = te.compute(
        (*batch, m, n),
        lambda *i: te.sum(a[(*i[:-1], rk)].astype("int32") * read_b(*i[:-2], i[-1], rk), axis=rk),
        name="C",
        attrs=Part.ACCUMULATOR.attrs(part_key),
    )
    shape = (*batch, m, n)
    axes = out_axes or tuple(range(len(shape)))
    if sorted(axes) != list(range(len(shape))):
        raise ValueError(f"out_axes {out_axes} is no order of the accumulator's {len(shape)} axes")

    where = [axes.index(a) for a in range(len(shape))]  # the accumulator's axis a is O's axis where[a]

    def out(*o: Expr) -> Expr:
        i = [o[w] for w in where]
        return epilogue(acc[tuple(i)], *i).astype(out_dtype)

    return te.compute(tuple(shape[a] for a in axes), out, name="O", attrs=Part.EPILOGUE.attrs(part_key))
