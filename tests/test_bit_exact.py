"""The compiled library equals the NumPy reference bit for bit; the reference stays close to HF."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import ALL_KINDS, CHOICES, KINDS, Spec, calibrated, new_model, random_inputs

# (spec, batch, seq): packed and unpacked GEMM layouts, odd row tiles, seq not a multiple of 16 or 4
SHAPES = {
    "h32-l1-b2-s16": (Spec(32, 2, 1, 64), 2, 16),
    "h64-l2-b2-s32": (Spec(64, 4, 2, 128), 2, 32),
    "h32-l1-b2-s12": (Spec(32, 2, 1, 64), 2, 12),
    "h48-l1-b3-s10": (Spec(48, 3, 1, 96), 3, 10),
    # every linear layer of the encoder fills AMX's 32 x 32 blocks over K >= 256 in steps of 64
    "h256-l1-b2-s16": (Spec(256, 4, 1, 512), 2, 16),
}
# every class at two shapes; the encoder's own kinds at all of them
CASES = [pytest.param(shape, kind, id=f"{shape}-{kind}") for shape in SHAPES for kind in ALL_KINDS
         if kind in KINDS or shape in ("h32-l1-b2-s16", "h48-l1-b3-s10")]


def choices(kind: str) -> int:
    return CHOICES if kind == "IBertForMultipleChoice" else 1


@functools.cache
def executable(kind: str, shape: str, preset: str, a_shift: int | None = None):
    from ibert_tvm import targets
    from ibert_tvm.build import compile_graph
    from ibert_tvm.graph import build_graph

    spec, batch, seq = SHAPES[shape]
    p = targets.get(preset)
    graph = build_graph(calibrated(kind, spec)[1], batch, seq, p.a_shift if a_shift is None else a_shift,
                        choices=choices(kind), fused_attention=p.device_kind.fused_attention)
    return compile_graph(graph, p), graph.params


@pytest.fixture(scope="session")
def compiled():
    """`compiled(kind, shape, preset[, a_shift]) -> (executable, params)`, cached for the session."""
    return executable


def inputs(shape: str, kind: str = "IBertModel", seed: int = 7):
    """[batch, seq] ids and mask ([batch, choices, seq] for multiple choice)."""
    spec, batch, seq = SHAPES[shape]
    # row 0 full, row 1 ends in padding, row 2 (if any) is all padding
    rows = batch * choices(kind)
    ids, mask = random_inputs(np.random.default_rng(seed), rows, seq, [(0, seq // 3, seq)[i % 3] for i in range(rows)][:rows])
    lead = (batch, choices(kind)) if choices(kind) > 1 else (batch,)
    return ids.reshape(*lead, seq), mask.reshape(*lead, seq)


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
    ids, mask = inputs(shape, kind)
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


@pytest.mark.parametrize("preset", ["x86-avx2", "x86-avx512-vnni", "x86-amx"])
@pytest.mark.parametrize("kind", KINDS)
def test_tvm_equals_reference_x86_presets(kind, preset, compiled):
    """The named x86 presets (x86-avx2: LLVM-vectorized tiles, no VNNI), besides `host`; AMX at a
    shape whose encoder GEMMs all take the tiles."""
    from ibert_tvm import targets

    if not set(targets.get(preset).cpu_flags) <= targets.cpu_flags() or (preset == "x86-amx" and not targets.amx_permitted()):
        pytest.skip(f"this CPU cannot run {preset}")
    assert_bit_exact(kind, "h256-l1-b2-s16" if preset == "x86-amx" else "h48-l1-b3-s10", preset, compiled)


@pytest.mark.parametrize("shape", ["h32-l1-b2-s16", "h48-l1-b3-s10"])
@pytest.mark.parametrize("kind", ALL_KINDS)
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


def test_convert_rejects_other_models_and_uncalibrated_ones():
    import torch

    from ibert_tvm.importer import NotCalibratedError, convert

    with pytest.raises(TypeError, match="IBertForQuestionAnswering"):
        convert(torch.nn.Linear(2, 2))
    with pytest.raises(NotCalibratedError, match="calibrat"):
        convert(new_model("IBertModel", Spec()))
    # HF's own calibration leaves the float LM head without ranges: a clear error, not garbage
    lm = new_model("IBertForMaskedLM", Spec())
    calibrated_lm = calibrated("IBertForMaskedLM", Spec())[0]
    lm.load_state_dict(calibrated_lm.state_dict())
    with pytest.raises(NotCalibratedError, match="masked-LM head has no calibrated ranges"):
        convert(lm)
    qa = new_model("IBertForSequenceClassification", Spec())
    qa.__class__ = __import__("transformers").IBertForQuestionAnswering
    qa.qa_outputs, qa.ibert = torch.nn.Linear(32, 3), calibrated("IBertModel", Spec())[0]
    with pytest.raises(ValueError, match="2 outputs"):
        convert(qa)


def to_float(program, name: str, ints: np.ndarray) -> np.ndarray:
    scale = np.asarray(program.output_scales()[name])
    return ints.astype(np.float64) * scale


def hf_bound(program, name: str, hf_hidden: np.ndarray) -> np.ndarray | float:
    """How far each output may be from HF's (float heads, float tanh/GELU/LayerNorm) for the
    integer program to count as the same model: a few integer steps of error carried through."""
    if name == "last_hidden_state":
        return 10 * program.hidden_scale
    head = program.classifier or program.pooler
    if program.token_head is not None:  # a float linear on the int8 hidden states
        s_w = np.asarray(program.logit_scale) / program.hidden_scale
        w = np.abs(program.token_head.weight.astype(np.float64)) * s_w[:, None]
        bound = 10 * program.hidden_scale * w.sum(1) + np.abs(hf_hidden).sum(-1, keepdims=True) * s_w / 2
        return bound[..., int(name == "end_logits")] if program.model_class == "IBertForQuestionAnswering" else bound
    if program.lm_head is not None:  # GELU, LayerNorm and the decoder in float: relative
        return 0.1 * np.nanmax(np.abs(hf_hidden))
    if head.out_proj is None:  # pooler: a few tanh steps (1/127)
        return 4 / 127
    # logits: a few tanh steps of error in every input of out_proj
    bound = np.abs(head.out_proj.weight.astype(np.float64)).sum(1) * program.logit_scale * 4
    return bound[0] if program.multiple_choice else bound


@pytest.mark.parametrize("shape,kind", CASES)
def test_reference_close_to_hf(shape, kind):
    """Distance of the integer program, with HF's per-tensor scales, to HF's own quant_mode=True
    forward (loose bounds)."""
    import torch

    from ibert_tvm import reference
    from ibert_tvm.importer import convert

    model = calibrated(kind, SHAPES[shape][0])[0]
    program = convert(model, per_channel=False)  # HF's simulation has one scale per tensor
    ids, mask = inputs(shape, kind)
    real = mask.sum(-1) > 0  # HF's outputs for all-padding rows are NaN
    ours = reference.run(program, ids, mask)
    tensors = dict(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    with torch.no_grad():
        hf = model(**tensors, output_hidden_states=True)
    hidden = hf.hidden_states[-1].numpy().astype(np.float64)
    for name in program.outputs:
        got = to_float(program, name, ours[name])
        want = getattr(hf, name).numpy().astype(np.float64)
        bound = hf_bound(program, name, want if program.lm_head is not None else hidden)
        keep = mask == 1 if got.shape[: mask.ndim] == mask.shape else real
        diff = np.abs(got - want)
        ok = diff <= bound
        print(f"{shape} {kind} {name}: max |ours - HF| = {diff[keep].max():.3g} (bound {np.max(bound):.3g})")
        assert ok[keep].all(), name


def test_amx_shape_fills_the_tiles_in_every_linear_layer():
    """The premise of the x86-amx case above: its encoder's linear layers all fit the tiles."""
    from ibert_tvm.graph import build_graph
    from ibert_tvm.schedules import cpu

    spec, batch, seq = SHAPES["h256-l1-b2-s16"]
    module = build_graph(calibrated("IBertModel", spec)[1], batch, seq).module
    shapes = {gv.name_hint: cpu.gemm_shape(f) for gv, f in module.functions.items() if "ibert.kind" in f.attrs}
    linear = {name: s for name, s in shapes.items() if s and name.startswith("l0_") and len(s) == 3}
    assert len(linear) == 4 and all(cpu.amx_fits(*s) for s in linear.values()), linear
