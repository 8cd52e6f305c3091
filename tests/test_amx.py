"""Intel AMX: the linear layers in both loop orders, the batched (attention) form of the tile
GEMM, and the OS permission it needs."""

from __future__ import annotations

import types

import numpy as np
import pytest
import tvm

from ibert_tvm import reference, targets
from ibert_tvm.importer import gelu_of
from ibert_tvm.program import INT8, Linear, dyadic
from ibert_tvm.relay_ops.attention import context_kernel
from ibert_tvm.relay_ops.gemm import U8_SHIFT
from ibert_tvm.relay_ops.linear import gelu_epilogue, linear_kernel
from ibert_tvm.schedules import cpu


def amx_host() -> targets.Preset:
    host = targets.get("host")
    if host.isa != "amx":
        pytest.skip("this CPU (or its OS) offers no AMX tiles")
    return host


@pytest.mark.parametrize("a_shift, product", [(0, "tdpbssd"), (U8_SHIFT, "tdpbusd")], ids=["s8", "u8"])
@pytest.mark.parametrize("n, k", [(512, 256), (2048, 768)], ids=["rows-first", "columns-first"])
def test_linear_on_the_tiles_equals_numpy(n, k, a_shift, product):
    """A weight that L2 keeps takes row tiles outermost, a larger one column blocks; either way
    the i-GELU epilogue reads the tiles' sums exactly, whether the activations are read in place
    (s8, as the x86-amx preset builds them) or staged as u8."""
    host = amx_host()
    assert (n * k > cpu.L2_WEIGHT) == (n == 2048)
    rng = np.random.default_rng(1)
    lin = Linear(rng.integers(-127, 128, (n, k)).astype(np.int8), rng.integers(-5000, 5000, n).astype(np.int32))
    g = gelu_of(lin, rng.uniform(1e-5, 3e-5, n), [0.03, 0.035])
    m = 64
    assert host.a_shift(m, n, k) == 0
    kern = linear_kernel("g", lin, m, gelu_epilogue(g, lin.acc_bound), "int8", a_shift=a_shift)
    lib = tvm.compile(tvm.IRModule({"main": cpu.schedule(kern.func, cpu.ISAS["amx"])}), targets.tvm_target(host))
    asm = lib.mod.inspect_source("asm")
    # the accumulators start on the tiles, and C is not zeroed in memory first (TVM's kept init)
    assert product in asm and "tilezero" in asm and "memset" not in asm
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    out = tvm.runtime.tensor(np.zeros(kern.out_shape, kern.out_dtype))
    lib["main"](tvm.runtime.tensor(x), *map(tvm.runtime.tensor, kern.consts), out)
    want = reference.gelu(reference.linear(x, lin), g)
    assert len(np.unique(want)) > 100
    np.testing.assert_array_equal(out.numpy(), want)


@pytest.mark.parametrize("a_shift", [0, U8_SHIFT], ids=["s8", "u8"])
def test_attention_context_on_the_tiles_equals_numpy(a_shift):
    """P V per head over 256 keys (K >= 256: on the tiles; the encoder shapes of the bit-exact
    tests have fewer keys), requantized to int8 in the [batch, keys, heads, d] layout; the
    probabilities staged as s8 (p - 128, the V sums making up for it) or as u8."""
    host = amx_host()
    batch, seq, hidden, heads = 2, 256, 256, 2
    d = hidden // heads
    assert cpu.amx_fits(seq, d, seq)
    rng = np.random.default_rng(0)
    probs = rng.integers(0, 256, (batch, heads, seq, seq)).astype(np.uint8)
    qkv = rng.integers(-128, 128, (batch * seq, 3 * hidden)).astype(np.int8)
    layer = types.SimpleNamespace(ctx_out=dyadic(0.003, 255 * 128 * seq, INT8))
    k = context_kernel("c", layer, batch, seq, hidden, heads, a_shift)
    lib = tvm.compile(tvm.IRModule({"main": cpu.schedule(k.func, cpu.ISAS["amx"])}), targets.tvm_target(host))
    out = tvm.runtime.tensor(np.zeros(k.out_shape, k.out_dtype))
    lib["main"](tvm.runtime.tensor(probs), tvm.runtime.tensor(qkv), *map(tvm.runtime.tensor, k.consts), out)
    v = qkv[:, 2 * hidden :].reshape(batch, seq, heads, d).transpose(0, 2, 1, 3).astype(np.int64)
    want = reference.requant(probs.astype(np.int64) @ v, layer.ctx_out).transpose(0, 2, 1, 3)
    assert len(np.unique(want)) > 100
    np.testing.assert_array_equal(out.numpy(), want)


def test_a_refused_amx_permission_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(targets, "cpu_flags", lambda: {"avx512f", "avx512bw", "avx512_vnni", *targets.AMX_FLAGS})
    monkeypatch.setattr(targets, "amx_permitted", lambda: False)
    with pytest.raises(RuntimeError, match="AMX tiles and Linux refused"):
        targets.check_runnable("x86_64", list(targets.get("x86-amx").cpu_flags))
