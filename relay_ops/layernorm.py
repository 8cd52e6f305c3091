"""i-LayerNorm over the last axis of an int32 [rows, C] tensor, with its requantization chain."""

from __future__ import annotations

from tvm import te, tirx

from ibert_tvm.program import LayerNorm

from .common import I64, Consts, Kernel, c64, chain, clamp, isqrt_stages, make_kernel


def layer_norm_kernel(name: str, ln: LayerNorm, rows: int, channels: int) -> Kernel:
    consts = Consts(name)
    x = te.placeholder((rows, channels), "int32", name="x")
    c = te.reduce_axis((0, channels), name="c")
    total = te.compute((rows,), lambda r: te.sum(x[r, c].astype(I64), axis=c), name="total")
    # round(mean) half up, in integers
    mean = te.compute((rows,), lambda r: tirx.floordiv(c64(2) * total[r] + c64(channels), c64(2 * channels)), name="mean")
    c2 = te.reduce_axis((0, channels), name="c2")

    def sq(r, ch):
        y = (x[r, ch].astype(I64) - mean[r]) >> c64(ln.shift)
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
        y = (x[r, ch].astype(I64) - mean[r]) * factor[r] >> c64(1)
        return chain(clamp(y, -bound, bound) + bias[ch], ln.out, consts, ch).astype("int8")

    out = te.compute((rows, channels), norm, name="O")
    return make_kernel(name, "rowwise", [x], out, consts)
