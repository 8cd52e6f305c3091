"""transformers' `pipeline` API over a compiled artifact: `pipeline(task, artifact, **options)`.

Task names, inputs, options and results are transformers' (v5's feature-extraction,
text-classification, token-classification and fill-mask; v4's question-answering, which v5
removed), so code written against `transformers.pipeline` runs on the integer library by changing
the import. Two tasks transformers lacks: `sentence-embedding` (one vector per text, pooled as the
artifact's sentence-transformers model pools) and `multiple-choice` (see `MultipleChoicePipeline`).

Options go to `pipeline(...)` (defaults for every call) or to a call (for that call). Inputs are
tokenized with the artifact's tokenizer and run CHUNK rows at a time. Runtime only: numpy and
tokenizers, no torch.
"""

from __future__ import annotations

import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

from .manifest import POOLING_MODES, Pooling
from .model_classes import REGISTRY, TASKS
from .runner import Runner, check_texts

CHUNK = 64  # rows tokenized and run at a time: peak memory follows the chunk, not the input

log = logging.getLogger(__name__)

MASK_TOKENS = ("[MASK]", "<mask>")
RUNNER_OPTIONS = ("threads", "rpc", "rpc_timeout", "verify_key")  # given with a path, they make its Runner
ALIASES = {"sentiment-analysis": "text-classification", "ner": "token-classification"}  # transformers' too
AGGREGATIONS = ("none", "simple", "first", "average", "max")
FUNCTIONS = ("default", "sigmoid", "softmax", "none")


class _Unset:
    """text-classification's top_k when not given: transformers then returns a dict per text."""

    def __repr__(self) -> str:
        return "unset"


UNSET = _Unset()


def task_of(r: Runner) -> str:
    """The task an artifact's model class serves."""
    return REGISTRY[r.model_class].task


def softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, in float64; -inf entries get probability 0."""
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: Pooling | None = None) -> np.ndarray:
    """Sentence vectors [n, hidden] from token vectors [n, seq, hidden] and the attention mask
    [n, seq], as sentence-transformers' Pooling (and Normalize) modules compute them. `pooling`
    None: mean over the real tokens, then unit length."""
    mode, normalize = ("mean", True) if pooling is None else (pooling.mode, pooling.normalize)
    hidden = np.asarray(hidden)
    m = np.asarray(mask)[..., None].astype(hidden.dtype)
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "max":  # padding can never be the largest
        pooled = np.where(m > 0, hidden, -1e9).max(1)
    elif mode == "mean":
        pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    elif mode == "mean_sqrt_len_tokens":
        pooled = (hidden * m).sum(1) / np.sqrt(m.sum(1))
    else:
        raise ValueError(f"unknown pooling mode {mode!r}; one of {', '.join(POOLING_MODES)}")
    if normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled


def _rows(r: Runner, encodings: list[Any], per_row: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Each row's float outputs, the encodings run CHUNK rows at a time (peak memory follows the
    chunk, not the input); `per_row` consecutive encodings make one row (multiple choice)."""
    step = CHUNK * per_row
    for start in range(0, len(encodings), step):
        ids, mask, types = r.pack(encodings[start : start + step])
        if per_row > 1:
            ids, mask, types = (a.reshape(-1, per_row, a.shape[-1]) for a in (ids, mask, types))
        out = r.run(ids, mask, types)
        for i in range(len(ids)):
            yield {name: value[i] for name, value in out.items()}


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value.lower()


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of at least 1; got {value!r}")
    return value


