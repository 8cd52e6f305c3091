"""i-softmax and integer tanh: TVM kernels vs the NumPy reference over their whole input range,
and the integer approximations' error against the real functions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st

from ibert_tvm import reference, targets
from ibert_tvm.importer import gelu_of, iexp, tanh_of
from ibert_tvm.program import EXP_CONST, INT16, INT22, Linear, Softmax, dyadic
from ibert_tvm.reference import gelu_flat_from
from ibert_tvm.relay_ops.attention import softmax_kernel
from ibert_tvm.relay_ops.common import Consts, high_half_lift, iexp_bounds, make_kernel
from ibert_tvm.relay_ops.common import iexp as iexp_expr
from ibert_tvm.relay_ops.linear import gelu_epilogue, gelu_window, linear_kernel, residual_epilogue, tanh_epilogue
from ibert_tvm.schedules import cpu


def run_kernel(kernel, *inputs: np.ndarray) -> np.ndarray:
    func = cpu.schedule(kernel.func, cpu.ISAS[targets.get("host").isa])
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), targets.tvm_target(targets.get("host")))
    out = tvm.runtime.tensor(np.zeros(kernel.out_shape, kernel.out_dtype))
    lib["main"](*[tvm.runtime.tensor(a) for a in (*inputs, *kernel.consts)], out)
    return out.numpy()


def iexp_kernel(ie, size: int):
    from tvm import te

    x = te.placeholder((size,), "int32", name="x")
    out = te.compute((size,), lambda i: iexp_expr(x[i], ie), name="O")
    return make_kernel("iexp", "elementwise", [x], out, Consts("iexp"))


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(2e-5, 5e-2), exp_at_zero=st.sampled_from([1, 255, 32767, 1 << 20]))
def test_iexp_equals_reference_on_every_interval(scale, exp_at_zero):
    """i-exp at any scale and output range, int32 tail or int64, against the reference on inputs
    that reach every interval q (and q past the clamp), at both ends of each interval."""
    c = (1 / 0.35815147) / scale**2
    ie = iexp(scale, exp_at_zero / c, clamp=INT16 if exp_at_zero < 1 << 15 else (0, 1 << 21))
    q = np.arange(EXP_CONST + 3)
    x = np.unique(np.concatenate([q * ie.x0, q * ie.x0 + 1, q * ie.x0 - 1, [0, np.iinfo(np.int32).min + 1]]))
    x = np.minimum(x, 0).astype(np.int32)
    got = run_kernel(iexp_kernel(ie, x.size), x)
    np.testing.assert_array_equal(got, reference.iexp(x, ie))


def test_softmax_exp_takes_the_int32_tail_at_attention_scales():
    """Scores' scales of real models (1e-4 .. 3e-2, outputs int16) keep i-exp's tail in int32."""
    for scale in (1e-4, 1e-3, 3e-2):
        c = (1 / 0.35815147) / scale**2
        assert iexp_bounds(iexp(scale, 32767 / c, clamp=INT16)) == (True, True), scale


@pytest.mark.parametrize("scale", [3e-2, 1e-3, 1e-4, 4e-5])
def test_softmax_kernel_matches_reference_across_exp_intervals(scale):
    """Scores span ~40 multiples of ln2 below the row max, so every i-exp interval q is hit. At
    1e-3 the tail's first shift passes 32 (the product's high half); at 1e-4 q is one too
    (`high_reciprocal`, roberta-base's scales); at 4e-5 the polynomial is int64."""
    x0 = -0.6931 / scale
    c = (1 / 0.35815147) / scale**2
    sm = Softmax(exp=iexp(scale, 2.0**EXP_CONST / (c * 2.0**EXP_CONST / 32767), clamp=INT16))
    rng = np.random.default_rng(1)
    batch, heads, seq = 2, 3, 32
    scores = rng.integers(int(40 * x0), 1, (batch, heads, seq, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[1, 20:] = 0
    got = run_kernel(softmax_kernel("sm", sm, batch, heads, seq), scores, mask)
    want = reference.softmax(scores, mask[:, None, None, :], sm)
    assert (got == want).all()
    assert (got[1, :, :, 20:] == 0).all()
    real = np.exp((scores - scores.max(-1, keepdims=True)) * scale)
    # 1/256 output steps plus the i-exp polynomial, whose integer constants are coarse at scale 0.03
    assert np.abs(got[0] / 256 - real[0] / real[0].sum(-1, keepdims=True)).max() < 0.03


@pytest.mark.parametrize("exp_at_zero,clamp", [(1, INT16), (2, INT16), (32767, INT16), (1 << 20, (0, 1 << 21))])
def test_softmax_kernel_matches_reference_at_its_edges(exp_at_zero, clamp):
    """int32's whole range in one row (gaps near 2**32), one kept key (row sum == exp(0), 1 included:
    the normalizing factor 2**32), power-of-two sums, fully masked rows; i-exp outputs past int16 take
    the int64 path."""
    scale = 1e-3
    c = (1 / 0.35815147) / scale**2
    sm = Softmax(exp=iexp(scale, exp_at_zero / c, clamp=clamp))
    rng = np.random.default_rng(2)
    batch, heads, seq = 4, 2, 32
    lo, hi = np.iinfo(np.int32).min, np.iinfo(np.int32).max
    scores = rng.integers(lo, hi, (batch, heads, seq, seq), endpoint=True).astype(np.int32)
    scores[..., 0], scores[..., 1] = hi, lo
    scores[:, 1, ::2, 2:] = scores[:, 1, ::2, :1]  # rows of equal scores: the sum is seq * exp(0)
    mask = np.ones((batch, seq), np.int32)
    mask[1, 1:] = 0
    mask[2, :] = 0
    mask[3, 16:] = 0
    got = run_kernel(softmax_kernel("sm", sm, batch, heads, seq), scores, mask)
    want = reference.softmax(scores, mask[:, None, None, :], sm)  # gaps of 2**31 and more included
    assert (got == want).all()
    assert (got[1, :, :, 0] == 255).all() and not got[2].any()


def gelu_kernel(g, acc_bound: int, rows: int):
    """The i-GELU epilogue alone, on int32 accumulators [rows, channels]."""
    from tvm import te

    consts = Consts("gelu")
    acc = te.placeholder((rows, len(g.b)), "int32", name="acc")
    f = gelu_epilogue(g, acc_bound)
    out = te.compute(acc.shape, lambda i, j: f(acc[i, j], j, consts, [], i).astype("int8"), name="O")
    return make_kernel("gelu", "elementwise", [acc], out, consts)


@pytest.mark.parametrize("acc_scale, coarse, folds", [(1e-5, None, True), (1.4e-5, 1e-3, True), (1e-5, 3e-4, False)],
                         ids=["window", "window-lifted", "int64"])
def test_gelu_epilogue_equals_reference_at_its_clamps(acc_scale, coarse, folds):
    """Accumulators at, beside and past the window where the output changes (`gelu_flat_from`),
    at +-b and at the accumulator's bound: the clamp changes no output. Every fourth channel gets
    the `coarse` accumulator scale if given: then some requantizations shift by e <= 32
    (erf + one lifted, as in MiniLM), or (int64) no mantissa of 12 bits keeps x * m in int32."""
    n = 48
    rng = np.random.default_rng(3)
    lin = Linear(rng.integers(-127, 127, (n, 768)).astype(np.int8), rng.integers(-9000, 9000, n).astype(np.int32))
    s_acc = acc_scale * rng.uniform(0.5, 1.5, n)
    if coarse:
        s_acc[::4] = coarse
    g = gelu_of(lin, s_acc, [0.03, 0.035])
    bound = lin.acc_bound
    assert (gelu_window(g, bound) is not None) == folds
    assert not folds or (g.out[0].e <= 32).any() == (coarse is not None)
    lo, hi = gelu_flat_from(g, bound)
    nb = -g.b
    rows = [lo, lo - 1, lo + 1, hi, hi - 1, hi + 1, nb, -nb, nb - 1, 1 - nb, 0 * nb, 0 * nb + bound, 0 * nb - bound]
    acc = np.clip(np.stack([*rows, *rng.integers(-bound, bound + 1, (20, n))]), -bound, bound).astype(np.int32)
    acc = np.concatenate([acc, rng.integers(-2 * nb.max(), 2 * nb.max(), (15, n)).astype(np.int32)])
    want = reference.gelu(acc, g)
    assert len(np.unique(want)) > 30
    np.testing.assert_array_equal(run_kernel(gelu_kernel(g, bound, len(acc)), acc), want)
    at = lambda x: reference.gelu(np.broadcast_to(x, (1, n)).astype(np.int64), g)[0]  # noqa: E731
    np.testing.assert_array_equal(at(hi), at(np.full(n, bound)))
    np.testing.assert_array_equal(at(lo), at(np.full(n, -bound)))
    # where the window reaches past +-b, one step inside it the output still changes
    assert (hi > nb).any()
    assert (at(hi - 1) != at(hi))[hi > nb].all() and (at(lo + 1) != at(lo))[lo < -nb].all()


def test_gelu_epilogue_equals_reference_on_every_accumulator_up_to_b():
    """Every x in [b - 2, 2 - b] on every channel, with the window that makes the whole epilogue
    int32: erf's square, carry and sign in int32 lanes (`_erf32`: the high half of (u << 9)**2
    plus the low bits' carry) against the reference's int64."""
    n = 4
    rng = np.random.default_rng(3)
    lin = Linear(rng.integers(-127, 127, (n, 768)).astype(np.int8), rng.integers(-9000, 9000, n).astype(np.int32))
    g = gelu_of(lin, 1.4e-5 * rng.uniform(0.5, 1.5, n), [0.03, 0.035])
    assert gelu_window(g, lin.acc_bound) is not None
    nb = int(-g.b.min())
    acc = np.repeat(np.arange(-nb - 2, nb + 3, dtype=np.int32)[:, None], n, axis=1)
    want = reference.gelu(acc, g)
    assert len(np.unique(want)) > 100
    np.testing.assert_array_equal(run_kernel(gelu_kernel(g, lin.acc_bound, len(acc)), acc), want)


def residual_kernel(acc_rq, res_rq, rows: int, n: int):
    """The residual epilogue alone: int32 accumulators and int8 residuals [rows, channels]."""
    from tvm import te

    consts = Consts("res")
    acc = te.placeholder((rows, n), "int32", name="acc")
    res = te.placeholder((rows, n), "int8", name="res")
    f = residual_epilogue(acc_rq, res_rq)
    out = te.compute(acc.shape, lambda i, j: f(acc(i, j), j, consts, [res], i).astype("int32"), name="O")
    return make_kernel("residual", "elementwise", [acc, res], out, consts)


@pytest.mark.parametrize("coarse", [None, 2.0**-3], ids=["one-clamp", "per-channel-clamps"])
def test_residual_epilogue_equals_reference_at_its_clamps(coarse):
    """The accumulator is clamped where its requantized value takes the sum past 22 bits whatever
    the residual adds; at, beside and past each channel's clamp, at the bound and at 0, with the
    residual at its extremes, the output is the reference's. Every other channel gets a `coarse`
    ratio if given (and the rest a finer one): then no one clamp suits every channel's shift."""
    n = 32
    rng = np.random.default_rng(5)
    bound = 1536 * 128 * 127  # an ffn_out's accumulator
    ratio = 2.0**7 * rng.uniform(0.5, 1.5, n)
    if coarse:
        ratio[::2], ratio[1::2] = coarse * rng.uniform(0.5, 1.5, n // 2), 4 * ratio[1::2]
    acc_rq, res_rq = dyadic(ratio, bound), dyadic(2.0**13 * rng.uniform(0.5, 1.5, n), 128)
    reach = int(np.abs(reference.requant(np.array([-128, 127])[:, None], res_rq)).max()) + 1
    w = np.minimum(dataclasses.replace(acc_rq, lo=INT22[0] - reach, hi=INT22[1] + reach).saturations(), bound)
    w = w.astype(np.int64)
    assert (w < bound).any() and (high_half_lift(acc_rq, int(w.max())) is None) == (coarse is not None)
    rows = [w, w - 1, w + 1, -w, 1 - w, -w - 1, 2 * w, -2 * w, 0 * w, 0 * w + bound, 0 * w - bound]
    acc = np.concatenate([np.stack(rows), rng.integers(-bound, bound + 1, (16, n)),
                          rng.integers(-2 * w, 2 * w + 1, (16, n))])
    acc = np.clip(np.concatenate([acc, acc, acc]), -bound, bound).astype(np.int32)
    third = len(acc) // 3
    res = np.concatenate([np.full((third, n), -128), np.full((third, n), 127), rng.integers(-128, 128, (third, n))])
    res = res.astype(np.int8)
    want = reference.residual(acc, res, acc_rq, res_rq)
    assert (want == INT22[1]).any() and (want == INT22[0]).any() and len(np.unique(want)) > 100
    np.testing.assert_array_equal(run_kernel(residual_kernel(acc_rq, res_rq, len(acc), n), acc, res), want)


def test_tanh_kernel_matches_reference_and_tanh():
    n = 32
    acc_scale = np.full(n, 6.0 / 127)  # int8 inputs cover [-6, 6]
    lin = Linear(weight=np.eye(n, dtype=np.int8), bias=np.zeros(n, np.int32))
    t = tanh_of(acc_scale, lin.acc_bound)
    x = np.repeat(np.arange(-128, 128, dtype=np.int8)[:, None], n, axis=1)
    got = run_kernel(linear_kernel("th", lin, x.shape[0], tanh_epilogue(t), "int8"), x)
    want = reference.tanh(x.astype(np.int32), t)
    assert (got == want).all()
    err = got[:, 0] / 127 - np.tanh(x[:, 0] * acc_scale[0])
    l2, linf = np.sqrt(np.mean(err**2)), np.abs(err).max()
    print(f"integer tanh on [-6, 6]: L2 {l2:.4f}, Linf {linf:.4f}")
    assert linf < 0.012 and l2 < 0.006


def test_tanh_error_on_a_dense_grid():
    """The error the README documents, measured as the paper measures i-GELU's: on [-4, 4] at a
    fine input step (1e-4), RMS ("L2") and L-infinity against tanh. The int8 output's rounding
    alone costs 0.0039 L-infinity."""
    scale = 1e-4
    x = np.arange(-40000, 40001)
    err = reference.tanh(x, tanh_of(np.array([scale]), 40000)) / 127 - np.tanh(x * scale)
    l2, linf = np.sqrt(np.mean(err**2)), np.abs(err).max()
    print(f"integer tanh on [-4, 4]: L2 (RMS) {l2:.4f}, Linf {linf:.4f}")
    assert linf < 0.006 and l2 < 0.0025
