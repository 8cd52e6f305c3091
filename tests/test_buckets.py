"""Buckets: one artifact holds several compiled batch sizes and lengths; the runner runs each input
at the shortest length that holds it, in the cheapest calls of the compiled batches, bit-exact
against the reference in every bucket."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import KINDS, random_inputs
from hypothesis import given
from hypothesis import strategies as st

from ibert_tvm import cli, reference
from ibert_tvm.runner import CALL_COST, Runner, plan_batches


@pytest.fixture(scope="module", params=KINDS)
def bucketed(request, artifacts, tmp_path_factory):
    from ibert_tvm.compile import CompileOptions, compile_program

    a = artifacts[request.param]
    opt = CompileOptions(model=str(a.checkpoint), batches=(3, 1), seq_len=16, buckets=(4, 8),
                         out=tmp_path_factory.mktemp("buckets") / "art", progress=False)
    return a, Runner(compile_program(a.program, a.checkpoint, opt))


def test_manifest_lists_buckets_and_shares_parameters(bucketed):
    a, r = bucketed
    assert (r.batches, r.lengths) == ([1, 3], [4, 8, 16])
    assert r.functions == {(b, n): f"main_b{b}_s{n}" for b in (1, 3) for n in (4, 8, 16)}
    single = json.loads((a.path / "manifest.json").read_text())
    assert r.manifest.params == single["params"]  # weights stored once, not per bucket


@pytest.mark.parametrize("rows, width, calls", [(3, 3, [(3, 4)]), (1, 4, [(1, 4)]), (2, 7, [(1, 8), (1, 8)]),
                                               (4, 9, [(3, 16), (1, 16)]), (5, 16, [(3, 16), (1, 16), (1, 16)])])
def test_each_input_runs_at_the_shortest_bucket_bit_exact(bucketed, rows, width, calls):
    a, r = bucketed
    used = []

    class Spy:  # the library's functions, as the runner looks them up
        def __getitem__(self, name):
            used.append(name)
            return vm[name]

    vm, r._vm = r._vm, Spy()
    try:
        ids, mask = random_inputs(np.random.default_rng(width), rows, width, pads=[(i * 3) % width for i in range(rows)])
        got = r.run_integer(ids, mask)
    finally:
        r._vm = vm
    assert used == [f"main_b{b}_s{n}" for b, n in calls]
    want = reference.run(a.program, ids, mask)
    for name in a.program.outputs:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_encode_pads_to_the_bucket_of_the_longest_text(bucketed):
    _, r = bucketed
    ids, mask, _ = r.encode(["good", "a b c d e f"]).values()  # the tests' tokenizer: one token a word
    assert ids.shape == (2, 8) and mask.sum(1).tolist() == [1, 6]
    assert r.encode(["good"])["input_ids"].shape == (1, 4)


def test_buckets_outside_the_compiled_length_are_refused(artifact, tmp_path, capsys):
    argv = ["compile", "--model", str(artifact.checkpoint), "--seq-len", "16", "-o", str(tmp_path / "x")]
    assert cli.main([*argv, "--buckets", "8", "32"]) == 2
    assert "buckets must lie in [1, seq_len=16], got [32]" in capsys.readouterr().err
    assert cli.main([*argv, "--buckets", "0"]) == 2
    assert not (tmp_path / "x").exists()


@given(st.integers(1, 200), st.sets(st.integers(1, 40), min_size=1, max_size=4))
def test_plan_covers_the_rows_at_least_cost(rows, sizes):
    """Against every way of covering the rows: plans cost b + CALL_COST a call of b rows."""
    batches = sorted(sizes)
    plan = plan_batches(rows, batches)
    assert sum(plan) >= rows and set(plan) <= sizes and plan == sorted(plan, reverse=True)
    best = [0.0] + [float("inf")] * (rows + max(batches))  # cheapest way to run exactly r padded rows
    for r in range(1, len(best)):
        best[r] = min((best[r - b] + b + CALL_COST for b in batches if b <= r), default=float("inf"))
    cost = sum(b + CALL_COST for b in plan)
    assert cost == pytest.approx(min(best[rows:]))


def test_plan_for_one_and_eight():
    assert plan_batches(1, [1, 8]) == [1]
    assert plan_batches(9, [1, 8]) == [8, 1]
    assert plan_batches(16, [1, 8]) == [8, 8]
    assert plan_batches(5, [1, 8]) == [1] * 5
    assert plan_batches(7, [1, 8]) == [8]
    assert plan_batches(3, [8]) == [8]
