"""CPU baselines for the same FP32 weights, made ready to deploy: PyTorch dynamic INT8, ONNX Runtime's
fused FP32/INT8 files (transformers' own Bert/Roberta class, as ONNX Runtime's BERT tooling expects),
OpenVINO's FP32/INT8 IR, and TVM's own FP32 path (its PyTorch frontend, with plain schedules). The
runtimes that run them (`bench.onnx_session`, `bench.openvino_session`) need no PyTorch.

Needs the `compile` extra plus the `bench` extra's onnxruntime, onnx, openvino and nncf.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..files import atomic_file, readable


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


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode (no dropout in an exported graph), its training mode restored after."""
    was_training = model.training
    try:
        yield model.eval()
    finally:
        model.train(was_training)


def _cached(path: Path, make: Callable[[Path], object]) -> Path:
    """`path`, made by `make(tmp)` on first use (atomically: see `files.atomic_file`)."""
    return path if path.is_file() else atomic_file(path, make)


def _stem(model: nn.Module, batch: int, seq: int, workdir: Path) -> Path:
    """Where a cached export of this model (by content) and static shape lives."""
    return Path(workdir) / f"ibert-{_fingerprint(model)}-b{batch}-s{seq}"


def transformers_fp32(folder: Path) -> nn.Module:
    """The checkpoint in `folder` as transformers' own FP32 encoder, the class ONNX Runtime's BERT
    optimizer is written for: a BertModel for BERT, a RobertaModel for RoBERTa and IBert (IBert's
    float tensors are RoBERTa's, its integer buffers are left out), with a pooler when the checkpoint
    has one. Eager attention: the optimizer fuses its pattern into Attention, not SDPA's."""
    from transformers import AutoConfig, BertConfig, BertModel, RobertaConfig, RobertaModel

    from ..checkpoint import tensor_names, transformers_quiet

    kind = AutoConfig.from_pretrained(folder).model_type
    classes = {"bert": (BertConfig, BertModel), "roberta": (RobertaConfig, RobertaModel),
               "ibert": (RobertaConfig, RobertaModel)}
    if kind not in classes:
        raise ValueError(f"{folder}: model type {kind!r} has no transformers FP32 class here; "
                         f"supported: {', '.join(classes)}")
    config_class, model_class = classes[kind]
    pooler = any(".pooler." in f".{name}" for name in tensor_names(Path(folder)))
    with transformers_quiet():
        config = config_class.from_pretrained(folder, attn_implementation="eager")
        return model_class.from_pretrained(folder, config=config, add_pooling_layer=pooler).eval()


def _export_fp32(model: nn.Module, path: Path) -> None:
    """The TorchScript exporter at opset 17 with batch and sequence left open, as ONNX Runtime's
    BERT examples export: the optimizer's fusions match that graph (static shapes fold the mask's
    Expand and Reshape away, and the attention is then not fused). One file, no external data."""
    ids = torch.ones(1, 16, dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    # quiet: this exporter's deprecation, and tracer warnings about a mask branch on lengths that
    # stay equal at every shape (the tests run the file at another shape than this example's)
    with torch.no_grad(), _evaluating(model), warnings.catch_warnings(action="ignore"):
        torch.onnx.export(_LastHidden(model).eval(), (ids, torch.ones_like(ids)), str(path), dynamo=False,
                          opset_version=17, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes})


def onnx_path(model: nn.Module, workdir: Path, int8: bool) -> Path:
    """ONNX Runtime's advice for BERT on CPU, applied to `model` (a `transformers_fp32`): the export,
    `optimize_model`'s fused graph (EmbedLayerNormalization, Attention, SkipLayerNormalization,
    BiasGelu), and for `int8` that graph through `quantize_dynamic` with per-channel s8 weights
    (QAttention, MatMulInteger). Any batch and length; cached by content and ONNX Runtime version."""
    import onnxruntime

    stem = Path(workdir) / f"{model.config.model_type}-{_fingerprint(model)}-ort{onnxruntime.__version__}"
    exported = _cached(stem.with_name(stem.name + "-export.onnx"), lambda tmp: _export_fp32(model, tmp))

    def optimize(tmp: Path) -> None:
        from onnxruntime.transformers.optimizer import optimize_model

        c = model.config
        optimize_model(str(exported), model_type="bert", num_heads=c.num_attention_heads,
                       hidden_size=c.hidden_size).save_model_to_file(str(tmp))

    fused = _cached(stem.with_name(stem.name + "-fused-fp32.onnx"), optimize)
    if not int8:
        return fused

    def quantize(tmp: Path) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # without a default type the quantizer stops at the fused ops' outputs (no type to infer)
        quantize_dynamic(fused, tmp, weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})

    return _cached(stem.with_name(stem.name + "-fused-int8.onnx"), quantize)


