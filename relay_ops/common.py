"""Integer building blocks shared by the kernels: dyadic requantization, i-exp, Newton sqrt."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm.ir.expr
from tvm import te, tirx

from ibert_tvm.program import EXP_CONST, PRODUCT_BITS, IExp, Requant

I64 = "int64"


def c64(v: int) -> tvm.ir.expr.Expr:
    return tirx.const(int(v), I64)


@dataclass
class Kernel:
    """A PrimFunc plus the constant arrays (weights, multipliers) it takes after its inputs."""

    name: str
    func: tirx.PrimFunc
    consts: list[np.ndarray]
    out_shape: tuple[int, ...]
    out_dtype: str


@dataclass
class Consts:
    """Collects a kernel's constant operands as placeholders, remembering their values."""

    prefix: str
    tensors: list[te.Tensor] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)

    def add(self, arr: np.ndarray, name: str) -> te.Tensor:
        t = te.placeholder(arr.shape, str(arr.dtype), name=f"{self.prefix}_{name}_{len(self.tensors)}")
        self.tensors.append(t)
        self.arrays.append(arr)
        return t


def make_kernel(name: str, kind: str, inputs: list[te.Tensor], out: te.Tensor, consts: Consts,
                attrs: dict[str, object] | None = None) -> Kernel:
    func = te.create_prim_func([*inputs, *consts.tensors, out])
    func = func.with_attr({"global_symbol": name, "ibert.kind": kind, **(attrs or {})})
    return Kernel(name, func, consts.arrays, tuple(int(s) for s in out.shape), str(out.dtype))


def clamp(x: tvm.ir.expr.Expr, lo: int | None, hi: int | None) -> tvm.ir.expr.Expr:
    if lo is None:
        return x
    return tirx.max(tirx.min(x, tirx.const(hi, str(x.ty))), tirx.const(lo, str(x.ty)))


def opaque_sum(a: tvm.ir.expr.Expr, b: tvm.ir.expr.Expr) -> tvm.ir.expr.Expr:
    """a + b of int32s that never overflow, as a wrapping add. LLVM distributes a sign extension
    over a signed (nsw) add, and a sum of two extended values may take 33 bits: a 64-bit product
    of it is then `vpmullq` (3 uops) rather than `vpmuldq` (1). Reinterpreted, not cast: TVM's
    bound analysis takes a cast of a uint32 for non-negative."""
    return tirx.reinterpret("int32", a.astype("uint32") + b.astype("uint32"))


def rshift_round(x: tvm.ir.expr.Expr, e: tvm.ir.expr.Expr, dtype: str = I64) -> tvm.ir.expr.Expr:
    one = tirx.const(1, dtype)
    return (x + (one << (e - one))) >> e


def requant(x: tvm.ir.expr.Expr, rq: Requant, consts: Consts, ch: tvm.ir.expr.Expr | None = None,
            bound: np.ndarray | None = None) -> tvm.ir.expr.Expr:
    """``clamp((x * m + 2**(e-1)) >> e)``, with m, e immediates or per-channel constant tensors;
    in int32 when the requantization's bound allows (half the vector work of int64), else per
    channel as the high half of two int32s where x (|x| <= `bound`, per channel, default rq.bound)
    leaves room for it (`high_half_lift`). Per channel, the rounding term is a constant tensor
    too: computing it per element (a variable shift and a subtraction per vector) cost 6% of the
    i-GELU GEMM's time."""
    dt = "int32" if rq.fits_int32 else I64
    if not rq.per_channel:
        m, e = tirx.const(int(rq.m), dt), tirx.const(int(rq.e), dt)
        return clamp(rshift_round(x.astype(dt) * m, e, dt).astype(I64), rq.lo, rq.hi)
    lift = high_half_lift(rq, rq.bound if bound is None else bound)
    if dt == I64 and lift is not None:
        m = consts.add(rq.m.astype("int32"), "m")[ch]
        lifted = x.astype("int32") << channel_values(lift, consts, ch, "shift")
        return rescale(high_half(lifted, m), rq, consts, ch, 32 - lift)
    # an int32 table of m even for int64 products: a product with a sign-extended 32-bit value is
    # one `vpmuldq` where LLVM can pair it that way (i-GELU's x * (erf + one) * m), not `vpmullq`
    m_dt = "int32" if int(np.abs(rq.m).max()) < 2**31 else I64
    m = consts.add(rq.m.astype(m_dt), "m")[ch].astype(dt)
    return rescale(x.astype(dt) * m, rq, consts, ch)


def high_half_lift(rq: Requant, bound: np.ndarray | int) -> np.ndarray | None:
    """Per channel, the left shift s of x (|x| <= `bound`, per channel or for all) for which the
    high half of (x << s) * m, an int32 times m's int32, holds every bit the rounding shift keeps:
    e - (32 - s) >= 1, with x << s still int32. None if some channel has none."""
    if int(np.abs(rq.m).max()) >= 2**31:
        return None
    need = np.maximum(0, 33 - rq.e.astype(np.int64))
    # one shift for every channel if it fits (an immediate), else each channel's least
    for s in (np.full_like(need, need.max()), need):
        if (np.asarray(bound, dtype=object) * np.left_shift(1, s.astype(object)) < 2**31).all():
            return s
    return None


