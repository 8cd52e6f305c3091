"""`ibert-tvm bench` runs its systems in worker processes and reports them (no timing asserted)."""

from __future__ import annotations

import pytest

from ibert_tvm import cli
from ibert_tvm.evaluation import bench

pytestmark = pytest.mark.slow


def test_measure_runs_each_system_in_its_own_process():
    res = bench.measure(["PyTorch FP32", bench.FLOOR], "default", 1, 32, rounds=2, reps=2, threads=1)
    for name in ("PyTorch FP32", bench.FLOOR):
        times, rss = res[name]
        assert len(times) == 4 and min(times) > 0
        assert 50 < rss < 4000  # MiB, this worker's own peak (not the parent's)
    text = bench.table([("default", "1x32", {**res, "ONNX Runtime INT8": "failed: ModuleNotFoundError: onnxruntime"})])
    assert "| default | 1x32 | PyTorch FP32 |" in text and "1.00x" in text
    assert "| ONNX Runtime INT8 | failed: ModuleNotFoundError: onnxruntime |" in text


def test_bad_shape_is_refused(capsys):
    assert cli.main(["bench", "--shapes", "128"]) == 2
    assert "shape must look like 1x128" in capsys.readouterr().err


def test_tvm_fp32_baseline_matches_pytorch(tmp_path):
    """TVM's own FP32 path (PyTorch frontend, plain schedules) computes the same hidden states."""
    import numpy as np
    import torch
    from conftest import random_inputs, save_checkpoint

    from ibert_tvm.evaluation.baselines import tvm_fp32_library
    from ibert_tvm.evaluation.fp32 import fp32_model, tvm_fp32_session

    net = fp32_model(str(save_checkpoint(tmp_path / "ckpt", "IBertModel")), "IBertModel")
    ids, mask = random_inputs(np.random.default_rng(0), 2, 16)
    lib = tvm_fp32_library(net, 2, 16, tmp_path / "work")
    got = tvm_fp32_session(lib)(ids, mask)
    with torch.no_grad():
        want = net(input_ids=torch.tensor(ids, dtype=torch.int64), attention_mask=torch.tensor(mask)).last_hidden_state
    assert np.abs(want.numpy()).max() > 0.5
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    assert tvm_fp32_library(net, 2, 16, tmp_path / "work") == lib  # cached
