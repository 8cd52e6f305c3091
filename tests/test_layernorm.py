"""i-LayerNorm's kernel against the reference, with and without the 22-bit input bound that lets
it keep sums and differences in int32: rows at the bound's edges, constant rows (variance 0) and
random ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from conftest import Spec, calibrated

from ibert_tvm import reference, targets
from ibert_tvm.graph import RESIDUAL_BOUND
from ibert_tvm.program import LayerNorm
from ibert_tvm.relay_ops.layernorm import layer_norm_kernel
from ibert_tvm.schedules import cpu


def edge_rows(channels: int, rng: np.random.Generator) -> np.ndarray:
    lo, hi = -RESIDUAL_BOUND, RESIDUAL_BOUND - 1
    alternating = np.where(np.arange(channels) % 2 == 0, lo, hi)
    one_out = np.full(channels, lo)
    one_out[channels // 3] = hi
    rows = [np.full(channels, lo), np.full(channels, hi), np.zeros(channels), alternating, one_out,
            *rng.integers(lo, hi + 1, (11, channels)), *rng.integers(-300, 300, (4, channels))]
    return np.stack(rows).astype(np.int32)


def widened(ln: LayerNorm, channels: int) -> LayerNorm:
    """The same LayerNorm over `channels` channels, its per-channel constants repeated."""
    reps = channels // len(ln.bias)
    out = [dataclasses.replace(rq, m=np.tile(rq.m, reps), e=np.tile(rq.e, reps)) if rq.per_channel else rq
           for rq in ln.out]
    return dataclasses.replace(ln, bias=np.tile(ln.bias, reps), out=out)


# 32 channels: the row sum fits int32; 2048: 2**21 * 2048 does not, and only x - mean is int32
@pytest.mark.parametrize("channels", [32, 2048])
@pytest.mark.parametrize("in_bound", [None, RESIDUAL_BOUND], ids=["int64", "22-bit input"])
def test_layer_norm_equals_the_reference_at_the_edges(in_bound, channels):
    ln = widened(calibrated("IBertModel", Spec())[1].layers[0].out_ln, channels)
    x = edge_rows(channels, np.random.default_rng(5))
    host = targets.get("host")
    k = layer_norm_kernel("ln", ln, x.shape[0], channels, in_bound)
    func = cpu.schedule(k.func, cpu.ISAS[host.isa]).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), targets.tvm_target(host))
    out = tvm.runtime.tensor(np.zeros(k.out_shape, k.out_dtype))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, *k.consts)], out)
    want = reference.layer_norm(x, ln)
    assert len(np.unique(want)) > 20
    np.testing.assert_array_equal(out.numpy(), want)
