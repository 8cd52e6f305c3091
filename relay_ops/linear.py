"""Linear layers: INT8 GEMM + INT32 bias, then an integer epilogue fused into the same kernel."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tvm.ir.expr
from tvm import te, tirx

from ibert_tvm import reference
from ibert_tvm.program import INT22, Gelu, Linear, Requant, Tanh

from .common import (
    I64,
    Consts,
    Kernel,
    c64,
    chain,
    channel_values,
    clamp,
    high_half,
    high_half_lift,
    iexp,
    make_kernel,
    opaque_sum,
    requant,
    rescale,
    with_sign,
)
from .gemm import B_ABOVE_INT8_MIN, U8_SHIFT, Shift, compensation, int8_matmul, pack_weight, packable, shift_of

Expr = tvm.ir.expr.Expr
Epilogue = Callable[[Expr, Expr, Consts, list[te.Tensor]], Expr]


def linear_kernel(
    name: str,
    lin: Linear,
    m: int,
    epilogue: Epilogue,
    out_dtype: str,
    extra_inputs: tuple[tuple[tuple[int, ...], str], ...] = (),
    x_shape: tuple[int, ...] | None = None,
    read: Callable[[te.Tensor, Expr, Expr], Expr] | None = None,
    a_shift: Shift = U8_SHIFT,
) -> Kernel:
    """x [m, K] times W.T, then epilogue; `x_shape` + `read(x, row, k)` re-index another layout.

    The epilogue gets (acc + bias as int32, column n, consts, extra input tensors, row m).
    """
    n, k = lin.weight.shape
    a_shift = shift_of(a_shift, m, n, k)
    consts = Consts(name)
    packed = packable(n, k)
    w = consts.add(pack_weight(lin.weight) if packed else lin.weight, "w")
    bias = consts.add((lin.bias.astype(np.int64) - compensation(lin.weight, a_shift)).astype(np.int32), "b")
    x = te.placeholder(x_shape or (m, k), "int8", name="x")
    a = (lambda i, kk: read(x, i, kk)) if read else (lambda i, kk: x[i, kk])
    extras = [te.placeholder(shape, dtype, name=f"in{j}") for j, (shape, dtype) in enumerate(extra_inputs)]
    out = int8_matmul(
        (), m, n, k, a, w, packed,
        lambda acc, i, j: epilogue(opaque_sum(acc, bias[j]), j, consts, extras, i),
        out_dtype, a_shift,
    )
    return make_kernel(name, "gemm", [x, *extras], out, consts,
                       {B_ABOVE_INT8_MIN: True} if int(lin.weight.min(initial=0)) > -128 else None)


def requant_epilogue(rqs: list[Requant]) -> Epilogue:
    return lambda acc, j, consts, extras, i: chain(acc, rqs, consts, j)


def residual_epilogue(acc_rq: Requant, res_rq: Requant) -> Epilogue:
    """LN input: requantized GEMM output plus requantized residual, clamped to 22 bits.

    Each channel's accumulator is clamped first where its requantized value alone takes the sum
    past the clamp whatever the residual adds (`Requant.saturations`): that changes no output, and
    the narrower bound lets the product be the high half of two int32s (`high_half_lift`), and the
    sum int32, rather than 64-bit lanes (MiniLM's attn_out 20% faster)."""
    reach = int(np.abs(reference.requant(np.array([-128, 127])[:, None], res_rq)).max()) + 1
    w = dataclasses.replace(acc_rq, lo=INT22[0] - reach, hi=INT22[1] + reach).saturations() \
        if acc_rq.per_channel else None
    if w is not None:
        w = np.minimum(w, acc_rq.bound).astype(np.int64)
        if high_half_lift(acc_rq, int(w.max())) is not None:
            w = np.full_like(w, w.max())  # one clamp for all channels: immediates, no tables
    sum_dt = I64
    if w is not None and int(np.abs(reference.requant(np.stack([-w, w]), acc_rq)).max()) + reach < 2**31:
        sum_dt = "int32"

    def f(acc, j, consts, extras, i):
        if w is not None:
            acc = tirx.min(tirx.max(acc, channel_values(-w, consts, j, "wlo")), channel_values(w, consts, j, "whi"))
        s = requant(acc, acc_rq, consts, j, w).astype(sum_dt)
        return clamp(s + requant(extras[0][i, j], res_rq, consts, j).astype(sum_dt), *INT22)
    return f


def gelu_window(g: Gelu, acc_bound: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The clamp (`reference.gelu_flat_from`) within which x * m of the first requantization and
    erf + one are int32, if there is one: then their product is one `vpmuldq`."""
    first = g.out[0]
    if int(np.abs(g.b).max()) >= 2**31 or not first.per_channel or Gelu.multiplier_bound(g.b, g.c, g.one) >= 2**31:
        return None
    lo, hi = reference.gelu_flat_from(g, acc_bound)
    return (lo, hi) if reference.gelu_window_product(g, lo, hi) < 2**31 else None


def gelu_epilogue(g: Gelu, acc_bound: int) -> Epilogue:
    """i-GELU with per-channel constants, then its requantization chain to int8.

    Where -b fits int32 (every model measured), the clamped |x| is int32. Where x, clamped to the
    range over which the output changes, times m of the first requantization fits int32 too
    (`gelu_window`: the importer narrows m for it, `importer.gelu_narrow_bits`; roberta-base and
    MiniLM), x * m * (erf + one) is taken as the high half of an int32 product (`high_half`), and
    erf + one is int32 work as well (`_erf32`): no 64-bit lanes, whose widening and narrowing cost
    more than the arithmetic (MiniLM's i-GELU GEMM 10% faster than with them). Else
    x * (erf + one) * m is int64."""
    dt = "int32" if int(np.abs(g.b).max()) < 2**31 else I64
    first = g.out[0]
    window = gelu_window(g, acc_bound)
    shift = g.ERF_SHIFT
    half_k = (32 - shift) // 2  # (u << half_k)**2 >> 32 == u**2 >> shift
    # only with the window: for a 64-bit product x * (erf + one), int32 lanes of erf cost another
    # widening (MiniLM's i-GELU GEMM measured 5% slower)
    narrow_erf = window is not None and (32 - shift) % 2 == 0 and int(-g.b.min()) < 2 ** (31 - half_k)
    mask = (1 << shift) - 1
    # the high half of x * m times (erf + one) << lift, shifted right by e - (32 - lift): channels
    # with e <= 32 take a left shift of erf + one, where its bound leaves room (MiniLM: e from 28)
    lift = high_half_lift(first, Gelu.multiplier_bound(g.b, g.c, g.one))

    def _erf32(u: Expr, s: Expr, consts: Consts, j: Expr) -> Expr:
        """floor(sign * (u**2 + c) / 2**shift) in int32 lanes: with c = ch * 2**shift + cl, it is
        ch + (u**2 >> shift) + a carry from the low bits, rounded up for a negative sign (then
        negated): u**2 >> shift is the high half of (u << half_k)**2 (`high_half`), its low bits
        a wrapping product."""
        ch = consts.add((g.c >> shift).astype("int32"), "gch")[j]
        cl = consts.add((g.c & mask).astype("int32"), "gcl")[j]
        uk = u << tirx.const(half_k, "int32")
        low = tirx.reinterpret("int32", (u.astype("uint32") * u.astype("uint32")) & tirx.const(mask, "uint32"))
        carry = (low + cl + (s & tirx.const(mask, "int32"))) >> tirx.const(shift, "int32")
        e = ch + high_half(uk, uk) + carry
        return with_sign(e, s)

    def f(acc, j, consts, extras, i):
        nb = consts.add((-g.b).astype(dt), "gnb")[j]
        x = acc.astype(dt)
        if window is not None:
            lo, hi = (channel_values(v, consts, j, name) for v, name in zip(window, ("glo", "ghi")))
            x = tirx.min(tirx.max(x, lo), hi)
        # (min(|x|, -b) + b)**2 as u**2 with u = max(-b - |x|, 0) in [0, -b]; |x| as max(x, -x): TVM
        # lowers abs to a select that the simplifier then pushes through the square
        u = tirx.max(nb - tirx.max(x, -x), tirx.const(0, dt))
        # sign(x) * v as (v ^ s) - s with s = -1 for x < 0 (`with_sign`; at x == 0 the erf value is
        # multiplied by x == 0 anyway)
        if narrow_erf:  # t = erf + one, int32
            one = consts.add(g.one.astype("int32"), "g1")[j]
            t = opaque_sum(_erf32(u, x >> tirx.const(31, "int32"), consts, j), one)
        else:
            c, one = consts.add(g.c, "gc")[j], consts.add(g.one, "g1")[j]
            u, s = u.astype(I64), x.astype(I64) >> c64(63)
            t = ((((u * u + c) ^ s) - s) >> c64(shift)) + one
        if window is None:
            return chain(x.astype(I64) * t.astype(I64), g.out, consts, j)
        xm = x * consts.add(first.m.astype("int32"), "m")[j]
        t = t.astype("int32")  # the window's erf + one is int32, and the cast tells LLVM so
        if lift is None:
            product = rescale(xm.astype(I64) * t.astype(I64), first, consts, j)
        else:
            t = t << channel_values(lift, consts, j, "shift")
            product = rescale(high_half(xm, t), first, consts, j, 32 - lift)
        return chain(product, g.out[1:], consts, j)
    return f


def tanh_epilogue(t: Tanh) -> Epilogue:
    """tanh(x) = sign(x) (1 - E) / (1 + E), E = i-exp(-2|x|) in Q15; int8 out at scale 1/127."""
    def f(acc, j, consts, extras, i):
        x = requant(acc, t.to_fixed, consts, j)
        # |x| as max(x, -x) and the sign by `with_sign`: with abs and a select TVM's simplifier
        # specialized the whole expression to each sign, two divisions per output
        e = iexp(c64(-2) * tirx.max(x, -x), t.exp).astype("int32")  # in [0, one]
        one = tirx.const(1 << Tanh.EXP_FRAC, "int32")
        # operands positive and below 2**24: a 32-bit truncating division (`idiv` lane by lane)
        mag = tirx.truncdiv(tirx.const(2 * Tanh.OUT_SCALE, "int32") * (one - e) + (one + e),
                            tirx.const(2, "int32") * (one + e))
        return with_sign(mag, (x >> c64(63)).astype("int32"))
    return f


def raw_epilogue() -> Epilogue:
    return lambda acc, j, consts, extras, i: acc
