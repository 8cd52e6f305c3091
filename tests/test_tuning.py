"""`ibert-tvm tune` here: a trial budget, records written where asked (by default the user's cache,
never the package), read over the shipped ones and re-applied by compile."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CALIB_TEXTS, Spec

from ibert_tvm import cli, targets
from ibert_tvm.schedules import cpu, tuning


def test_tune_with_a_trial_budget_then_compile_uses_the_records(artifact, tmp_path, capsys, monkeypatch):
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(CALIB_TEXTS))
    model = ["--model", str(artifact.checkpoint), "--batch", "2", "--seq-len", "16", "--calib-texts", str(texts),
             "--records", str(tmp_path / "rec")]
    assert cli.main(["tune", *model, "--trials", "5"]) == 0, capsys.readouterr().err
    host = targets.get("host")
    records = json.loads(tuning.record_file(host.target["mcpu"], tmp_path / "rec").read_text())
    assert capsys.readouterr().out == f"{len(records)} tile records in {tmp_path / 'rec'}/\n"
    isa = cpu.ISAS[host.isa]
    # the default tiny model (hidden 32, intermediate 64) at 2 x 16 rows; AMX blocks are not tuned
    linears = {"qkv": (32, 96, 32), "attn_out": (32, 32, 32), "inter": (32, 64, 32), "ffn_out": (32, 32, 64)}
    assert {k.split(":")[0] for k in records} >= {role for role, shape in linears.items() if cpu.tuned(isa, shape)}
    for k, tiles in records.items():
        shape = tuple(map(int, k.split(":")[1].split("x")))
        assert cpu.tuned(isa, shape) and tuple(tiles) in cpu.tile_candidates(*shape[-3:-1], isa), k

    used = []
    real = cpu.schedule
    monkeypatch.setattr(cpu, "schedule", lambda func, isa, tiles=None: used.append(tiles) or real(func, isa, tiles))
    assert cli.main(["compile", *model, "-o", str(tmp_path / "art")]) == 0, capsys.readouterr().err
    assert {tuple(t) for t in records.values()} >= {t for t in used if t is not None} and any(used)
    summary = capsys.readouterr().out
    assert f"tiles    tuned where {host.target['mcpu']}'s records hold" in summary and str(tmp_path / "rec") in summary


def test_tune_rejects_a_zero_budget_and_gpu_targets(artifact, capsys):
    assert cli.main(["tune", "--model", str(artifact.checkpoint), "--trials", "0"]) == 2
    assert "--trials must be at least 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cuda-sm75 is a cuda target"):
        from ibert_tvm.build import tune_graph

        tune_graph(None, targets.get("cuda-sm75"))


def _gemm_shapes(module, isa: cpu.Isa) -> dict[str, tuple[int, ...]]:
    """Record key -> shape of the module's tunable GEMMs."""
    return {tuning.key(gv.name_hint, s): s for gv, f in module.functions.items()
            if "ibert.kind" in f.attrs and (s := cpu.gemm_shape(f)) and cpu.tuned(isa, s)}


def _gemm_keys(module, isa: cpu.Isa) -> list[str]:
    return sorted(_gemm_shapes(module, isa))


@pytest.fixture
def tiny_module(tiny):
    from ibert_tvm.graph import build_graph

    return build_graph(tiny("IBertModel", Spec())[1], 2, 16, targets.get("x86-avx512-vnni").a_shift).module


def test_tune_writes_the_users_cache_never_the_package(tiny_module, tmp_path, monkeypatch):
    monkeypatch.setenv("IBERT_TVM_CACHE", str(tmp_path / "cache"))
    shipped = sorted(p.name for p in tuning.RECORDS.iterdir())
    isa = cpu.ISAS["vnni"]  # register tiles for every GEMM: every shape is tunable
    keys = _gemm_keys(tiny_module, isa)
    records = tuning.tune(tiny_module, "ibert-test-cpu", isa, lambda func: 1.0, trials=len(keys), progress=False)
    written = tmp_path / "cache" / "records" / "ibert-test-cpu.json"
    assert sorted(records) == keys and json.loads(written.read_text()) == records
    assert sorted(p.name for p in tuning.RECORDS.iterdir()) == shipped
    assert tuning.record_files("ibert-test-cpu") == [written]


