"""`ibert-tvm`: compile an I-BERT for a target, run an artifact, or run the demo (the main job)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from . import __version__, tasks
from .model_classes import TASKS
from .runner import Runner

DEMO_SENTENCES = [
    "A gripping, beautifully acted film that stays with you.",
    "One of the most moving movies I have seen this year.",
    "The plot is dull and the dialogue is painfully flat.",
    "I checked my watch every ten minutes; a tedious mess.",
    "The recipe needs two cups of flour and a pinch of salt.",
]


def _options(a: argparse.Namespace, **extra):
    from .calibrate import read_texts
    from .compile import CompileOptions

    texts = read_texts(a.calib_texts) if a.calib_texts else None
    return CompileOptions(model=a.model, target=a.target, batch=a.batch, seq_len=a.seq_len, calib_texts=texts,
                          records=Path(a.records) if a.records else None, **extra)


def cmd_compile(a: argparse.Namespace) -> int:
    from .compile import compile_model

    opt = _options(a, out=Path(a.output), force=a.force, buckets=tuple(a.buckets), choices=a.choices,
                   sign_key=Path(a.sign_key) if a.sign_key else None)
    print(f"wrote {compile_model(opt)}")
    return 0


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
    records = tune_model(_options(a), a.trials, a.rpc_tracker, a.key)
    print(f"{len(records)} tile records in {a.records or 'schedules/records'}/")
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    from .calibrate import calibrate_checkpoint

    out = calibrate_checkpoint(a.model, Path(a.texts), Path(a.output), estimator=a.estimator, percentile=a.percentile,
                               batch_size=a.batch_size, seq_len=a.seq_len, max_texts=a.max_texts, force=a.force)
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


def _answer(r: Runner, a: argparse.Namespace) -> list[dict]:
    if not a.question:
        raise ValueError("the answer task needs --question; the texts are the contexts")
    return [{"context": t, **tasks.answer(r, a.question, t)} for t in a.texts]


def _choose(r: Runner, a: argparse.Namespace) -> list[dict]:
    if not a.prompt:
        raise ValueError("the choose task needs --prompt; the texts are the choices")
    return [{"prompt": a.prompt, **tasks.choose(r, a.prompt, a.texts, a.truncate)}]


def _fill_mask(r: Runner, a: argparse.Namespace) -> list[dict]:
    return [{"text": t, "masks": tasks.fill_mask(r, t, a.top_k)} for t in a.texts]


def _tag(r: Runner, a: argparse.Namespace) -> list[dict]:
    return [{"text": t, "words": tasks.tag(r, t, a.truncate)} for t in a.texts]


def _classify(r: Runner, a: argparse.Namespace) -> list[dict]:
    return [{"text": t, **c} for t, c in zip(a.texts, tasks.classify(r, a.texts, a.truncate))]


def _embed(r: Runner, a: argparse.Namespace) -> list[dict]:
    vectors = tasks.embed(r, a.texts, a.truncate)
    return [{"text": t, "embedding": [round(float(v), 4) for v in (e if a.json else e[:6])]}
            for t, e in zip(a.texts, vectors)]


# `run`'s results per task (tasks.TASKS): one result per text, as JSON-ready dicts
TASK_RESULTS: dict[str, Callable[[Runner, argparse.Namespace], list[dict]]] = {
    "embed": _embed, "fill-mask": _fill_mask, "classify": _classify, "choose": _choose, "tag": _tag, "answer": _answer,
}


def cmd_run(a: argparse.Namespace) -> int:
    with Runner(a.artifact, threads=a.threads, rpc=a.rpc, rpc_timeout=a.rpc_timeout, verify_key=a.verify_key) as r:
        result = TASK_RESULTS[a.task or tasks.task_of(r)](r, a)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        for item in result:
            print("\t".join(f"{k}={v}" for k, v in item.items()))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """The main job: compile the default model for this CPU, compare similarities with FP32."""
    from . import artifact
    from .compile import CompileOptions, compile_model
    from .evaluation.fp32 import fp32_embeddings
    from .runner import Runner

    out = Path(a.output)
    opt = CompileOptions(model="default", target="host", batch=1, seq_len=a.seq_len, out=out, force=True)
    if a.force:
        compile_model(opt)
    else:
        artifact.reuse(out, lambda: compile_model(opt))
    r = Runner(out)
    ours = r.embed(DEMO_SENTENCES)
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
        **_calibration_options(a)))
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
                                         **_calibration_options(a)))
    elif a.qat:
        raise ValueError("--qat is a step of --finetune (fine-tune --model first, then QAT)")
    result = evaluate(EvalOptions(model=model, artifact=Path(a.artifact) if a.artifact else None,
                                  embeddings=a.embeddings, limit=a.limit, heldout=a.heldout, hf=not a.no_hf,
                                  target=a.target,
                                  batch=a.batch, seq_len=a.seq_len, buckets=tuple(a.buckets)))
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
    p.add_argument("--model", required=True, help="transformers checkpoint directory, or 'default' (all-MiniLM-L6-v2)")
    p.add_argument("--target", default="host",
                   help="target preset (`ibert-tvm targets` lists them; host: this machine)")
    p.add_argument("--batch", type=int, default=1, help="compiled batch: inputs run in chunks of this many rows")
    p.add_argument("--seq-len", type=int, default=128, help="longest compiled sequence length (tokens)")
    p.add_argument("--calib-texts", help="text file, one calibration sentence a line (needed when uncalibrated)")
    p.add_argument("--records", help="tuning records folder (default: schedules/records)")


def _calibration_arguments(p: argparse.ArgumentParser) -> None:
    """Fine-tuning's calibration options; left out, FinetuneOptions' defaults apply."""
    p.add_argument("--calib-sentences", type=int, help="training sentences that calibrate the ranges (default 256)")
    p.add_argument("--estimator", help="activation range estimator: minmax (the default here: measured best "
                                       "after QAT), ema (HF's) or percentile")
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
    p.add_argument("--model", required=True,
                     help="transformers checkpoint directory, or 'default' (all-MiniLM-L6-v2)")
    p.add_argument("--texts", required=True, help="text file, one calibration sentence a line")
    p.add_argument("-o", "--output", required=True, help="folder for the calibrated checkpoint")
    p.add_argument("--estimator", default="ema",
                     help="activation range estimator: ema (HF's default), minmax or percentile")
    p.add_argument("--percentile", type=float, default=99.99, help="percentile kept by --estimator percentile")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per calibration batch")
    p.add_argument("--seq-len", type=int, default=128, help="calibration text is cut to this many tokens")
    p.add_argument("--max-texts", type=int, help="use only the first N sentences")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(fn=cmd_calibrate)


def _add_bench(sub: Any) -> None:
    from .evaluation import bench

    p = sub.add_parser("bench", help="time the INT8 library against PyTorch, ONNX Runtime and HF, in one run",
                       description=bench.__doc__)
    bench.add_arguments(p)
    p.set_defaults(fn=bench.run)


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
    p = sub.add_parser("run", help=f"run an artifact on text: {', '.join(TASKS)}")
    p.add_argument("artifact")
    p.add_argument("texts", nargs="+", help="the texts; for --task answer the contexts, for choose the choices")
    p.add_argument("--task", choices=list(TASKS),
                   help="default: the task of the artifact's model class")
    p.add_argument("--question", help="answer: the question asked of every context")
    p.add_argument("--prompt", help="choose: the prompt the choices complete")
    p.add_argument("--top-k", type=int, default=5, help="fill-mask: tokens per mask")
    p.add_argument("--json", action="store_true")
    p.add_argument("--truncate", action="store_true", help="cut text longer than the compiled length")
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
    p.add_argument("--model", required=True, help="transformers checkpoint directory, or 'default' (all-MiniLM-L6-v2)")
    p.add_argument("--train", required=True,
                   help="TSV file of label<TAB>text, or 'sentiment' (the train half of the sentiment split)")
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
                                    "quant_mode=True simulation (sentiment test split, held-out VADER sets)")
    p.add_argument("--model", required=True, help="calibrated classifier checkpoint (or, with --embeddings, an "
                                                  "encoder; 'default' is all-MiniLM-L6-v2)")
    p.add_argument("--artifact", help="compiled artifact of --model; compiled there when missing "
                                      "(default: a temporary one)")
    p.add_argument("--embeddings", action="store_true", help="bare encoder: cosine of sentence embeddings to FP32")
    p.add_argument("--limit", type=int, default=1000, help="test sentences, an even sample (4000: all)")
    p.add_argument("--heldout", type=int, default=300, help="sentences per held-out VADER set (0: skip them)")
    p.add_argument("--no-hf", action="store_true", help="leave out HF's simulation (~8x slower than FP32)")
    p.add_argument("--target", default="host", help="target preset of the compiled artifact")
    p.add_argument("--batch", type=int, default=16, help="compiled batch")
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


COMMANDS = (_add_compile, _add_tune, _add_calibrate, _add_bench, _add_keygen, _add_targets, _add_run, _add_demo,
            _add_finetune, _add_eval)


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
    return p


COMPILER_PACKAGES = ("torch", "transformers", "tqdm", "xgboost")  # the `compile` extra's


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
