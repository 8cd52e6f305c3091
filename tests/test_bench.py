"""`ibert-tvm bench`: system names, peers that are not installed, each system in its own worker
process, times against ours, the plot (no timing asserted: the machine is shared)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

import numpy as np
import pytest
from conftest import ci_setup_failed, random_inputs, save_checkpoint

from ibert_tvm import cli
from ibert_tvm.evaluation import bench

SHAPE = (1, 16)


def needs(module: str) -> None:
    """The bench extra (scripts/setup.sh installs it, so CI has it) provides `module`: under CI a
    missing one fails the test, elsewhere it skips with a warning."""
    if importlib.util.find_spec(module) is None:
        ci_setup_failed(f"{module} is not installed: pip install \"ibert-tvm[bench]\"")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    return str(save_checkpoint(tmp_path_factory.mktemp("bench") / "ckpt", "IBertModel"))


@pytest.fixture(scope="module")
def measured(tiny_checkpoint) -> bench.Result:
    """The tiny model timed by PyTorch FP32, both OpenVINO systems and the GEMM floor, in one run."""
    needs("openvino")
    needs("nncf")
    return bench.measure(["torch-fp32", "openvino-int8", "openvino-fp32", bench.FLOOR], tiny_checkpoint, *SHAPE,
                         rounds=2, reps=2, threads=1)


def test_system_names_parse_and_are_listed(capsys):
    names = ["ibert-tvm", "openvino-int8", "ort-int8", "torch-fp32", "int8-gemm-floor"]
    assert cli.parser().parse_args(["bench", "--systems", *names]).systems == names
    with pytest.raises(SystemExit) as exit_:
        cli.parser().parse_args(["bench", "--systems", "OpenVINO INT8"])
    assert exit_.value.code == 2 and "invalid choice: 'OpenVINO INT8'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["bench", "--help"])
    help_text = capsys.readouterr().out
    for name, system in bench.SYSTEMS.items():
        assert f"  {name.ljust(max(map(len, bench.SYSTEMS)))}  {system.about}" in help_text
        assert " " not in name


def test_missing_peer_names_its_pip_install(monkeypatch, capsys, tmp_path):
    lacking = dataclasses.replace(bench.SYSTEMS["openvino-int8"], needs=("openvino", "ibert_tvm_absent_module"))
    monkeypatch.setitem(bench.SYSTEMS, "openvino-int8", lacking)
    png = tmp_path / "bench.png"
    assert cli.main(["bench", "--systems", "openvino-int8", "--shapes", "1x16", "--png", str(png)]) == 0
    out, err = capsys.readouterr()
    why = 'not installed: needs ibert_tvm_absent_module, which this install lacks: pip install "ibert-tvm[bench]"'
    assert f"skipping openvino-int8: {why}" in err
    assert f"| default | 1x16 | openvino-int8 | {why} | | | |" in out
    assert not png.exists()  # nothing was measured


def test_bad_shape_is_refused(capsys):
    assert cli.main(["bench", "--shapes", "128"]) == 2
    assert "shape must look like 1x128" in capsys.readouterr().err


@pytest.mark.slow
def test_measure_runs_each_system_in_its_own_process(measured):
    for name in ("torch-fp32", "openvino-int8", "openvino-fp32", bench.FLOOR):
        times, rss = measured[name]
        assert len(times) == 4 and min(times) > 0
        assert 50 < rss < 4000  # MiB, this worker's own peak (not the parent's)
    # the OpenVINO workers run without PyTorch, as deployed: well under the PyTorch worker's peak
    assert measured["openvino-fp32"][1] < measured["torch-fp32"][1] - 100


@pytest.mark.slow
def test_table_gives_each_system_its_time_against_ours(measured):
    res = {**measured, bench.OURS: ([0.003, 0.002, 0.002, 0.001], 300.0), "ort-int8": "failed: RuntimeError: boom"}
    text = bench.table([("tiny", "1x16", res)])
    assert f"| tiny | 1x16 | {bench.OURS} | 2.00 | 1.00x | " in text
    floor = bench.median_ms(res, bench.FLOOR)
    for name in ("torch-fp32", "openvino-int8", "openvino-fp32"):
        ms = float(np.median(measured[name][0])) * 1e3
        assert f"| tiny | 1x16 | {name} | {ms:.2f} | {ms / 2:.2f}x | {floor / ms:.0%} | {measured[name][1]:.0f} |" in text
    assert "| tiny | 1x16 | ort-int8 | failed: RuntimeError: boom | | | |" in text
    assert text.endswith(bench.LEGEND)
    assert not re.search(r"\| [0-9.]+x \|", bench.table([("tiny", "1x16", measured)]))  # no ratios without ours


@pytest.mark.slow
def test_plot_is_titled_with_the_cpu_threads_rounds_and_shapes(measured, tmp_path):
    needs("matplotlib")
    from PIL import Image

    cpu = bench.cpu_model()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    assert cpu == (names[0] if names else cpu) and cpu != "unknown CPU"
    args = cli.parser().parse_args(["bench", "--threads", "1", "--rounds", "2", "--reps", "2", "--shapes", "1x16"])
    png = tmp_path / "plot" / "bench.png"
    bench.plot([("tiny", "1x16", {**measured, "ort-int8": "not installed: needs onnxruntime"})], png, bench.title(args))
    with Image.open(png) as image:
        heading = image.text["Title"]
        assert image.size[0] > 500 and image.size[1] > 300
    assert cpu in heading and "1 threads, 2 rounds x 2 calls" in heading and "1x16" in heading


@pytest.mark.slow
def test_openvino_models_match_pytorch(tiny_checkpoint, tmp_path):
    """OpenVINO's FP32 IR computes PyTorch's hidden states; its INT8 IR is quantized (FakeQuantize
    nodes) and still close."""
    needs("openvino")
    needs("nncf")
    import openvino as ov
    import torch

    from ibert_tvm.evaluation.baselines import openvino_ir
    from ibert_tvm.evaluation.fp32 import fp32_model

    net = fp32_model(tiny_checkpoint, "IBertModel")
    ids, mask = random_inputs(np.random.default_rng(0), 2, 16, pads=[0, 0])
    with torch.no_grad():
        want = net(input_ids=torch.tensor(ids, dtype=torch.int64), attention_mask=torch.tensor(mask)).last_hidden_state
    want = want.numpy()
    feeds = bench.calibration_feeds(bench.model_dir(tiny_checkpoint) / "tokenizer.json", 16, net.config.pad_token_id)
    assert len(feeds) == bench.CALIB_SENTENCES and feeds[0]["input_ids"].dtype == np.int64
    got = {}
    for kind, calibration in (("fp32", None), ("int8", feeds)):
        xml = openvino_ir(net, tmp_path, calibration)
        assert openvino_ir(net, tmp_path, calibration) == xml  # cached
        ops = {op.get_type_name() for op in ov.Core().read_model(xml).get_ordered_ops()}
        assert ("FakeQuantize" in ops) == (kind == "int8")
        run = bench.openvino_session(xml, 2, 16, 1, f32=True)
        got[kind] = run(ids.astype(np.int64), mask.astype(np.int64))
    np.testing.assert_allclose(got["fp32"], want, atol=1e-4)
    assert np.abs(want).max() > 0.5
    assert np.abs(got["int8"] - want).mean() < 0.1 * np.abs(want).mean()
    assert np.abs(got["int8"] - want).max() > 1e-4  # quantized: not the FP32 result


@pytest.mark.slow
def test_tvm_fp32_baseline_matches_pytorch(tmp_path):
    """TVM's own FP32 path (PyTorch frontend, plain schedules) computes the same hidden states."""
    import torch

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


