"""The fused attention kernel (CPU libraries: Q K^T, i-softmax and P V in one kernel, a row tile of
queries at a time) against the reference's three steps, for every register tile the tuner may
pick, with masked keys and a sequence that is all padding."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from conftest import Spec, calibrated

from ibert_tvm import reference, targets
from ibert_tvm.relay_ops.attention import attention_kernel
from ibert_tvm.schedules import cpu

BATCH, SEQ = 3, 32


def expected(qkv: np.ndarray, mask: np.ndarray, layer, heads: int) -> np.ndarray:
    hidden = qkv.shape[1] // 3
    d = hidden // heads
    batch, seq = mask.shape

    def head(which: int) -> np.ndarray:
        part = qkv[:, which * hidden : (which + 1) * hidden]
        return part.reshape(batch, seq, heads, d).transpose(0, 2, 1, 3).astype(np.int64)

    scores = (head(0) @ head(1).transpose(0, 1, 3, 2)).astype(np.int32)
    probs = reference.softmax(scores, mask[:, None, None, :], layer.softmax)
    return reference.requant(probs.astype(np.int64) @ head(2), layer.ctx_out).transpose(0, 2, 1, 3)  # [b, s, heads, d]


def isas() -> list[str]:
    """The host's ISA, and AVX2 (its s8 operand form) where the host runs it."""
    host = targets.get("host")
    found = [host.isa]
    if host.isa != "avx2" and set(targets.get("x86-avx2").cpu_flags) <= targets.cpu_flags():
        found.append("avx2")
    return found


@pytest.mark.parametrize("isa", isas())
def test_fused_attention_equals_the_three_steps_for_every_tile(isa):
    spec = Spec()
    layer = calibrated("IBertModel", spec)[1].layers[0]
    rng = np.random.default_rng(3)
    qkv = rng.integers(-128, 128, (BATCH * SEQ, 3 * spec.hidden)).astype(np.int8)
    mask = np.ones((BATCH, SEQ), np.int32)
    mask[1, SEQ // 3 :] = 0
    mask[2] = 0
    want = expected(qkv, mask, layer, spec.heads)
    assert len(np.unique(want)) > 20
    preset = targets.get("x86-avx2" if isa == "avx2" else "host")
    k = attention_kernel("a", layer, BATCH, SEQ, spec.hidden, spec.heads, cpu.ISAS[isa].a_shift)
    candidates = cpu.tile_candidates(SEQ, spec.hidden // spec.heads, cpu.ISAS[isa])
    assert len(candidates) >= 2
    for tiles in [*candidates, None]:
        func = cpu.schedule(k.func, cpu.ISAS[isa], tiles).with_attr("global_symbol", "main")
        lib = tvm.compile(tvm.IRModule({"main": func}), targets.tvm_target(preset))
        out = tvm.runtime.tensor(np.zeros(k.out_shape, k.out_dtype))
        lib["main"](*[tvm.runtime.tensor(a) for a in (qkv, mask, *k.consts)], out)
        np.testing.assert_array_equal(out.numpy(), want, err_msg=f"tiles {tiles}")


def test_fused_attention_at_256_keys_on_an_amx_host():
    """At 256 keys the context GEMM would fit the AMX tiles, but in the fused kernel it stays on
    vpdpbusd (u8), whose register tiles keep the softmax's rows in L1 (`cpu.AMX_MIN_N`)."""
    host = targets.get("host")
    if host.isa != "amx":
        pytest.skip("this CPU (or its OS) offers no AMX tiles")
    spec, batch, seq = Spec(hidden=64, heads=2), 1, 256
    d = spec.hidden // spec.heads
    assert not cpu.amx_fits(seq, d, seq) and host.a_shift(seq, d, seq) == cpu.ISAS["amx"].a_shift
    layer = calibrated("IBertModel", spec)[1].layers[0]
    rng = np.random.default_rng(4)
    qkv = rng.integers(-128, 128, (batch * seq, 3 * spec.hidden)).astype(np.int8)
    mask = np.ones((batch, seq), np.int32)
    mask[0, 200:] = 0
    k = attention_kernel("a", layer, batch, seq, spec.hidden, spec.heads, host.a_shift)
    func = cpu.schedule(k.func, cpu.ISAS["amx"]).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), targets.tvm_target(host))
    assert "tdpb" not in lib.mod.inspect_source("asm")
    out = tvm.runtime.tensor(np.zeros(k.out_shape, k.out_dtype))
    lib["main"](*[tvm.runtime.tensor(a) for a in (qkv, mask, *k.consts)], out)
    want = expected(qkv, mask, layer, spec.heads)
    assert len(np.unique(want)) > 20
    np.testing.assert_array_equal(out.numpy(), want)
