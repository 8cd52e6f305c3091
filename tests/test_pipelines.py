"""transformers' pipeline API over the runner (`ibert_tvm.pipelines`).

Every task's results are recomputed here from the NumPy integer reference; every option and input
form is exercised, and the errors. transformers' own post-processing, run on the integer library's
logits (the FP32 model's forward swapped for ours), must give our results exactly; and beside
transformers' pipelines on the FP32 model of the same weights, ours give results of the same
structure and mostly the same answers (a tiny random model: quantization flips close calls)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CALIB_TEXTS, CHOICES, VOCAB, WORDS, compile_capturing, save_checkpoint

from ibert_tvm import pipelines, reference
from ibert_tvm.manifest import POOLING_MODES, Pooling
from ibert_tvm.pipelines import pipeline
from ibert_tvm.runner import Runner

SEQ = 16
HEADS = ("IBertForMaskedLM", "IBertForMultipleChoice", "IBertForTokenClassification", "IBertForQuestionAnswering")
TAGS = ("O", "B-ENT", "I-ENT")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PIECES = ("##s", "##ed", "##ly", "##ing", "##er")
_rng = random.Random(0)
TEXTS = [" ".join(_rng.choice(WORDS) for _ in range(_rng.randint(3, 10))) for _ in range(60)]  # for agreement
TAGGED = ["the films were boringly good, xx", "we liked the story", "a dull plot with the worst actor"]
LONG_CONTEXT = " ".join(WORDS[i % len(WORDS)] for i in range(0, 120, 3))  # 40 words: several windows


def bert_tokenizer():
    """BERT-style WordPiece over the test vocabulary: [CLS] a [SEP] b [SEP], `##` sub-words, a decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    names = [*SPECIAL, *WORDS, *PIECES]
    names += [f"tok{i}" for i in range(VOCAB - len(names))]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(names)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(SPECIAL))
    assert tok.token_to_id("[PAD]") == 0 and tok.get_vocab_size() == VOCAB
    return tok


def sharpen_attention(checkpoint: Path, factor: float = 10.0) -> None:
    """Scale the encoder's linear weights. At transformers' initial std 0.02 attention is uniform and
    the [CLS] vector that multiple choice reads hardly depends on the choice: FP32 logits of a
    question's choices then differ by ~1e-5, far below int8 resolution, and agreement is chance."""
    from safetensors.numpy import load_file, save_file

    path = checkpoint / "model.safetensors"
    weights = load_file(path)
    for name in weights:
        if name.startswith("ibert.encoder.") and name.endswith(("query.weight", "key.weight", "value.weight",
                                                                 "dense.weight")):
            weights[name] = weights[name] * factor
    save_file(weights, path, metadata={"format": "pt"})


@dataclass
class Head:
    runner: Runner
    program: Any  # IntProgram
    checkpoint: Path


@pytest.fixture(scope="session")
def heads(tmp_path_factory, artifacts) -> dict[str, Head]:
    """kind -> Head: the session's encoder and classifier (word-level tokenizer), and the four other
    classes compiled here with the BERT-style tokenizer (token classification with B-/I- tags)."""
    from ibert_tvm.compile import CompileOptions

    root = tmp_path_factory.mktemp("pipelines")
    out = {k: Head(Runner(a.path), a.program, a.checkpoint) for k, a in artifacts.items()}
    for kind in HEADS:
        ckpt = save_checkpoint(root / f"ckpt-{kind}", kind)
        bert_tokenizer().save(str(ckpt / "tokenizer.json"))
        if kind == "IBertForMultipleChoice":
            sharpen_attention(ckpt)
        if kind == "IBertForTokenClassification":
            config = json.loads((ckpt / "config.json").read_text())
            config["id2label"], config["label2id"] = dict(enumerate(TAGS)), {t: i for i, t in enumerate(TAGS)}
            (ckpt / "config.json").write_text(json.dumps(config))
        opt = CompileOptions(model=str(ckpt), batches=(2,), seq_len=SEQ, out=root / f"art-{kind}",
                             calib_texts=CALIB_TEXTS, progress=False,
                             choices=CHOICES if kind == "IBertForMultipleChoice" else None)
        path, program = compile_capturing(opt)
        out[kind] = Head(Runner(path), program, ckpt)
    assert out["IBertForTokenClassification"].runner.manifest.label_names == list(TAGS)
    return out


