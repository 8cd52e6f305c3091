"""CPU baselines outside TVM for the same FP32 IBert: PyTorch dynamic INT8 and ONNX Runtime FP32/INT8.

Needs the `compile` extra plus onnx, onnxscript (the dynamo exporter needs it) and onnxruntime.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn


class _PairLinear(nn.Module):
    """A plain nn.Linear that keeps QuantLinear's `(out, scaling_factor)` calling convention, so the
    IBert layers that unpack it still work; quantize_dynamic swaps the inner nn.Linear."""

    def __init__(self, quant_linear: nn.Module):
        super().__init__()
        w, b = quant_linear.weight, quant_linear.bias
        self.linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            self.linear.weight.copy_(w)
            if b is not None:
                self.linear.bias.copy_(b)

    def forward(self, x: torch.Tensor, prev_act_scaling_factor: torch.Tensor | None = None):
        return self.linear(x), None


def _float_linears(model: nn.Module) -> nn.Module:
    """A copy of `model` with every QuantLinear (float math in quant_mode=False) as an nn.Linear."""
    from transformers.models.ibert.quant_modules import QuantLinear

    if getattr(model.config, "quant_mode", False):
        raise ValueError("expected an FP32 IBert (quant_mode=False)")
    out = copy.deepcopy(model).eval()
    for name, mod in list(out.named_modules()):
        if isinstance(mod, QuantLinear):
            parent, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent), attr, _PairLinear(mod))
    return out


def torch_dynamic_int8(model: nn.Module) -> nn.Module:
    """PyTorch dynamic quantisation: s8 per-tensor weights, activations quantised per call."""
    return torch.ao.quantization.quantize_dynamic(_float_linears(model), {nn.Linear}, dtype=torch.qint8)


class _LastHidden(nn.Module):
    """Tensors in, tensor out: the exporter wants a plain output, not a ModelOutput."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _fingerprint(model: nn.Module) -> str:
    """Content hash (config + weights), so the cache survives processes and notices a retrained model."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(torch.__version__.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _export_fp32(model: nn.Module, batch: int, seq: int, path: Path) -> None:
    ids = torch.ones(batch, seq, dtype=torch.int64)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    was_training = model.training  # .eval() below (no dropout in the graph) is undone afterwards
    try:
        tmp = path.with_suffix(f".tmp{os.getpid()}.onnx")
        # dynamo=True: the TorchScript exporter gives wrong outputs for IBert. One file
        # (external_data=False) so quantize_dynamic and the cache handle a single path.
        torch.onnx.export(_LastHidden(model).eval(), (ids, mask), str(tmp), dynamo=True, external_data=False,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"])
        os.replace(tmp, path)  # atomic, so a concurrent or interrupted run never leaves half a file
    finally:
        model.train(was_training)


def onnx_path(model: nn.Module, batch: int, seq: int, workdir: Path, int8: bool) -> Path:
    """The cached .onnx for this model and static shape, exported (and quantised) on first use."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stem = f"ibert-{_fingerprint(model)}-b{batch}-s{seq}"
    fp32 = workdir / f"{stem}-fp32.onnx"
    if not fp32.is_file():
        _export_fp32(model, batch, seq, fp32)
    if not int8:
        return fp32
    q = workdir / f"{stem}-int8.onnx"
    if not q.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = q.with_suffix(f".tmp{os.getpid()}.onnx")
        quantize_dynamic(fp32, tmp, weight_type=QuantType.QInt8)
        os.replace(tmp, q)
    return q


def onnx_session(path: Path, threads: int, *, spin: bool = True) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """ONNX Runtime on CPU over an exported model (`onnx_path`): `run(ids, mask) -> last_hidden_state`,
    int64 [batch, seq] inputs.

    spin=False when PyTorch (or another session) runs in the same process: ORT's idle workers
    spin-wait and fight torch's OpenMP threads for the cores (MiniLM 1x128 on 2 cores, ORT FP32 and
    torch FP32 alternating: 125 ms a pair spinning, 69 ms not; 21 + 28 ms each alone)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts,
                                providers=["CPUExecutionProvider"])

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feed = {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.asarray(mask, np.int64)}
        return sess.run(["last_hidden_state"], feed)[0]

    return run
