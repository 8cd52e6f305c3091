"""Each CPU preset's INT8 GEMMs compile to its ISA: AMX tiles, VNNI on AVX-512, sdot on ARM dotprod, and
widening multiplies where the dot product is missing (AVX2, plain NEON)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tvm
from conftest import linear_past_l2

from ibert_tvm import build, targets
from ibert_tvm.program import INT8, Linear, dyadic
from ibert_tvm.relay_ops.linear import linear_kernel, requant_epilogue, residual_epilogue
from ibert_tvm.schedules import cpu, stack_buffers


def gemm_lib(preset: str, lin: Linear, m: int, epilogue=None, out_dtype: str = "int8", extra_inputs=()):
    """One linear-layer kernel compiled for a preset, and its constant operands."""
    p = targets.get(preset)
    epilogue = epilogue or requant_epilogue([dyadic(0.01, lin.acc_bound, INT8)])
    k = linear_kernel("g", lin, m, epilogue, out_dtype, extra_inputs, a_shift=p.a_shift)
    return p.device_kind.compile(build.schedule_module(tvm.IRModule({"g": k.func}), p), targets.tvm_target(p)), k.consts


def random_linear(n: int, k: int) -> Linear:
    rng = np.random.default_rng(0)
    return Linear(rng.integers(-127, 127, (n, k)).astype(np.int8), rng.integers(-99, 99, n).astype(np.int32))


def gemm_asm(preset: str, m: int = 8, n: int = 64, k: int = 32, form: str = "asm") -> str:
    return gemm_lib(preset, random_linear(n, k), m)[0].mod.inspect_source(form)


def test_vnni_target_uses_vpdpbusd():
    assert "vpdpbusd" in gemm_asm("x86-avx512-vnni")


def test_amx_target_uses_tiles_where_shapes_fill_them():
    """32-row blocks over K >= 256 and N >= 128 go to the tiles, s8 x s8 (the activation read in
    place, unshifted); 8 rows stay on vpdpbusd, u8 x s8."""
    asm = gemm_asm("x86-amx", m=64, n=128, k=256)
    assert "tdpbssd" in asm and "ldtilecfg" in asm and "vpdpbusd" not in asm
    assert "tdpb" not in gemm_asm("x86-amx") and "vpdpbusd" in gemm_asm("x86-amx")


@pytest.mark.parametrize("budget", [stack_buffers.STACK_BYTES, 0])
def test_register_tile_stages_live_on_the_stack(monkeypatch, budget):
    """The VNNI tiles' staged activations and accumulators are stack buffers (no workspace call,
    whose pointers crowded the loop nest's registers), within the stack budget, and the kernel
    stays exact; AMX's accumulator block, stored through its address, stays a 64-byte aligned
    workspace."""
    monkeypatch.setattr(stack_buffers, "STACK_BYTES", budget)
    m, n, k = 16, 64, 96
    lin = random_linear(n, k)
    lib, consts = gemm_lib("x86-avx512-vnni", lin, m, lambda acc, j, c, e, i: acc, "int32")
    assert ("TVMBackendAllocWorkspace" in lib.mod.inspect_source("ll")) == (budget == 0)
    assert "TVMBackendAllocWorkspace" in gemm_asm("x86-amx", m=64, n=128, k=256, form="ll")
    if not set(targets.get("x86-avx512-vnni").cpu_flags) <= targets.cpu_flags():
        pytest.skip("this CPU lacks AVX-512 VNNI")
    x = np.random.default_rng(2).integers(-128, 128, (m, k)).astype(np.int8)
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib["g"](tvm.runtime.tensor(x), *(tvm.runtime.tensor(c) for c in consts), out)
    np.testing.assert_array_equal(out.numpy(), x.astype(np.int64) @ lin.weight.astype(np.int64).T + lin.bias)


def test_residual_epilogue_takes_the_high_half_in_two_products():
    """The residual epilogue's per-channel requantization, the high half of two int32s, is two
    `vpmuldq` and a permute on the register tiles; where LLVM hoisted the multiplier's sign
    extension out of a loop over the tile's rows, it widened both operands to 64 bits (`vpmovqd`
    narrowed the halves back)."""
    n, k, m = 64, 384, 16
    lin = random_linear(n, k)
    rng = np.random.default_rng(4)
    acc_rq = dyadic(2.0**7 * rng.uniform(0.5, 1.5, n), lin.acc_bound)
    res_rq = dyadic(2.0**13 * rng.uniform(0.5, 1.5, n), 128)
    lib, _ = gemm_lib("x86-avx512-vnni", lin, m, residual_epilogue(acc_rq, res_rq), "int32", (((m, n), "int8"),))
    asm = lib.mod.inspect_source("asm")
    assert "vpermt2d" in asm and "vpmuldq" in asm and "vpmovqd" not in asm


def test_avx2_target_has_no_avx512():
    asm = gemm_asm("x86-avx2")
    assert "vpdpbusd" not in asm and "zmm" not in asm
    assert "vpmaddubsw" in asm and "vpsignb" in asm  # the sign trick's pair products


@pytest.mark.parametrize("weight_min", [-127, -128])
def test_avx2_gemm_exact_at_the_saturation_edges(weight_min):
    """Rows of -128 and 127 against weights at their extremes put every vpmaddubsw pair at its
    largest magnitude (2 * 128 * 127); a weight of -128 (which the sign trick cannot flip) makes the
    kernel take the 16-bit products (`vpmaddwd`, `vphaddd`) instead, exact as well."""
    if not set(targets.get("x86-avx2").cpu_flags) <= targets.cpu_flags():
        pytest.skip("this CPU lacks AVX2")
    m, n, k = 8, 32, 64
    rng = np.random.default_rng(1)
    w = rng.choice([weight_min, 126, -1, 0], (n, k)).astype(np.int8)
    w[0], w[1] = weight_min, 126
    lin = Linear(w, rng.integers(-99, 99, n).astype(np.int32))
    x = rng.choice([-128, 127, 0, 1], (m, k)).astype(np.int8)
    x[0], x[1] = -128, 127
    lib, consts = gemm_lib("x86-avx2", lin, m, lambda acc, j, c, e, i: acc, "int32")
    asm = lib.mod.inspect_source("asm")
    assert ("vpmaddubsw" in asm) == (weight_min > -128) and ("vphaddd" in asm) == (weight_min == -128)
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib["g"](tvm.runtime.tensor(x), *(tvm.runtime.tensor(c) for c in consts), out)
    want = x.astype(np.int64) @ w.astype(np.int64).T + lin.bias
    np.testing.assert_array_equal(out.numpy(), want)
    assert np.abs(want).max() >= 64 * 127 * 127  # the edges were reached


@pytest.mark.parametrize("preset", ["x86-avx512-vnni", "x86-avx2"])
def test_a_weight_past_l2_takes_column_tiles_outermost(preset):
    """Register tiles over a weight larger than L2_WEIGHT: the parallel loop runs over column tiles,
    each with ROW_GROUPS groups of row tiles (each weight panel read once per group, not once per
    row tile), and the kernel stays exact."""
    p = targets.get(preset)
    if not set(p.cpu_flags) <= targets.cpu_flags():
        pytest.skip(f"this CPU lacks {preset}'s instructions")
    m, tiles = 64, (4, 2)
    kern, x, want = linear_past_l2(p.a_shift, m, 2)
    n = kern.out_shape[1]
    func = cpu.schedule(kern.func, cpu.ISAS[p.isa], tiles)
    parallel = re.findall(r"T\.parallel\((\d+)\)", func.script())  # the staged activation's, then the GEMM's
    assert parallel[-1] == str(n // (tiles[1] * 16) * cpu.ROW_GROUPS) and str(m // tiles[0]) not in parallel
    lib = tvm.compile(tvm.IRModule({"main": func}), targets.tvm_target(p))
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib["main"](tvm.runtime.tensor(x), *(tvm.runtime.tensor(c) for c in kern.consts), out)
    np.testing.assert_array_equal(out.numpy(), want)


def test_arm_dotprod_target_uses_sdot():
    assert "sdot" in gemm_asm("arm64-dotprod")


def test_arm_neon_target_widens_without_sdot():
    asm = gemm_asm("arm64-neon")
    assert "sdot" not in asm
    assert "smull" in asm or "smlal" in asm


@pytest.mark.parametrize("name", ["x86-avx512-vnni", "x86-avx2", "arm64-dotprod", "arm64-neon", "host", "x86"])
def test_cpu_presets_resolve(name):
    p = targets.get(name)
    assert p.target["kind"] == "llvm" and p.isa is not None


def test_targets_command_lists_every_preset(capsys):
    from ibert_tvm import cli

    assert cli.main(["targets", "--json"]) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)]
    assert names == ["host", *targets.PRESETS]
    assert {"x86-avx512-vnni", "x86-avx2", "arm64-dotprod", "arm64-neon", "cuda-sm75", "cuda-sm80", "cuda-sm90"} <= set(names)
