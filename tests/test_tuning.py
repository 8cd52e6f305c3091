"""`ibert-tvm tune` here: a trial budget, records written where asked and re-applied by compile."""

from __future__ import annotations

import pytest
from conftest import CALIB_TEXTS

from ibert_tvm import cli, targets
from ibert_tvm.schedules import cpu, tuning


def test_tune_with_a_trial_budget_then_compile_uses_the_records(artifact, tmp_path, capsys, monkeypatch):
    texts = tmp_path / "calib.txt"
    texts.write_text("\n".join(CALIB_TEXTS))
    model = ["--model", str(artifact.checkpoint), "--batch", "2", "--seq-len", "16", "--calib-texts", str(texts),
             "--records", str(tmp_path / "rec")]
    assert cli.main(["tune", *model, "--trials", "5"]) == 0, capsys.readouterr().err
    host = targets.get("host")
    records = tuning.load(host.target["mcpu"], tmp_path / "rec")
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


def test_tune_rejects_a_zero_budget_and_gpu_targets(artifact, capsys):
    assert cli.main(["tune", "--model", str(artifact.checkpoint), "--trials", "0"]) == 2
    assert "--trials must be at least 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cuda-sm75 is a cuda target"):
        from ibert_tvm.build import tune_graph

        tune_graph(None, targets.get("cuda-sm75"))