def channel_values(v: np.ndarray, consts: Consts, ch: tvm.ir.expr.Expr, name: str) -> tvm.ir.expr.Expr:
    """Per-channel int32 constants (shifts, clamps): an immediate where every channel's is the same."""
    return tirx.const(int(v.max()), "int32") if (v == v.max()).all() else consts.add(v.astype("int32"), name)[ch]


def with_sign(v: tvm.ir.expr.Expr, s: tvm.ir.expr.Expr) -> tvm.ir.expr.Expr:
    """v for s == 0, -v for s == -1 (int32), as (v ^ s) - s: a select would have TVM's simplifier
    specialize the whole expression of v to each sign. Opaque (`opaque_sum`): LLVM would
    distribute a product of the result over a plain add."""
    return opaque_sum(v ^ s, -s)


def rescale(product: tvm.ir.expr.Expr, rq: Requant, consts: Consts, ch: tvm.ir.expr.Expr,
            dropped: np.ndarray | int = 0) -> tvm.ir.expr.Expr:
    """A per-channel requantization of x whose product x * m the caller formed (in its dtype):
    ``clamp((product + 2**(e-1)) >> e)``. With `dropped` low bits already shifted off (the
    product's `high_half`: 32, for every e > 32) the rest of the shift is e - dropped, exact since
    2**(e-1) is then a multiple of 2**dropped; after a high half it is int32 work on 16 lanes."""
    dt = str(product.ty)
    e = consts.add((rq.e - dropped).astype(dt), "e")[ch]
    half = consts.add(np.left_shift(1, rq.e.astype(np.int64) - 1 - dropped).astype(dt), "r")[ch]
    return clamp(((product + half) >> e).astype(I64), rq.lo, rq.hi)


def chain(x: tvm.ir.expr.Expr, rqs: list[Requant], consts: Consts, ch: tvm.ir.expr.Expr) -> tvm.ir.expr.Expr:
    for rq in rqs:
        x = requant(x, rq, consts, ch)
    return x


