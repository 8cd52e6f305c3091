"""Every class as an artifact: the runner's outputs (named as transformers) equal the reference's,
and the task helpers (classify, fill_mask, answer, tag, choose, embed) read them correctly: their
labels, probabilities and vectors are recomputed here from the NumPy reference's integers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CALIB_TEXTS, CHOICES, WORDS, compile_capturing, mean_pooled, save_checkpoint

from ibert_tvm import reference, tasks
from ibert_tvm.runner import Runner

SEQ = 16
NEW_KINDS = ("IBertForMaskedLM", "IBertForMultipleChoice", "IBertForTokenClassification", "IBertForQuestionAnswering")
LONG_CONTEXT = " ".join(WORDS[i % len(WORDS)] for i in range(0, 120, 3))  # 40 words: several windows


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64; the tests' own, so that a wrong
    `tasks.softmax` cannot also be the expected value."""
    z = np.exp(np.asarray(logits, np.float64) - np.max(logits, axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="session")
def class_artifacts(tmp_path_factory, artifacts):
    """kind -> (Runner, IntProgram) for the four head classes (compiled here) and the two session ones."""
    from ibert_tvm.compile import CompileOptions

    root = tmp_path_factory.mktemp("classes")
    out = {k: (Runner(a.path), a.program) for k, a in artifacts.items()}
    for kind in NEW_KINDS:
        ckpt = save_checkpoint(root / f"ckpt-{kind}", kind)
        opt = CompileOptions(model=str(ckpt), batch=2, seq_len=SEQ, out=root / f"art-{kind}", calib_texts=CALIB_TEXTS,
                             progress=False, choices=CHOICES if kind == "IBertForMultipleChoice" else None)
        path, program = compile_capturing(opt)
        out[kind] = (Runner(path), program)
    return out


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_runner_outputs_equal_reference(class_artifacts, kind):
    r, program = class_artifacts[kind]
    rows = 3 * (CHOICES if kind == "IBertForMultipleChoice" else 1)  # 3 rows: more than one compiled batch
    ids, mask, _ = r.encode([CALIB_TEXTS[i % len(CALIB_TEXTS)] for i in range(rows)]).values()
    if kind == "IBertForMultipleChoice":
        ids, mask = ids.reshape(3, CHOICES, -1), mask.reshape(3, CHOICES, -1)
    got = r.run_integer(ids, mask)
    want = reference.run(program, ids, mask)
    assert [o.name for o in r.outputs] == program.outputs
    for name in program.outputs:
        assert got[name].shape == want[name].shape and int((got[name] != want[name]).sum()) == 0, name
    assert r.manifest.choices == (CHOICES if kind == "IBertForMultipleChoice" else None)


def test_classify(class_artifacts):
    r, program = class_artifacts["IBertForSequenceClassification"]
    out = tasks.classify(r, CALIB_TEXTS[:3])
    ids, mask, _ = r.encode(CALIB_TEXTS[:3]).values()
    logits = reference.run(program, ids, mask)["logits"] * program.logit_scale
    for res, row, p in zip(out, logits, softmax(logits)):
        assert res["label"] == program.label_names[int(np.argmax(row))]
        assert res["logits"] == pytest.approx(list(row), rel=1e-5)
        assert list(res["probabilities"]) == list(program.label_names)
        assert list(res["probabilities"].values()) == pytest.approx(list(p), rel=1e-5)
        assert res["score"] == pytest.approx(p.max(), rel=1e-5)


def test_fill_mask(class_artifacts):
    r, program = class_artifacts["IBertForMaskedLM"]
    (top,) = tasks.fill_mask(r, "the film was [MASK] and the music was great", top_k=4)
    ids, mask, _ = r.encode("the film was [MASK] and the music was great").values()
    row = reference.run(program, ids, mask)["logits"][0, 3] * program.logit_scale
    best = np.argsort(-row, kind="stable")[:4]
    assert [t["id"] for t in top] == list(best)
    assert [t["token"] for t in top] == [r.tokenizer.id_to_token(int(i)) for i in best]
    assert [t["score"] for t in top] == pytest.approx(list(softmax(row)[best]), rel=1e-5)
    assert len(tasks.fill_mask(r, "[MASK] film [MASK]")) == 2
    with pytest.raises(ValueError, match=r"needs the mask token \[MASK\]"):
        tasks.fill_mask(r, "the film was good")


def _best_span(start: np.ndarray, end: np.ndarray, ctx: list[int], longest: int = 30) -> tuple[float, int, int]:
    best = (-np.inf, 0, 0)
    for i in ctx:
        for j in ctx:
            if i <= j < i + longest and start[i] + end[j] > best[0]:
                best = (start[i] + end[j], i, j)
    return best


def test_answer_short_context_is_the_best_span(class_artifacts):
    r, program = class_artifacts["IBertForQuestionAnswering"]
    question, context = "the plot", "a dull film with the best music"
    got = tasks.answer(r, question, context)
    enc = r.tokenizer.encode(question, context)
    ids, mask, types = r.pack([enc])
    out = reference.run(program, ids, mask, types)
    ctx = [t for t, s in enumerate(enc.sequence_ids) if s == 1]
    score, i, j = _best_span(out["start_logits"][0] * program.logit_scale[0],
                             out["end_logits"][0] * program.logit_scale[1], ctx)
    assert got["windows"] == 1 and (got["start"], got["end"]) == (enc.offsets[i][0], enc.offsets[j][1])
    assert got["answer"] == context[got["start"] : got["end"]] and got["score"] == pytest.approx(score, rel=1e-5)


def test_answer_reads_a_long_context_in_windows(class_artifacts):
    r, _ = class_artifacts["IBertForQuestionAnswering"]
    got = tasks.answer(r, "the plot", LONG_CONTEXT, stride=4)
    assert got["windows"] >= 4
    assert got["answer"] == LONG_CONTEXT[got["start"] : got["end"]] and got["answer"]
    assert got["start"] == 0 or LONG_CONTEXT[got["start"] - 1] == " "  # whole words
    # a long context's best span is at least as good as the best span of its first window alone
    first = " ".join(LONG_CONTEXT.split()[:10])
    assert got["score"] >= tasks.answer(r, "the plot", first)["score"] - 1e-6
    with pytest.raises(ValueError, match="question alone fills"):
        tasks.answer(r, " ".join(["film"] * SEQ), "a plot")


def test_tag_labels_each_word_by_its_first_token(class_artifacts):
    r, program = class_artifacts["IBertForTokenClassification"]
    text = "The film was good but the plot was dull"
    got = tasks.tag(r, text)
    assert [w["word"] for w in got] == text.split()
    ids, mask, _ = r.encode(text).values()
    logits = reference.run(program, ids, mask)["logits"][0] * program.logit_scale
    assert [w["label"] for w in got] == [program.label_names[int(np.argmax(logits[t]))] for t in range(len(got))]
    assert [w["score"] for w in got] == pytest.approx(list(softmax(logits[: len(got)]).max(1)), rel=1e-5)


def test_choose(class_artifacts):
    r, program = class_artifacts["IBertForMultipleChoice"]
    prompt, choices = "the film was", ["good", "a dull plot"]
    got = tasks.choose(r, prompt, choices)
    ids, mask, types = r.pack(r.tokenize([(prompt, c) for c in choices] + [(prompt, choices[0])]))
    logits = reference.run(program, ids[None], mask[None], types[None])["logits"][0, :2] * program.logit_scale[0]
    assert got["choice"] == int(np.argmax(logits)) and got["logits"] == pytest.approx(list(logits), rel=1e-5)
    assert got["probabilities"] == pytest.approx(list(softmax(logits)), rel=1e-5)
    assert got["text"] == choices[got["choice"]]
    with pytest.raises(ValueError, match=f"compiled for at most {CHOICES}"):
        tasks.choose(r, prompt, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="at least one choice"):
        tasks.choose(r, prompt, [])


def test_embed_and_wrong_task(class_artifacts):
    r, program = class_artifacts["IBertModel"]
    e = tasks.embed(r, CALIB_TEXTS[:2])
    ids, mask, _ = r.encode(CALIB_TEXTS[:2]).values()
    hidden = reference.run(program, ids, mask)["last_hidden_state"] * program.hidden_scale
    np.testing.assert_allclose(e, mean_pooled(hidden, mask), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="classify needs an IBertForSequenceClassification artifact.*IBertModel"):
        tasks.classify(r, "the film")
    mc, _ = class_artifacts["IBertForMultipleChoice"]
    with pytest.raises(ValueError, match=f"{CHOICES + 1} choices, the library was compiled for {CHOICES}"):
        mc.run_integer(np.ones((1, CHOICES + 1, 4), np.int32))


@pytest.mark.parametrize("kind, argv, key", [
    ("IBertForSequenceClassification", ["the film"], "label"),
    ("IBertForMaskedLM", ["the [MASK] was good"], "masks"),
    ("IBertForQuestionAnswering", ["--question", "the plot", LONG_CONTEXT], "answer"),
    ("IBertForTokenClassification", ["the film was good"], "words"),
    ("IBertForMultipleChoice", ["--prompt", "the film was", "good", "bad"], "choice"),
    ("IBertModel", ["the film"], "embedding"),
])
def test_cli_run_task(class_artifacts, capsys, kind, argv, key):
    from ibert_tvm.cli import main

    assert main(["run", str(class_artifacts[kind][0].path), *argv, "--json"]) == 0
    (item,) = json.loads(capsys.readouterr().out)
    assert key in item


def test_cli_run_task_errors(class_artifacts, capsys):
    from ibert_tvm.cli import main

    qa = str(class_artifacts["IBertForQuestionAnswering"][0].path)
    assert main(["run", qa, "a context"]) == 2 and "--question" in capsys.readouterr().err
    assert main(["run", qa, "--task", "classify", "a text"]) == 2
    assert "classify needs an IBertForSequenceClassification" in capsys.readouterr().err
