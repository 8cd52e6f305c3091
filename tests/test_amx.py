"""Intel AMX: the batched (attention) form of the tile GEMM, and the OS permission it needs."""

from __future__ import annotations

import types

import numpy as np
import pytest
import tvm

from ibert_tvm import reference, targets
from ibert_tvm.program import INT8, dyadic
from ibert_tvm.relay_ops.attention import context_kernel
from ibert_tvm.schedules import cpu


def test_attention_context_on_the_tiles_equals_numpy():
    """P V per head over 256 keys (K >= 256: on the tiles; the encoder shapes of the bit-exact
    tests have fewer keys), requantized to int8 in the [batch, heads, keys, d] layout."""
    host = targets.get("host")
    if host.isa != "amx":
        pytest.skip("this CPU (or its OS) offers no AMX tiles")
    batch, seq, hidden, heads = 2, 256, 64, 2
    d = hidden // heads
    assert cpu.amx_fits(seq, d, seq)
    rng = np.random.default_rng(0)
    probs = rng.integers(0, 256, (batch, heads, seq, seq)).astype(np.uint8)
    qkv = rng.integers(-128, 128, (batch * seq, 3 * hidden)).astype(np.int8)
    layer = types.SimpleNamespace(ctx_out=dyadic(0.003, 255 * 128 * seq, INT8))
    k = context_kernel("c", layer, batch, seq, hidden, heads)
    lib = tvm.compile(tvm.IRModule({"main": cpu.schedule(k.func, cpu.ISAS["amx"])}), targets.tvm_target(host))
    out = tvm.runtime.tensor(np.zeros(k.out_shape, k.out_dtype))
    lib["main"](tvm.runtime.tensor(probs), tvm.runtime.tensor(qkv), *map(tvm.runtime.tensor, k.consts), out)
    v = qkv[:, 2 * hidden :].reshape(batch, seq, heads, d).transpose(0, 2, 1, 3).astype(np.int64)
    want = reference.requant(probs.astype(np.int64) @ v, layer.ctx_out)
    assert len(np.unique(want)) > 100
    np.testing.assert_array_equal(out.numpy(), want)


def test_a_refused_amx_permission_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(targets, "cpu_flags", lambda: {"avx512f", "avx512bw", "avx512_vnni", *targets.AMX_FLAGS})
    monkeypatch.setattr(targets, "amx_permitted", lambda: False)
    with pytest.raises(RuntimeError, match="AMX tiles and Linux refused"):
        targets.check_runnable("x86_64", list(targets.get("x86-amx").cpu_flags))
