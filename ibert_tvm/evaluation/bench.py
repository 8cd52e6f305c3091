"""`ibert-tvm bench`: our INT8 library against what people deploy today, measured in one run.

Each system lives in its own worker process (one runtime per process, as deployed; in a shared
process PyTorch's OpenMP pool and the other runtimes' thread pools slow each other down), built one
after the other, then timed in interleaved rounds so machine drift hits all alike. Idle workers are
frozen (SIGSTOP): an idle thread pool still spins and, on 2 cores, cost the measured system a third
(PyTorch's OpenMP workers cost ours 9.8 ms instead of 2.6). Each block has untimed warm-up calls
(calls after a pause are slow). Speed is reported as each system's median time over ibert-tvm's in
the same run. Peak RSS is the worker's high-water mark (VmHWM), loading what it deploys included
(our artifact, the .onnx files, OpenVINO's IR: all made beforehand in the parent); the workers of
ibert-tvm, TVM, ONNX Runtime and OpenVINO run without PyTorch, as a deployment would. The INT8 GEMM
floor times the model's matrix products alone with `torch._int_mm` (oneDNN): the fraction of it a
system reaches says how close to the hardware it is.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import cache_dir

WARMUP = 3
SETTLE_S = 0.3  # PyTorch's OpenMP workers spin about this long after their last call (the parent's too)
CALIB_SENTENCES = 64  # OpenVINO INT8's calibration: a few dozen of the sentences our compile calibrates on


@dataclass(frozen=True)
class System:
    about: str
    needs: tuple[str, ...] = ()  # modules beyond the compile extra; the bench extra installs them


OURS, FLOOR = "ibert-tvm", "int8-gemm-floor"
SYSTEMS = {
    OURS: System("the compiled integer-only library (TVM runtime only)"),
    "openvino-int8": System("OpenVINO, NNCF static INT8 (transformer preset: SmoothQuant, bias correction)",
                            ("openvino", "nncf")),
    "ort-int8": System("ONNX Runtime as it advises for BERT: transformers' class exported, optimize_model's fused "
                       "Attention/SkipLayerNorm/BiasGelu, quantize_dynamic (per-channel s8)", ("onnxruntime", "onnx")),
    "torch-dynamic-int8": System("PyTorch quantize_dynamic of the FP32 model's Linear layers"),
    "openvino-fp32": System("OpenVINO FP32 (INFERENCE_PRECISION_HINT f32)", ("openvino",)),
    "ort-fp32": System("ONNX Runtime FP32, the fused graph ort-int8 quantizes", ("onnxruntime", "onnx")),
    "tvm-fp32": System("the FP32 model through TVM's PyTorch frontend, TVM-fused ops, plain CPU schedules"),
    "torch-fp32": System("PyTorch FP32 eager (IBert, quant_mode=False)"),
    "hf-ibert-sim": System("HuggingFace's float simulation of I-BERT (quant_mode=True)"),
    FLOOR: System("the model's INT8 GEMMs alone, torch._int_mm (oneDNN)"),
}
TORCH_FREE = (OURS, "tvm-fp32", "ort-int8", "ort-fp32", "openvino-int8", "openvino-fp32")
INT8_PEERS = ("openvino-int8", "ort-int8", "torch-dynamic-int8")  # the headline compares ours with the fastest
ROBERTA_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    vocab_size=50265, max_position_embeddings=514, pad_token_id=1)
CACHE = cache_dir()


def install_hint(modules: list[str]) -> str:
    return f"needs {' and '.join(modules)}, which this install lacks: pip install \"ibert-tvm[bench]\""


def unavailable(name: str) -> str | None:
    """Why system `name` cannot run in this install (a module it needs is missing), else None."""
    lacking = [m for m in SYSTEMS[name].needs if importlib.util.find_spec(m) is None]
    return f"not installed: {install_hint(lacking)}" if lacking else None


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


def artifact_for(model: str, batch: int, seq: int, target: str = "host") -> Path:
    """The INT8 artifact for (model, batch, seq) and a target preset this machine runs, compiled in
    the parent (the worker that runs it must not import the compiler), afresh each run: one left by
    an earlier compiler times old kernels. Tiles are tuned for this CPU as `compile` tunes them
    (`host` only, once: the records are kept)."""
    from ..compile import DEFAULT_TUNE_SECONDS, compile_model

    out = Path(f"artifacts/bench-{model}-{batch}x{seq}" + ("" if target == "host" else f"-{target}"))
    return compile_model(compile_options(model, target=target, batches=(batch,), seq_len=seq, out=out, force=True,
                                         tune_seconds=DEFAULT_TUNE_SECONDS))


def compile_options(model: str, **fields) -> "CompileOptions":  # noqa: F821
    """How a benchmark model is loaded and calibrated: `default` by its own rules, the random
    roberta-base on the default calibration sentences."""
    from ..compile import CompileOptions, default_calibration_texts

    if model == "default":
        return CompileOptions(model=model, progress=False, **fields)
    return CompileOptions(model=str(model_dir(model)), calib_texts=default_calibration_texts(64), progress=False,
                          **fields)


def calibration_feeds(tokenizer_file: Path, seq: int, pad: int) -> list[dict[str, np.ndarray]]:
    """OpenVINO INT8's calibration set: our compile's calibration sentences, tokenized one a feed
    (each at its own length, so no padding enters the statistics)."""
    from ..calibrate import tokenizer_batches
    from ..compile import default_calibration_texts

    batches = tokenizer_batches(tokenizer_file, default_calibration_texts(CALIB_SENTENCES), 1, seq, pad)
    return [{k: v.numpy() for k, v in b.items()} for b in batches]


def prepare(name: str, model: str, batch: int, seq: int, target: str = "host") -> Path | None:
    """What a system deploys, made here in the parent so that no worker's peak RSS counts the
    compiler or exporter: our artifact, the .onnx files, OpenVINO's IR, TVM's FP32 library."""
    if name == OURS:
        return artifact_for(model, batch, seq, target)
    if name not in TORCH_FREE:
        return None
    from . import baselines
    from .fp32 import fp32_model

    if name.startswith("ort-"):
        return baselines.onnx_path(baselines.transformers_fp32(model_dir(model)), CACHE / "onnx",
                                   int8=name == "ort-int8")
    net = fp32_model(str(model_dir(model)), "IBertModel")
    if name == "tvm-fp32":
        return baselines.tvm_fp32_library(net, batch, seq, CACHE / "tvm-fp32")
    feeds = None
    if name == "openvino-int8":
        feeds = calibration_feeds(model_dir(model) / "tokenizer.json", seq, net.config.pad_token_id)
    return baselines.openvino_ir(net, CACHE / "openvino", feeds)


# -- in the worker ---------------------------------------------------------------------------------
Session = Callable[[np.ndarray, np.ndarray], np.ndarray]


def onnx_session(path: Path, threads: int) -> Session:
    """ONNX Runtime on CPU over `baselines.onnx_path`'s model: `run(ids, mask) -> last_hidden_state`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda ids, mask: sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]