def _cached_dir(path: Path, make: Callable[[Path], object]) -> Path:
    """`path`, a folder made by `make(tmp)` on first use: built in a private folder beside it, then
    renamed into place, so no reader sees it half written (a concurrent maker's folder serves too)."""
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        make(tmp)
        readable(tmp, 0o777)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def openvino_ir(model: nn.Module, workdir: Path, calibration: list[dict[str, np.ndarray]] | None) -> Path:
    """The model converted by OpenVINO (`model.xml`, shapes left open: the runtime fixes them), or
    with `calibration` feeds quantized to INT8 by NNCF's transformer preset (SmoothQuant, fast bias
    correction); cached by content like the .onnx. FP32 weights are kept as they are (no FP16 IR)."""
    import openvino as ov

    h = hashlib.sha256(f"{_fingerprint(model)} openvino {ov.__version__}".encode())
    if calibration is not None:
        import nncf

        h.update(f" nncf {nncf.__version__}".encode())
        for feed in calibration:
            for name, array in sorted(feed.items()):
                h.update(name.encode())
                h.update(np.ascontiguousarray(array).tobytes())

    def make(folder: Path) -> None:
        ids = torch.ones(1, 16, dtype=torch.int64)
        with torch.no_grad(), _evaluating(model):
            net = ov.convert_model(_LastHidden(model).eval(),
                                   example_input={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        if calibration is not None:
            net = nncf.quantize(net, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
                                subset_size=len(calibration))
        ov.save_model(net, folder / "model.xml", compress_to_fp16=False)

    kind = "fp32" if calibration is None else "int8"
    return _cached_dir(Path(workdir) / f"ibert-{h.hexdigest()[:16]}-openvino-{kind}", make) / "model.xml"


def _fp32_schedule(func: "tvm.tirx.PrimFunc") -> "tvm.tirx.PrimFunc":  # noqa: F821
    """A plain CPU schedule for TVM's legalized FP32 ops: each matmul in 4-row x 16-lane register
    tiles accumulated locally over K (parallel over row tiles and batch), every other block with
    its leading spatial loops in parallel and its last one vectorized (as our rowwise fallback)."""
    from tvm import s_tir

    from ibert_tvm.schedules.cpu import generic, parallel_vector

    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if any(w.source.dtype == "bool" for b in blocks for w in sch.get(b).writes):  # masks: TVM cannot
        return func  # vectorize bool stores
    try:
        blk = sch.get_sblock("matmul")
    except s_tir.ScheduleError:
        generic(sch)
        return sch.mod["main"]
    *batch, i, j, k = sch.get_loops(blk)
    rows, cols = (4 if int(sch.get(i).extent) % 4 == 0 else 1), (16 if int(sch.get(j).extent) % 16 == 0 else 1)
    i0, i1 = sch.split(i, [None, rows])
    j0, j1 = sch.split(j, [None, cols])
    sch.reorder(*batch, i0, j0, k, i1, j1)
    par = sch.fuse(*batch, i0) if batch else i0
    sch.parallel(par)
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, j0)
    sch.vectorize(j1)  # before decompose_reduction, which TVM requires
    init = sch.decompose_reduction(blk, k)
    sch.unroll(i1)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    for other in sch.get_child_blocks(sch.get_sblock("root")):  # fused epilogues (bias, GELU): own loops
        loops = sch.get_loops(other)
        if loops and not sch.get(loops[0]).same_as(sch.get(par)):
            parallel_vector(sch, other)
    return sch.mod["main"]


def tvm_fp32_library(model: nn.Module, batch: int, seq: int, workdir: Path) -> Path:
    """The FP32 model through TVM's own PyTorch frontend (torch.export -> Relax), its ops legalized
    and fused by TVM, scheduled plainly (`_fp32_schedule`), for this CPU; cached like the .onnx."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from ..targets import get, tvm_target

    def build(tmp: Path) -> None:
        ids = torch.ones(batch, seq, dtype=torch.int64)
        with torch.no_grad(), _evaluating(model):
            exported = torch.export.export(_LastHidden(model).eval(), (ids, torch.ones_like(ids)))
        mod = from_exported_program(exported, keep_params_as_input=False)
        target = tvm_target(get("host"))
        with target:
            mod = tvm.ir.transform.Sequential([
                relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
                relax.transform.FuseOps(), relax.transform.FuseTIR(),
            ])(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc):
                mod[gv] = _fp32_schedule(func)
        tvm.compile(mod, target).export_library(str(tmp))

    stem = _stem(model, batch, seq, workdir)
    return _cached(stem.with_name(stem.name + "-tvm-fp32.so"), build)
