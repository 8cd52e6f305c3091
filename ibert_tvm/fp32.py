"""FP32 PyTorch baselines of the same checkpoint (for the demo, the accuracy report, the benchmark)."""

from __future__ import annotations

import numpy as np


def fp32_model(model: str, model_class: str | None = None):
    """The checkpoint as an IBert with quant_mode=False: plain float RoBERTa/BERT arithmetic."""
    from . import checkpoint

    return checkpoint.load(model, model_class, quant_mode=False)


def fp32_embeddings(model: str, texts: list[str], seq_len: int) -> np.ndarray:
    import torch
    from tokenizers import Tokenizer

    from . import checkpoint

    tok = Tokenizer.from_file(str(checkpoint.resolve(model) / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(seq_len)
    tok.enable_padding(pad_id=0, length=seq_len)
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    with torch.no_grad():
        h = fp32_model(model, "IBertModel")(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    pooled = ((h * m).sum(1) / m.sum(1)).numpy()
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
