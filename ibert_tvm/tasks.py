"""Task helpers over `Runner`, in the spirit of transformers pipelines but without torch.

Each helper checks that the artifact holds the class its task needs, tokenizes with the artifact's
tokenizer, runs the integer library and turns its logits into the answer a user wants: a label,
tokens, a span of the context with character offsets, per-word tags, a choice, a vector.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .model_classes import REGISTRY, TASKS
from .runner import Runner

MASK_TOKENS = ("[MASK]", "<mask>")


def task_of(r: Runner) -> str:
    """The task an artifact's model class serves."""
    return REGISTRY[r.model_class].task


def _need(r: Runner, task: str) -> None:
    if r.model_class != TASKS[task]:
        raise ValueError(f"{task} needs an {TASKS[task]} artifact; {r.path} holds {r.model_class} "
                         f"(its task is {task_of(r)})")


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _labels(r: Runner) -> list[str]:
    return list(r.manifest.label_names)


def classify(r: Runner, texts: list[str] | str, truncate: bool = False) -> list[dict[str, Any]]:
    """Per text: the most likely label, its probability, and every label's probability."""
    _need(r, "classify")
    labels, out = _labels(r), []
    for _, result in r.chunks(texts, truncate):
        logits = result["logits"].astype(np.float64)
        out += [{"label": labels[int(p.argmax())], "score": float(p.max()),
                 "probabilities": dict(zip(labels, map(float, p))), "logits": [float(v) for v in row]}
                for p, row in zip(softmax(logits), logits)]
    return out


def fill_mask(r: Runner, text: str, top_k: int = 5) -> list[list[dict[str, Any]]]:
    """For each mask token in `text`, the `top_k` likeliest tokens (token, id, probability)."""
    _need(r, "fill-mask")
    tok = r.tokenizer
    mask_ids = [i for i in (tok.token_to_id(t) for t in MASK_TOKENS) if i is not None]
    if not mask_ids:
        raise ValueError(f"{r.path}: the tokenizer has no mask token ({' or '.join(MASK_TOKENS)})")
    enc = r.tokenize(text)
    ids, mask, types = r.pack(enc)
    where = np.flatnonzero(np.isin(ids[0], mask_ids))
    if where.size == 0:
        raise ValueError(f"fill_mask needs the mask token {tok.id_to_token(mask_ids[0])} in the text: {text!r}")
    probs = softmax(r.run(ids, mask, types)["logits"][0, where].astype(np.float64))
    out = []
    for p in probs:
        best = np.argsort(-p)[:top_k]
        out.append([{"token": tok.id_to_token(int(i)), "id": int(i), "score": float(p[i])} for i in best])
    return out


def answer(r: Runner, question: str, context: str, stride: int = 32, max_answer_tokens: int = 30) -> dict[str, Any]:
    """The likeliest span of `context` (text and character offsets). A context longer than the
    compiled length is read in overlapping windows of whole words, `stride` tokens of overlap."""
    _need(r, "answer")
    tok = r.tokenizer
    budget = r.seq_len - len(tok.encode(question, "").ids)  # what the question and special tokens leave
    if budget < 1:
        raise ValueError(f"the question alone fills the compiled length {r.seq_len}")
    ctx = tok.encode(context, add_special_tokens=False)
    if not ctx.ids:
        raise ValueError("the context is empty")
    starts = [i for i, w in enumerate(ctx.word_ids) if i == 0 or w != ctx.word_ids[i - 1]]
    n, windows, a = len(ctx.ids), [], 0
    while True:
        b = n if a + budget >= n else max(s for s in starts if s <= a + budget)
        while True:  # the window, re-tokenized after the question, must still fit
            if b == a:
                raise ValueError(f"a word of the context does not fit the compiled length {r.seq_len} with the question")
            lo, hi = ctx.offsets[a][0], ctx.offsets[b - 1][1]
            enc = tok.encode(question, context[lo:hi])
            if len(enc.ids) <= r.seq_len:
                break
            b = max((s for s in starts if s < b), default=a)
        windows.append((lo, enc))
        if b == n:
            break
        nxt = max(s for s in starts if s <= max(b - stride, 0))
        a = nxt if nxt > a else b
    ids, mask, types = r.pack([e for _, e in windows])
    out = r.run(ids, mask, types)
    best = (-np.inf, 0, 0)
    for w, (lo, enc) in enumerate(windows):
        in_ctx = np.array([s == 1 for s in enc.sequence_ids] + [False] * (ids.shape[1] - len(enc.ids)))
        s_log = np.where(in_ctx, out["start_logits"][w], -np.inf)
        e_log = np.where(in_ctx, out["end_logits"][w], -np.inf)
        span = s_log[:, None] + e_log[None, :]
        i, j = np.indices(span.shape)
        span[(j < i) | (j >= i + max_answer_tokens)] = -np.inf
        si, ej = np.unravel_index(int(np.argmax(span)), span.shape)
        if span[si, ej] > best[0]:
            best = (float(span[si, ej]), lo + enc.offsets[si][0], lo + enc.offsets[ej][1])
    score, start, end = best
    return {"answer": context[start:end], "start": start, "end": end, "score": score, "windows": len(windows)}


def tag(r: Runner, text: str, truncate: bool = False) -> list[dict[str, Any]]:
    """A label per word (from its first sub-token), with the word's character offsets."""
    _need(r, "tag")
    enc = r.tokenize(text, truncate)[0]
    ids, mask, types = r.pack([enc])
    probs = softmax(r.run(ids, mask, types)["logits"][0].astype(np.float64))
    labels, words = _labels(r), {}
    for t, w in enumerate(enc.word_ids):
        if w is None:
            continue
        if w not in words:
            words[w] = {"start": enc.offsets[t][0], "token": t}
        words[w]["end"] = enc.offsets[t][1]
    out = []
    for w in words.values():
        p = probs[w["token"]]
        out.append({"word": text[w["start"] : w["end"]], "start": w["start"], "end": w["end"],
                    "label": labels[int(p.argmax())], "score": float(p.max())})
    return out


def choose(r: Runner, prompt: str, choices: list[str], truncate: bool = False) -> dict[str, Any]:
    """Which of `choices` best continues / answers `prompt`: its index and every choice's probability."""
    _need(r, "choose")
    if not choices:
        raise ValueError("choose needs at least one choice")
    if len(choices) > r.choices:
        raise ValueError(f"{len(choices)} choices given; the library was compiled for at most {r.choices} "
                         "(compile --choices N)")
    encs = r.tokenize([(prompt, c) for c in choices], truncate)
    # unused choice slots repeat the first choice; their scores are dropped
    ids, mask, types = r.pack(encs + encs[:1] * (r.choices - len(choices)))
    logits = r.run(ids[None], mask[None], types[None])["logits"][0, : len(choices)].astype(np.float64)
    p = softmax(logits)
    return {"choice": int(p.argmax()), "text": choices[int(p.argmax())], "probabilities": [float(v) for v in p],
            "logits": [float(v) for v in logits]}


def embed(r: Runner, texts: list[str] | str, truncate: bool = False) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence vectors (sentence-transformers' pooling)."""
    _need(r, "embed")
    return r.embed(texts, truncate)
