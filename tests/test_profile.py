"""`ibert-tvm profile`: kernel times by role, GEMM shapes and the floor, the report and the CLI."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest

from ibert_tvm import artifact as artifact_module
from ibert_tvm import cli
from ibert_tvm.evaluation import profile as prof
from ibert_tvm.manifest import Bucket
from ibert_tvm.names import kernel_kind
from ibert_tvm.runner import Runner

# the session artifacts are CPU libraries: scores, softmax and context are one attention kernel
LAYER_ROLES = {"qkv", "attention", "attn_out", "attn_ln", "inter", "ffn_out", "ffn_ln"}
HEAD_ROLES = {"IBertModel": {"pooler"}, "IBertForSequenceClassification": {"cls_dense", "cls_out"}}
BATCH, SEQ = 2, 16  # the session artifacts' one bucket


@pytest.fixture(scope="module")
def profiles(artifacts) -> dict[str, prof.Profile]:
    """One profile per session artifact, the first with the INT8 floor."""
    return {kind: prof.profile(a.path, reps=5, floor=kind == "IBertModel") for kind, a in artifacts.items()}


@pytest.mark.parametrize("kind", sorted(HEAD_ROLES))
def test_roles_cover_every_kernel_of_the_function(profiles, artifacts, kind):
    p, program = profiles[kind], artifacts[kind].program
    assert (p.batch, p.seq, p.function) == (BATCH, SEQ, f"main_b{BATCH}_s{SEQ}")
    assert all(s.startswith(f"b{BATCH}_s{SEQ}_") and kernel_kind(s) in prof.ROLES for s in p.symbols)
    assert p.strays == []  # the VM called nothing else but its builtins
    calls = {r.name: r.calls for r in p.roles}
    assert set(calls) == {"embed", "embed_ln"} | LAYER_ROLES | HEAD_ROLES[kind]
    assert sum(calls.values()) == len(p.symbols) == 2 + len(LAYER_ROLES) * len(program.layers) + len(HEAD_ROLES[kind])
    assert all(calls[r] == len(program.layers) for r in LAYER_ROLES)


@pytest.mark.parametrize("kind", sorted(HEAD_ROLES))
def test_times_are_positive_and_within_the_forward(profiles, kind):
    p = profiles[kind]
    assert p.forward_ms > 0 and all(r.ms > 0 for r in p.roles)
    assert [r.ms for r in p.roles] == sorted((r.ms for r in p.roles), reverse=True)
    assert len(p.replayed) == 5 and all(t > 0 for t in p.replayed)
    # medians of separate runs: room for a busy CPU's stalls, none for a unit gone wrong
    assert p.kernels_ms < 20 * p.forward_ms, (p.kernels_ms, p.forward_ms)


def test_gemm_shapes_follow_the_model(profiles, artifacts):
    program = artifacts["IBertModel"].program
    h, rows = program.hidden, BATCH * SEQ
    inter = program.layers[0].inter.weight.shape[0]
    gemms = {r.name: r.gemm for r in profiles["IBertModel"].roles}
    assert gemms["qkv"] == prof.Gemm(1, rows, h, 3 * h)
    assert gemms["attn_out"] == prof.Gemm(1, rows, h, h)
    assert gemms["inter"] == prof.Gemm(1, rows, h, inter)
    assert gemms["ffn_out"] == prof.Gemm(1, rows, inter, h)
    assert gemms["pooler"] == prof.Gemm(1, BATCH, h, h)  # the first token of each sequence
    assert all(gemms[r] is None for r in ("embed", "embed_ln", "attention", "attn_ln", "ffn_ln"))
    cls = {r.name: r.gemm for r in profiles["IBertForSequenceClassification"].roles}
    labels = artifacts["IBertForSequenceClassification"].program.classifier.out_proj.weight.shape[0]
    assert cls["cls_out"] == prof.Gemm(1, BATCH, h, labels)


def test_attention_products_of_the_three_kernel_form():
    """CUDA libraries keep scores and context as kernels of their own: their products per head."""
    flat, heads, seq, d = 2, 4, 16, 8
    qkv = (flat * seq, 3 * heads * d)
    assert prof.gemm_of("scores", "s", [qkv, (flat, heads, seq, seq)], {}) == prof.Gemm(flat * heads, seq, d, seq)
    probs = (flat, heads, seq, seq)
    assert prof.gemm_of("context", "c", [probs, qkv, (flat, seq, heads, d)], {}) == prof.Gemm(flat * heads, seq, seq, d)


def test_floor_is_measured_for_gemms_only(profiles):
    p = profiles["IBertModel"]
    assert p.floor is None
    for r in p.roles:
        if r.gemm is None:
            assert r.floor_ms is r.hot_ms is r.gops is r.of_floor is r.hot_of_floor is None
        else:
            assert r.floor_ms > 0 and r.gops == pytest.approx(r.gemm.ops * r.calls / r.ms / 1e6)
            assert r.of_floor == pytest.approx(r.floor_ms / r.ms)
            assert r.hot_of_floor == pytest.approx(r.floor_ms / r.hot_ms)
    unfloored = profiles["IBertForSequenceClassification"]
    assert "--no-floor" in unfloored.floor
    assert all(r.floor_ms is r.of_floor is r.hot_of_floor is None for r in unfloored.roles)


@pytest.mark.parametrize("kind", sorted(HEAD_ROLES))
def test_hot_time_is_each_gemm_call_repeated(profiles, kind):
    """Our GEMM kernels repeated on their operands: every call timed, none of the other kernels."""
    for r in profiles[kind].roles:
        assert (r.hot_ms is None) == (r.gemm is None), r
        if r.hot_ms is not None:
            # at least the call's Python overhead each, and no more than the replays' worst forward
            assert r.calls * 1e-4 < r.hot_ms < max(profiles[kind].replayed), r


def test_table_has_the_columns_and_the_setting(profiles):
    p = profiles["IBertModel"]
    text = prof.table(p)
    assert ("| role | calls | total ms | % of forward | GOP/s | fraction of floor | hot ms | hot fraction of floor |"
            in text)
    inter = next(line for line in text.splitlines() if line.startswith("| inter (+GELU) "))
    r = next(r for r in p.roles if r.name == "inter")
    assert inter.split("|")[7:9] == [f" {r.hot_ms:.3f} ", f" {r.hot_of_floor:.0%} "]
    assert p.cpu in text and f"{p.threads} threads" in text and f"batch x seq {BATCH}x{SEQ}" in text
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert set(rows[1:]) == {prof.ABOUT.get(r.name, r.name) for r in p.roles} | {prof.OTHER}
    assert "attention (QK^T, softmax, PV)" in rows and "inter (+GELU)" in rows
    other = next(line for line in text.splitlines() if line.startswith(f"| {prof.OTHER} "))
    assert float(other.split("|")[3]) == pytest.approx(p.forward_ms - p.kernels_ms, abs=1e-3)


def test_cli_prints_the_table_and_draws(artifact, tmp_path, capsys):
    argv = ["profile", str(artifact.path), "--reps", "2", "--no-floor", "--threads", "1"]
    png = tmp_path / "profile.png"
    if importlib.util.find_spec("matplotlib"):
        argv += ["--png", str(png)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| role | calls | total ms |" in out and "| qkv | 1 |" in out and "1 threads" in out
    assert png.exists() == bool(importlib.util.find_spec("matplotlib"))


def test_default_bucket_is_batch_one_else_the_smallest_at_the_longest_length(artifact):
    m = artifact_module.read(artifact.path)
    assert prof.pick_bucket(m, None, None) == (BATCH, SEQ)  # no batch 1 compiled
    more = dataclasses.replace(m, batches=[1, BATCH], buckets=[
        Bucket(b, s, f"main_b{b}_s{s}") for b in (1, BATCH) for s in (8, SEQ)])
    assert prof.pick_bucket(more, None, None) == (1, SEQ)
    assert prof.pick_bucket(more, BATCH, 8) == (BATCH, 8)


def test_unknown_bucket_names_the_compiled_ones(artifact, capsys):
    with pytest.raises(ValueError, match=f"no compiled bucket batch 3 x length {SEQ}; this artifact has {BATCH}x{SEQ}"):
        prof.profile(artifact.path, batch=3)
    assert cli.main(["profile", str(artifact.path), "--seq-len", "9"]) == 2
    assert f"no compiled bucket batch {BATCH} x length 9" in capsys.readouterr().err


def test_bad_artifact_is_named(tmp_path, capsys):
    with pytest.raises(artifact_module.ArtifactError, match="is not an ibert-tvm artifact"):
        prof.profile(tmp_path)
    assert cli.main(["profile", str(tmp_path / "missing")]) == 2
    assert "is not an ibert-tvm artifact (no manifest.json)" in capsys.readouterr().err


def test_each_call_checks_the_inputs_not_the_weights(artifact):
    """Relax checks a function's parameters on every call, two VM builtins each; the weights are
    the artifact's hash-checked tensors (`num_input`), so only the inputs are checked."""
    seen: list[str] = []

    def record(func, symbol, before, ret, *args) -> int:
        if before:
            seen.append(symbol)
        return 0

    with Runner(artifact.path, threads=1) as r:
        r.set_instrument(record)
        r.run_integer(np.ones((BATCH, SEQ), np.int64))
        r.set_instrument(None)
    inputs = len(artifact_module.read(artifact.path).inputs)
    assert seen.count("vm.builtin.check_tensor_info") == seen.count("vm.builtin.match_shape") == inputs