def ms(*times: float) -> tuple[list[float], float]:
    """A measured cell of these times (ms)."""
    return [t / 1e3 for t in times], 100.0


def test_headline_names_the_fastest_int8_peer_of_each_run():
    rows = [("tiny", "1x16", {bench.OURS: ms(2.0, 2.2, 2.4), "openvino-int8": ms(2.5), "ort-int8": ms(4.0),
                              "torch-fp32": ms(1.0), "torch-dynamic-int8": "failed: RuntimeError: boom"}),
            ("tiny", "8x16", {bench.OURS: ms(10.0), "torch-dynamic-int8": ms(8.0), "ort-int8": ms(9.0)}),
            ("tiny", "1x32", {bench.OURS: ms(3.0), "openvino-fp32": ms(1.0)})]  # no INT8 peer ran: no line
    assert bench.headline(rows).splitlines() == [
        ("tiny 1x16: ibert-tvm 2.20 ms, 0.88x the time of openvino-int8 (2.50 ms), the fastest INT8 peer run "
         "(openvino-int8, ort-int8)"),
        ("tiny 8x16: ibert-tvm 10.00 ms, 1.25x the time of torch-dynamic-int8 (8.00 ms), the fastest INT8 peer run "
         "(ort-int8, torch-dynamic-int8)"),
    ]


