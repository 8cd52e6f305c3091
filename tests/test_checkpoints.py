"""BERT, RoBERTa and IBert checkpoints of every task map onto the six IBert classes exactly."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import BertConfig, IBertConfig, RobertaConfig

from ibert_tvm import checkpoint

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=3)
FAMILIES = {
    "Bert": (BertConfig, dict(max_position_embeddings=40)),
    "Roberta": (RobertaConfig, dict(pad_token_id=1, max_position_embeddings=42)),
    "IBert": (IBertConfig, dict(pad_token_id=1, max_position_embeddings=42)),
}
OUTPUTS = {
    "Model": ("last_hidden_state", "pooler_output"),
    "ForMaskedLM": ("logits",),
    "ForSequenceClassification": ("logits",),
    "ForMultipleChoice": ("logits",),
    "ForTokenClassification": ("logits",),
    "ForQuestionAnswering": ("start_logits", "end_logits"),
}


def _inputs(task: str) -> dict[str, torch.Tensor]:
    shape = (2, 3, 10) if task == "ForMultipleChoice" else (2, 10)
    ids = torch.randint(3, 100, shape)
    mask = torch.ones_like(ids)
    mask[..., 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("task", OUTPUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_maps_onto_ibert(tmp_path, family, task):
    config_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    labels = {"num_labels": 2} if task == "ForQuestionAnswering" else {}
    src = getattr(transformers, family + task)(config_cls(**{**SMALL, **labels}, **extra)).eval()
    src.save_pretrained(tmp_path)
    ib = checkpoint.load(tmp_path, quant_mode=False)
    assert type(ib).__name__ == "IBert" + task
    inputs = _inputs(task)
    with torch.no_grad():
        want, got = src(**inputs), ib(**inputs)
    for name in OUTPUTS[task]:
        w, g = getattr(want, name), getattr(got, name)
        if name == "last_hidden_state":  # pad positions differ (IBert numbers positions from pad + 1)
            w, g = w[inputs["attention_mask"].bool()], g[inputs["attention_mask"].bool()]
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_missing_head_is_an_error_unless_asked_for(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(BertConfig(**SMALL, max_position_embeddings=40)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no weights for IBertForQuestionAnswering's head"):
        checkpoint.load(tmp_path, "IBertForQuestionAnswering", quant_mode=False)
    qa = checkpoint.load(tmp_path, "IBertForSequenceClassification", quant_mode=False, num_labels=2, new_head=True)
    assert qa.config.num_labels == 2 and qa.classifier.out_proj.weight.shape == (2, 32)


def test_unmappable_architecture_is_named(tmp_path):
    torch.manual_seed(0)
    transformers.BertForNextSentencePrediction(BertConfig(**SMALL)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BertForNextSentencePrediction has a head ibert-tvm cannot map"):
        checkpoint.load(tmp_path)
    assert type(checkpoint.load(tmp_path, "IBertModel", quant_mode=False)).__name__ == "IBertModel"


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2Model"]}))
    with pytest.raises(ValueError, match="model type 'gpt2'"):
        checkpoint.load(tmp_path)
