"""`ibert-tvm`: compile an I-BERT for a target, run an artifact, or run the demo (the main job)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEMO_SENTENCES = [
    "A gripping, beautifully acted film that stays with you.",
    "One of the most moving movies I have seen this year.",
    "The plot is dull and the dialogue is painfully flat.",
    "I checked my watch every ten minutes; a tedious mess.",
    "The recipe needs two cups of flour and a pinch of salt.",
]


def _read_lines(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def _options(a: argparse.Namespace, **extra):
    from .compile import CompileOptions

    texts = _read_lines(a.calib_texts) if a.calib_texts else None
    if a.calib_texts and not texts:
        raise ValueError(f"calibration text file {a.calib_texts} is empty")
    return CompileOptions(model=a.model, target=a.target, batch=a.batch, seq_len=a.seq_len, calib_texts=texts,
                          records=Path(a.records) if a.records else None, **extra)


def cmd_compile(a: argparse.Namespace) -> int:
    from .compile import compile_model

    print(f"wrote {compile_model(_options(a, out=Path(a.output), force=a.force, buckets=tuple(a.buckets)))}")
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    from .compile import tune_model

    if a.trials is not None and a.trials < 1:
        raise ValueError(f"--trials must be at least 1, got {a.trials}")
    records = tune_model(_options(a), a.trials, a.rpc_tracker, a.key)
    print(f"{len(records)} tile records in {a.records or 'schedules/records'}/")
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


def cmd_run(a: argparse.Namespace) -> int:
    from .runner import Runner, mean_pool

    with Runner(a.artifact, threads=a.threads, rpc=a.rpc, rpc_timeout=a.rpc_timeout) as r:
        ids, mask = r.encode(a.texts, truncate=a.truncate)
        out = r.run(ids, mask)
    result = []
    for i, text in enumerate(a.texts):
        item: dict = {"text": text}
        if "logits" in out:
            logits = out["logits"][i]
            labels = r.manifest["label_names"]
            item["label"] = labels[int(np.argmax(logits))] if labels else int(np.argmax(logits))
            item["logits"] = [round(float(v), 5) for v in logits]
        else:
            emb = mean_pool(out["last_hidden_state"][i : i + 1], mask[i : i + 1])[0]
            item["embedding"] = [round(float(v), 4) for v in (emb if a.json else emb[:6])]
        result.append(item)
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
    print(f"artifact: {out}  (target {r.manifest['target']['preset']}, seq_len {r.seq_len})")
    for i, s in enumerate(DEMO_SENTENCES):
        print(f"  [{i}] {s}")
    print("\npair   int8-TVM   fp32-PyTorch")
    for i in range(len(DEMO_SENTENCES)):
        for j in range(i + 1, len(DEMO_SENTENCES)):
            print(f"{i}-{j}    {sim_int[i, j]:+.4f}    {sim_fp[i, j]:+.4f}")
    cos = (ours * ref).sum(1)
    print(f"\ncosine(int8 embedding, fp32 embedding): mean {cos.mean():.4f}, min {cos.min():.4f}")
    return 0


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="transformers checkpoint directory, or 'default' (all-MiniLM-L6-v2)")
    p.add_argument("--target", default="host", help="target preset (`ibert-tvm targets` lists them); default: this machine")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-texts", help="text file, one calibration sentence a line (needed when uncalibrated)")
    p.add_argument("--records", help="tuning records folder (default: schedules/records)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ibert-tvm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile a checkpoint into an artifact folder")
    _model_arguments(c)
    c.add_argument("-o", "--output", default="artifacts/model")
    c.add_argument("--force", action="store_true", help="replace an existing artifact")
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
    from . import bench

    b = sub.add_parser("bench", help="time the INT8 library against PyTorch, ONNX Runtime and HF, in one run",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(b)
    b.set_defaults(fn=bench.run)
    ts = sub.add_parser("targets", help="list the target presets")
    ts.add_argument("--json", action="store_true")
    ts.set_defaults(fn=cmd_targets)
    r = sub.add_parser("run", help="run an artifact on text")
    r.add_argument("artifact")
    r.add_argument("texts", nargs="+")
    r.add_argument("--json", action="store_true")
    r.add_argument("--truncate", action="store_true", help="cut text longer than the compiled length")
    r.add_argument("--threads", type=int, help="worker threads (default: every CPU this process may use)")
    r.add_argument("--rpc", metavar="HOST:PORT", help="run on a board serving `python -m tvm.exec.rpc_server`")
    r.add_argument("--rpc-timeout", type=float, default=10.0, help="seconds to wait for the RPC server")
    r.set_defaults(fn=cmd_run)
    d = sub.add_parser("demo", help="compile the default model here and compare sentence similarities with FP32")
    d.add_argument("-o", "--output", default="artifacts/default-host")
    d.add_argument("--seq-len", type=int, default=128)
    d.add_argument("--force", action="store_true", help="recompile even if the artifact exists")
    d.set_defaults(fn=cmd_demo)
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
