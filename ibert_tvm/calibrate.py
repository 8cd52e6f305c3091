"""Activation-range calibration of an IBert model (HF's QuantAct EMA, updated in train mode)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers.models.ibert import quant_modules as qm


def calibrate(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], progress: bool = True) -> torch.nn.Module:
    """Reset every QuantAct range, then run `batches` through the model in train mode, dropout off.

    Batches are tokenizer outputs (`input_ids`, `attention_mask`). Returns the model in eval mode.
    """
    if not batches:
        raise ValueError("calibration needs at least one batch of text; got none")
    dropouts = {m: m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    for m in model.modules():
        if isinstance(m, qm.QuantAct):
            m.x_min.fill_(-1e-5)
            m.x_max.fill_(1e-5)
        elif isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    with torch.no_grad():
        for batch in tqdm(batches, desc="calibrating", disable=not progress):
            model(**batch)
    for m, p in dropouts.items():
        m.p = p
    return model.eval()


def tokenizer_batches(tokenizer_file: Path, texts: list[str], batch: int, max_len: int, pad_id: int) -> list[dict[str, Any]]:
    """Calibration batches, padded with the model's pad id (IBert positions count non-pad ids)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=pad_id)
    out = []
    for i in range(0, len(texts), batch):
        enc = tok.encode_batch(texts[i : i + batch])
        out.append({
            "input_ids": torch.tensor([e.ids for e in enc]),
            "attention_mask": torch.tensor([e.attention_mask for e in enc]),
        })
    return out


def calibrate_texts(model: torch.nn.Module, texts: Sequence[str], tokenizer_file: Path, seq_len: int = 128,
                    batch_size: int = 32, progress: bool = True) -> torch.nn.Module:
    """`calibrate` on raw text, tokenized with the checkpoint's `tokenizer.json`."""
    if not any(t.strip() for t in texts):
        raise ValueError("calibration text is empty")
    batches = tokenizer_batches(tokenizer_file, list(texts), batch_size, seq_len, model.config.pad_token_id)
    return calibrate(model, batches, progress=progress)
