"""Checkpoints that would compile into a library answering wrongly, or fail with a reader's bare error:
non-finite weights and ranges, truncated and corrupt weight files. Each fails before any TVM work,
naming the tensor or the file."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from conftest import CALIB_TEXTS, Spec, new_model, save_checkpoint
from safetensors.torch import load_file, save_file

from ibert_tvm import build, checkpoint, importer
from ibert_tvm.compile import CompileOptions, compile_model
from ibert_tvm.ranges import CHANNEL_RANGES

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def no_tvm(monkeypatch):
    """Any compilation reaching TVM fails the test: these errors must come first."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("reached TVM compilation")

    monkeypatch.setattr(build, "compile_graph", refuse)


def poisoned(path: Path, name: str, value: float, calibrate: bool = False) -> Path:
    """A tiny IBertModel checkpoint whose tensor `name` has `value` as its first element."""
    save_checkpoint(path, "IBertModel", Spec(), calibrate=calibrate)
    file = path / "model.safetensors"
    state = load_file(file)
    state[name].view(-1)[0] = value
    save_file(state, file, metadata={"format": "pt"})
    return path


def compile_tiny(ckpt: Path, out: Path, calibrate: bool) -> Path:
    return compile_model(CompileOptions(model=str(ckpt), target="host", seq_len=16, out=out,
                                        calib_texts=CALIB_TEXTS if calibrate else None, progress=False))


@pytest.mark.parametrize("name, value, what", [
    ("encoder.layer.0.attention.self.query.weight", NAN, "NaN"),
    ("encoder.layer.0.output.dense.bias", INF, "inf"),
    ("embeddings.word_embeddings.weight", -INF, "inf"),
])
def test_non_finite_weight_is_a_compile_error(tmp_path, no_tvm, name, value, what):
    # With calibration text: the check must come before calibration, whose forward would hit HF's assert
    ckpt = poisoned(tmp_path / "ckpt", name, value)
    with pytest.raises(checkpoint.NonFiniteError, match=re.escape(f"{ckpt}: {name} contains {what}")):
        compile_tiny(ckpt, tmp_path / "art", calibrate=True)


def test_non_finite_range_in_checkpoint_is_a_compile_error(tmp_path, no_tvm):
    # Without calibration text the stored ranges are used as they are (and a NaN range would
    # otherwise read as "not calibrated")
    name = "encoder.layer.0.output.output_activation.x_max"
    ckpt = poisoned(tmp_path / "ckpt", name, NAN, calibrate=True)
    with pytest.raises(checkpoint.NonFiniteError, match=re.escape(f"{ckpt}: {name} contains NaN")):
        compile_tiny(ckpt, tmp_path / "art", calibrate=False)


@pytest.mark.parametrize("kind", ["IBertModel", "IBertForSequenceClassification"])
def test_convert_refuses_non_finite_range_buffer(tiny, kind):
    model = copy.deepcopy(tiny(kind, Spec())[0])
    prefix = "" if kind == "IBertModel" else "ibert."
    model.get_submodule(f"{prefix}encoder.layer.0.pre_output_act").x_min.fill_(-INF)
    with pytest.raises(ValueError, match=re.escape(f"{prefix}encoder.layer.0.pre_output_act.x_min contains inf")):
        importer.convert(model)


def test_convert_refuses_non_finite_channel_range(tiny):
    model = copy.deepcopy(tiny("IBertModel", Spec())[0])
    ranges = getattr(model.config, CHANNEL_RANGES)
    ranges["encoder.layer.0.pre_output_act"][5] = NAN
    with pytest.raises(ValueError, match=re.escape(f"config.{CHANNEL_RANGES}['encoder.layer.0.pre_output_act'] "
                                                   "contains NaN")):
        importer.convert(model)


def test_finite_model_converts(tiny):
    importer.convert(tiny("IBertModel", Spec())[0])  # the checks do not reject what they should pass


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _garbage(file: Path) -> None:
    file.write_bytes(b"\x13\x37" * 4096)


DAMAGE = {"truncated": _truncate, "garbage": _garbage}


@pytest.mark.parametrize("damage", DAMAGE)
def test_corrupt_safetensors_names_the_file(tmp_path, no_tvm, damage):
    ckpt = save_checkpoint(tmp_path / "ckpt", "IBertModel")
    file = ckpt / "model.safetensors"
    DAMAGE[damage](file)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=re.escape(f"{file} is truncated or corrupt: ")):
        compile_tiny(ckpt, tmp_path / "art", calibrate=True)


@pytest.mark.parametrize("damage", [None, *DAMAGE])
def test_corrupt_pytorch_bin_names_the_file(tmp_path, damage):
    ckpt = save_checkpoint(tmp_path / "ckpt", "IBertModel")
    file = ckpt / "pytorch_model.bin"
    torch.save(load_file(ckpt / "model.safetensors"), file)
    (ckpt / "model.safetensors").unlink()
    if damage is None:  # the header-only check passes an intact pickle
        assert type(checkpoint.load(ckpt)).__name__ == "IBertModel"
        return
    DAMAGE[damage](file)
    with pytest.raises(checkpoint.CorruptCheckpointError, match=re.escape(f"{file} is truncated or corrupt: ")):
        checkpoint.load(ckpt)


def test_corrupt_shard_is_named(tmp_path):
    new_model("IBertModel", Spec()).save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    _truncate(shards[-1])
    with pytest.raises(checkpoint.CorruptCheckpointError, match=re.escape(f"{shards[-1]} is truncated or corrupt: ")):
        checkpoint.load(tmp_path)
