"""Multi-head attention on the stacked int8 QKV activations [B*S, 3H]: three kernels.

scores = Q K^T (int8 x int8 -> int32), i-softmax with integer masking (u8 probabilities at scale
1/256), context = P V requantized to int8 and laid out [B, heads, S, d] for the next GEMM.
"""

from __future__ import annotations

from tvm import te, tirx

from ibert_tvm.program import Layer, Softmax

from .common import I64, Consts, Kernel, c64, iexp, make_kernel, requant
from .gemm import GROUP, LANES, U8_SHIFT, Part, int8_matmul, packable


def _operand(qkv: te.Tensor, batch: int, seq: int, hidden: int, heads: int, which: int, transpose: bool,
             with_sums: bool) -> tuple[te.Tensor, bool, te.Tensor | None]:
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
                          name="ksum", attrs=Part.WEIGHT_SUMS.attrs)
    if packable(n, k):
        shape = (batch, heads, n // LANES, k // GROUP, LANES, GROUP)
        b_pack = te.compute(shape, lambda b, h, n0, k0, n1, k1: at(b, h, n0 * LANES + n1, k0 * GROUP + k1),
                            name="B_pack", attrs=Part.WEIGHT.attrs)
        return b_pack, True, sums
    return te.compute((batch, heads, n, k), at, name="B_pack", attrs=Part.WEIGHT.attrs), False, sums


def scores_kernel(name: str, batch: int, seq: int, hidden: int, heads: int, a_shift: int = U8_SHIFT) -> Kernel:
    d = hidden // heads
    qkv = te.placeholder((batch * seq, 3 * hidden), "int8", name="qkv")
    kb, packed, ksum = _operand(qkv, batch, seq, hidden, heads, 1, False, a_shift != 0)
    out = int8_matmul(
        (batch, heads), seq, seq, d,
        lambda b, h, i, kk: qkv[b * seq + i, h * d + kk],
        kb, packed,
        lambda acc, b, h, i, j: acc - a_shift * ksum[b, h, j] if ksum is not None else acc,
        "int32", a_shift,
    )
    return make_kernel(name, "gemm", [qkv], out, Consts(name))


def softmax_kernel(name: str, sm: Softmax, batch: int, heads: int, seq: int) -> Kernel:
    """i-softmax over keys; masked keys (mask == 0) are excluded from the max and get 0."""
    scores = te.placeholder((batch, heads, seq, seq), "int32", name="scores")
    mask = te.placeholder((batch, seq), "int32", name="mask")
    j = te.reduce_axis((0, seq), name="j")
    low = tirx.min_value("int32")
    mx = te.compute(
        (batch, heads, seq),
        lambda b, h, i: te.max(tirx.Select(mask[b, j] != 0, scores[b, h, i, j], low), axis=j),
        name="rowmax",
    )
    e = te.compute(
        (batch, heads, seq, seq),
        lambda b, h, i, k: tirx.Select(
            mask[b, k] != 0, iexp(scores[b, h, i, k].astype(I64) - mx[b, h, i].astype(I64), sm.exp), c64(0)
        ).astype("int32"),
        name="exp",
    )
    j2 = te.reduce_axis((0, seq), name="j2")
    total = te.compute((batch, heads, seq), lambda b, h, i: te.sum(e[b, h, i, j2].astype(I64), axis=j2), name="total")
    factor = te.compute(
        (batch, heads, seq), lambda b, h, i: tirx.floordiv(c64(1 << 32), tirx.max(total[b, h, i], c64(1))), name="factor"
    )
    out = te.compute(
        (batch, heads, seq, seq),
        lambda b, h, i, k: tirx.min((e[b, h, i, k].astype(I64) * factor[b, h, i]) >> c64(32 - sm.out_bits), c64(255)).astype("uint8"),
        name="O",
    )
    return make_kernel(name, "rowwise", [scores, mask], out, Consts(name))


def context_kernel(name: str, layer: Layer, batch: int, seq: int, hidden: int, heads: int,
                   a_shift: int = U8_SHIFT) -> Kernel:
    d = hidden // heads
    consts = Consts(name)
    probs = te.placeholder((batch, heads, seq, seq), "uint8", name="probs")
    qkv = te.placeholder((batch * seq, 3 * hidden), "int8", name="qkv")
    # u8 probabilities enter the GEMM as p - 128 (int8), which its A stage shifts by a_shift: with
    # 128 (x86) that is p itself; with 0 the missing 128 * sum_keys V comes back per column.
    missing = U8_SHIFT - a_shift
    vb, packed, vsum = _operand(qkv, batch, seq, hidden, heads, 2, True, missing != 0)
    out = int8_matmul(
        (batch, heads), seq, d, seq,
        lambda b, h, i, kk: (probs[b, h, i, kk].astype("int32") - 128),
        vb, packed,
        lambda acc, b, h, i, n: requant(acc + missing * vsum[b, h, n] if vsum is not None else acc, layer.ctx_out, consts),
        "int8", a_shift,
    )
    return make_kernel(name, "gemm", [probs, qkv], out, consts)
