"""Activation-range calibration of an IBert model: HF's QuantAct ranges and the float heads' ranges.

Every range comes from train-mode passes with dropout off, after a reset to HF's ∓1e-5 "empty"
range, by one of three estimators:

- `ema`: HF's default, an exponential moving average of each batch's min/max (momentum 0.95);
- `minmax`: the running min/max over all batches (HF's `act_range_momentum == -1`);
- `percentile`: each batch's (100 - p)-th / p-th percentile (nearest rank), averaged over batches.

HF keeps some heads in float (IBertForMaskedLM's `lm_head`), so they have no QuantAct; the ranges
the compiler needs to quantize them are recorded with the same estimator and kept in the config
(`ibert_tvm_head_ranges`), which `save_pretrained` writes to config.json.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm
from transformers.models.ibert import quant_modules as qm

from . import checkpoint
from .model_classes import REGISTRY
from .ranges import CHANNEL_ACTS, CHANNEL_RANGES, ESTIMATORS, HEAD_POINTS, HEAD_RANGES, Estimator

EMA_MOMENTUM = 0.95  # HF QuantAct's default
RUNNING_MINMAX = -1  # the act_range_momentum that makes HF's QuantAct keep a running min/max
DEFAULT_PERCENTILE = 99.99

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "merges.txt", "vocab.json")
CALIBRATION = "calibration.json"

_QUANT_ACT_FORWARD = inspect.signature(qm.QuantAct.forward)
log = logging.getLogger(__name__)


def check_estimator(estimator: str, percentile: float = DEFAULT_PERCENTILE) -> None:
    """ValueError unless `estimator` is known and `percentile` lies in (50, 100]."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown range estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if not 50 < percentile <= 100:  # also rejects NaN
        raise ValueError(f"percentile must lie in (50, 100], got {percentile}")


