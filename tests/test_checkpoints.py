"""BERT, RoBERTa and IBert checkpoints of every task map onto the six IBert classes exactly,
encoders saved without a pooler included, and loading keeps transformers' load report quiet."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import transformers
from conftest import CALIB_TEXTS, MAX_POSITIONS, PAD, VOCAB, build_tokenizer, compile_capturing, random_inputs
from transformers import BertConfig, IBertConfig, RobertaConfig
from transformers.utils import logging as hf_logging

from ibert_tvm import checkpoint, reference

SMALL = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
         "num_labels": 3}
FAMILIES = {
    "Bert": (BertConfig, {"max_position_embeddings": 40}),
    "Roberta": (RobertaConfig, {"pad_token_id": 1, "max_position_embeddings": 42}),
    "IBert": (IBertConfig, {"pad_token_id": 1, "max_position_embeddings": 42}),
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


# Encoders saved without a pooler: (model saved, the encoder it holds, class to load it as or None)
POOLERLESS = {
    "BertModel(add_pooling_layer=False)": lambda: (m := transformers.BertModel(
        BertConfig(**SMALL, max_position_embeddings=40), add_pooling_layer=False), m, None),
    "RobertaModel(add_pooling_layer=False)": lambda: (m := transformers.RobertaModel(
        RobertaConfig(**SMALL, **FAMILIES["Roberta"][1]), add_pooling_layer=False), m, None),
    "IBertModel(add_pooling_layer=False)": lambda: (m := transformers.IBertModel(
        IBertConfig(**SMALL, **FAMILIES["IBert"][1]), add_pooling_layer=False), m, None),
    "BertForTokenClassification.bert": lambda: (m := transformers.BertForTokenClassification(
        BertConfig(**SMALL, max_position_embeddings=40)).bert, m, None),
    "BertForTokenClassification as IBertModel": lambda: (m := transformers.BertForTokenClassification(
        BertConfig(**SMALL, max_position_embeddings=40)), m.bert, "IBertModel"),
}


@pytest.fixture
def transformers_log() -> Iterator[io.StringIO]:
    """What transformers' loggers print while the test runs (its handler holds the stderr of import
    time, which capfd does not see)."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    level = hf_logging.get_verbosity()  # the CLI, run in this process by other tests, lowers it
    hf_logging.set_verbosity_warning()
    hf_logging.add_handler(handler)
    yield text
    hf_logging.remove_handler(handler)
    hf_logging.set_verbosity(level)


@pytest.mark.parametrize("source", POOLERLESS)
def test_encoder_without_pooler_loads_without_one_and_quietly(tmp_path, capfd, transformers_log, source):
    torch.manual_seed(0)
    saved, encoder, as_class = POOLERLESS[source]()
    saved.eval().save_pretrained(tmp_path)
    capfd.readouterr()
    ib = checkpoint.load(tmp_path, as_class, quant_mode=False)
    shown = transformers_log.getvalue() + "".join(capfd.readouterr())
    # transformers' report (unexpected classifier) and its progress bar stay out
    assert "LOAD REPORT" not in shown and "Loading weights" not in shown
    assert type(ib).__name__ == "IBertModel" and ib.pooler is None
    inputs = _inputs("Model")
    with torch.no_grad():
        want, got = encoder.eval()(**inputs), ib(**inputs)
    assert got.pooler_output is None
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got.last_hidden_state[real], want.last_hidden_state[real], atol=1e-5, rtol=1e-5)


def test_a_class_that_needs_a_pooler_counts_it_as_head(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(BertConfig(**SMALL, max_position_embeddings=40), add_pooling_layer=False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no weights for IBertForMultipleChoice's head \(.*ibert\.pooler\.dense"):
        checkpoint.load(tmp_path, "IBertForMultipleChoice", quant_mode=False)
    mc = checkpoint.load(tmp_path, "IBertForMultipleChoice", quant_mode=False, new_head=True)
    assert mc.ibert.pooler is not None


def test_quiet_loading_restores_transformers_output_and_replays_it_on_failure(transformers_log):
    log = hf_logging.get_logger("transformers.modeling_utils")
    root = hf_logging.get_logger()
    handlers, bars, propagate = list(root.handlers), hf_logging.is_progress_bar_enabled(), root.propagate
    with checkpoint.transformers_quiet():
        log.warning("report of a load that went well")
    with pytest.raises(RuntimeError, match="transformers failed"), checkpoint.transformers_quiet():
        log.warning("report of a load that failed")
        raise RuntimeError("transformers failed: see the report above")
    assert root.handlers == handlers and hf_logging.is_progress_bar_enabled() == bars and root.propagate == propagate
    log.warning("after")
    assert transformers_log.getvalue().splitlines() == ["report of a load that failed", "after"]


def test_pooler_less_bert_compiles_without_pooler_output_bit_exactly(tmp_path):
    from ibert_tvm.compile import CompileOptions
    from ibert_tvm.runner import Runner

    torch.manual_seed(0)
    cfg = BertConfig(**{**SMALL, "vocab_size": VOCAB}, pad_token_id=PAD, max_position_embeddings=MAX_POSITIONS - PAD - 1)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "ckpt")
    build_tokenizer().save(str(tmp_path / "ckpt" / "tokenizer.json"))
    opt = CompileOptions(model=str(tmp_path / "ckpt"), batches=(2,), seq_len=16, out=tmp_path / "art",
                         calib_texts=CALIB_TEXTS, progress=False)
    path, program = compile_capturing(opt)
    assert program.model_class == "IBertModel" and program.pooler is None
    ids, mask = random_inputs(np.random.default_rng(3), 2, 16, pads=[0, 6])
    with Runner(path) as r:
        assert [o.name for o in r.manifest.outputs] == ["last_hidden_state"]
        got = r.run_integer(ids, mask)
    got.pop("scales")
    want = reference.run(program, ids, mask)
    assert list(got) == list(want) == ["last_hidden_state"]
    assert np.array_equal(got["last_hidden_state"], want["last_hidden_state"])
