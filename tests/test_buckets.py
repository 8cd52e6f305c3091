"""Sequence-length buckets: one artifact holds several compiled lengths; the runner runs each input
at the shortest that holds it, bit-exact against the reference at every length."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import KINDS, random_inputs

from ibert_tvm import cli, reference
from ibert_tvm.runner import Runner


@pytest.fixture(scope="module", params=KINDS)
def bucketed(request, artifacts, tmp_path_factory):
    from ibert_tvm.compile import CompileOptions, compile_program

    a = artifacts[request.param]
    opt = CompileOptions(model=str(a.checkpoint), batch=2, seq_len=16, buckets=(4, 8),
                         out=tmp_path_factory.mktemp("buckets") / "art", progress=False)
    return a, Runner(compile_program(a.program, a.checkpoint, opt))


def test_manifest_lists_buckets_and_shares_parameters(bucketed):
    a, r = bucketed
    assert r.buckets == {4: "main_s4", 8: "main_s8", 16: "main_s16"}
    single = json.loads((a.path / "manifest.json").read_text())
    assert r.manifest.params == single["params"]  # weights stored once, not per bucket


@pytest.mark.parametrize("width, bucket", [(3, 4), (4, 4), (7, 8), (9, 16), (16, 16)])
def test_each_input_runs_at_the_shortest_bucket_bit_exact(bucketed, width, bucket):
    a, r = bucketed
    used = []
    real = r._vm.set_input
    r._vm.set_input = lambda name, *args: used.append(name) or real(name, *args)
    try:
        ids, mask = random_inputs(np.random.default_rng(width), 3, width, pads=[0, width // 2, 1])
        got = r.run_integer(ids, mask)
    finally:
        del r._vm.set_input
    assert set(used) == {f"main_s{bucket}"}
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
