"""BERT and RoBERTa checkpoints (bare or with a classification head) map onto IBert exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    RobertaModel,
)

from ibert_tvm import checkpoint

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=3)
SOURCES = [
    (BertConfig, BertModel, "IBertModel", "last_hidden_state", dict(max_position_embeddings=40)),
    (BertConfig, BertForSequenceClassification, "IBertForSequenceClassification", "logits", dict(max_position_embeddings=40)),
    (RobertaConfig, RobertaModel, "IBertModel", "last_hidden_state", dict(pad_token_id=1, max_position_embeddings=42)),
    (RobertaConfig, RobertaForSequenceClassification, "IBertForSequenceClassification", "logits",
     dict(pad_token_id=1, max_position_embeddings=42)),
]


@pytest.mark.parametrize("config_cls, model_cls, ibert_class, output, extra", SOURCES, ids=lambda x: getattr(x, "__name__", ""))
def test_fp32_checkpoint_maps_onto_ibert(tmp_path, config_cls, model_cls, ibert_class, output, extra):
    torch.manual_seed(0)
    src = model_cls(config_cls(**SMALL, **extra)).eval()
    src.save_pretrained(tmp_path)
    ib = checkpoint.load(tmp_path, quant_mode=False)
    assert type(ib).__name__ == ibert_class
    ids = torch.randint(3, 100, (2, 10))
    with torch.no_grad():
        want, got = getattr(src(input_ids=ids), output), getattr(ib(input_ids=ids), output)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
