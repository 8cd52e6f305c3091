"""Properties of the integer building blocks: Newton sqrt (NumPy and TVM) and dyadic requantization."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ibert_tvm.program import INT8, PRODUCT_BITS, dyadic
from ibert_tvm.reference import isqrt, requant
from ibert_tvm.relay_ops.common import high_reciprocal

LIMIT = 2**62
EDGES = [0, 1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 2**31 - 1, 2**32, 2**61, LIMIT - 1]
EDGES += [r * r + d for r in (2**31 - 1, 2**30, 3037000499 // 2) for d in (-1, 0, 1)]
EDGES = sorted({n for n in EDGES if 0 <= n < LIMIT})

# numbers below 2**62, half of them squares or squares +- 1 (Newton's hardest cases)
near_square = st.builds(lambda r, d: min(max(r * r + d, 0), LIMIT - 1), st.integers(0, 2**31 - 1), st.sampled_from([-1, 0, 1]))
big_int = st.one_of(st.integers(0, LIMIT - 1), near_square, st.integers(0, 2**62 - 1).map(lambda n: n >> (n % 62)))
int_arrays = st.lists(big_int, min_size=1, max_size=64)


def expected(values) -> np.ndarray:
    return np.array([math.isqrt(int(v)) for v in values], np.int64)


def test_reference_isqrt_edges():
    np.testing.assert_array_equal(isqrt(np.array(EDGES, np.int64)), expected(EDGES))


def test_reference_isqrt_zero_divides_by_nothing():
    with np.errstate(divide="raise"):
        assert isqrt(np.array([0, 5], np.int64)).tolist() == [0, 2]


@settings(max_examples=150, deadline=None)
@given(int_arrays)
def test_reference_isqrt_matches_math(values):
    np.testing.assert_array_equal(isqrt(np.array(values, np.int64)), expected(values))


@pytest.fixture(scope="module")
def tvm_isqrt():
    """The `isqrt_stages` TE kernel on a 64-element int64 vector, compiled for the host."""
    import tvm
    from tvm import te

    from ibert_tvm import targets
    from ibert_tvm.relay_ops.common import isqrt_stages

    size = 64
    n = te.placeholder((size,), "int64", name="n")
    func = te.create_prim_func([n, isqrt_stages(n, "t")])
    lib = tvm.compile(func, target=targets.tvm_target(targets.get("host")))

    def run(values) -> np.ndarray:
        x = np.zeros(size, np.int64)
        x[: len(values)] = values
        out = tvm.runtime.tensor(np.full(size, -1, np.int64))
        lib["main"](tvm.runtime.tensor(x), out)
        return out.numpy()[: len(values)]

    return run


def test_tvm_isqrt_edges(tvm_isqrt):
    np.testing.assert_array_equal(tvm_isqrt(EDGES), expected(EDGES))


@settings(max_examples=100, deadline=None)
@given(int_arrays)
def test_tvm_isqrt_matches_math(tvm_isqrt, values):
    np.testing.assert_array_equal(tvm_isqrt(values), expected(values))


def test_tvm_isqrt_every_bit_length(tvm_isqrt):
    """Powers of two, and their neighbours, for every bit length up to 62 (each starting point)."""
    values = sorted({v for b in range(62) for v in (2**b - 1, 2**b, 2**b + 1) if 0 <= v < LIMIT})
    for i in range(0, len(values), 64):
        chunk = values[i : i + 64]
        np.testing.assert_array_equal(tvm_isqrt(chunk), expected(chunk))


ratios = st.floats(1e-6, 10.0, allow_nan=False, allow_infinity=False)
signed_ratios = st.tuples(ratios, st.booleans()).map(lambda t: -t[0] if t[1] else t[0])


@settings(max_examples=300, deadline=None)
@given(r=signed_ratios, bound_bits=st.integers(0, 52), data=st.data())
def test_dyadic_no_overflow_and_close(r, bound_bits, data):
    bound = data.draw(st.integers(max(1, 2 ** bound_bits // 2), 2**bound_bits), label="bound")
    rq = dyadic(r, bound)
    m, e = int(rq.m), int(rq.e)
    bits = min(31, PRODUCT_BITS - 1 - bound.bit_length())
    assert 1 <= e <= PRODUCT_BITS
    assert (m < 0) == (r < 0) or m == 0
    for x in {bound, -bound, 0, 1, -1, data.draw(st.integers(-bound, bound), label="x")}:
        assert abs(x * m) < 2**PRODUCT_BITS
        y = (x * m + (1 << (e - 1))) >> e  # exact integer arithmetic, the documented rule
        err = abs(Fraction(y) - x * Fraction(r))
        # rounding to nearest (<= 1/2) plus the mantissa's own rounding error times |x|
        assert err <= Fraction(1, 2) + abs(x) * Fraction(1, 2 ** (e + 1))
        if abs(x * r) <= 2 ** (bits - 1):  # the mantissa resolves the product: within 1
            assert err <= 1


@settings(max_examples=50, deadline=None)
@given(r=signed_ratios, x=st.integers(-(2**20), 2**20))
def test_dyadic_within_one_for_activation_bounds(r, x):
    rq = dyadic(r, 2**20)
    y = (x * int(rq.m) + (1 << (int(rq.e) - 1))) >> int(rq.e)
    assert abs(Fraction(y) - x * Fraction(r)) <= 1


@settings(max_examples=200, deadline=None)
@given(rs=st.lists(signed_ratios, min_size=1, max_size=6), bound_bits=st.integers(8, 40), data=st.data())
def test_saturation_is_the_least_clamp_that_changes_nothing(rs, bound_bits, data):
    """Clamping x to +-w before a saturating requantization keeps every output; at w - 1 some
    channel still has an unsaturated output on one side."""
    rq = dyadic(np.array(rs), 2**bound_bits, INT8)
    w = rq.saturation()
    assert w is not None and w >= 1
    out = lambda x: requant(np.full(len(rs), x, np.int64), rq)  # noqa: E731
    beyond = data.draw(st.integers(w, max(w, rq.bound)), label="beyond")
    for x in {w, w + 1, beyond}:
        np.testing.assert_array_equal(out(x), out(w))
        np.testing.assert_array_equal(out(-x), out(-w))
    if w > 1:
        assert (out(w - 1) != out(w)).any() or (out(1 - w) != out(-w)).any()


def test_saturation_needs_a_clamp():
    assert dyadic(0.5, 1000).saturation() is None


@settings(max_examples=300, deadline=None)
@given(d=st.integers(2, 2**24), intervals=st.integers(1, 64), data=st.data())
def test_high_reciprocal_is_exact_division(d, intervals, data):
    """n * M >> 32 == n // d wherever `high_reciprocal` offers M: at the top of the range, at
    every remainder's worst case (d - 1) near it, and anywhere."""
    n_max = min(intervals * d, 2**31 - 1)
    m = high_reciprocal(d, n_max)
    ns = {0, 1, d - 1, d, n_max, n_max - n_max % d - 1, data.draw(st.integers(0, n_max), label="n")}
    ns |= {q * d - 1 for q in range(max(1, n_max // d - 3), n_max // d + 1)}
    ns = sorted(n for n in ns if 0 <= n <= n_max)
    if m is not None:
        assert m < 2**31 and all(n * m >> 32 == n // d for n in ns)


def test_high_reciprocal_at_roberta_bases_exp_scale():
    """i-exp's quotient at a scores scale of 1e-4 (x0 = -6931, 30 intervals) is a high half: every n."""
    n = np.arange(30 * 6931 + 1, dtype=np.int64)
    m = high_reciprocal(6931, int(n[-1]))
    assert m is not None and (n * m >> 32 == n // 6931).all()


def test_dyadic_per_channel_matches_scalar():
    rs = np.array([1e-6, 0.37, -2.5, 9.99])
    rq = dyadic(rs, 1000)
    for i, r in enumerate(rs):
        one = dyadic(r, 1000)
        assert (rq.m[i], rq.e[i]) == (int(one.m), int(one.e))


def test_dyadic_rejects_bounds_that_leave_too_few_bits():
    with pytest.raises(ValueError, match="mantissa bits"):
        dyadic(0.5, 2**56)


@settings(max_examples=300, deadline=None)
@given(d=st.integers(1, 2**24), n_max=st.integers(0, 2**30), data=st.data())
def test_reciprocal_is_exact_division(d, n_max, data):
    from ibert_tvm.relay_ops.common import reciprocal

    m, s = reciprocal(d, n_max)
    ns = data.draw(st.lists(st.integers(0, n_max), min_size=1, max_size=50)) + [n_max, n_max - n_max % d, 0]
    assert all((n * m) >> s == n // d for n in ns)