def _quantized_input(act: qm.QuantAct, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The tensor a QuantAct call ranges and quantizes: `identity + x` when a residual is given."""
    bound = _QUANT_ACT_FORWARD.bind(act, *args, **kwargs).arguments
    x, identity = bound["x"], bound.get("identity")
    return x if identity is None else identity + x


def percentile_range(x: torch.Tensor, p: float) -> tuple[float, float]:
    """The (100 - p)-th and p-th percentiles of `x` by nearest rank (numpy's "inverted_cdf")."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    k = max(1, math.ceil(p / 100 * n))
    # Not torch.quantile, which refuses tensors over 2^24 elements, nor HF's get_percentile_min_max,
    # whose minimum is 0 at p = 100
    return flat.kthvalue(n + 1 - k).values.item(), flat.kthvalue(k).values.item()


def _tap(module: torch.nn.Module, where: Literal["input", "output"], observer: qm.QuantAct):
    """Feed `module`'s input or output to `observer` on every forward; returns the hook handle."""
    if where == "input":
        def pre_hook(_m: torch.nn.Module, args: tuple) -> None:
            observer(args[0])

        return module.register_forward_pre_hook(pre_hook)

    def hook(_m: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
        observer(output)

    return module.register_forward_hook(hook)


def calibrate(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], progress: bool = True, *,
              estimator: Estimator = "ema", percentile: float = DEFAULT_PERCENTILE) -> torch.nn.Module:
    """Reset every QuantAct range, then run `batches` through the model in train mode, dropout off,
    estimating the ranges with `estimator`; also records the float heads' ranges (`head_ranges`).

    Batches are tokenizer outputs (`input_ids`, `attention_mask`). Returns the model in eval mode.
    """
    check_estimator(estimator, percentile)
    if not batches:
        raise ValueError("calibration needs at least one batch of text; got none")
    momentum = EMA_MOMENTUM if estimator == "ema" else RUNNING_MINMAX
    acts = [m for m in model.modules() if isinstance(m, qm.QuantAct)]
    names = dict(model.named_modules())
    # Shadow QuantActs (never model submodules, so never saved) give the heads HF's own range update.
    observers = {name: qm.QuantAct(8, act_range_momentum=momentum) for name, (module, _) in HEAD_POINTS.items()
                 if module in names}
    samples: dict[qm.QuantAct, list[tuple[float, float]]] = {m: [] for m in [*acts, *observers.values()]}
    channel_max: dict[str, torch.Tensor] = {}
    hooks = [_tap(names[HEAD_POINTS[n][0]], HEAD_POINTS[n][1], o) for n, o in observers.items()]
    hooks += _channel_hooks(names, channel_max)
    if estimator == "percentile":
        # The pass itself runs as minmax: HF quantizes with the current range, and a running
        # min/max never clips what the later layers see while the percentiles are recorded.
        def record(m: qm.QuantAct, args: tuple, kwargs: dict[str, Any]) -> None:
            samples[m].append(percentile_range(_quantized_input(m, args, kwargs), percentile))

        hooks += [m.register_forward_pre_hook(record, with_kwargs=True) for m in samples]
    try:
        with _calibration_mode(model, acts, momentum), torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", disable=not progress):
                model(**batch)
    finally:
        for h in hooks:
            h.remove()
    if estimator == "percentile":
        # HF's forward never calls some QuantActs (embeddings_act2, IntLayerNorm.activation): they
        # keep the reset range, as the other estimators leave them
        for m, s in samples.items():
            if s:
                lo, hi = torch.tensor(s, dtype=torch.float64).mean(0).tolist()
                m.x_min.fill_(lo)
                m.x_max.fill_(hi)
    setattr(model.config, CHANNEL_RANGES, {n: v.tolist() for n, v in channel_max.items()})
    if observers:
        setattr(model.config, HEAD_RANGES, {n: [o.x_min.item(), o.x_max.item()] for n, o in observers.items()})
    elif hasattr(model.config, HEAD_RANGES):  # left by an earlier calibration with a head this model lacks
        delattr(model.config, HEAD_RANGES)
    return model


def _channel_hooks(names: dict[str, torch.nn.Module], channel_max: dict[str, torch.Tensor]) -> list[Any]:
    """Hooks that keep the per-channel max |x| entering each `CHANNEL_ACTS` QuantAct in `channel_max`."""
    def hook_for(name: str):
        def hook(_m: qm.QuantAct, args: tuple) -> None:
            x = args[0].detach().abs()
            peak = x.reshape(-1, x.shape[-1]).amax(0)
            channel_max[name] = torch.maximum(channel_max[name], peak) if name in channel_max else peak

        return hook

    return [names[n].register_forward_pre_hook(hook_for(n.removeprefix("ibert."))) for n in names
            if any(n.endswith("." + a) or n == a for a in CHANNEL_ACTS)]


@contextlib.contextmanager
def _calibration_mode(model: torch.nn.Module, acts: list[qm.QuantAct], momentum: float) -> Iterator[None]:
    """Ranges reset and updated with `momentum`, dropout off, train mode; all restored after
    (the ranges stay: they are the result)."""
    momenta = {m: m.act_range_momentum for m in acts}
    dropouts = {m: m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    for m in acts:
        m.x_min.fill_(-1e-5)
        m.x_max.fill_(1e-5)
        m.act_range_momentum = momentum
    for m in dropouts:
        m.p = 0.0
    model.train()
    try:
        yield
    finally:
        for m, mom in momenta.items():
            m.act_range_momentum = mom
        for m, p in dropouts.items():
            m.p = p
        model.eval()


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
                    batch_size: int = 32, progress: bool = True, *, estimator: Estimator = "ema",
                    percentile: float = DEFAULT_PERCENTILE) -> torch.nn.Module:
    """`calibrate` on raw text, tokenized with the checkpoint's `tokenizer.json`."""
    check_estimator(estimator, percentile)
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch size and sequence length must be positive, got {batch_size} and {seq_len}")
    # IBert numbers real tokens from pad + 1, so longer text would index past the position table
    longest = model.config.max_position_embeddings - model.config.pad_token_id - 1
    if seq_len > longest:
        raise ValueError(f"sequence length {seq_len} exceeds the model's {longest} positions")
    if not any(t.strip() for t in texts):
        raise ValueError("calibration text is empty")
    batches = tokenizer_batches(tokenizer_file, list(texts), batch_size, seq_len, model.config.pad_token_id)
    log.info("calibrating activation ranges (%s) on %d sentences", estimator, len(texts))
    if REGISTRY[type(model).__name__].choice_axis:  # [batch, choices, seq]: each sentence is one choice
        batches = [{k: v[:, None] for k, v in b.items()} for b in batches]
    return calibrate(model, batches, progress=progress, estimator=estimator, percentile=percentile)


def text_lines(text: str) -> list[str]:
    """One sentence a line: the non-empty lines, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_texts(path: Path) -> list[str]:
    """The file's non-empty lines, stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration text file {path} does not exist")
    texts = text_lines(path.read_text(encoding="utf-8"))
    if not texts:
        raise ValueError(f"calibration text file {path} has no non-empty lines")
    return texts


def calibrate_checkpoint(model: str | Path, texts_file: Path, out: Path, *, estimator: Estimator = "ema",
                         percentile: float = DEFAULT_PERCENTILE, batch_size: int = 32, seq_len: int = 128,
                         max_texts: int | None = None, force: bool = False, progress: bool = True) -> Path:
    """Calibrate checkpoint `model` (a directory or "default") on `texts_file`'s lines and write a
    calibrated IBert checkpoint with the source's tokenizer files and `calibration.json` to `out`."""
    from .artifact import TOKENIZER, Staging, sha256

    check_estimator(estimator, percentile)
    if max_texts is not None and max_texts < 1:
        raise ValueError(f"--max-texts must be at least 1, got {max_texts}")
    with Staging(Path(out), force) as stage:  # claimed before the heavy work
        texts = read_texts(texts_file)[:max_texts]
        src = checkpoint.resolve(model)
        if not (src / TOKENIZER).is_file():
            raise FileNotFoundError(f"{src} has no {TOKENIZER} to tokenize calibration text with")
        ibert = checkpoint.load(src, quant_mode=True)
        calibrate_texts(ibert, texts, src / TOKENIZER, seq_len, batch_size, progress,
                        estimator=estimator, percentile=percentile)
        record = {
            "source": str(model),
            "estimator": estimator,
            "percentile": percentile if estimator == "percentile" else None,
            "texts": len(texts),
            "texts_sha256": sha256(Path(texts_file)),
            "seq_len": seq_len,
            "batch_size": batch_size,
        }
        ibert.save_pretrained(stage.dir)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, stage.dir / name)
        (stage.dir / CALIBRATION).write_text(json.dumps(record, indent=2))
        return stage.publish()
