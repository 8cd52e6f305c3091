"""Multi-head attention on the stacked int8 QKV activations [B*S, 3H]: three kernels, or one.

scores = Q K^T (int8 x int8 -> int32), i-softmax with integer masking (u8 probabilities at scale
1/256), context = P V requantized to int8 and laid out [B, S, heads, d]: the heads merged, rows the
next GEMM reads as they lie; or all three in one kernel (`attention_kernel`).
"""

from __future__ import annotations

from tvm import te, tirx

from ibert_tvm.program import EXP_CONST, Layer, Requant, Softmax

from .common import I64, Consts, Kernel, c64, iexp, make_kernel, requant
from .gemm import FIRST_PART_KEY, GROUP, LANES, PART_KEY, U8_SHIFT, Part, Shift, int8_matmul, packable, shift_of


def _operand(qkv: te.Tensor, batch: int, seq: int, hidden: int, heads: int, which: int, transpose: bool,
             with_sums: bool, part_key: str = PART_KEY) -> tuple[te.Tensor, bool, te.Tensor | None]:
    """One head operand as the GEMM's B: K as [S keys, d] or V^T as [d, S], packed if it fits,
    plus, if asked, its sums over the reduced axis (block "ksum") for the shift's compensation.
    Both are marked with their GEMM role (`Part`), by which the schedules find them.

    `which` is 1 for K, 2 for V (their column block in QKV).
    """
    d = hidden // heads
    n, k = (d, seq) if transpose else (seq, d)

    def at(b, h, nn, kk):
        s, dd = (kk, nn) if transpose else (nn, kk)
        return qkv[b * seq + s, which * hidden + h * d + dd]

    sums = None
    if with_sums:
        r = te.reduce_axis((0, k), name="r")
        sums = te.compute((batch, heads, n), lambda b, h, j: te.sum(at(b, h, j, r).astype("int32"), axis=r),
                          name="ksum", attrs=Part.WEIGHT_SUMS.attrs(part_key))
    if packable(n, k):
        shape = (batch, heads, n // LANES, k // GROUP, LANES, GROUP)
        b_pack = te.compute(shape, lambda b, h, n0, k0, n1, k1: at(b, h, n0 * LANES + n1, k0 * GROUP + k1),
                            name="B_pack", attrs=Part.WEIGHT.attrs(part_key))
        return b_pack, True, sums
    return te.compute((batch, heads, n, k), at, name="B_pack", attrs=Part.WEIGHT.attrs(part_key)), False, sums


def _scores(qkv: te.Tensor, batch: int, seq: int, hidden: int, heads: int, a_shift: int,
            part_key: str = PART_KEY) -> te.Tensor:
    """Q K^T per head, int32 [batch, heads, seq, keys]."""
    d = hidden // heads
    kb, packed, ksum = _operand(qkv, batch, seq, hidden, heads, 1, False, a_shift != 0, part_key)
    return int8_matmul(
        (batch, heads), seq, seq, d,
        lambda b, h, i, kk: qkv[b * seq + i, h * d + kk],
        kb, packed,
        lambda acc, b, h, i, j: acc - a_shift * ksum[b, h, j] if ksum is not None else acc,
        "int32", a_shift, part_key,
    )


def scores_kernel(name: str, batch: int, seq: int, hidden: int, heads: int, a_shift: Shift = U8_SHIFT) -> Kernel:
    qkv = te.placeholder((batch * seq, 3 * hidden), "int8", name="qkv")
    shift = shift_of(a_shift, seq, seq, hidden // heads)
    return make_kernel(name, "gemm", [qkv], _scores(qkv, batch, seq, hidden, heads, shift), Consts(name))


def _fits_int16(rq: Requant) -> bool:
    """i-exp's clamp keeps its output in int16 (HF's QuantAct(16)): softmax can stay in int32."""
    return rq.lo is not None and -(1 << 15) <= rq.lo and rq.hi < 1 << 15


def _times_factor(e: tirx.PrimExpr, factor: tirx.PrimExpr, shift: int) -> tirx.PrimExpr:
    """floor(e * factor / 2**shift) in int32, for |e| <= 2**15, 0 <= factor < 2**32 and shift >= 16.

    With factor = hi * 2**16 + lo: floor((e * hi + floor(e * lo / 2**16)) / 2**(shift - 16)); both
    products and their sum stay within int32 (|e * hi| <= 2**31 - 2**15, |e * lo >> 16| <= 2**15).
    """
    hi = (factor >> c64(16)).astype("int32")
    lo = (factor & c64(0xFFFF)).astype("int32")
    return (e * hi + ((e * lo) >> 16)) >> (shift - 16)


def _probs(scores: te.Tensor, mask: te.Tensor, sm: Softmax, batch: int, heads: int, seq: int) -> te.Tensor:
    """i-softmax of int32 scores [batch, heads, seq, keys] over keys, u8 at scale 1/256; masked keys
    (mask == 0) are excluded from the max and get 0."""
    j = te.reduce_axis((0, seq), name="j")
    low = tirx.min_value("int32")
    mx = te.compute(
        (batch, heads, seq),
        lambda b, h, i: te.max(tirx.Select(mask[b, j] != 0, scores[b, h, i, j], low), axis=j),
        name="rowmax",
    )
    # max - score of a kept key lies in [0, 2**32): exact in uint32 (wrapping) arithmetic, and i-exp
    # clamps it below 2**31 anyway; masked keys' garbage is discarded by the select
    lim = tirx.const(EXP_CONST * -sm.exp.x0, "uint32")

    def exp(b, h, i, k):
        gap = tirx.min(mx[b, h, i].astype("uint32") - scores[b, h, i, k].astype("uint32"), lim)
        return tirx.Select(mask[b, k] != 0, iexp(-gap.astype("int32"), sm.exp), c64(0)).astype("int32")

    e = te.compute((batch, heads, seq, seq), exp, name="exp")
    small = _fits_int16(sm.exp.out)  # then the row sum fits int32 up to 2**16 keys
    sum_dt = "int32" if small and seq <= 1 << 16 else I64
    j2 = te.reduce_axis((0, seq), name="j2")
    total = te.compute((batch, heads, seq), lambda b, h, i: te.sum(e[b, h, i, j2].astype(sum_dt), axis=j2), name="total")
    factor = te.compute(
        (batch, heads, seq),
        lambda b, h, i: tirx.floordiv(c64(1 << 32), tirx.max(total[b, h, i].astype(I64), c64(1))),
        name="factor",
    )
    shift = 32 - sm.out_bits
    int32 = small and 8 <= sm.out_bits <= 16

    def prob(b, h, i, k):
        if int32:
            # factor capped at 2**32 - 1 to fit uint32: that changes e * factor >> shift only for total == 1,
            # e * 2**out_bits - 1 for e > 0 (still >= 255, the clamp), unchanged for e <= 0 (|e| < 2**shift)
            p = _times_factor(e[b, h, i, k], tirx.min(factor[b, h, i], c64((1 << 32) - 1)), shift)
        else:
            p = (e[b, h, i, k].astype(I64) * factor[b, h, i]) >> c64(shift)
        return tirx.min(p, tirx.const(255, "int32" if int32 else I64)).astype("uint8")

    return te.compute((batch, heads, seq, seq), prob, name="probs")


def softmax_kernel(name: str, sm: Softmax, batch: int, heads: int, seq: int) -> Kernel:
    scores = te.placeholder((batch, heads, seq, seq), "int32", name="scores")
    mask = te.placeholder((batch, seq), "int32", name="mask")
    return make_kernel(name, "rowwise", [scores, mask], _probs(scores, mask, sm, batch, heads, seq), Consts(name))


def _context(probs: te.Tensor, qkv: te.Tensor, layer: Layer, batch: int, seq: int, hidden: int, heads: int,
             a_shift: int, consts: Consts) -> te.Tensor:
    """P V per head, requantized to int8 [batch, seq, heads, d] (each head's products tiled as
    [batch, heads, seq, d], their outputs stored in the merged order)."""
    d = hidden // heads
    # u8 probabilities enter the GEMM as p - 128 (int8), which its A stage shifts by a_shift: with
    # 128 (x86) that is p itself; with 0 the missing 128 * sum_keys V comes back per column.
    missing = U8_SHIFT - a_shift
    vb, packed, vsum = _operand(qkv, batch, seq, hidden, heads, 2, True, missing != 0)
    return int8_matmul(
        (batch, heads), seq, d, seq,
        lambda b, h, i, kk: (probs[b, h, i, kk].astype("int32") - 128),
        vb, packed,
        lambda acc, b, h, i, n: requant(acc + missing * vsum[b, h, n] if vsum is not None else acc, layer.ctx_out, consts),
        "int8", a_shift, out_axes=(0, 2, 1, 3),
    )


def context_kernel(name: str, layer: Layer, batch: int, seq: int, hidden: int, heads: int,
                   a_shift: Shift = U8_SHIFT) -> Kernel:
    consts = Consts(name)
    probs = te.placeholder((batch, heads, seq, seq), "uint8", name="probs")
    qkv = te.placeholder((batch * seq, 3 * hidden), "int8", name="qkv")
    shift = shift_of(a_shift, seq, hidden // heads, seq)
    out = _context(probs, qkv, layer, batch, seq, hidden, heads, shift, consts)
    return make_kernel(name, "gemm", [probs, qkv], out, consts)


def attention_kernel(name: str, layer: Layer, batch: int, seq: int, hidden: int, heads: int,
                     a_shift: Shift = U8_SHIFT) -> Kernel:
    """The three in one kernel: Q K^T (its stages marked FIRST_PART_KEY), i-softmax and P V, a
    row tile of queries at a time; scores and probabilities never leave the cache."""
    consts = Consts(name)
    qkv = te.placeholder((batch * seq, 3 * hidden), "int8", name="qkv")
    mask = te.placeholder((batch, seq), "int32", name="mask")
    d = hidden // heads
    scores = _scores(qkv, batch, seq, hidden, heads, shift_of(a_shift, seq, seq, d), FIRST_PART_KEY)
    probs = _probs(scores, mask, layer.softmax, batch, heads, seq)
    out = _context(probs, qkv, layer, batch, seq, hidden, heads, shift_of(a_shift, seq, d, seq), consts)
    return make_kernel(name, "gemm", [qkv, mask], out, consts)
