"""`ibert-tvm bench`: our INT8 library against what people deploy today, measured in one run.

Each system lives in its own worker process (one runtime per process, as deployed; in a shared
process PyTorch's OpenMP pool and TVM's thread pool slow each other down), built one after the
other, then timed in interleaved blocks so machine drift hits all alike. Idle workers are frozen
(SIGSTOP): an idle thread pool still spins and, on 2 cores, cost the measured system a third.
Each block has untimed warm-up calls (calls after a pause are slow). Peak RSS is the worker's
high-water mark (VmHWM), loading what it deploys included (our artifact, ONNX Runtime's .onnx file:
both made beforehand in the parent); the INT8 library's worker loads the TVM runtime library only
(TVM_USE_RUNTIME_LIB=1), as a deployment would. "INT8 GEMM floor" times the model's matrix products alone with `torch._int_mm`
(oneDNN): the fraction of it a system reaches says how close to the hardware it is.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..files import cache_dir

WARMUP = 3
OURS, BASE, FLOOR = "ibert-tvm INT8", "PyTorch FP32", "INT8 GEMM floor"
SYSTEMS = {
    OURS: "the compiled integer-only library (TVM runtime only)",
    "TVM FP32": "the FP32 model through TVM's own PyTorch frontend, TVM-fused ops, plain CPU schedules",
    BASE: "PyTorch FP32 eager (quant_mode=False)",
    "PyTorch dynamic INT8": "torch quantize_dynamic of the FP32 model's Linear layers",
    "ONNX Runtime FP32": "dynamo-exported FP32 model",
    "ONNX Runtime INT8": "onnxruntime quantize_dynamic, s8 weights",
    "HF quant_mode=True": "HuggingFace's float simulation of I-BERT",
    FLOOR: "the model's GEMMs alone, torch._int_mm (oneDNN)",
}
ROBERTA_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    vocab_size=50265, max_position_embeddings=514, pad_token_id=1)
CACHE = cache_dir()


def model_dir(name: str) -> Path:
    """The checkpoint of a benchmark model: `default` (MiniLM-L6), or `roberta-base` shaped with
    random weights (no package ships RoBERTa weights; speed does not depend on their values)."""
    from .. import checkpoint

    if name != "roberta-base":
        return checkpoint.resolve(name)
    out = CACHE / "bench-roberta-base"
    if not (out / "config.json").exists():
        import shutil

        import torch
        from transformers import IBertConfig, IBertModel

        torch.manual_seed(0)
        IBertModel(IBertConfig(**ROBERTA_BASE, quant_mode=True)).save_pretrained(out)
        # its ids only need to fall inside the vocabulary: MiniLM's tokenizer serves calibration
        shutil.copyfile(checkpoint.resolve("default") / "tokenizer.json", out / "tokenizer.json")
    return out


def artifact_for(model: str, batch: int, seq: int) -> Path:
    """The INT8 artifact for (model, batch, seq), compiled here once (in the parent: the worker
    that runs it must not import the compiler)."""
    from .. import artifact
    from ..compile import compile_model

    out = Path(f"artifacts/bench-{model}-{batch}x{seq}")
    opt = compile_options(model, batch=batch, seq_len=seq, out=out, force=True)
    return artifact.reuse(out, lambda: compile_model(opt))


def compile_options(model: str, **fields) -> "CompileOptions":  # noqa: F821
    """How a benchmark model is loaded and calibrated: `default` by its own rules, the random
    roberta-base on the default calibration sentences."""
    from ..compile import CompileOptions, default_calibration_texts

    if model == "default":
        return CompileOptions(model=model, progress=False, **fields)
    return CompileOptions(model=str(model_dir(model)), calib_texts=default_calibration_texts(64), progress=False,
                          **fields)


def prepare(name: str, model: str, batch: int, seq: int) -> Path | None:
    """What a system deploys, made here in the parent so that no worker's peak RSS counts the
    compiler or exporter: our artifact, ONNX Runtime's .onnx file, TVM's FP32 library."""
    if name == OURS:
        return artifact_for(model, batch, seq)
    from .fp32 import fp32_model

    if name == "TVM FP32":
        from .baselines import tvm_fp32_library

        return tvm_fp32_library(fp32_model(str(model_dir(model)), "IBertModel"), batch, seq, CACHE / "tvm-fp32")
    if name.startswith("ONNX Runtime"):
        from .baselines import onnx_path

        return onnx_path(fp32_model(str(model_dir(model)), "IBertModel"), batch, seq, CACHE / "onnx", "INT8" in name)
    return None


def _system(name: str, model: str, batch: int, seq: int, threads: int, lib: Path | None) -> Callable[[], object]:
    """Build one system inside its worker (`lib`: what `prepare` made for it); returns a
    zero-argument callable running one forward."""
    ids = np.random.default_rng(0).integers(1000, 20000, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    if name in (OURS, "TVM FP32"):
        # As deployed: the runtime library, not the compiler, and no PyTorch (the runner's install
        # has none; tvm_ffi imports it eagerly when present, ~190 MiB of this worker's peak RSS)
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    if name == OURS:
        from ..runner import Runner

        r = Runner(lib, threads=threads)
        return lambda: r.run_integer(ids, mask)
    if name == "TVM FP32":
        from ..threads import use_threads
        from .fp32 import tvm_fp32_session

        use_threads(threads)
        session = tvm_fp32_session(lib)
        return lambda: session(ids, mask)
    if name.startswith("ONNX Runtime"):
        from .baselines import onnx_session

        session = onnx_session(lib, threads)
        return lambda: session(ids, mask)
    import torch

    torch.set_num_threads(threads)
    if name == FLOOR:
        return _gemm_floor(model, batch, seq)
    if name == "HF quant_mode=True":
        from ..compile import load_calibrated

        net, _ = load_calibrated(compile_options(model, seq_len=seq))
    else:
        from .fp32 import fp32_model

        net = fp32_model(str(model_dir(model)), "IBertModel")
        if name == "PyTorch dynamic INT8":
            from .baselines import torch_dynamic_int8

            net = torch_dynamic_int8(net)
    ti, tm = torch.tensor(ids), torch.tensor(mask)

    def run() -> None:
        with torch.no_grad():
            net(input_ids=ti, attention_mask=tm)

    return run


def _gemm_floor(model: str, batch: int, seq: int) -> Callable[[], None]:
    """Every INT8 matrix product of one forward (projections, FFN, per-head attention), nothing else."""
    import torch
    from transformers import IBertConfig

    c = IBertConfig.from_pretrained(model_dir(model))
    rows, h, d = batch * seq, c.hidden_size, c.hidden_size // c.num_attention_heads
    shapes = [(rows, h, 3 * h), (rows, h, h), (rows, h, c.intermediate_size), (rows, c.intermediate_size, h)]
    shapes += [(seq, d, seq), (seq, seq, d)] * (batch * c.num_attention_heads)
    # torch._int_mm wants M > 16 and K, N multiples of 8
    mats = [(torch.randint(-128, 127, (max(m, 32), k), dtype=torch.int8), torch.randint(-128, 127, (k, n), dtype=torch.int8))
            for m, k, n in shapes]

    def run() -> None:
        for _ in range(c.num_hidden_layers):
            for a, b in mats:
                torch._int_mm(a, b)

    return run


def _worker(conn, name: str, model: str, batch: int, seq: int, threads: int, lib: Path | None) -> None:
    try:
        fn = _system(name, model, batch, seq, threads, lib)
        fn()
    except Exception as err:  # noqa: BLE001 - reported as a table cell, the other systems go on
        conn.send(f"failed: {type(err).__name__}: {err}".splitlines()[0][:200])
        return
    conn.send("ready")
    while (reps := conn.recv()) > 0:
        for _ in range(WARMUP):
            fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        conn.send(times)
    conn.send(peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's high-water mark. Not ru_maxrss: Linux carries it across exec, so a spawned
    worker would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(systems: list[str], model: str, batch: int, seq: int, rounds: int, reps: int, threads: int
            ) -> dict[str, tuple[list[float], float] | str]:
    """name -> (times, peak RSS MiB), or the reason it could not run."""
    ctx = mp.get_context("spawn")
    workers, result = {}, {}
    for name in systems:  # one after the other: building would skew the others
        try:
            lib = prepare(name, model, batch, seq)
        except Exception as err:  # noqa: BLE001 - as in the worker: a table cell, the others go on
            result[name] = f"failed: {type(err).__name__}: {err}".splitlines()[0][:200]
            continue
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, name, model, batch, seq, threads, lib))
        proc.start()
        status = parent.recv()
        if status != "ready":
            result[name] = status
            proc.join()
            continue
        os.kill(proc.pid, signal.SIGSTOP)
        workers[name] = (parent, proc)
    times: dict[str, list[float]] = {k: [] for k in workers}
    for _ in range(rounds):
        for name, (conn, proc) in workers.items():
            os.kill(proc.pid, signal.SIGCONT)
            conn.send(reps)
            times[name] += conn.recv()
            os.kill(proc.pid, signal.SIGSTOP)
    for name, (conn, proc) in workers.items():
        os.kill(proc.pid, signal.SIGCONT)
        conn.send(0)
        result[name] = (times[name], conn.recv())
        proc.join()
    return result


def table(rows: list[tuple[str, str, dict]]) -> str:
    out = ["| model | batch x seq | system | median ms | vs PyTorch FP32 | of INT8 GEMM floor | peak RSS MiB |",
           "|---|---|---|---|---|---|---|"]
    for model, shape, res in rows:
        med = {k: float(np.median(v[0])) * 1e3 for k, v in res.items() if not isinstance(v, str)}
        for name in SYSTEMS:
            if name not in res:
                continue
            if isinstance(res[name], str):
                out.append(f"| {model} | {shape} | {name} | {res[name]} | | | |")
                continue
            ms = med[name]
            speed = f"{med[BASE] / ms:.2f}x" if BASE in med else ""
            floor = f"{med[FLOOR] / ms:.0%}" if FLOOR in med and name != FLOOR else ""
            out.append(f"| {model} | {shape} | {name} | {ms:.2f} | {speed} | {floor} | {res[name][1]:.0f} |")
    return "\n".join(out)


def plot(rows: list[tuple[str, str, dict]], png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = [f"{m}\n{s}" for m, s, _ in rows]
    names = [n for n in SYSTEMS if any(n in r and not isinstance(r[n], str) for *_, r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(rows)), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [float(np.median(r[name][0])) * 1e3 if name in r and not isinstance(r[name], str) else 0 for *_, r in rows]
        ax.bar(np.arange(len(rows)) + i * width, vals, width, label=name)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, groups)
    ax.set_ylabel("median latency (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    return True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["default"], choices=["default", "roberta-base"],
                   help="default: all-MiniLM-L6-v2; roberta-base: its shapes, random weights")
    p.add_argument("--shapes", nargs="+", default=["1x128", "8x128", "1x256"], metavar="BxS")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS), metavar="NAME",
                   help="any of: " + "; ".join(SYSTEMS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=15, help="timed calls per block (after 3 untimed)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--png", default="artifacts/bench.png")


def run(a: argparse.Namespace) -> int:
    shapes = []
    for s in a.shapes:
        try:
            b, n = map(int, s.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape must look like 1x128 (batch x seq), got {s!r}") from None
        shapes.append((b, n))
    systems = [s for s in SYSTEMS if s in a.systems]
    rows = [(m, f"{b}x{n}", measure(systems, m, b, n, a.rounds, a.reps, a.threads)) for m in a.models for b, n in shapes]
    print(table(rows))
    if plot(rows, Path(a.png)):
        print(f"\nplot: {a.png}")
    return 0
