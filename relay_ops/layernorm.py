"""i-LayerNorm over the last axis of an int32 [rows, C] tensor, with its requantization chain."""

from __future__ import annotations

from tvm import te, tirx

from ibert_tvm.program import LayerNorm

from .common import I64, Consts, Kernel, c64, chain, clamp, isqrt_stages, make_kernel, opaque_sum


def layer_norm_kernel(name: str, ln: LayerNorm, rows: int, channels: int, in_bound: int | None = None) -> Kernel:
    """`in_bound`: the largest |x| when the producer clamps it (the residual sums: 22 bits). Then
    the row sum is int32 where it fits, and x - mean too, whose square is one 32 x 32 -> 64-bit
    product (`vpmuldq`) instead of a 64-bit one."""
    consts = Consts(name)
    x = te.placeholder((rows, channels), "int32", name="x")
    narrow = in_bound is not None and 2 * in_bound < 2**31
    dt = "int32" if narrow else I64  # of x - mean
    sum_dt = "int32" if narrow and in_bound * channels < 2**31 else I64
    c = te.reduce_axis((0, channels), name="c")
    total = te.compute((rows,), lambda r: te.sum(x[r, c].astype(sum_dt), axis=c), name="total")
    # round(mean) half up, in integers
    mean = te.compute((rows,), lambda r: tirx.floordiv(c64(2) * total[r].astype(I64) + c64(channels),
                                                       c64(2 * channels)).astype(dt), name="mean")
    c2 = te.reduce_axis((0, channels), name="c2")

    def centered(r, ch):
        # |x - mean| < 2 * in_bound: a wrapping int32 difference, which LLVM keeps 32-bit
        return opaque_sum(x[r, ch], -mean[r]) if narrow else x[r, ch].astype(I64) - mean[r]

    def sq(r, ch):
        y = (centered(r, ch) >> tirx.const(ln.shift, dt)).astype(I64)
        return y * y

    var = te.compute((rows,), lambda r: te.sum(sq(r, c2), axis=c2), name="var")
    root = isqrt_stages(var, "isqrt")
    factor = te.compute(
        (rows,),
        lambda r: tirx.floordiv(c64(1 << 31), tirx.max(root[r] << c64(ln.shift), c64(1))),
        name="factor",
    )
    bias = consts.add(ln.bias, "bias")
    bound = LayerNorm.out_bound(channels)

    def norm(r, ch):
        y = centered(r, ch).astype(I64) * factor[r] >> c64(1)
        return chain(clamp(y, -bound, bound) + bias[ch], ln.out, consts, ch).astype("int8")

    out = te.compute((rows, channels), norm, name="O")
    return make_kernel(name, "rowwise", [x], out, consts)