class Pipeline(ABC):
    """A task over a Runner. Call it on one input for one result, on a list for a list of results;
    options given to the call override those given to `pipeline()`."""

    task: ClassVar[str]
    serves: ClassVar[str | None] = None  # the registry task whose model class this one runs (default: task)
    pairs: ClassVar[bool] = True  # whether an input may be a (text, text) pair

    def __init__(self, runner: Runner, *, owns_runner: bool = False, **options: Any):
        needed = TASKS[self.serves or self.task]
        if runner.model_class != needed:
            raise ValueError(f"{self.task} needs an {needed} artifact; {runner.path} holds {runner.model_class} "
                             f"(its task is {task_of(runner)})")
        self.runner = runner
        self.options = self._checked(options)
        self._owns_runner = owns_runner

    @classmethod
    def option_names(cls) -> list[str]:
        """The options this task takes: the keyword parameters of its `_run` (their defaults are the defaults)."""
        return [p for p in inspect.signature(cls._run).parameters if p not in ("self", "items")]

    @classmethod
    def option_default(cls, name: str) -> Any:
        return inspect.signature(cls._run).parameters[name].default

    def _checked(self, options: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise TypeError(f"{self.task} has no option {unknown[0]!r}; its options: {', '.join(self.option_names())}")
        return options

    def __call__(self, inputs: Any, **options: Any) -> Any:
        items, single = self._items(inputs)
        results = self._run(items, **{**self.options, **self._checked(options)})
        return results[0] if single else results

    def _items(self, inputs: Any) -> tuple[list[Any], bool]:
        """Texts, or (text, text) pairs where the task takes them; one string is one input."""
        if isinstance(inputs, dict):
            raise TypeError(f"{self.task} takes a text or a list of texts, not a dict")
        items = check_texts(inputs)
        pairs = [i for i, t in enumerate(items) if not isinstance(t, str)]
        if pairs and not self.pairs:
            raise TypeError(f"{self.task} takes single texts; input {pairs[0]} is a pair")
        return items, isinstance(inputs, str)

    @abstractmethod
    def _run(self, items: list[Any]) -> list[Any]:
        """One result per item; the keyword parameters of an implementation are its task's options."""

    def close(self) -> None:
        """Close the Runner if `pipeline()` opened it from a path (a Runner passed in stays open)."""
        if self._owns_runner:
            self.runner.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FeatureExtractionPipeline(Pipeline):
    """Per text, every token's vector (`last_hidden_state`, special tokens included), as
    transformers returns them: nested lists [1][tokens][hidden], or numpy arrays of that shape
    with `return_tensors=True`."""

    task = "feature-extraction"

    def _run(self, items: list[Any], truncation: bool = False, return_tensors: bool = False) -> list[Any]:
        encodings = self.runner.tokenize(items, truncation)
        rows = _rows(self.runner, encodings)
        vectors = (row["last_hidden_state"][None, : len(e.ids)] for e, row in zip(encodings, rows))
        return [v.copy() if return_tensors else v.tolist() for v in vectors]  # a copy frees the chunk's array


class SentenceEmbeddingPipeline(Pipeline):
    """One vector per text, pooled as the artifact's `manifest.pooling` says (a sentence-transformers
    model's Pooling and Normalize; mean over the real tokens and unit length when it has none).
    A list of texts gives an array [texts, hidden] (as sentence-transformers' `encode`), one text a
    vector [hidden]."""

    task = "sentence-embedding"
    serves = "feature-extraction"

    def __call__(self, inputs: Any, **options: Any) -> np.ndarray:
        result = super().__call__(inputs, **options)
        return result if isinstance(inputs, str) else np.stack(result)

    def _run(self, items: list[Any], truncation: bool = False) -> list[np.ndarray]:
        encodings = self.runner.tokenize(items, truncation)
        pooling = self.runner.manifest.pooling
        return [pool(row["last_hidden_state"][None, : len(e.ids)], np.ones((1, len(e.ids)), np.int32), pooling)[0]
                for e, row in zip(encodings, _rows(self.runner, encodings))]


class TextClassificationPipeline(Pipeline):
    """Labels of texts or text pairs (`(text, pair)` or `{"text": ..., "text_pair": ...}`).

    `top_k` not given: per text {"label", "score"} of the likeliest label (and, as transformers
    does, a list of that one dict for a single text); an int: the k likeliest as a list; None:
    every label, likeliest first. `function_to_apply`: default (sigmoid for a one-label model,
    softmax otherwise; the manifest does not record transformers' `problem_type`, so a
    multi-label model asks for sigmoid itself), sigmoid, softmax or none (the logits)."""

    task = "text-classification"

    def __call__(self, inputs: Any, **options: Any) -> Any:
        result = super().__call__(inputs, **options)
        legacy = "top_k" not in {**self.options, **options}
        return [result] if legacy and isinstance(inputs, str) else result

    def _items(self, inputs: Any) -> tuple[list[Any], bool]:
        single = isinstance(inputs, dict)
        given = [inputs] if single else inputs
        if isinstance(given, list):
            given = [_pair(t, i) if isinstance(t, dict) else t for i, t in enumerate(given)]
        return check_texts(given), single or isinstance(inputs, str)

    def _run(self, items: list[Any], top_k: int | None | _Unset = UNSET, function_to_apply: str = "default",
             truncation: bool = False) -> list[Any]:
        if top_k is not None and top_k is not UNSET:
            _positive("top_k", top_k)
        function = _choice("function_to_apply", function_to_apply, FUNCTIONS)
        labels = self.runner.manifest.label_names
        if function == "default":
            function = "sigmoid" if len(labels) == 1 else "softmax"
        apply = {"sigmoid": lambda x: 1 / (1 + np.exp(-x)), "softmax": softmax, "none": lambda x: x}[function]
        encodings = self.runner.tokenize(items, truncation)
        out = []
        for row in _rows(self.runner, encodings):
            scores = apply(row["logits"].astype(np.float64))
            if top_k is UNSET:
                out.append({"label": labels[int(scores.argmax())], "score": float(scores.max())})
                continue
            ranked = sorted(({"label": lab, "score": float(s)} for lab, s in zip(labels, scores)),
                            key=lambda d: d["score"], reverse=True)
            out.append(ranked if top_k is None else ranked[:top_k])
        return out


def _pair(item: dict[str, Any], i: int) -> tuple[str, str] | str:
    if set(item) - {"text", "text_pair"} or "text" not in item:
        raise TypeError(f"input {i} is a dict with keys {sorted(item)}; a pair is {{'text': ..., 'text_pair': ...}}")
    return (item["text"], item["text_pair"]) if "text_pair" in item else item["text"]


class TokenClassificationPipeline(Pipeline):
    """Per text, its tokens' labels (or entities), as transformers' TokenClassificationPipeline.

    `aggregation_strategy`: none (each token: entity, score, index, word, start, end), simple
    (adjacent tokens of one entity, B-/I- prefixes read, joined: entity_group, score, word, start,
    end), first / average / max (sub-tokens first made one word: its first token's label, the
    label of its averaged scores, its most confident token's label; then as simple).
    `ignore_labels`: labels left out of the result."""

    task = "token-classification"
    pairs = False

    def _run(self, items: list[Any], aggregation_strategy: str = "none", ignore_labels: Sequence[str] = ("O",),
             truncation: bool = False) -> list[list[dict[str, Any]]]:
        strategy = _choice("aggregation_strategy", aggregation_strategy, AGGREGATIONS)
        ignore = {ignore_labels} if isinstance(ignore_labels, str) else set(ignore_labels)
        tok = self.runner.tokenizer
        words_known = bool(getattr(tok.model, "continuing_subword_prefix", None))
        if strategy in ("first", "average", "max") and not words_known:
            log.warning("Tokenizer does not support real words, using fallback heuristic")
        unk = getattr(tok.model, "unk_token", None)
        unk_id = tok.token_to_id(unk) if unk else None
        encodings = self.runner.tokenize(items, truncation)
        out = []
        for text, e, row in zip(items, encodings, _rows(self.runner, encodings)):
            scores = softmax(row["logits"][: len(e.ids)])
            tokens = []
            for i, (token_id, (start, end)) in enumerate(zip(e.ids, e.offsets)):
                if e.special_tokens_mask[i]:
                    continue
                word, ref = tok.id_to_token(token_id), text[start:end]
                if token_id == unk_id:
                    word, subword = ref, False
                elif words_known:
                    subword = len(word) != len(ref)
                else:  # transformers' heuristic: glued to the previous character
                    subword = start > 0 and " " not in text[start - 1 : start + 1]
                tokens.append({"word": word, "scores": scores[i], "start": start, "end": end, "index": i,
                               "is_subword": subword})
            entities = self._aggregate(tokens, strategy)
            out.append([x for x in entities if x.get("entity", x.get("entity_group")) not in ignore])
        return out

    def _label(self, scores: np.ndarray) -> tuple[str, float]:
        best = int(np.argmax(scores))
        return self.runner.manifest.label_names[best], float(scores[best])

    def _text(self, tokens: list[str]) -> str:
        decoder = self.runner.tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def _aggregate(self, tokens: list[dict[str, Any]], strategy: str) -> list[dict[str, Any]]:
        if strategy in ("none", "simple"):
            entities = []
            for t in tokens:
                label, score = self._label(t["scores"])
                entities.append({"entity": label, "score": score, "index": t["index"], "word": t["word"],
                                 "start": t["start"], "end": t["end"]})
        else:
            words: list[list[dict[str, Any]]] = []
            for t in tokens:
                if words and t["is_subword"]:
                    words[-1].append(t)
                else:
                    words.append([t])
            entities = [self._word(w, strategy) for w in words]
        return entities if strategy == "none" else self._group(entities)

    def _word(self, tokens: list[dict[str, Any]], strategy: str) -> dict[str, Any]:
        if strategy == "first":
            scores = tokens[0]["scores"]
        elif strategy == "max":
            scores = max(tokens, key=lambda t: t["scores"].max())["scores"]
        else:
            scores = np.nanmean(np.stack([t["scores"] for t in tokens]), axis=0)
        label, score = self._label(scores)
        return {"entity": label, "score": score, "word": self._text([t["word"] for t in tokens]),
                "start": tokens[0]["start"], "end": tokens[-1]["end"]}

    def _group(self, entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Adjacent entities of one tag join, unless the later one begins (B-) a new entity."""
        groups: list[list[dict[str, Any]]] = []
        for e in entities:
            bi, tag = _bio(e["entity"])
            if groups and bi != "B" and tag == _bio(groups[-1][-1]["entity"])[1]:
                groups[-1].append(e)
            else:
                groups.append([e])
        return [{"entity_group": g[0]["entity"].split("-", 1)[-1], "score": float(np.nanmean([e["score"] for e in g])),
                 "word": self._text([e["word"] for e in g]), "start": g[0]["start"], "end": g[-1]["end"]}
                for g in groups]


def _bio(label: str) -> tuple[str, str]:
    """("B" or "I", tag); a label without a B-/I- prefix continues (I) its tag."""
    return (label[0], label[2:]) if label.startswith(("B-", "I-")) else ("I", label)


class FillMaskPipeline(Pipeline):
    """The likeliest tokens for the mask token ([MASK] or <mask>) of each text: {"score", "token",
    "token_str", "sequence"}, `top_k` of them; a list per mask when a text has several.
    `targets`: only these tokens are scored (a word outside the vocabulary counts as its first token)."""

    task = "fill-mask"
    pairs = False

    def _run(self, items: list[Any], top_k: int = 5, targets: str | Sequence[str] | None = None,
             truncation: bool = False) -> list[Any]:
        tok, pad_id = self.runner.tokenizer, self.runner.pad_id
        mask_id = next((i for i in map(tok.token_to_id, MASK_TOKENS) if i is not None), None)
        if mask_id is None:
            raise ValueError(f"{self.runner.path}: the tokenizer has no mask token ({' or '.join(MASK_TOKENS)})")
        target_ids = None if targets is None else self._target_ids(targets)
        k = _positive("top_k", top_k) if target_ids is None else min(_positive("top_k", top_k), len(target_ids))
        encodings = self.runner.tokenize(items, truncation)
        missing = [i for i, e in enumerate(encodings) if mask_id not in e.ids]
        if missing:
            raise ValueError(f"text {missing[0]} has no mask token {tok.id_to_token(mask_id)}: {items[missing[0]]!r}")
        out = []
        for e, row in zip(encodings, _rows(self.runner, encodings)):
            ids = np.asarray(e.ids)
            where = np.flatnonzero(ids == mask_id)
            probs = softmax(row["logits"][where])
            if target_ids is not None:
                probs = probs[:, target_ids]
            single = len(where) == 1
            per_mask = []
            for at, p in zip(where, probs):
                fills = []
                for best in np.argsort(-p, kind="stable")[:k]:
                    token = int(best if target_ids is None else target_ids[best])
                    filled = ids.copy()
                    filled[at] = token
                    # as transformers: other masks stay visible when a text has several
                    sequence = tok.decode(filled[filled != pad_id].tolist(), skip_special_tokens=single)
                    fills.append({"score": float(p[best]), "token": token,
                                  "token_str": tok.decode([token], skip_special_tokens=False), "sequence": sequence})
                per_mask.append(fills)
            out.append(per_mask[0] if single else per_mask)
        return out

    def _target_ids(self, targets: str | Sequence[str]) -> list[int]:
        tok, ids = self.runner.tokenizer, []
        for t in [targets] if isinstance(targets, str) else targets:
            i = tok.token_to_id(t)
            if i is None:
                pieces = tok.encode(t, add_special_tokens=False).ids
                if not pieces:
                    log.warning("target %r has no token in the vocabulary; ignored", t)
                    continue
                i = pieces[0]
                log.warning("target %r is not in the vocabulary; scoring its first token %r", t, tok.id_to_token(i))
            ids.append(i)
        if not ids:
            raise ValueError("targets names no token of the vocabulary")
        return list(dict.fromkeys(ids))


class QuestionAnsweringPipeline(Pipeline):
    """The likeliest spans of a context that answer a question (transformers v4's pipeline):
    `qa(question=..., context=...)`, `qa({"question": ..., "context": ...})` or a list of dicts
    (`question=` and `context=` may be lists of one length, or one string and a list).

    Result: {"score", "start", "end", "answer"} (character offsets into the context; score the
    start probability times the end probability, softmax over the context tokens); a list of
    `top_k` such dicts when top_k > 1. A context longer than the compiled length is read in windows
    of whole words that overlap by `doc_stride` tokens (default: half the length, at most 128).
    Spans end at most `max_answer_len` tokens after they start; `align_to_words` widens them to
    whole words; `handle_impossible_answer` adds the empty answer, scored by the [CLS] token."""

    task = "question-answering"

    def __call__(self, inputs: Any = None, *, question: str | list[str] | None = None,
                 context: str | list[str] | None = None, **options: Any) -> Any:
        if question is not None or context is not None:
            if inputs is not None:
                raise TypeError("give the input as question=/context= or positionally, not both")
            inputs = _questions(question, context)
        return super().__call__(inputs, **options)

    def _items(self, inputs: Any) -> tuple[list[Any], bool]:
        single = isinstance(inputs, dict)
        if not single and not isinstance(inputs, (list, tuple)):
            raise TypeError("question-answering takes question=..., context=..., a {'question', 'context'} dict "
                            f"or a list of them; got {type(inputs).__name__}")
        items = []
        for i, item in enumerate([inputs] if single else inputs):
            if not isinstance(item, dict) or set(item) != {"question", "context"}:
                raise TypeError(f"input {i} must be a dict with keys question and context; got {str(item)[:60]!r}")
            for key in ("question", "context"):
                if not isinstance(item[key], str) or not item[key].strip():
                    raise ValueError(f"input {i}: {key} must be a non-empty string")
            items.append((item["question"], item["context"]))
        if not items:
            raise ValueError("no question given")
        return items, single

    def _run(self, items: list[Any], top_k: int = 1, doc_stride: int | None = None, max_answer_len: int = 15,
             handle_impossible_answer: bool = False, align_to_words: bool = True) -> list[Any]:
        r = self.runner
        _positive("top_k", top_k)
        _positive("max_answer_len", max_answer_len)
        stride = min(r.seq_len // 2, 128) if doc_stride is None else doc_stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
            raise ValueError(f"doc_stride must be a whole number of at least 0; got {doc_stride!r}")
        windows = [context_windows(r.tokenizer, q, c, r.seq_len, stride) for q, c in items]
        rows = _rows(r, [enc for w in windows for _, enc in w])
        out = []
        for (_, context), parts in zip(items, windows):
            best: dict[tuple[int, int], float] = {}  # overlapping windows find a span more than once
            null = 1.0
            for lo, enc in parts:
                row = next(rows)
                spans, null_here = _spans(row["start_logits"], row["end_logits"], enc, max_answer_len)
                null = min(null, null_here)
                found: dict[tuple[int, int], float] = {}  # spans of sub-words can widen to the same words
                for s, e, score in spans:
                    start, end = _characters(enc, s, e, align_to_words)
                    found.setdefault((lo + start, lo + end), score)
                    if len(found) == top_k:
                        break
                for key, score in found.items():
                    best[key] = max(best.get(key, 0.0), score)
            answers = [{"score": score, "start": s, "end": e, "answer": context[s:e]} for (s, e), score in best.items()]
            if handle_impossible_answer:
                answers.append({"score": null, "start": 0, "end": 0, "answer": ""})
            answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:top_k]
            out.append(answers[0] if top_k == 1 else answers)
        return out


def _questions(question: str | list[str] | None, context: str | list[str] | None) -> dict[str, str] | list[dict]:
    if question is None or context is None:
        raise TypeError("question-answering needs both question= and context=")
    if isinstance(question, str) and isinstance(context, str):
        return {"question": question, "context": context}
    questions = [question] * len(context) if isinstance(question, str) else list(question)
    contexts = [context] * len(questions) if isinstance(context, str) else list(context)
    if len(questions) != len(contexts):
        raise ValueError(f"{len(questions)} questions for {len(contexts)} contexts: give as many, or one of either")
    return [{"question": q, "context": c} for q, c in zip(questions, contexts)]


def context_windows(tok: Any, question: str, context: str, seq_len: int, stride: int) -> list[tuple[int, Any]]:
    """(character offset of the window in `context`, encoding of question + window) for windows of
    whole words that cover `context`, consecutive windows sharing about `stride` tokens."""
    budget = seq_len - len(tok.encode(question, "").ids)  # what the question and special tokens leave
    if budget < 1:
        raise ValueError(f"the question alone fills the compiled length {seq_len}")
    ctx = tok.encode(context, add_special_tokens=False)
    if not ctx.ids:
        raise ValueError("the context is empty")
    starts = [i for i, w in enumerate(ctx.word_ids) if i == 0 or w != ctx.word_ids[i - 1]]
    n, windows, a = len(ctx.ids), [], 0
    while True:
        b = n if a + budget >= n else max(s for s in starts if s <= a + budget)
        while True:  # the window, tokenized again after the question, must still fit
            if b == a:
                raise ValueError(f"a word of the context does not fit the compiled length {seq_len} with the question")
            lo, hi = ctx.offsets[a][0], ctx.offsets[b - 1][1]
            enc = tok.encode(question, context[lo:hi])
            if len(enc.ids) <= seq_len:
                break
            b = max((s for s in starts if s < b), default=a)
        windows.append((lo, enc))
        if b == n:
            return windows
        nxt = max(s for s in starts if s <= max(b - stride, 0))
        a = nxt if nxt > a else b


def _spans(start_logits: np.ndarray, end_logits: np.ndarray, enc: Any,
           max_answer_len: int) -> tuple[Iterator[tuple[int, int, float]], float]:
    """One window's spans (start token, end token, probability), best first, and the score of the
    empty answer, as transformers' select_starts_ends: start and end are softmaxed over the context
    tokens and a leading [CLS] (which scores the empty answer and is then excluded)."""
    n = len(enc.ids)
    context = np.array([s == 1 for s in enc.sequence_ids])
    allowed = context.copy()
    allowed[0] |= bool(enc.special_tokens_mask[0])
    p_start = softmax(np.where(allowed, start_logits[:n], -np.inf))
    p_end = softmax(np.where(allowed, end_logits[:n], -np.inf))
    null = float(p_start[0] * p_end[0])
    i, j = np.indices((n, n))
    valid = context[:, None] & context[None, :] & (j >= i) & (j < i + max_answer_len)
    scores = np.where(valid, np.outer(p_start, p_end), -1.0).ravel()
    order = np.argsort(-scores, kind="stable")[: int(valid.sum())]
    return ((int(b // n), int(b % n), float(scores[b])) for b in order), null


def _characters(enc: Any, s: int, e: int, align_to_words: bool) -> tuple[int, int]:
    """Character offsets (in the window's text) of tokens s..e, widened to whole words if asked."""
    if align_to_words:
        first, last = enc.token_to_word(s), enc.token_to_word(e)
        if first is not None and last is not None:
            return enc.word_to_chars(first, 1)[0], enc.word_to_chars(last, 1)[1]
    return enc.offsets[s][0], enc.offsets[e][1]


class MultipleChoicePipeline(Pipeline):
    """Which choice best answers or continues a prompt. transformers has no pipeline for this task;
    this one takes {"prompt": ..., "choices": [...]} ("question" may stand for "prompt"), or a list
    of them, and returns {"choice": index of the likeliest, "text": that choice, "scores": the
    softmax over the choices}. At most `compile --choices N` choices."""

    task = "multiple-choice"

    def _items(self, inputs: Any) -> tuple[list[Any], bool]:
        single = isinstance(inputs, dict)
        if not single and not isinstance(inputs, (list, tuple)):
            raise TypeError(f"multiple-choice takes a {{'prompt', 'choices'}} dict or a list of them; "
                            f"got {type(inputs).__name__}")
        items = []
        for i, item in enumerate([inputs] if single else inputs):
            keys = set(item) if isinstance(item, dict) else set()
            if len(keys & {"prompt", "question"}) != 1 or keys - {"prompt", "question"} != {"choices"}:
                raise TypeError(f"input {i} must be a dict with keys prompt (or question) and choices; "
                                f"got {str(item)[:60]!r}")
            prompt, choices = item.get("prompt", item.get("question")), item["choices"]
            if isinstance(choices, str) or not choices or not all(isinstance(c, str) for c in choices):
                raise ValueError(f"input {i}: choices must be a non-empty list of strings")
            if len(choices) > self.runner.choices:
                raise ValueError(f"input {i} has {len(choices)} choices; the library was compiled for at most "
                                 f"{self.runner.choices} (compile --choices N)")
            items.append((prompt, list(choices)))
        if not items:
            raise ValueError("no prompt given")
        return items, single

    def _run(self, items: list[Any], truncation: bool = False) -> list[dict[str, Any]]:
        r = self.runner
        encodings = r.tokenize([(prompt, c) for prompt, choices in items for c in choices], truncation)
        rows, at = [], 0
        for _, choices in items:  # unused choice slots repeat the first choice; their scores are dropped
            rows += encodings[at : at + len(choices)] + encodings[at : at + 1] * (r.choices - len(choices))
            at += len(choices)
        out = []
        for (_, choices), row in zip(items, _rows(r, rows, per_row=r.choices)):
            p = softmax(row["logits"][: len(choices)])
            best = int(p.argmax())
            out.append({"choice": best, "text": choices[best], "scores": [float(v) for v in p]})
        return out


PIPELINES: dict[str, type[Pipeline]] = {p.task: p for p in (
    FeatureExtractionPipeline, SentenceEmbeddingPipeline, TextClassificationPipeline, TokenClassificationPipeline,
    FillMaskPipeline, QuestionAnsweringPipeline, MultipleChoicePipeline)}


def pipeline(task: str, artifact: str | Path | Runner, **options: Any) -> Pipeline:
    """transformers' `pipeline(task, model)` over a compiled artifact (a folder, or a Runner).

    `task`: one of PIPELINES (transformers' names; also its aliases sentiment-analysis and ner).
    `options`: the task's options (see its class), defaults for every call; with a path, also the
    Runner's (threads, rpc, rpc_timeout, verify_key). The artifact's model class must serve the task."""
    name = ALIASES.get(task, task)
    if name not in PIPELINES:
        raise ValueError(f"unknown task {task!r}; one of {', '.join(PIPELINES)}")
    runner_options = {k: options.pop(k) for k in RUNNER_OPTIONS if k in options}
    if isinstance(artifact, Runner):
        if runner_options:
            raise TypeError(f"{', '.join(runner_options)} configure a new Runner: pass them to Runner(), "
                            "or give pipeline() the artifact's path")
        return PIPELINES[name](artifact, **options)
    runner = Runner(artifact, **runner_options)
    try:
        return PIPELINES[name](runner, owns_runner=True, **options)
    except BaseException:
        runner.close()
        raise