def test_the_users_records_overlay_the_shipped_ones(tiny_module, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "RECORDS", tmp_path / "shipped")
    isa = cpu.ISAS["vnni"]
    first, *rest = _gemm_keys(tiny_module, isa)
    shipped = tuning.record_file("ibert-test-cpu", tmp_path / "shipped")
    shipped.parent.mkdir()
    shipped.write_text(json.dumps({first: [1, 1]}))
    measured = []
    records = tuning.tune(tiny_module, "ibert-test-cpu", isa, lambda func: measured.append(func) or 1.0,
                          trials=len(rest), folder=tmp_path / "mine", progress=False)
    assert sorted(records) == rest and len(measured) == len(rest)  # a shipped shape is not measured again
    assert json.loads(shipped.read_text()) == {first: [1, 1]}  # nor rewritten
    mine = tuning.record_file("ibert-test-cpu", tmp_path / "mine")
    assert tuning.record_files("ibert-test-cpu", tmp_path / "mine") == [shipped, mine]
    assert tuning.load("ibert-test-cpu", tmp_path / "mine") == {first: [1, 1], **records}
    mine.write_text(json.dumps({**records, first: [2, 1]}))
    assert tuning.load("ibert-test-cpu", tmp_path / "mine")[first] == [2, 1]  # the user's record wins
    mine.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object"):
        tuning.load("ibert-test-cpu", tmp_path / "mine")


def test_a_time_budget_records_whole_shapes_largest_first_and_the_next_call_continues(tiny_module, tmp_path,
                                                                                      monkeypatch):
    isa = cpu.ISAS["vnni"]
    shapes = _gemm_shapes(tiny_module, isa)
    order = sorted(shapes, key=lambda k: -np.prod(shapes[k]))
    counts = [len(cpu.tile_candidates(*shapes[k][-3:-1], isa)) for k in order]
    clock = [0.0]
    monkeypatch.setattr(tuning.time, "monotonic", lambda: clock[0])

    def measure(func) -> float:  # each measurement takes one second of the fake clock
        clock[0] += 1
        return 1.0

    # a measurement begun before the deadline ends: the second shape misses its last candidate, unrecorded
    budget = counts[0] + counts[1] - 2
    first = tuning.tune(tiny_module, "ibert-test-cpu", isa, measure, folder=tmp_path, progress=False, seconds=budget)
    assert list(first) == order[:1] and clock[0] == budget + 1
    rest = tuning.tune(tiny_module, "ibert-test-cpu", isa, measure, folder=tmp_path, progress=False, seconds=1e9)
    assert sorted(rest) == sorted(order) and clock[0] == budget + 1 + sum(counts[1:])


def test_compile_for_host_tunes_what_has_no_record_unless_told_not_to(artifact, tmp_path, capsys, monkeypatch):
    measured = []
    monkeypatch.setattr(tuning, "local_measure", lambda target, build: lambda func: measured.append(func) or 1.0)
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(CALIB_TEXTS))
    model = ["--model", str(artifact.checkpoint), "--batch", "2", "--seq-len", "16", "--calib-texts", str(texts)]
    assert cli.main(["compile", *model, "--records", str(tmp_path / "none"), "--no-tune", "-o", str(tmp_path / "a")]) == 0
    assert not measured and not (tmp_path / "none").exists()
    host = targets.get("host")
    if not tuning.record_files(host.target["mcpu"], tmp_path / "none"):
        assert "no tuning records for" in capsys.readouterr().err
    assert cli.main(["compile", *model, "--records", str(tmp_path / "rec"), "-o", str(tmp_path / "b")]) == 0
    records = tuning._read(tuning.record_file(host.target["mcpu"], tmp_path / "rec"))
    assert measured and records and len(measured) >= len(records)
    assert "tiles    tuned where" in capsys.readouterr().out
    measured.clear()
    assert cli.main(["compile", *model, "--records", str(tmp_path / "rec"), "-o", str(tmp_path / "c")]) == 0
    assert not measured  # every shape has its record now


def test_a_failing_tuner_leaves_a_working_artifact_and_the_shapes_it_finished(artifact, tiny_module, tmp_path,
                                                                             capsys, monkeypatch, caplog):
    """Measured shapes are written as each is done; a tuner that then fails (or is interrupted) keeps
    them, and compile goes on with default tiles for the rest."""
    isa = cpu.ISAS[targets.get("host").isa]
    largest = max(_gemm_shapes(tiny_module, isa).values(), key=np.prod)
    calls = []

    def measure(func) -> float:  # breaks in the second shape
        calls.append(func)
        if len(calls) > len(cpu.tile_candidates(*largest[-3:-1], isa)):
            raise RuntimeError("the timer broke")
        return 1.0

    monkeypatch.setattr(tuning, "local_measure", lambda target, build: measure)
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(CALIB_TEXTS))
    argv = ["compile", "--model", str(artifact.checkpoint), "--batch", "2", "--seq-len", "16", "--calib-texts",
            str(texts), "--records", str(tmp_path / "rec"), "-o", str(tmp_path / "a")]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert "tuning the GEMM tiles failed (RuntimeError: the timer broke)" in caplog.text
    host = targets.get("host")
    kept = tuning._read(tuning.record_file(host.target["mcpu"], tmp_path / "rec"))
    assert len(kept) == 1  # the shape done before the failure, not the one it broke in
    from ibert_tvm.runner import Runner

    with Runner(tmp_path / "a") as r:
        assert r.run_integer([[5, 6, 7]])["last_hidden_state"].shape[:2] == (1, 3)