def tiny_bert_checkpoint(path) -> str:
    """A random BERT encoder, as transformers saves one (MiniLM's layout, tiny), without a pooler."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False).save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bert", "ibert"])
def test_ort_int8_is_onnx_runtimes_fused_dynamic_int8_and_close_to_pytorch(kind, tiny_checkpoint, tmp_path, capsys):
    """ort-int8 follows ONNX Runtime's advice for BERT: transformers' own class (the same FP32 weights
    as the IBert the other systems run), optimize_model's fused ops, per-channel dynamic INT8 of them."""
    needs("onnxruntime")
    needs("onnx")
    import onnx
    import torch

    from ibert_tvm.evaluation.baselines import onnx_path, transformers_fp32
    from ibert_tvm.evaluation.fp32 import fp32_model

    folder = tiny_bert_checkpoint(tmp_path / "bert") if kind == "bert" else tiny_checkpoint
    net = transformers_fp32(folder)
    assert type(net).__name__ == ("BertModel" if kind == "bert" else "RobertaModel")
    assert (net.pooler is None) == (kind == "bert")  # as the checkpoint has (save_checkpoint's IBertModel has one)
    ids, mask = (a.astype(np.int64) for a in random_inputs(np.random.default_rng(0), 2, 24, pads=[0, 5]))  # not the export's 1x16
    with torch.no_grad():
        want = net(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
        ibert = fp32_model(folder, "IBertModel")(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    real = mask.astype(bool)  # IBert numbers pad tokens' positions RoBERTa's way, BERT does not
    np.testing.assert_allclose(ibert.last_hidden_state.numpy()[real], want[real], atol=1e-5)  # the same weights
    assert np.abs(want).max() > 0.5

    got, ops = {}, {}
    for int8 in (False, True):
        path = onnx_path(net, tmp_path / "onnx", int8=int8)
        assert onnx_path(net, tmp_path / "onnx", int8=int8) == path  # cached
        ops[int8] = {n.op_type for n in onnx.load(path).graph.node}
        got[int8] = bench.onnx_session(path, 1)(ids, mask)  # the shape was not fixed by the export
    assert {"Attention", "SkipLayerNormalization", "BiasGelu"} <= ops[False] and "Softmax" not in ops[False]
    assert {"QAttention", "MatMulInteger", "SkipLayerNormalization"} <= ops[True] and "Attention" not in ops[True]
    np.testing.assert_allclose(got[False], want, atol=1e-4)
    err = np.abs(got[True] - want).max()
    cos = (got[True] * want).sum(-1) / np.linalg.norm(got[True], axis=-1) / np.linalg.norm(want, axis=-1)
    with capsys.disabled():
        print(f"\n{kind}: ort-int8 vs PyTorch FP32 last_hidden_state: max abs diff {err:.4f}, min cosine {cos.min():.5f}")
    assert cos.min() > 0.99 and err < 0.1 * np.abs(want).max()
    assert err > 1e-4  # quantized: not the FP32 result
