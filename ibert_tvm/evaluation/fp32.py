"""FP32 baselines of the same checkpoint (for the demo, the accuracy report, the benchmark): PyTorch's,
and a runner for TVM's own FP32 library (`baselines.tvm_fp32_library`) that needs no PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def fp32_model(model: str, model_class: str | None = None):
    """The checkpoint as an IBert with quant_mode=False: plain float RoBERTa/BERT arithmetic."""
    from .. import checkpoint

    return checkpoint.load(model, model_class, quant_mode=False)


def fp32_embeddings(model: str, texts: list[str], seq_len: int) -> np.ndarray:
    """Mean-pooled, normalised FP32 sentence embeddings, pooled by the sentence-embedding pipeline's `pool`."""
    import torch

    from .. import checkpoint
    from ..calibrate import tokenizer_batches
    from ..pipelines import pool

    net = fp32_model(model, "IBertModel")
    (batch,) = tokenizer_batches(checkpoint.resolve(model) / "tokenizer.json", texts, len(texts), seq_len,
                                 net.config.pad_token_id)
    with torch.no_grad():
        hidden = net(**batch).last_hidden_state.numpy()
    return pool(hidden, batch["attention_mask"].numpy())


def tvm_fp32_session(path: Path) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """`run(ids, mask) -> last_hidden_state` of a `tvm_fp32_library` (TVM's runtime only)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    vm = VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        (out,) = vm["main"](tvm.runtime.tensor(np.asarray(ids, np.int64)), tvm.runtime.tensor(np.asarray(mask, np.int64)))
        return out.numpy()

    return run
