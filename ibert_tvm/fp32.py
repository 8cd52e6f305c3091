"""FP32 PyTorch baselines of the same checkpoint (for the demo, the accuracy report, the benchmark)."""

from __future__ import annotations

import numpy as np


def fp32_model(model: str, model_class: str | None = None):
    """The checkpoint as an IBert with quant_mode=False: plain float RoBERTa/BERT arithmetic."""
    from . import checkpoint

    return checkpoint.load(model, model_class, quant_mode=False)


def fp32_embeddings(model: str, texts: list[str], seq_len: int) -> np.ndarray:
    """Mean-pooled, normalised FP32 sentence embeddings, pooled exactly as `Runner.embed` pools."""
    import torch

    from . import checkpoint
    from .calibrate import tokenizer_batches
    from .runner import mean_pool

    net = fp32_model(model, "IBertModel")
    (batch,) = tokenizer_batches(checkpoint.resolve(model) / "tokenizer.json", texts, len(texts), seq_len,
                                 net.config.pad_token_id)
    with torch.no_grad():
        hidden = net(**batch).last_hidden_state.numpy()
    return mean_pool(hidden, batch["attention_mask"].numpy())
