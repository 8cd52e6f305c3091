"""`ibert-tvm`: compile an I-BERT for a target, run an artifact, or run the demo (the main job)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_SENTENCES = [
    "A gripping, beautifully acted film that stays with you.",
    "One of the most moving movies I have seen this year.",
    "The plot is dull and the dialogue is painfully flat.",
    "I checked my watch every ten minutes; a tedious mess.",
    "The recipe needs two cups of flour and a pinch of salt.",
]


def _options(a: argparse.Namespace, **extra):
    from .compile import CompileOptions

    from .calibrate import read_texts

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


def _task_results(r, a: argparse.Namespace) -> list[dict]:
    """One result per text for the task (the artifact's own unless --task), as JSON-ready dicts."""
    from . import tasks

    task = a.task or tasks.task_of(r)
    if task == "answer":
        if not a.question:
            raise ValueError("the answer task needs --question; the texts are the contexts")
        return [{"context": t, **tasks.answer(r, a.question, t)} for t in a.texts]
    if task == "choose":
        if not a.prompt:
            raise ValueError("the choose task needs --prompt; the texts are the choices")
        return [{"prompt": a.prompt, **tasks.choose(r, a.prompt, a.texts, a.truncate)}]
    if task == "fill-mask":
        return [{"text": t, "masks": tasks.fill_mask(r, t, a.top_k)} for t in a.texts]
    if task == "tag":
        return [{"text": t, "words": tasks.tag(r, t, a.truncate)} for t in a.texts]
    if task == "classify":
        return [{"text": t, **c} for t, c in zip(a.texts, tasks.classify(r, a.texts, a.truncate))]
    vectors = tasks.embed(r, a.texts, a.truncate)
    return [{"text": t, "embedding": [round(float(v), 4) for v in (e if a.json else e[:6])]}
            for t, e in zip(a.texts, vectors)]


def cmd_run(a: argparse.Namespace) -> int:
    from .runner import Runner

    with Runner(a.artifact, threads=a.threads, rpc=a.rpc, rpc_timeout=a.rpc_timeout, verify_key=a.verify_key) as r:
        result = _task_results(r, a)
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
    from .fp32 import fp32_embeddings
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
    from .finetune import FinetuneOptions, finetune

    out = finetune(FinetuneOptions(
        model=a.model, train=a.train, out=Path(a.output), qat=a.qat, epochs=a.epochs, lr=a.lr,
        batch_size=a.batch_size, seq_len=a.seq_len, max_steps=a.max_steps, seed=a.seed, force=a.force,
        **_calibration_options(a)))
    print(f"fine-tuned, calibrated checkpoint: {out}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import EvalOptions, evaluate, markdown

    model = a.model
    if a.finetune:
        from .finetune import sentiment_classifier

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
    p.add_argument("--target", default="host", help="target preset (`ibert-tvm targets` lists them); default: this machine")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ibert-tvm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile a checkpoint into an artifact folder")
    _model_arguments(c)
    c.add_argument("-o", "--output", default="artifacts/model")
    c.add_argument("--force", action="store_true",
                   help="replace an existing artifact (only a folder ibert-tvm wrote; anything else is an error)")
    c.add_argument("--sign-key", metavar="PEM", help="sign the manifest with this Ed25519 private key "
                                                     "(`ibert-tvm keygen` makes one)")
    c.add_argument("--choices", type=int, help="multiple-choice models: the most choices per question (default 4)")
    c.add_argument("--buckets", type=int, nargs="+", default=[], metavar="LEN",
                   help="also compile these shorter lengths; text runs at the shortest that holds it")
    c.set_defaults(fn=cmd_compile)
    t = sub.add_parser("tune", help="measure GEMM tile sizes for a model's shapes (here, or on an RPC device farm); "
                                    "records are kept and later compiles use them")
    _model_arguments(t)
    t.add_argument("--trials", type=int, help="measure at most this many tiles in all (default: every candidate)")
    t.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on a device from this TVM RPC tracker")
    t.add_argument("--key", help="the tracker's device key (e.g. the one given to rpc_server --key)")
    t.set_defaults(fn=cmd_tune)
    cal = sub.add_parser("calibrate", help="calibrate a checkpoint's activation ranges on text and save it; "
                                           "`compile --model` then needs no --calib-texts")
    cal.add_argument("--model", required=True,
                     help="transformers checkpoint directory, or 'default' (all-MiniLM-L6-v2)")
    cal.add_argument("--texts", required=True, help="text file, one calibration sentence a line")
    cal.add_argument("-o", "--output", required=True, help="folder for the calibrated checkpoint")
    cal.add_argument("--estimator", default="ema",
                     help="activation range estimator: ema (HF's default), minmax or percentile")
    cal.add_argument("--percentile", type=float, default=99.99, help="percentile kept by --estimator percentile")
    cal.add_argument("--batch-size", type=int, default=32)
    cal.add_argument("--seq-len", type=int, default=128, help="calibration text is cut to this many tokens")
    cal.add_argument("--max-texts", type=int, help="use only the first N sentences")
    cal.add_argument("--force", action="store_true", help="replace an existing output folder")
    cal.set_defaults(fn=cmd_calibrate)
    from . import bench

    b = sub.add_parser("bench", help="time the INT8 library against PyTorch, ONNX Runtime and HF, in one run",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(b)
    b.set_defaults(fn=bench.run)
    k = sub.add_parser("keygen", help="make an Ed25519 key pair for signing artifacts (compile --sign-key) "
                                      "and verifying them (run --verify-key)")
    k.add_argument("-o", "--output", default="ibert-tvm-signing.pem",
                   help="private key file (never overwritten); the public key goes to NAME.pub.pem")
    k.set_defaults(fn=cmd_keygen)
    ts = sub.add_parser("targets", help="list the target presets")
    ts.add_argument("--json", action="store_true")
    ts.set_defaults(fn=cmd_targets)
    r = sub.add_parser("run", help="run an artifact on text: classify, fill-mask, answer, tag, choose or embed")
    r.add_argument("artifact")
    r.add_argument("texts", nargs="+", help="the texts; for --task answer the contexts, for choose the choices")
    r.add_argument("--task", choices=["classify", "fill-mask", "answer", "tag", "choose", "embed"],
                   help="default: the task of the artifact's model class")
    r.add_argument("--question", help="answer: the question asked of every context")
    r.add_argument("--prompt", help="choose: the prompt the choices complete")
    r.add_argument("--top-k", type=int, default=5, help="fill-mask: tokens per mask")
    r.add_argument("--json", action="store_true")
    r.add_argument("--truncate", action="store_true", help="cut text longer than the compiled length")
    r.add_argument("--threads", type=int, help="worker threads (default: every CPU this process may use)")
    r.add_argument("--rpc", metavar="HOST:PORT", help="run on a board serving `python -m tvm.exec.rpc_server`")
    r.add_argument("--rpc-timeout", type=_positive_seconds, default=10.0, help="seconds to wait for the RPC server")
    r.add_argument("--verify-key", metavar="PEM", help="require a signature by this Ed25519 public key")
    r.set_defaults(fn=cmd_run)
    d = sub.add_parser("demo", help="compile the default model here and compare sentence similarities with FP32")
    d.add_argument("-o", "--output", default="artifacts/default-host")
    d.add_argument("--seq-len", type=int, default=128)
    d.add_argument("--force", action="store_true", help="recompile even if the artifact exists")
    d.set_defaults(fn=cmd_demo)
    f = sub.add_parser("finetune", help="fine-tune a sentence classifier (FP32, or --qat: quantization-aware) and "
                                        "save it calibrated, ready for `compile`")
    f.add_argument("--model", required=True, help="transformers checkpoint directory, or 'default' (all-MiniLM-L6-v2)")
    f.add_argument("--train", required=True,
                   help="TSV file of label<TAB>text, or 'sentiment' (the train half of the sentiment split)")
    f.add_argument("-o", "--output", required=True, help="folder for the fine-tuned checkpoint (a cache: "
                                                         "the same inputs again return it without training)")
    f.add_argument("--qat", action="store_true", help="train in HF's quant_mode=True (straight-through estimators), "
                                                      "after calibrating; start from an FP32 fine-tuned --model")
    f.add_argument("--epochs", type=float, default=1.0)
    f.add_argument("--lr", type=float, help="peak learning rate (default 1e-4 FP32, 1e-5 QAT)")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--seq-len", type=int, help="longest training sequence in tokens (default 128 FP32, 64 QAT)")
    f.add_argument("--max-steps", type=int, help="stop after this many steps (QAT default 300)")
    _calibration_arguments(f)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--force", action="store_true", help="replace an output folder that is not a fine-tuning result")
    f.set_defaults(fn=cmd_finetune)
    e = sub.add_parser("eval", help="accuracy of the compiled integer library next to FP32 PyTorch and HF's "
                                    "quant_mode=True simulation (sentiment test split, held-out VADER sets)")
    e.add_argument("--model", required=True, help="calibrated classifier checkpoint (or, with --embeddings, an "
                                                  "encoder; 'default' is all-MiniLM-L6-v2)")
    e.add_argument("--artifact", help="compiled artifact of --model; compiled there when missing "
                                      "(default: a temporary one)")
    e.add_argument("--embeddings", action="store_true", help="bare encoder: cosine of sentence embeddings to FP32")
    e.add_argument("--limit", type=int, default=1000, help="test sentences, an even sample (4000: all)")
    e.add_argument("--heldout", type=int, default=300, help="sentences per held-out VADER set (0: skip them)")
    e.add_argument("--no-hf", action="store_true", help="leave out HF's simulation (~8x slower than FP32)")
    e.add_argument("--target", default="host", help="target preset of the compiled artifact")
    e.add_argument("--batch", type=int, default=16, help="compiled batch")
    e.add_argument("--seq-len", type=int, default=64, help="longest compiled length; longer text is truncated")
    e.add_argument("--buckets", type=int, nargs="*", default=[16, 32], metavar="LEN", help="shorter compiled lengths")
    e.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    e.add_argument("--finetune", action="store_true", help="first fine-tune --model on the sentiment split in FP32 "
                                                           "and calibrate it (cached in --work)")
    e.add_argument("--qat", action="store_true", help="with --finetune: then quantization-aware training")
    e.add_argument("--work", default="artifacts/sentiment", help="folder for the fine-tuned checkpoints")
    e.add_argument("--qat-steps", type=int, help="QAT steps (default 300)")
    e.add_argument("--qat-lr", type=float, help="QAT peak learning rate (default 1e-5)")
    _calibration_arguments(e)
    e.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"ibert-tvm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
