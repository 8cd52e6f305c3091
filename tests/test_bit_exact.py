"""The compiled library equals the NumPy reference bit for bit; the reference stays close to HF."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import KINDS, Spec, calibrated, ibert_config, new_model, random_inputs

# (spec, batch, seq): packed and unpacked GEMM layouts, odd row tiles, seq not a multiple of 16 or 4
SHAPES = {
    "h32-l1-b2-s16": (Spec(32, 2, 1, 64), 2, 16),
    "h64-l2-b2-s32": (Spec(64, 4, 2, 128), 2, 32),
    "h32-l1-b2-s12": (Spec(32, 2, 1, 64), 2, 12),
    "h48-l1-b3-s10": (Spec(48, 3, 1, 96), 3, 10),
}
CASES = [pytest.param(shape, kind, id=f"{shape}-{kind}") for shape in SHAPES for kind in KINDS]


@functools.cache
def executable(kind: str, shape: str, preset: str, a_shift: int | None = None):
    from ibert_tvm import targets
    from ibert_tvm.build import compile_graph
    from ibert_tvm.graph import build_graph

    spec, batch, seq = SHAPES[shape]
    p = targets.get(preset)
    graph = build_graph(calibrated(kind, spec)[1], batch, seq, p.a_shift if a_shift is None else a_shift)
    return compile_graph(graph, p), graph.params


@pytest.fixture(scope="session")
def compiled():
    """`compiled(kind, shape, preset[, a_shift]) -> (executable, params)`, cached for the session."""
    return executable


def inputs(shape: str, seed: int = 7):
    spec, batch, seq = SHAPES[shape]
    # row 0 full, row 1 ends in padding, row 2 (if any) is all padding
    pads = [0, seq // 3, seq][:batch]
    return random_inputs(np.random.default_rng(seed), batch, seq, pads)


def run_tvm(ex, params, ids, mask) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in (ids, mask, np.zeros_like(ids))]
    args += [tvm.runtime.tensor(a) for _, a in params]
    return [o.numpy() for o in vm["main"](*args)]


def assert_bit_exact(kind, shape, preset, compiled, a_shift=None):
    from ibert_tvm import reference

    program = calibrated(kind, SHAPES[shape][0])[1]
    ids, mask = inputs(shape)
    got = run_tvm(*compiled(kind, shape, preset, a_shift), ids, mask)
    want = reference.run(program, ids, mask)
    assert len(got) == len(program.outputs)
    for name, out in zip(program.outputs, got):
        assert out.dtype == want[name].dtype and out.shape == want[name].shape, name
        differing = int((out != want[name]).sum())
        assert differing == 0, f"{name}: {differing} of {out.size} elements differ"


@pytest.mark.parametrize("shape,kind", CASES)
def test_tvm_equals_reference(shape, kind, compiled):
    assert_bit_exact(kind, shape, "host", compiled)


@pytest.mark.parametrize("preset", ["x86-avx2", "x86-avx512-vnni"])
@pytest.mark.parametrize("kind", KINDS)
def test_tvm_equals_reference_x86_presets(kind, preset, compiled):
    """The named x86 presets (x86-avx2: LLVM-vectorized tiles, no VNNI), besides `host`."""
    from ibert_tvm import targets

    if not set(targets.get(preset).cpu_flags) <= targets.cpu_flags():
        pytest.skip(f"this CPU cannot run {preset}")
    assert_bit_exact(kind, "h48-l1-b3-s10", preset, compiled)


@pytest.mark.parametrize("shape", ["h32-l1-b2-s16", "h48-l1-b3-s10"])
@pytest.mark.parametrize("kind", KINDS)
def test_signed_operand_form_equals_reference(shape, kind, compiled):
    """The s8 x s8 GEMM form of ARM and CUDA (a_shift 0, run-time V sums in the context GEMM),
    run here through the LLVM-vectorized x86 schedule."""
    from ibert_tvm import targets

    if not set(targets.get("x86-avx2").cpu_flags) <= targets.cpu_flags():
        pytest.skip("this CPU lacks AVX2")
    assert_bit_exact(kind, shape, "x86-avx2", compiled, a_shift=0)


def test_outputs_are_not_trivial(compiled):
    """Guard against vacuous equality: outputs vary across tokens and inputs."""
    program = calibrated("IBertModel", SHAPES["h32-l1-b2-s16"][0])[1]
    ids, mask = inputs("h32-l1-b2-s16")
    hidden, pooler = run_tvm(*compiled("IBertModel", "h32-l1-b2-s16", "host"), ids, mask)
    assert len(np.unique(hidden)) > 50 and np.abs(hidden).max() > 20
    assert not np.array_equal(pooler[0], pooler[1])
    assert program.outputs == ["last_hidden_state", "pooler_output"]


def test_convert_rejects_other_classes_and_uncalibrated_models():
    from transformers import IBertForMaskedLM

    from ibert_tvm.importer import NotCalibratedError, convert

    with pytest.raises(TypeError, match="IBertForSequenceClassification"):
        convert(IBertForMaskedLM(ibert_config(Spec())))
    with pytest.raises(NotCalibratedError, match="calibrat"):
        convert(new_model("IBertModel", Spec()))


def to_float(program, name: str, ints: np.ndarray) -> np.ndarray:
    scale = np.asarray(program.output_scales()[name])
    return ints.astype(np.float64) * scale


@pytest.mark.parametrize("shape,kind", CASES)
def test_reference_close_to_hf(shape, kind):
    """Distance of the integer program to HF's own quant_mode=True forward (loose bounds)."""
    import torch

    from ibert_tvm import reference

    model, program = calibrated(kind, SHAPES[shape][0])
    ids, mask = inputs(shape)
    real = mask.sum(1) > 0
    ours = reference.run(program, ids, mask)
    with torch.no_grad():
        hf = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    for name in program.outputs:
        got = to_float(program, name, ours[name])
        want = getattr(hf, name).numpy().astype(np.float64)
        if name == "last_hidden_state":
            diff = np.abs(got - want)[mask == 1]
            bound = 10 * program.hidden_scale
        else:
            # HF's pooler and classifier are float (dense, torch.tanh); ours tanh is integer
            diff, want = np.abs(got - want)[real], want[real]
            head = program.classifier or program.pooler
            if head.out_proj is None:  # pooler: a few tanh steps (1/127)
                bound = 4 / 127
            else:  # logits: a few tanh steps of error in every input of out_proj
                bound = np.abs(head.out_proj.weight.astype(np.float64)).sum(1) * program.logit_scale * 4
        print(f"{shape} {kind} {name}: max |ours - HF| = {diff.max():.3g} (bound {np.max(bound):.3g})")
        assert np.all(diff <= bound), name