def reference_outputs(head: Head, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> dict[str, np.ndarray]:
    """The NumPy reference's integers times the manifest's output scales."""
    ints = reference.run(head.program, ids, mask, types)
    return {o.name: ints[o.name] * np.asarray(o.scale) for o in head.runner.outputs}


def reference_of(head: Head, texts: list[Any]) -> tuple[dict[str, np.ndarray], list[Any]]:
    """Reference outputs of texts (or pairs) and their encodings."""
    encodings = head.runner.tokenize(texts)
    return reference_outputs(head, *head.runner.pack(encodings)), encodings


def probabilities(x: np.ndarray) -> np.ndarray:
    """The tests' own softmax (float64): a wrong `pipelines.softmax` cannot also be the expected value."""
    z = np.exp(np.asarray(x, np.float64) - np.max(x, axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# -- pooling ----------------------------------------------------------------------------------------


def pooled_by_hand(hidden: np.ndarray, mask: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    """sentence-transformers' Pooling modes, written row by row over the real tokens."""
    rows = []
    for h, m in zip(np.asarray(hidden, np.float64), np.asarray(mask)):
        real = h[m.astype(bool)]
        v = {"cls": h[0], "mean": real.mean(0), "max": real.max(0),
             "mean_sqrt_len_tokens": real.sum(0) / np.sqrt(len(real))}[mode]
        rows.append(v / np.linalg.norm(v) if normalize else v)
    return np.array(rows)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_every_mode(mode, normalize):
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(4, 7, 5)).astype(np.float32) - 3  # all negative-ish: max must skip the padding
    mask = np.array([[1] * n + [0] * (7 - n) for n in (7, 1, 4, 2)])
    got = pipelines.pool(hidden, mask, Pooling(mode, normalize))
    np.testing.assert_allclose(got, pooled_by_hand(hidden, mask, mode, normalize), rtol=1e-5, atol=1e-6)
    if mode == "mean" and normalize:  # no pooling recorded: today's mean + unit length
        np.testing.assert_allclose(pipelines.pool(hidden, mask), got)


def test_pool_unknown_mode():
    with pytest.raises(ValueError, match="unknown pooling mode 'sum'"):
        pipelines.pool(np.zeros((1, 2, 3)), np.ones((1, 2)), Pooling("sum", True))


@pytest.mark.parametrize("pooling", [None, *(Pooling(m, n) for m in POOLING_MODES for n in (True, False))],
                         ids=lambda p: "none" if p is None else f"{p.mode}-{p.normalize}")
def test_sentence_embedding_pools_as_the_manifest_says(heads, monkeypatch, pooling):
    head = heads["IBertModel"]
    monkeypatch.setattr(head.runner, "manifest", dataclasses.replace(head.runner.manifest, pooling=pooling))
    texts = CALIB_TEXTS[:4]
    got = pipeline("sentence-embedding", head.runner)(texts)
    want, encodings = reference_of(head, texts)
    mask = head.runner.pack(encodings)[1]
    mode, normalize = ("mean", True) if pooling is None else (pooling.mode, pooling.normalize)
    assert got.shape == (4, head.program.hidden)
    np.testing.assert_allclose(got, pooled_by_hand(want["last_hidden_state"], mask, mode, normalize),
                               rtol=1e-5, atol=1e-6)
    one = pipeline("sentence-embedding", head.runner)(texts[1])
    assert one.shape == (head.program.hidden,)
    np.testing.assert_allclose(one, got[1], rtol=1e-6, atol=1e-7)


# -- feature extraction -----------------------------------------------------------------------------


def test_feature_extraction_is_every_token_vector(heads):
    head = heads["IBertModel"]
    fe = pipeline("feature-extraction", head.runner)
    texts = CALIB_TEXTS[:3]
    got = fe(texts)
    want, encodings = reference_of(head, texts)
    for g, e, w in zip(got, encodings, want["last_hidden_state"]):
        assert isinstance(g, list) and len(g) == 1 and len(g[0]) == len(e.ids)
        assert all(isinstance(v, float) for v in g[0][0]) and len(g[0][0]) == head.program.hidden
        np.testing.assert_allclose(np.array(g[0]), w[: len(e.ids)], rtol=1e-5, atol=1e-6)
    tensors = fe(texts[0], return_tensors=True)
    assert isinstance(tensors, np.ndarray) and tensors.shape == (1, len(encodings[0].ids), head.program.hidden)
    np.testing.assert_array_equal(tensors, np.array(got[0], np.float32))
    with pytest.raises(ValueError, match="longer than the compiled length"):
        fe(" ".join(WORDS))
    assert np.array(fe(" ".join(WORDS), truncation=True)).shape == (1, SEQ, head.program.hidden)


# -- text classification ----------------------------------------------------------------------------


def test_text_classification(heads):
    head = heads["IBertForSequenceClassification"]
    labels = head.runner.manifest.label_names
    tc = pipeline("text-classification", head.runner)
    texts = CALIB_TEXTS[:3]
    want, _ = reference_of(head, texts)
    logits = want["logits"]
    p = probabilities(logits)
    got = tc(texts)  # no top_k: the likeliest label, a dict per text
    assert [g["label"] for g in got] == [labels[i] for i in logits.argmax(1)]
    assert [g["score"] for g in got] == pytest.approx(list(p.max(1)), rel=1e-5)
    assert tc(texts[0]) == [got[0]]  # transformers' quirk: one text still gives a list of one dict
    every = tc(texts, top_k=None)
    for row, probs in zip(every, p):
        order = np.argsort(-probs)
        assert [d["label"] for d in row] == [labels[i] for i in order]
        assert [d["score"] for d in row] == pytest.approx(list(probs[order]), rel=1e-5)
    assert tc(texts, top_k=2) == [row[:2] for row in every]
    assert tc(texts[0], top_k=1) == every[0][:1]
    for function, expect in (("sigmoid", 1 / (1 + np.exp(-logits))), ("softmax", p), ("none", logits),
                             ("default", p)):
        scores = [{d["label"]: d["score"] for d in row} for row in tc(texts, top_k=None, function_to_apply=function)]
        np.testing.assert_allclose([[s[lab] for lab in labels] for s in scores], expect, rtol=1e-5, atol=1e-8)


def test_text_classification_pairs(heads):
    head = heads["IBertForSequenceClassification"]
    tc = pipeline("text-classification", head.runner, top_k=None)
    pair = ("the film", "was good")
    want, _ = reference_of(head, [pair])
    as_tuple, as_dict = tc([pair]), tc({"text": pair[0], "text_pair": pair[1]})
    assert as_tuple == [as_dict]
    scores = {d["label"]: d["score"] for d in as_dict}
    assert [scores[lab] for lab in head.runner.manifest.label_names] == pytest.approx(
        list(probabilities(want["logits"])[0]), rel=1e-5)
    assert tc([{"text": "the film"}]) == tc(["the film"])
    with pytest.raises(TypeError, match="'text_pair': ..."):
        tc({"text": "the film", "pair": "good"})
    with pytest.raises(TypeError, match="ambiguous"):
        tc(pair)


@pytest.mark.parametrize("options, exc, match", [
    ({"function_to_apply": "relu"}, ValueError, "function_to_apply must be one of default, sigmoid"),
    ({"top_k": 0}, ValueError, "top_k must be a whole number of at least 1"),
    ({"topk": 2}, TypeError, "text-classification has no option 'topk'; its options: top_k, function_to_apply"),
])
def test_text_classification_bad_options(heads, options, exc, match):
    with pytest.raises(exc, match=match):
        pipeline("text-classification", heads["IBertForSequenceClassification"].runner)("the film", **options)


# -- token classification ---------------------------------------------------------------------------


def test_token_classification_tags_every_token_of_every_text(heads):
    head = heads["IBertForTokenClassification"]
    tk = pipeline("token-classification", head.runner)
    want, encodings = reference_of(head, TAGGED)
    every = tk(TAGGED, ignore_labels=[])
    assert len(every) == len(TAGGED)
    for text, e, logits, got in zip(TAGGED, encodings, want["logits"], every):
        tokens = [i for i in range(len(e.ids)) if e.tokens[i] not in ("[CLS]", "[SEP]")]
        p = probabilities(logits[: len(e.ids)])
        assert [g["index"] for g in got] == tokens
        assert [g["entity"] for g in got] == [TAGS[int(np.argmax(p[i]))] for i in tokens]
        assert [g["score"] for g in got] == pytest.approx([float(p[i].max()) for i in tokens], rel=1e-5)
        assert [(g["start"], g["end"]) for g in got] == [e.offsets[i] for i in tokens]
        unknown = [text[s:t] for s, t in (e.offsets[i] for i in tokens if e.tokens[i] == "[UNK]")]
        assert [g["word"] for g in got] == [e.tokens[i] if e.tokens[i] != "[UNK]" else unknown.pop(0) for i in tokens]
        assert list(got[0]) == ["entity", "score", "index", "word", "start", "end"]
    default = tk(TAGGED)  # ignore_labels defaults to ["O"]
    assert default == [[g for g in row if g["entity"] != "O"] for row in every]
    assert tk(TAGGED[0], ignore_labels="B-ENT") == [g for g in every[0] if g["entity"] != "B-ENT"]
    assert tk(TAGGED[1]) == default[1]


def test_token_classification_errors(heads):
    tk = pipeline("token-classification", heads["IBertForTokenClassification"].runner)
    with pytest.raises(ValueError, match="aggregation_strategy must be one of none, simple, first, average, max"):
        tk("the film", aggregation_strategy="longest")
    with pytest.raises(TypeError, match="token-classification takes single texts; input 0 is a pair"):
        tk([("the film", "was good")])


# -- fill mask --------------------------------------------------------------------------------------


def test_fill_mask(heads):
    head = heads["IBertForMaskedLM"]
    tok = head.runner.tokenizer
    fm = pipeline("fill-mask", head.runner)
    texts = ["the film was [MASK] and the music was great", "a [MASK] plot"]
    want, encodings = reference_of(head, texts)
    got = fm(texts, top_k=4)
    for text, e, logits, fills in zip(texts, encodings, want["logits"], got):
        at = e.ids.index(tok.token_to_id("[MASK]"))
        p = probabilities(logits[at])
        best = np.argsort(-p, kind="stable")[:4]
        assert [f["token"] for f in fills] == list(best)
        assert [f["score"] for f in fills] == pytest.approx(list(p[best]), rel=1e-5)
        assert [f["token_str"] for f in fills] == [tok.id_to_token(int(i)) for i in best]
        filled = (text.replace("[MASK]", tok.id_to_token(int(i))).split() for i in best)
        assert [f["sequence"] for f in fills] == [" ".join(w for w in f if w not in SPECIAL) for f in filled]
    assert fm(texts[1]) == fm(texts, top_k=5)[1]  # one text: its list; top_k 5 by default
    assert pipeline("fill-mask", head.runner, top_k=2)(texts[1]) == got[1][:2]


def test_fill_mask_several_masks_and_targets(heads):
    head = heads["IBertForMaskedLM"]
    fm = pipeline("fill-mask", head.runner)
    two = fm("[MASK] film was [MASK]", top_k=3)
    assert len(two) == 2 and all(len(m) == 3 for m in two)
    assert two[0][0]["sequence"].startswith("[CLS] ") and "[MASK]" in two[0][0]["sequence"]  # as transformers
    want, encodings = reference_of(head, ["[MASK] film was [MASK]"])
    p = probabilities(want["logits"][0, encodings[0].ids.index(head.runner.tokenizer.token_to_id("[MASK]"))])
    targets = ["good", "bad", "dull"]
    ids = [head.runner.tokenizer.token_to_id(t) for t in targets]
    restricted = fm("the film was [MASK]", targets=targets, top_k=10)  # top_k capped at the targets
    want, encodings = reference_of(head, ["the film was [MASK]"])
    p = probabilities(want["logits"][0, 4])
    order = sorted(ids, key=lambda i: -p[i])
    assert [f["token"] for f in restricted] == order
    assert [f["score"] for f in restricted] == pytest.approx([p[i] for i in order], rel=1e-5)
    assert [f["token"] for f in fm("the film was [MASK]", targets="good")] == [ids[0]]
    # a word outside the vocabulary counts as its first token (as transformers, with a warning)
    assert [f["token"] for f in fm("the film was [MASK]", targets=["goodly"])] == [ids[0]]


def test_fill_mask_errors(heads):
    fm = pipeline("fill-mask", heads["IBertForMaskedLM"].runner)
    with pytest.raises(ValueError, match=r"text 1 has no mask token \[MASK\]: 'the film'"):
        fm(["a [MASK]", "the film"])
    with pytest.raises(ValueError, match="targets names no token"):
        fm("a [MASK]", targets=[""])
    with pytest.raises(ValueError, match="top_k must be"):
        fm("a [MASK]", top_k=-1)


# -- question answering -----------------------------------------------------------------------------


def span_probabilities(start: np.ndarray, end: np.ndarray, enc: Any) -> tuple[dict[int, float], dict[int, float]]:
    """token -> start / end probability: softmax over the context's tokens and [CLS] (token 0)."""
    allowed = [i for i, s in enumerate(enc.sequence_ids) if s == 1 or i == 0]
    return dict(zip(allowed, probabilities(start[allowed]))), dict(zip(allowed, probabilities(end[allowed])))


def best_spans(start: np.ndarray, end: np.ndarray, enc: Any, longest: int = 15) -> list[tuple[float, int, int]]:
    """Every span of the context by brute force, (probability, first token, last token), best first."""
    ps, pe = span_probabilities(start, end, enc)
    ctx = [i for i, s in enumerate(enc.sequence_ids) if s == 1]
    return sorted(((ps[i] * pe[j], i, j) for i in ctx for j in ctx if i <= j < i + longest), key=lambda s: -s[0])


def test_question_answering_short_context(heads):
    head = heads["IBertForQuestionAnswering"]
    qa = pipeline("question-answering", head.runner)
    question, context = "the plot", "a dull film with the best music"
    want, (enc,) = reference_of(head, [(question, context)])
    spans = best_spans(want["start_logits"][0], want["end_logits"][0], enc)
    got = qa(question=question, context=context)
    score, i, j = spans[0]
    assert got == {"score": pytest.approx(score, rel=1e-5), "start": enc.offsets[i][0], "end": enc.offsets[j][1],
                   "answer": context[enc.offsets[i][0] : enc.offsets[j][1]]}
    assert list(got) == ["score", "start", "end", "answer"]
    top = qa(question=question, context=context, top_k=3)
    assert [(a["start"], a["end"]) for a in top] == [(enc.offsets[i][0], enc.offsets[j][1]) for _, i, j in spans[:3]]
    assert [a["score"] for a in top] == pytest.approx([s for s, _, _ in spans[:3]], rel=1e-5)
    short = qa(question=question, context=context, top_k=20, max_answer_len=1)
    assert sorted(a["answer"] for a in short) == sorted(context.split())
    ps, pe = span_probabilities(want["start_logits"][0], want["end_logits"][0], enc)
    with_null = qa(question=question, context=context, top_k=30, handle_impossible_answer=True)
    assert {"score": pytest.approx(ps[0] * pe[0], rel=1e-5), "start": 0, "end": 0, "answer": ""} in with_null
    assert len(with_null) == len(spans) + 1
    assert qa({"question": question, "context": context}) == got == qa([{"question": question, "context": context}])[0]


def test_question_answering_aligns_to_words(heads):
    qa = pipeline("question-answering", heads["IBertForQuestionAnswering"].runner, top_k=40, max_answer_len=1)
    context = "the films moved boringly"  # tokens: the film ##s [UNK] boring ##ly
    words = qa(question="the plot", context=context)  # one-token spans widened to their words, each once
    assert sorted(a["answer"] for a in words) == sorted(context.split())
    pieces = qa(question="the plot", context=context, align_to_words=False)
    assert sorted(a["answer"] for a in pieces) == sorted(["the", "film", "s", "moved", "boring", "ly"])


def test_context_windows_cover_a_long_context_in_whole_words(heads):
    tok = heads["IBertForQuestionAnswering"].runner.tokenizer
    counts = []
    for stride in (0, 4, 8):
        windows = pipelines.context_windows(tok, "the plot", LONG_CONTEXT, SEQ, stride)
        spans = [(lo, lo + max(t for (_, t), s in zip(e.offsets, e.sequence_ids) if s == 1)) for lo, e in windows]
        assert spans[0][0] == 0 and spans[-1][1] == len(LONG_CONTEXT)
        assert all(len(e.ids) <= SEQ for _, e in windows)
        assert all(lo == 0 or LONG_CONTEXT[lo - 1] == " " for lo, _ in spans)  # whole words
        assert all(b_lo <= a_hi + 1 for (_, a_hi), (b_lo, _) in itertools.pairwise(spans))  # no gap
        counts.append(len(windows))
    assert counts[0] >= 4 and counts[0] < counts[1] < counts[2]  # more overlap, more windows
    with pytest.raises(ValueError, match="question alone fills the compiled length 16"):
        pipelines.context_windows(tok, " ".join(["film"] * SEQ), "a plot", SEQ, 4)


def test_question_answering_long_contexts_run_in_one_batch(heads, monkeypatch):
    head = heads["IBertForQuestionAnswering"]
    qa = pipeline("question-answering", head.runner, doc_stride=4)
    calls = []
    real = Runner.run
    monkeypatch.setattr(Runner, "run", lambda self, *a, **k: calls.append(len(a[0])) or real(self, *a, **k))
    got = qa(question=["the plot", "the music"], context=LONG_CONTEXT)
    windows = [pipelines.context_windows(head.runner.tokenizer, q, LONG_CONTEXT, SEQ, 4)
               for q in ("the plot", "the music")]
    assert calls == [sum(map(len, windows))]  # every window of both questions in one call
    for answer, parts in zip(got, windows):
        best = (-1.0, 0, 0)
        for lo, enc in parts:  # the best span of any window, by the reference
            want = reference_outputs(head, *head.runner.pack([enc]))
            score, i, j = best_spans(want["start_logits"][0], want["end_logits"][0], enc)[0]
            best = max(best, (score, lo + enc.offsets[i][0], lo + enc.offsets[j][1]))
        assert (answer["score"], answer["start"], answer["end"]) == (pytest.approx(best[0], rel=1e-5), *best[1:])
        assert answer["answer"] == LONG_CONTEXT[best[1] : best[2]]


@pytest.mark.parametrize("call, exc, match", [
    (lambda qa: qa(question="the plot"), TypeError, "needs both question= and context="),
    (lambda qa: qa({"question": "the plot"}), TypeError, "input 0 must be a dict with keys question and context"),
    (lambda qa: qa({"question": "the plot", "context": " "}), ValueError, "input 0: context must be a non-empty"),
    (lambda qa: qa(question=["a", "b"], context=["c"]), ValueError, "2 questions for 1 contexts"),
    (lambda qa: qa({"question": "a", "context": "b"}, question="a", context="b"), TypeError, "not both"),
    (lambda qa: qa("the plot"), TypeError, "got str"),
    (lambda qa: qa(question="a", context="the film", doc_stride=-1), ValueError, "doc_stride must be"),
    (lambda qa: qa(question="a", context="the film", max_answer_len=0), ValueError, "max_answer_len must be"),
])
def test_question_answering_errors(heads, call, exc, match):
    with pytest.raises(exc, match=match):
        call(pipeline("question-answering", heads["IBertForQuestionAnswering"].runner))


# -- multiple choice --------------------------------------------------------------------------------


def test_multiple_choice(heads):
    head = heads["IBertForMultipleChoice"]
    mc = pipeline("multiple-choice", head.runner)
    prompt, choices = "the film was", ["good", "a dull plot"]
    got = mc({"prompt": prompt, "choices": choices})
    ids, mask, types = head.runner.pack(head.runner.tokenize([(prompt, c) for c in [*choices, choices[0]]]))
    p = probabilities(reference_outputs(head, ids[None], mask[None], types[None])["logits"][0, :2])
    best = int(p.argmax())
    assert got == {"choice": best, "text": choices[best], "scores": pytest.approx(list(p), rel=1e-5)}
    many = mc([{"question": prompt, "choices": choices}, {"prompt": "a plot", "choices": ["good", "bad", "dull"]}])
    assert many[0] == got and len(many[1]["scores"]) == CHOICES and sum(many[1]["scores"]) == pytest.approx(1)


@pytest.mark.parametrize("inputs, exc, match", [
    ({"prompt": "a", "choices": ["b", "c", "d", "e"]}, ValueError,
     f"4 choices; the library was compiled for at most {CHOICES}"),
    ({"prompt": "a", "choices": []}, ValueError, "choices must be a non-empty list"),
    ({"prompt": "a", "choices": "bc"}, ValueError, "choices must be a non-empty list"),
    ({"prompt": "a", "question": "b", "choices": ["c"]}, TypeError, "keys prompt \\(or question\\) and choices"),
    ("a prompt", TypeError, "got str"),
])
def test_multiple_choice_errors(heads, inputs, exc, match):
    with pytest.raises(exc, match=match):
        pipeline("multiple-choice", heads["IBertForMultipleChoice"].runner)(inputs)


# -- pipeline() -------------------------------------------------------------------------------------


def test_pipeline_from_a_path_or_a_runner(heads, monkeypatch):
    import ibert_tvm

    assert ibert_tvm.pipeline is pipeline
    head = heads["IBertForMaskedLM"]
    with pipeline("fill-mask", head.runner.path, top_k=2, threads=1) as fm:
        assert fm.runner is not head.runner and fm.runner.threads == 1
        assert len(fm("a [MASK]")) == 2 and len(fm("a [MASK]", top_k=3)) == 3  # a call's option wins
    with pytest.raises(RuntimeError, match="closed"):
        fm("a [MASK]")  # it opened its Runner, and closed it
    with pipeline("fill-mask", head.runner) as fm:
        assert fm.runner is head.runner
    assert len(fm("a [MASK]")) == 5  # a Runner passed in stays open
    assert pipeline("sentiment-analysis", heads["IBertForSequenceClassification"].runner).task == "text-classification"
    assert pipeline("ner", heads["IBertForTokenClassification"].runner).task == "token-classification"
    closed = []
    monkeypatch.setattr(Runner, "close", lambda self: closed.append(self.path))
    with pytest.raises(ValueError, match="question-answering needs an IBertForQuestionAnswering artifact; .* holds "
                                         "IBertForMaskedLM \\(its task is fill-mask\\)"):
        pipeline("question-answering", head.runner.path)
    assert closed == [head.runner.path]  # the Runner it opened for nothing


@pytest.mark.parametrize("call, exc, match", [
    (lambda r: pipeline("summarization", r), ValueError, "unknown task 'summarization'; one of feature-extraction"),
    (lambda r: pipeline("fill-mask", r, threads=2), TypeError, "threads configure a new Runner"),
    (lambda r: pipeline("fill-mask", r, top_n=2), TypeError, "fill-mask has no option 'top_n'"),
    (lambda r: pipeline("fill-mask", r)("a [MASK]", aggregation_strategy="simple"), TypeError, "no option"),
    (lambda r: pipeline("sentence-embedding", r), ValueError, "sentence-embedding needs an IBertModel artifact"),
    (lambda r: pipeline("fill-mask", r)([("a [MASK]", "b")]), TypeError, "input 0 is a pair"),
    (lambda r: pipeline("fill-mask", r)({"text": "a [MASK]"}), TypeError, "fill-mask takes a text or a list"),
])
def test_pipeline_errors(heads, call, exc, match):
    with pytest.raises(exc, match=match):
        call(heads["IBertForMaskedLM"].runner)


# -- command line -----------------------------------------------------------------------------------


def plain(x: Any) -> Any:
    """A result as JSON has it."""
    return json.loads(json.dumps(x, default=np.ndarray.tolist))


CLI_CASES = [  # kind, argv after the artifact, the same through the pipeline
    ("IBertModel", ["the film", "a plot"], lambda r: pipeline("sentence-embedding", r)(["the film", "a plot"])),
    ("IBertModel", ["--task", "feature-extraction", "the film"],
     lambda r: pipeline("feature-extraction", r)(["the film"])),
    ("IBertForSequenceClassification", ["the film", "a plot", "--top-k", "2", "--function-to-apply", "sigmoid"],
     lambda r: pipeline("text-classification", r)(["the film", "a plot"], top_k=2, function_to_apply="sigmoid")),
    ("IBertForTokenClassification", ["the films were good", "--aggregation-strategy", "first", "--ignore-labels"],
     lambda r: pipeline("token-classification", r)(["the films were good"], aggregation_strategy="first",
                                                   ignore_labels=[])),
    ("IBertForMaskedLM", ["the [MASK] was good", "--top-k", "3", "--targets", "film", "plot"],
     lambda r: pipeline("fill-mask", r)(["the [MASK] was good"], top_k=3, targets=["film", "plot"])),
    ("IBertForQuestionAnswering", ["--question", "the plot", LONG_CONTEXT, "a dull film", "--doc-stride", "4",
                                   "--max-answer-len", "3", "--top-k", "2", "--handle-impossible-answer"],
     lambda r: pipeline("question-answering", r, doc_stride=4, max_answer_len=3, top_k=2,
                        handle_impossible_answer=True)(question="the plot", context=[LONG_CONTEXT, "a dull film"])),
    ("IBertForMultipleChoice", ["--prompt", "the film was", "good", "bad", "--truncate"],
     lambda r: pipeline("multiple-choice", r)([{"prompt": "the film was", "choices": ["good", "bad"]}],
                                              truncation=True)),
]


@pytest.mark.parametrize("kind, argv, same", CLI_CASES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(CLI_CASES)])
def test_cli_run_is_the_pipeline(heads, capsys, kind, argv, same):
    from ibert_tvm.cli import main

    path = str(heads[kind].runner.path)
    assert main(["run", path, *argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [item["output"] for item in got] == plain(same(heads[kind].runner))
    assert main(["run", path, *argv]) == 0  # the terminal's form: one line per input
    assert len(capsys.readouterr().out.splitlines()) == len(got)


@pytest.mark.parametrize("kind, argv, match", [
    ("IBertForSequenceClassification", ["the film", "--max-answer-len", "3"],
     "--max-answer-len does not apply to text-classification"),
    ("IBertForSequenceClassification", ["the film", "--question", "why"], "--question is for question-answering"),
    ("IBertForQuestionAnswering", ["a context"], "question-answering needs --question"),
    ("IBertForMultipleChoice", ["good", "bad"], "multiple-choice needs --prompt"),
    ("IBertForQuestionAnswering", ["--question", "why", "a plot", "--truncate"],
     "--truncate does not apply to question-answering"),
    ("IBertForSequenceClassification", ["--task", "fill-mask", "the film"],
     "fill-mask needs an IBertForMaskedLM artifact; .* holds IBertForSequenceClassification"),
])
def test_cli_run_errors(heads, capsys, kind, argv, match):
    from ibert_tvm.cli import main

    assert main(["run", str(heads[kind].runner.path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ibert-tvm: error:") and re.search(match, err), err


# -- transformers ----------------------------------------------------------------------------------


def transformers_pipeline(task: str, head: Head, integer: bool) -> Any:
    """transformers' own pipeline on the FP32 model of the artifact's checkpoint (quant_mode=False, the
    same weights) and the artifact's tokenizer; `integer`: the model's outputs replaced by the
    integer library's for the same inputs, so that only transformers' post-processing remains."""
    import torch
    from transformers import PreTrainedTokenizerFast
    from transformers import pipeline as hf_pipeline

    from ibert_tvm.evaluation.fp32 import fp32_model

    model = fp32_model(str(head.checkpoint), head.runner.model_class)
    names = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
    specials = {n: t for n, t in zip(names, SPECIAL) if head.runner.tokenizer.token_to_id(t) is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(head.checkpoint / "tokenizer.json"), **specials,
                                        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    if integer:
        fp32_forward = model.forward

        def forward(input_ids, attention_mask=None, token_type_ids=None, **kwargs):
            out = fp32_forward(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                               **kwargs)
            ours = head.runner.run(*(None if t is None else t.numpy() for t in (input_ids, attention_mask,
                                                                                  token_type_ids)))
            for name, value in ours.items():
                out[name] = torch.from_numpy(value)
            return out

        model.forward = forward
    return hf_pipeline(task, model=model, tokenizer=tokenizer)


def assert_same(ours: Any, theirs: Any, where: str = "") -> None:
    """Equal results: the same keys in the same order, lengths, strings and ints; floats to 1e-5."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and list(ours) == list(theirs), where
        for k in theirs:
            assert_same(ours[k], theirs[k], f"{where}.{k}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(theirs, float | np.floating):
        assert isinstance(ours, float) and ours == pytest.approx(float(theirs), rel=1e-5, abs=1e-7), where
    else:
        assert type(ours) is type(theirs) and ours == theirs, where


def structure(x: Any) -> Any:
    """A result's shape: dict keys in order, value kinds (numpy scalars as Python's), element kinds of lists."""
    if isinstance(x, dict):
        return [[k, structure(v)] for k, v in x.items()]
    if isinstance(x, list):
        return ["list of", sorted({json.dumps(structure(v)) for v in x})]
    if isinstance(x, bool | str) or x is None:
        return type(x).__name__
    if isinstance(x, float | np.floating):
        return "float"
    return "int" if isinstance(x, int | np.integer) else repr(type(x))


MASKED = [t.replace(t.split()[1], "[MASK]", 1) for t in TEXTS if len(t.split()) > 2]


@pytest.mark.parametrize("kind, task, inputs, options", [
    ("IBertModel", "feature-extraction", CALIB_TEXTS, {}),
    ("IBertForSequenceClassification", "text-classification", TEXTS[:20], {}),
    ("IBertForSequenceClassification", "text-classification", CALIB_TEXTS[0], {}),
    ("IBertForSequenceClassification", "text-classification", TEXTS[:20], {"top_k": None}),
    ("IBertForSequenceClassification", "text-classification", CALIB_TEXTS[0], {"top_k": 2}),
    ("IBertForSequenceClassification", "text-classification", TEXTS[:20], {"function_to_apply": "sigmoid", "top_k": 3}),
    ("IBertForSequenceClassification", "text-classification", {"text": "the film", "text_pair": "was good"}, {}),
    *(("IBertForTokenClassification", "token-classification", [*TAGGED, *TEXTS[:20]],
       {"aggregation_strategy": s, "ignore_labels": []}) for s in pipelines.AGGREGATIONS),
    ("IBertForTokenClassification", "token-classification", TAGGED[0], {"aggregation_strategy": "simple"}),
    ("IBertForMaskedLM", "fill-mask", MASKED[:20], {}),
    ("IBertForMaskedLM", "fill-mask", "[MASK] film was [MASK]", {"top_k": 3}),
    ("IBertForMaskedLM", "fill-mask", MASKED[:5], {"targets": ["good", "bad", "the"]}),
], ids=lambda v: v if isinstance(v, str) and "-" in v else None)
def test_transformers_post_processing_of_our_logits_gives_our_results(heads, kind, task, inputs, options):
    """transformers' pipeline, its model's outputs swapped for the integer library's: the same results."""
    theirs = transformers_pipeline(task, heads[kind], integer=True)(inputs, **options)
    assert_same(pipeline(task, heads[kind].runner)(inputs, **options), theirs)


def test_transformers_span_decoding_of_our_logits_gives_our_answers(heads):
    """transformers 5 dropped the question-answering pipeline; its span decoder (v4's, kept for
    document QA) on the integer library's logits picks our answers with our scores."""
    from transformers.pipelines.document_question_answering import select_starts_ends

    head = heads["IBertForQuestionAnswering"]
    qa = pipeline("question-answering", head.runner)
    for context in ("a dull film with the best music", "the films moved boringly", "we liked the story"):
        want, (enc,) = reference_of(head, [("the plot", context)])
        n = len(enc.ids)
        p_mask = np.array([[s != 1 and i != 0 for i, s in enumerate(enc.sequence_ids)]], np.int64)  # [CLS] kept
        starts, ends, scores, null = select_starts_ends(
            want["start_logits"][:, :n], want["end_logits"][:, :n], p_mask, np.ones((1, n), np.int64), top_k=10,
            handle_impossible_answer=True, max_answer_len=15)
        words = [(enc.word_to_chars(enc.token_to_word(s), 1)[0], enc.word_to_chars(enc.token_to_word(e), 1)[1])
                 for s, e in zip(starts, ends)]
        theirs = sorted([{"score": float(v), "start": a, "end": b, "answer": context[a:b]}
                         for v, (a, b) in zip(scores, words)] + [{"score": null, "start": 0, "end": 0, "answer": ""}],
                        key=lambda x: -x["score"])
        unique, seen = [], set()  # sub-word spans widened to the same words: ours lists each span once
        for t in theirs:
            if (t["start"], t["end"]) not in seen:
                seen.add((t["start"], t["end"]))
                unique.append(t)
        assert_same(qa(question="the plot", context=context, top_k=5, handle_impossible_answer=True), unique[:5])


def agreement(pairs: list[tuple[Any, Any]]) -> float:
    return float(np.mean([a == b for a, b in pairs]))


def test_beside_transformers_on_fp32(heads):
    """transformers' pipelines on the FP32 model of the same weights: results of identical structure
    (and lengths where the tokens decide them), and mostly the same answers."""
    report = {}

    def both(task: str, kind: str, inputs: Any, **options: Any) -> tuple[Any, Any]:
        ours = pipeline(task, heads[kind].runner)(inputs, **options)
        theirs = transformers_pipeline(task, heads[kind], integer=False)(inputs, **options)
        assert structure(ours) == structure(theirs), task
        return ours, theirs

    ours, theirs = both("feature-extraction", "IBertModel", TEXTS)
    assert [np.shape(o) for o in ours] == [np.shape(t) for t in theirs]
    a, b = (np.concatenate([np.array(x[0]) for x in xs]) for xs in (ours, theirs))
    report["feature-extraction token cosine"] = cos = float(np.mean(
        (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
    assert cos > 0.99

    ours, theirs = both("text-classification", "IBertForSequenceClassification", TEXTS)
    report["text-classification label"] = agree = agreement([(o["label"], t["label"]) for o, t in zip(ours, theirs)])
    assert agree >= 0.8
    both("text-classification", "IBertForSequenceClassification", TEXTS[:5], top_k=None)

    ours, theirs = both("token-classification", "IBertForTokenClassification", TEXTS, ignore_labels=[])
    assert [len(o) for o in ours] == [len(t) for t in theirs]
    report["token-classification entity"] = agree = agreement(
        [(o["entity"], t["entity"]) for os_, ts in zip(ours, theirs) for o, t in zip(os_, ts)])
    assert agree >= 0.9
    both("token-classification", "IBertForTokenClassification", TEXTS, aggregation_strategy="simple")

    ours, theirs = both("fill-mask", "IBertForMaskedLM", MASKED)
    report["fill-mask top-1 token"] = agree = agreement([(o[0]["token"], t[0]["token"]) for o, t in zip(ours, theirs)])
    assert agree >= 0.9

    import torch

    from ibert_tvm.evaluation.fp32 import fp32_model

    head = heads["IBertForQuestionAnswering"]  # no transformers pipeline: its FP32 logits, decoded as ours are
    model = fp32_model(str(head.checkpoint), head.runner.model_class)
    agree = []
    for text in TEXTS[:30]:
        ours = pipeline("question-answering", head.runner)(question="the plot", context=text)
        enc = head.runner.tokenize([("the plot", text)])[0]
        with torch.no_grad():
            encoded = head.runner.encode([("the plot", text)])
            out = model(**{k: torch.tensor(v, dtype=torch.long) for k, v in encoded.items()})
        _, i, j = best_spans(out.start_logits[0].numpy(), out.end_logits[0].numpy(), enc)[0]
        assert structure(ours) == [["score", "float"], ["start", "int"], ["end", "int"], ["answer", "str"]]
        words = enc.word_to_chars(enc.token_to_word(i), 1)[0], enc.word_to_chars(enc.token_to_word(j), 1)[1]
        agree.append((ours["start"], ours["end"]) == words)
    report["question-answering span"] = float(np.mean(agree))
    assert report["question-answering span"] >= 0.7

    head = heads["IBertForMultipleChoice"]
    model = fp32_model(str(head.checkpoint), head.runner.model_class)
    agree = []
    for i in range(20):
        prompt, *choices = (" ".join(t.split()[:4]) for t in TEXTS[i :: 20][: 1 + CHOICES])  # short: pairs fit
        ours = pipeline("multiple-choice", head.runner)({"prompt": prompt, "choices": choices})
        enc = head.runner.encode([(prompt, c) for c in choices])
        with torch.no_grad():
            logits = model(**{k: torch.tensor(v[None], dtype=torch.long) for k, v in enc.items()}).logits[0]
        agree.append(ours["choice"] == int(logits.argmax()))
    report["multiple-choice choice"] = float(np.mean(agree))
    assert report["multiple-choice choice"] >= 0.8
    print("agreement with transformers on FP32:", json.dumps(report, indent=1))
