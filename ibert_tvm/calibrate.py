"""Activation-range calibration of an IBert model (HF's QuantAct EMA, updated in train mode)."""

from __future__ import annotations

from collections.abc import Sequence

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