def reciprocal(d: int, n_max: int) -> tuple[int, int]:
    """(M, S) with n * M >> S == n // d for every 0 <= n <= n_max.

    With 2**S > n_max * d and M = ceil(2**S / d), the rounding error n * (M * d - 2**S) / 2**S
    stays below 1 for every n <= n_max, so the floor never moves.
    """
    shift = (n_max * d).bit_length()
    m = -(-(1 << shift) // d)
    if (n_max * m).bit_length() > PRODUCT_BITS:
        raise ValueError(f"no int64 multiply-shift reciprocal of {d} up to {n_max}")
    return m, shift


def high_reciprocal(d: int, n_max: int) -> int | None:
    """M < 2**31 with n * M >> 32 == n // d for every 0 <= n <= n_max, if there is one: the
    quotient is then the high half of a 32 x 32-bit product. With M = ceil(2**32 / d) and
    err = M * d - 2**32, n * M / 2**32 = n / d + n * err / (d * 2**32); the floor holds while
    n * err < 2**32 (the worst n leaves remainder d - 1)."""
    m = -(-(1 << 32) // d)
    return m if m < 2**31 and n_max * (m * d - (1 << 32)) < 1 << 32 else None


def high_half(a: tvm.ir.expr.Expr, b: tvm.ir.expr.Expr | int) -> tvm.ir.expr.Expr:
    """(a * b) >> 32 of two int32s, as int32. LLVM's x86 backend computes the high half of a
    32 x 32-bit product from even- and odd-lane `vpmuldq` / `vpmuludq` and one permute, where a
    64-bit product takes widening, two multiplies and narrowing: 10 instructions a vector. The
    operands must be plain int32 values: LLVM distributes a product over an add it may (`opaque_sum`)."""
    b = c64(b) if isinstance(b, int) else b.astype(I64)
    return ((a.astype(I64) * b) >> c64(32)).astype("int32")


def _poly_extent(ie: IExp) -> int:
    """max |(r + b) * r + c| over i-exp's remainders r in (x0, 0] (a parabola: ends and vertex)."""
    lo, hi = ie.x0 + 1, 0
    rs = {lo, hi, min(max(-ie.b // 2, lo), hi), min(max(-(ie.b // 2) - 1, lo), hi)}
    return max(abs((r + ie.b) * r + ie.c) for r in rs)


TAIL_Q = 30  # largest power-of-two shift of the int32 tail; beyond it the result is 0


def iexp_bounds(ie: IExp) -> tuple[bool, bool]:
    """Whether n, q, r and the polynomial fit int32, and whether the requantization's tail does
    too (see `iexp`)."""
    poly = EXP_CONST * -ie.x0 < 2**31 and ie.c + abs(ie.b) * -ie.x0 + ie.x0 * ie.x0 < 2**31
    m_out, e = int(ie.out.m), int(ie.out.e)
    tail = poly and abs(m_out) < 2**31 and e >= 1 and (_poly_extent(ie) * abs(m_out)) >> (e - 1) < 2**TAIL_Q - 1
    return poly, tail


def iexp(x: tvm.ir.expr.Expr, ie: IExp) -> tvm.ir.expr.Expr:
    """i-exp of x <= 0 requantized by ie.out; the shift grows by q and past PRODUCT_BITS gives 0.

    q = floor(x / x0) is (-x) // |x0| on the clamped range, computed as a multiply-shift
    (vector division by a constant lowers to scalar branches).
    """
    lim = EXP_CONST * -ie.x0
    m, s = reciprocal(-ie.x0, lim)
    # n, q, r and the polynomial run in int32 when their static bounds allow (every scale of the
    # models measured); where only n * m passes 2**31, that one product is 64-bit from int32s
    small, tail32 = iexp_bounds(ie)
    dt = "int32" if small else I64
    k = lambda v: tirx.const(int(v), dt)  # noqa: E731
    # clamped on both sides: masked softmax lanes carry garbage that a select later discards
    n = tirx.min(tirx.max(-x.astype(I64), c64(0)), c64(lim)).astype(dt)
    high_m = high_reciprocal(-ie.x0, lim) if small else None
    if lim * m < 2**31 or not small:
        q = (n * k(m)) >> k(s)
    elif high_m is not None:
        q = high_half(n, high_m)
    else:
        q = ((n.astype(I64) * c64(m)) >> c64(s)).astype(dt)
    r = k(-ie.x0) * q - n  # x - x0 * q with x = -n: in (x0, 0]
    poly = (r + k(ie.b)) * r
    # in int32 an opaque add: LLVM would distribute the product z * m below over a plain one
    z = opaque_sum(poly, k(ie.c)) if small else poly + k(ie.c)
    m_out, e = int(ie.out.m), int(ie.out.e)
    if tail32:
        # The rounding shift by e + q in two steps, exact for floor shifts:
        #   (z*m + 2**(e+q-1)) >> (e+q) == ((z*m >> (e-1)) + 2**q) >> (q+1),
        # and z*m >> (e-1) fits int32 (checked above), so only z*m, int32 by int32, is 64-bit (one
        # `vpmuldq` on x86) instead of a 64-bit product and variable 64-bit shifts per element. For
        # q > TAIL_Q the result is 0 as in int64: |z*m| < 2**(e+29) <= 2**(e+q-1).
        # For e > 32 the first step is z*m >> 32, the product's high half (`high_half`), and the
        # rest e - 32 + q: ((z*m >> 32) + 2**(a+q)) >> (a+q+1) with a = e - 33. Its high half
        # is below 2**30 in magnitude, so past a + q = 30 the result is 0.
        a = e - 33 if e > 32 else None
        head = high_half(z, m_out) if a is not None else ((z.astype(I64) * c64(m_out)) >> c64(e - 1)).astype(dt)
        top = 30 - a if a is not None else TAIL_Q
        qq = tirx.min(q, k(top)) + k(a or 0)
        y = (head + (k(1) << qq)) >> (qq + k(1))
        y = tirx.Select((q > k(top)) | (q > k(PRODUCT_BITS - e)), k(0), y)
        return clamp(y, ie.out.lo, ie.out.hi).astype(I64)
    z, q = z.astype(I64), q.astype(I64)
    shift = c64(e) + q
    y = rshift_round(z * c64(m_out), tirx.min(shift, c64(PRODUCT_BITS)))
    return clamp(tirx.Select(shift > c64(PRODUCT_BITS), c64(0), y), ie.out.lo, ie.out.hi)


NEWTON_STEPS = 7  # from 2**ceil(bits/2) >= sqrt(n), enough for every n < 2**62 (tested)


def isqrt_stages(n: te.Tensor, name: str) -> te.Tensor:
    """floor(sqrt(n)) for a 1-D int64 tensor by integer Newton steps, one small stage each."""
    # n == 0 is computed as n == 1 (no division by zero) and fixed up at the end.
    def start(i):
        v = tirx.max(n[i], c64(1))
        bits = c64(64) - tirx.clz(v).astype(I64)
        return c64(1) << ((bits + c64(1)) >> c64(1))

    def newton(prev: te.Tensor, step: int) -> te.Tensor:
        def f(i):
            return tirx.min(prev[i], (prev[i] + tirx.floordiv(tirx.max(n[i], c64(1)), prev[i])) >> c64(1))
        return te.compute(n.shape, f, name=f"{name}_x{step}")

    x = te.compute(n.shape, start, name=f"{name}_x0")
    for step in range(1, NEWTON_STEPS + 1):
        x = newton(x, step)
    return te.compute(n.shape, lambda i: tirx.Select(n[i] == c64(0), c64(0), x[i]), name=f"{name}_sqrt")
