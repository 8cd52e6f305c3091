"""i-LayerNorm over the last axis of an int32 [rows, C] tensor, with its requantization chain."""

from __future__ import annotations

import numpy as np
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
    # 2**31 // std, std = max(root << shift, 1): at most 2**(31 - shift) but for a constant row
    # (root 0, std 1), whose 2**31 * y >> 1 is taken as 2**30 * y. Either way an int32 multiplier,
    # y * factor one `vpmuldq`.
    narrow_factor = ln.shift >= 1
    fdt = "int32" if narrow_factor else I64
    factor = te.compute(
        (rows,),
        lambda r: tirx.Select(root[r] == c64(0), c64(1 << 30),
                              tirx.floordiv(c64(1 << 31), root[r] << c64(ln.shift))).astype(fdt)
        if narrow_factor else tirx.floordiv(c64(1 << 31), tirx.max(root[r] << c64(ln.shift), c64(1))),
        name="factor",
    )
    bias = consts.add(ln.bias, "bias")
    bound = LayerNorm.out_bound(channels)
    # Past +-w the first requantization saturates on every channel: clamped there, its input is
    # int32 and its product with m one `vpmuldq` too. The +-bound clamp then changes nothing where
    # bound - |bias| >= w: one clamp where there were two.
    w = ln.out[0].saturation()
    window = w is not None and w < 2**31 and int(np.abs(ln.out[0].m).max()) < 2**31
    inner = not window or bound - int(np.abs(ln.bias).max()) < w

    def norm(r, ch):
        y = centered(r, ch).astype(I64) * factor[r].astype(I64)
        y = y >> tirx.Select(root[r] == c64(0), c64(0), c64(1)) if narrow_factor else y >> c64(1)
        y = (clamp(y, -bound, bound) if inner else y) + bias[ch]
        if window:
            y = clamp(y, -w, w).astype("int32")
        return chain(y, ln.out, consts, ch).astype("int8")

    out = te.compute((rows, channels), norm, name="O")
    return make_kernel(name, "rowwise", [x], out, consts)
