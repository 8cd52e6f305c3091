"""The INT8 GEMMs really run on AVX-512 VNNI where the target has it, and do without it elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from ibert_tvm import build, targets
from ibert_tvm.program import INT8, Linear, dyadic
from relay_ops.linear import linear_kernel, requant_epilogue


def gemm_asm(preset: str) -> str:
    rng = np.random.default_rng(0)
    lin = Linear(rng.integers(-127, 127, (64, 32)).astype(np.int8), rng.integers(-99, 99, 64).astype(np.int32))
    k = linear_kernel("g", lin, 8, requant_epilogue([dyadic(0.01, lin.acc_bound, INT8)]), "int8")
    p = targets.get(preset)
    mod = build.schedule_module(tvm.IRModule({"g": k.func}), p)
    return tvm.compile(mod, targets.tvm_target(p)).jit().inspect_source("asm")


def test_vnni_target_uses_vpdpbusd():
    assert "vpdpbusd" in gemm_asm("x86-avx512-vnni")


def test_avx2_target_has_no_avx512():
    asm = gemm_asm("x86-avx2")
    assert "vpdpbusd" not in asm and "zmm" not in asm
    assert "ymm" in asm  # still vectorized


@pytest.mark.parametrize("name", ["x86-avx512-vnni", "x86-avx2", "host", "x86"])
def test_presets_resolve(name):
    assert targets.get(name).target["kind"] == "llvm"