def openvino_session(xml: Path, batch: int, seq: int, threads: int, *, f32: bool) -> Session:
    """OpenVINO on CPU over `baselines.openvino_ir`, set up as its latency guide says: the static
    shape, one stream, one infer request; `f32` keeps a bf16-capable CPU from running FP32 in bf16."""
    import openvino as ov

    core = ov.Core()
    net = core.read_model(xml)
    net.reshape({"input_ids": [batch, seq], "attention_mask": [batch, seq]})
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    req = core.compile_model(net, "CPU", config).create_infer_request()

    def run(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        req.infer({"input_ids": ids, "attention_mask": mask})
        return req.get_output_tensor(0).data

    return run


def _system(name: str, model: str, ids: np.ndarray, threads: int, lib: Path | None) -> Callable[[], object]:
    """Build one system inside its worker (`lib`: what `prepare` made for it); returns a
    zero-argument callable running one forward on `ids` [batch, seq], all of them attended."""
    (batch, seq), mask = ids.shape, np.ones_like(ids)
    if name in TORCH_FREE:
        # As deployed: no PyTorch (tvm_ffi imports it eagerly when present, ~190 MiB of peak RSS)
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    if name in (OURS, "tvm-fp32"):
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"  # the runtime library, not the compiler
    if name == OURS:
        from ..runner import Runner

        r = Runner(lib, threads=threads)
        return lambda: r.run_integer(ids, mask)
    if name == "tvm-fp32":
        from ..threads import use_threads
        from .fp32 import tvm_fp32_session

        use_threads(threads)
        session = tvm_fp32_session(lib)
    elif name.startswith("ort-"):
        session = onnx_session(lib, threads)
    elif name.startswith("openvino-"):
        session = openvino_session(lib, batch, seq, threads, f32=name == "openvino-fp32")
    else:
        return _torch_system(name, model, ids, mask, threads)
    return lambda: session(ids, mask)


def _torch_system(name: str, model: str, ids: np.ndarray, mask: np.ndarray, threads: int) -> Callable[[], object]:
    import torch

    torch.set_num_threads(threads)
    if name == FLOOR:
        return _gemm_floor(model, *ids.shape)
    if name == "hf-ibert-sim":
        from ..compile import load_calibrated

        net, _ = load_calibrated(compile_options(model, seq_len=ids.shape[1]))
    else:
        from .fp32 import fp32_model

        net = fp32_model(str(model_dir(model)), "IBertModel")
        if name == "torch-dynamic-int8":
            from .baselines import torch_dynamic_int8

            net = torch_dynamic_int8(net)
    ti, tm = torch.tensor(ids), torch.tensor(mask)

    def run() -> None:
        with torch.no_grad():
            net(input_ids=ti, attention_mask=tm)

    return run


def _gemm_floor(model: str, batch: int, seq: int) -> Callable[[], None]:
    """Every INT8 matrix product of one forward (projections, FFN, per-head attention), nothing else."""
    from transformers import IBertConfig

    c = IBertConfig.from_pretrained(model_dir(model))
    rows, h, d = batch * seq, c.hidden_size, c.hidden_size // c.num_attention_heads
    shapes = [(rows, h, 3 * h), (rows, h, h), (rows, h, c.intermediate_size), (rows, c.intermediate_size, h)]
    shapes += [(seq, d, seq), (seq, seq, d)] * (batch * c.num_attention_heads)
    return int8_gemms(shapes, c.num_hidden_layers)


def int8_gemms(shapes: list[tuple[int, int, int]], times: int = 1) -> Callable[[], None]:
    """A callable running `torch._int_mm` on random INT8 matrices of each (M, K, N) in `shapes`,
    `times` over: the oneDNN floor of those products (the bench's floor, profile's per role)."""
    import torch

    # torch._int_mm wants M > 16 and K, N multiples of 8: smaller products are timed padded up
    mats = [(torch.randint(-128, 127, (max(m, 32), -(-k // 8) * 8), dtype=torch.int8),
             torch.randint(-128, 127, (-(-k // 8) * 8, -(-n // 8) * 8), dtype=torch.int8)) for m, k, n in shapes]

    def run() -> None:
        for _ in range(times):
            for a, b in mats:
                torch._int_mm(a, b)

    return run


def _worker(conn, name: str, model: str, ids: np.ndarray, threads: int, lib: Path | None) -> None:
    try:
        fn = _system(name, model, ids, threads, lib)
        fn()
    except Exception as err:  # noqa: BLE001 - reported as a table cell, the other systems go on
        conn.send(_failure(err))
        return
    conn.send("ready")
    while (reps := conn.recv()) > 0:
        conn.send(timings(fn, reps, warmup=WARMUP))
    conn.send(peak_rss_mib())


def timings(fn: Callable[[], object], reps: int, budget_s: float = float("inf"), warmup: int = 0) -> list[float]:
    """Seconds of each of `reps` calls of `fn`, fewer when they add up to `budget_s` first (at least one),
    after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    while len(out) < reps and (not out or sum(out) < budget_s):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _failure(err: Exception) -> str:
    return f"failed: {type(err).__name__}: {err}".splitlines()[0][:200]


def peak_rss_mib() -> float:
    """This process's high-water mark. Not ru_maxrss: Linux carries it across exec, so a spawned
    worker would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# -- in the parent ---------------------------------------------------------------------------------
Result = dict[str, tuple[list[float], float] | str]


def random_ids(model: str, batch: int, seq: int) -> np.ndarray:
    """Token ids every system gets: random, from the upper part of the vocabulary (no special tokens)."""
    vocab = json.loads((model_dir(model) / "config.json").read_text())["vocab_size"]
    return np.random.default_rng(0).integers(min(1000, vocab // 2), min(20000, vocab), (batch, seq), dtype=np.int64)


def measure(systems: list[str], model: str, batch: int, seq: int, rounds: int, reps: int, threads: int,
            target: str = "host") -> Result:
    """name -> (times in s, peak RSS MiB), or why it did not run (not installed, failed)."""
    ctx = mp.get_context("spawn")
    workers, result = {}, {}
    ids = random_ids(model, batch, seq)
    for name in systems:  # one after the other: building would skew the others
        if why := unavailable(name):
            result[name] = why
            continue
        try:
            lib = prepare(name, model, batch, seq, target)
        except Exception as err:  # noqa: BLE001 - as in the worker: a table cell, the others go on
            result[name] = _failure(err)
            continue
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, name, model, ids, threads, lib))
        proc.start()
        status = parent.recv()
        if status != "ready":
            result[name] = status
            proc.join()
            continue
        os.kill(proc.pid, signal.SIGSTOP)
        workers[name] = (parent, proc)
    time.sleep(SETTLE_S)  # this process built the systems: its own thread pools go quiet first
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


def median_ms(res: Result, name: str) -> float | None:
    cell = res.get(name)
    return float(np.median(cell[0])) * 1e3 if isinstance(cell, tuple) else None


RATIO = f"time vs {OURS}"
LEGEND = (f"{RATIO}: a system's median over {OURS}'s in the same run (2.00x: takes twice as long as {OURS}; "
          f"0.50x: half as long)")


def table(rows: list[tuple[str, str, Result]]) -> str:
    out = [f"| model | batch x seq | system | median ms | {RATIO} | of INT8 GEMM floor | peak RSS MiB |",
           "|---|---|---|---|---|---|---|"]
    for model, shape, res in rows:
        ours, floor = median_ms(res, OURS), median_ms(res, FLOOR)
        for name in (n for n in SYSTEMS if n in res):
            ms = median_ms(res, name)
            if ms is None:
                out.append(f"| {model} | {shape} | {name} | {res[name]} | | | |")
                continue
            ratio = f"{ms / ours:.2f}x" if ours else ""
            of_floor = f"{floor / ms:.0%}" if floor and name != FLOOR else ""
            out.append(f"| {model} | {shape} | {name} | {ms:.2f} | {ratio} | {of_floor} | {res[name][1]:.0f} |")
    return "\n".join([*out, "", LEGEND])


def headline(rows: list[tuple[str, str, Result]]) -> str:
    """One line per model and shape: our median over the fastest INT8 peer's of that run, named."""
    out = []
    for model, shape, res in rows:
        ours = median_ms(res, OURS)
        peers = {n: ms for n in INT8_PEERS if (ms := median_ms(res, n)) is not None}
        if ours is None or not peers:
            continue
        best = min(peers, key=peers.get)
        out.append(f"{model} {shape}: {OURS} {ours:.2f} ms, {ours / peers[best]:.2f}x the time of {best} "
                   f"({peers[best]:.2f} ms), the fastest INT8 peer run ({', '.join(peers)})")
    return "\n".join(out)


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo's "model name" (x86), else lscpu's "Model name"
    (ARM's cpuinfo has none; lscpu decodes the part number)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"},
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")]
    return names[0] if names else "unknown CPU"


def title(a: argparse.Namespace) -> str:
    ours = "" if a.target == "host" else f", {OURS} compiled for {a.target}"
    return (f"ibert-tvm bench on {cpu_model()}{ours}: {a.threads} threads, {a.rounds} rounds x {a.reps} calls\n"
            f"{', '.join(a.models)} at batch x seq {', '.join(a.shapes)}; median latency")


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bars(ax: Any, names: list[str], values: list[float | None], labels: list[str], orange: list[bool],
         xlabel: str, room: float) -> None:
    """Labelled horizontal bars on a linear axis, the first name on top; `room`: the axis runs to
    that multiple of the longest bar, so that the labels fit."""
    drawn = ax.barh(np.arange(len(names)), [v or 0.0 for v in values],
                    color=["tab:orange" if o else "tab:blue" for o in orange])
    ax.bar_label(drawn, labels, padding=3, fontsize=8)
    ax.set_yticks(np.arange(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, room * max((v for v in values if v), default=1.0))
    ax.set_xlabel(xlabel, fontsize=8)


def save(fig: Any, png: Path, heading: str) -> None:
    """`heading` as the figure's title and the PNG's Title metadata."""
    fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120, metadata={"Title": heading})
    pyplot().close(fig)


def plot(rows: list[tuple[str, str, Result]], png: Path, heading: str) -> None:
    """Horizontal bars, one panel per model and shape (each on its own linear axis), every bar
    labelled with its median and its time against ours; `heading` is the title (PNG metadata too)."""
    names = [n for n in SYSTEMS if any(n in res for *_, res in rows)]
    fig, axes = pyplot().subplots(len(rows), 1, squeeze=False,
                                  figsize=(9, 1.0 + len(rows) * (0.9 + 0.38 * len(names))))
    for ax, (model, shape, res) in zip(axes[:, 0], rows):
        ours = median_ms(res, OURS)
        ms = [median_ms(res, n) for n in names]
        bars(ax, names, ms, [_bar_label(res.get(n), v, ours) for n, v in zip(names, ms)], [n == OURS for n in names],
             f"median ms per forward (lower is faster); in brackets: time vs {OURS}", 1.3)
        ax.set_title(f"{model}, batch x seq {shape}", fontsize=9)
        ax.set_ylabel("system", fontsize=8)
    save(fig, png, heading)


def _bar_label(cell: tuple | str | None, ms: float | None, ours: float | None) -> str:
    if ms is None:
        return cell.split(":")[0] if isinstance(cell, str) else ""  # "not installed", "failed"
    return f"{ms:.2f} ms" + (f"  ({ms / ours:.2f}x)" if ours else "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["default"], choices=["default", "roberta-base"],
                   help="default: all-MiniLM-L6-v2; roberta-base: its shapes, random weights")
    p.add_argument("--shapes", nargs="+", default=["1x128", "8x128", "1x256"], metavar="BxS",
                   help="input shapes, batch x sequence length")
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), metavar="NAME",
                   help="systems to time, by the names listed below (default: all)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds: each system's block once a round")
    p.add_argument("--reps", type=int, default=15, help=f"timed calls per block (after {WARMUP} untimed)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads of every system")
    p.add_argument("--target", default="host", help=f"the preset {OURS} compiles for, one this machine runs (e.g. "
                                                    "x86-avx2 on a CPU with more, to time those kernels)")
    p.add_argument("--png", default="artifacts/bench.png", help="the plot")
    width = max(map(len, SYSTEMS))
    p.epilog = "systems:\n" + "\n".join(f"  {n:<{width}}  {s.about}" for n, s in SYSTEMS.items())


def run(a: argparse.Namespace) -> int:
    shapes = []
    for s in a.shapes:
        try:
            b, n = map(int, s.lower().split("x"))
        except ValueError:
            raise ValueError(f"shape must look like 1x128 (batch x seq), got {s!r}") from None
        shapes.append((b, n))
    systems = [s for s in SYSTEMS if s in (a.systems or SYSTEMS)]
    for name in systems:
        if why := unavailable(name):
            print(f"ibert-tvm bench: skipping {name}: {why}", file=sys.stderr)
    rows = [(m, f"{b}x{n}", measure(systems, m, b, n, a.rounds, a.reps, a.threads, a.target))
            for m in a.models for b, n in shapes]
    if a.target != "host":
        print(f"{OURS}: compiled for {a.target}\n")
    print(table(rows))
    if line := headline(rows):
        print(f"\n{line}")
    if importlib.util.find_spec("matplotlib") is None:
        print(f"\nno plot: it {install_hint(['matplotlib'])}", file=sys.stderr)
    elif any(median_ms(res, n) for *_, res in rows for n in res):
        plot(rows, Path(a.png), title(a))
        print(f"\nplot: {a.png}")
    return 0
