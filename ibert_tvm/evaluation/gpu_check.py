"""The one-call GPU check: what a bundle of `scripts/gpu_bundle.py build` holds, and what runs it there.

Here (with the compiler) the build compiles the model for the GPU over the grid, computes the
reference's integers for fixed inputs, and packs them with TVM's runtime (no compiler library), the
tvm_ffi wheel for the GPU machine's Python, this package's sources and the checkpoint's weights.
There (Python, numpy and maybe PyTorch; no TVM, no network), `python3 BUNDLE/run.py [--out DIR]`:

- unpacks the runtime and the wheel into a private folder, first on sys.path, TVM_USE_RUNTIME_LIB=1;
- runs every shape of the grid with the runner, each on its own compiled function, and counts the
  elements that differ from the reference's integers;
- times the library against PyTorch FP32 (TF32 off) and FP16 of the same checkpoint, numpy in and
  numpy out for each (inputs copied to the GPU, outputs back, as a caller gets them);
- runs one shape under compute-sanitizer's memcheck and racecheck, a child process each with a time limit;
- prints a markdown table, also written to DIR/gpu-check.md ($OUT by default) beside the sanitizer logs.

Exit status: 0 when every element equals the reference's and the sanitizer found nothing; 1 when an
element differs, a shape fails or the sanitizer reports errors; 2 when the check could not start
(no GPU, a broken bundle). Every loop is bounded in count and the whole run by BUDGET_S.
Module level imports numpy and the standard library only: TVM comes from the bundle.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# -- the bundle's layout (both halves) -------------------------------------------------------------
META = "bundle.json"  # target, model, grid, versions
PAYLOAD = "payload.tar.xz"  # SITE/tvm (runtime only), ARTIFACT/, FP32_MODEL/
EXPECTED = "expected.npz"  # per shape: the inputs and the reference's outputs
SOURCES = "src"  # this package's Python files
FFI_WHEEL = "apache_tvm_ffi-*.whl"
SITE, ARTIFACT, FP32_MODEL = "site", "artifact", "fp32-model"
REPORT = "gpu-check.md"
LIMIT_MIB = 64  # what the device tool carries, working tree included
GRID = [(b, s) for s in (128, 256) for b in (1, 2, 4, 8)]  # the paper's: batch 1/2/4/8 x seq 128/256

RUN_PY = '''"""ibert-tvm's GPU check, one call: python3 run.py [--out DIR] (ibert_tvm/evaluation/gpu_check.py)."""
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here / "src"))
from ibert_tvm.evaluation.gpu_check import main  # noqa: E402

sys.exit(main(here, sys.argv[1:]))
'''

# -- the run's bounds --------------------------------------------------------------------------------
BUDGET_S = 270.0  # the whole run, unpacking included: the device tool's call is short
REPS = 50  # timed calls per system and shape, at most
CELL_S = 2.0  # seconds of timed calls per system and shape, at most
SANITIZER_S = 100.0  # per sanitizer tool, at most
EXIT_FAILED, EXIT_NOT_RUN = 1, 2
ONESHOT_OK = "ibert-tvm one-shot: 0 differing elements"
SANITIZERS = {  # tool -> the summary line it ends with: counts of (findings, errors)
    "memcheck": re.compile(r"ERROR SUMMARY: (\d+) errors?"),
    "racecheck": re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, \d+ warnings?\)"),
}


def key(batch: int, seq: int) -> str:
    return f"{batch}x{seq}"


def fixed_inputs(vocab: int, batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids and mask [batch, seq]: random ids above the special tokens, the last row half padding."""
    rng = np.random.default_rng(batch * 1000 + seq)
    ids = rng.integers(min(1000, vocab // 2), vocab, (batch, seq)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[-1, seq // 2 :] = 0
    return ids, mask


def expected_entries(shape: tuple[int, int], ids: np.ndarray, mask: np.ndarray,
                     outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One shape's arrays as EXPECTED stores them."""
    k = key(*shape)
    return {f"{k}/in/input_ids": ids, f"{k}/in/attention_mask": mask, **{f"{k}/out/{n}": v for n, v in outputs.items()}}


def expected_of(expected: Any, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(ids, mask, the reference's outputs) of one shape from the loaded EXPECTED."""
    k = key(*shape)
    outs = {name.removeprefix(f"{k}/out/"): expected[name] for name in expected.files if name.startswith(f"{k}/out/")}
    return expected[f"{k}/in/input_ids"], expected[f"{k}/in/attention_mask"], outs


def differing(got: dict[str, Any], want: dict[str, np.ndarray]) -> int:
    """Elements of `want` that `got` does not hold exactly; an output missing, or of another shape or
    dtype, differs in all of them."""
    n = 0
    for name, w in want.items():
        g = got.get(name)
        same_kind = isinstance(g, np.ndarray) and g.shape == w.shape and g.dtype == w.dtype
        n += int(np.count_nonzero(g != w)) if same_kind else w.size
    return n


# -- there -------------------------------------------------------------------------------------------
@dataclass
class Row:
    shape: tuple[int, int]
    elements: int
    differing: int | None = None  # None: the shape did not run
    error: str | None = None
    ms: dict[str, float] = field(default_factory=dict)  # system -> median ms per forward


@dataclass
class Sanitized:
    tool: str
    clean: bool | None  # None: inconclusive (timed out, not run)
    summary: str


def say(what: str) -> None:
    """Progress, on stderr: the report is the last thing on stdout."""
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def unpack(bundle: Path, into: Path) -> None:
    """The payload and the tvm_ffi wheel, unpacked under `into`."""
    with tarfile.open(bundle / PAYLOAD) as tar:
        tar.extractall(into, filter="data")
    wheels = sorted(bundle.glob(FFI_WHEEL))
    if len(wheels) != 1:
        raise FileNotFoundError(f"{bundle} should hold one {FFI_WHEEL}, holds {[w.name for w in wheels]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(into / SITE)


def use_runtime(unpacked: Path) -> None:
    """Import TVM from the unpacked runtime: its Python files first on sys.path, the runtime library
    alone (the bundle holds no compiler library)."""
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    sys.path.insert(0, str(unpacked / SITE))


def has_gpu_code(artifact_dir: Path) -> bool:
    from ..device_cuda import device_images

    return bool(device_images(artifact_dir / "model.so"))


def check(runner: Any, expected: Any, grid: list[tuple[int, int]]) -> list[Row]:
    """Every shape of the grid once, on its own function, against the reference's integers."""
    rows = []
    for b, s in grid:
        ids, mask, want = expected_of(expected, (b, s))
        row = Row((b, s), sum(w.size for w in want.values()))
        rows.append(row)
        if runner.plan(b) != [b] or runner.bucket(s) != s:
            row.error = (f"the runner would not run {key(b, s)} on its own function "
                         f"(calls {runner.plan(b)} x {runner.bucket(s)})")
            continue
        try:
            row.differing = differing(runner.run_integer(ids, mask), want)
        except Exception as err:  # noqa: BLE001 - reported in the table, the run goes on
            row.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return rows


def torch_models(model_dir: Path) -> tuple[dict[str, Any], str | None]:
    """PyTorch FP32 (TF32 off) and FP16 of the bundle's checkpoint on the GPU, or why there are none."""
    try:
        import torch
    except ImportError:
        return {}, "PyTorch is not installed: no FP32 / FP16 columns"
    if not torch.cuda.is_available():
        return {}, f"PyTorch {torch.__version__} sees no CUDA GPU: no FP32 / FP16 columns"
    from .fp32 import fp32_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        fp32 = fp32_model(str(model_dir), "IBertModel").float().cuda().eval()  # .float(): whatever loading chose
        fp16 = copy.deepcopy(fp32).half()
    except Exception as err:  # noqa: BLE001 - the INT8 check stands without them
        return {}, f"PyTorch's models did not load: {type(err).__name__}: {err}"[:400]
    return {"PyTorch FP32": fp32, "PyTorch FP16": fp16}, None


def torch_forward(model: Any, ids: np.ndarray, mask: np.ndarray) -> Callable[[], list[Any]]:
    """One forward as a caller runs it: numpy ids to the GPU, the outputs back to the host."""
    import torch

    def run() -> list[Any]:
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(ids.astype(np.int64)).cuda(),
                        attention_mask=torch.from_numpy(mask.astype(np.int64)).cuda())
            return [t.cpu() for t in (out.last_hidden_state, out.pooler_output) if t is not None]

    return run


def time_all(rows: list[Row], runner: Any, expected: Any, models: dict[str, Any], reps: int,
             until: float) -> list[str]:
    """Median ms per forward of each system on each shape that ran, into the rows; cells share what is
    left before `until`, each at most CELL_S. Returns notes on what was not timed."""
    from .bench import WARMUP, timings

    cells = [(row, name) for row in rows if row.differing is not None for name in ("ibert-tvm INT8", *models)]
    failed: dict[str, str] = {}
    for i, (row, name) in enumerate(cells):
        left = until - time.monotonic()
        if left <= 0:
            return [*failed.values(), f"time budget spent: {len(cells) - i} of {len(cells)} cells not timed"]
        if name in failed:
            continue
        ids, mask, _ = expected_of(expected, row.shape)
        fn = torch_forward(models[name], ids, mask) if name in models else lambda: runner.run_integer(ids, mask)
        try:
            row.ms[name] = statistics.median(timings(fn, reps, min(CELL_S, left / (len(cells) - i)), WARMUP)) * 1e3
        except Exception as err:  # noqa: BLE001 - one system's failure leaves the others' numbers
            failed[name] = f"{name} failed at {key(*row.shape)}, not timed further: {type(err).__name__}: {err}"[:400]
        say(f"timed {name} at {key(*row.shape)}: {row.ms.get(name, float('nan')):.3f} ms")
    return list(failed.values())


def sanitizer_exe() -> str | None:
    cuda = os.environ.get("CUDA_PATH", "/usr/local/cuda")
    places = [shutil.which("compute-sanitizer"), f"{cuda}/bin/compute-sanitizer",
              f"{cuda}/compute-sanitizer/compute-sanitizer"]
    return next((p for p in places if p and os.access(p, os.X_OK)), None)


def sanitize(tool: str, exe: str, bundle: Path, unpacked: Path, shape: tuple[int, int], timeout: float,
             logs: Path | None) -> Sanitized:
    """One shape run once under `compute-sanitizer --tool TOOL` in a child process (the one-shot
    runner), killed with its children after `timeout` seconds."""
    if timeout < 5:
        return Sanitized(tool, None, "not run: time budget spent")
    cmd = [exe, "--tool", tool, "--error-exitcode", "86", sys.executable, str(bundle / "run.py"),
           "--oneshot", key(*shape), "--unpacked", str(unpacked)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        timed_out = True
    if logs is not None:
        (logs / f"{tool}.log").write_text(log[-(1 << 20):])
    if timed_out:
        return Sanitized(tool, None, f"timed out after {timeout:.0f} s (inconclusive)")
    counts = [tuple(map(int, (f,) if isinstance(f, str) else f)) for f in SANITIZERS[tool].findall(log)]
    findings, errors = sum(c[0] for c in counts), sum(c[-1] for c in counts)
    tail = " | ".join(log.strip().splitlines()[-3:])[:300]
    if not counts:  # the tool itself did not finish (no device support, say): no verdict on the library
        return Sanitized(tool, None, f"inconclusive: no summary from the tool (exit {proc.returncode}): {tail}")
    if errors or proc.returncode or ONESHOT_OK not in log:
        finished = "" if ONESHOT_OK in log else f"; the run did not finish with 0 differing elements: {tail}"
        return Sanitized(tool, False, f"{errors} errors ({findings} reported), exit {proc.returncode}{finished}")
    return Sanitized(tool, True, "clean (0 errors)" if findings == 0 else f"0 errors ({findings} warnings)")


def oneshot(artifact_dir: Path, expected: Any, shape: tuple[int, int]) -> int:
    """What the sanitizer watches: one forward of one shape, checked."""
    from ..runner import Runner

    ids, mask, want = expected_of(expected, shape)
    with Runner(artifact_dir) as r:
        n = differing(r.run_integer(ids, mask), want)
    print(ONESHOT_OK if n == 0 else f"ibert-tvm one-shot: {n} differing elements", flush=True)
    return 0 if n == 0 else EXIT_FAILED


def environment(gpu: bool) -> str:
    """Where it ran: the GPU (or CPU), Python, the TVM that was imported and whether it is runtime only."""
    import tvm
    from tvm import base

    where = "CPU"
    if gpu:
        dev = tvm.runtime.cuda(0)
        where = f"{dev.device_name} (sm_{dev.compute_version.replace('.', '')})"
    only = "runtime only" if base._RUNTIME_ONLY and "tvm_compiler" not in base._LOADED_LIBS else "WITH the compiler"
    return (f"{where}; Python {sys.version.split()[0]}; TVM {tvm.__version__} ({only}) from "
            f"{Path(tvm.__file__).parent}")


def ratio(row: Row, name: str) -> str:
    ours, theirs = row.ms.get("ibert-tvm INT8"), row.ms.get(name)
    return f"{theirs / ours:.2f}x" if ours and theirs else "-"


def table(rows: list[Row], systems: list[str]) -> str:
    head = ["batch x seq", "differing elements", "ibert-tvm INT8 ms", *(f"{s} ms" for s in systems),
            *(f"{s.split()[-1]} / INT8" for s in systems)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        diff = f"{r.differing:,} of {r.elements:,}" if r.differing is not None else f"not run: {r.error}"
        cells = [f"{r.ms[s]:.3f}" if s in r.ms else "-" for s in ("ibert-tvm INT8", *systems)]
        lines.append("| " + " | ".join([key(*r.shape), diff, *cells, *(ratio(r, s) for s in systems)]) + " |")
    return "\n".join(lines)


def report(meta: dict[str, Any], where: str, rows: list[Row], systems: list[str], sanitized: list[Sanitized],
           notes: list[str], reps: int, passed: bool) -> str:
    total, bad = sum(r.elements for r in rows if r.differing is not None), sum(r.differing or 0 for r in rows)
    failed = [key(*r.shape) for r in rows if r.differing is None]
    verdict = "PASS" if passed else "FAIL"
    lines = [
        f"## ibert-tvm GPU check: {verdict}",
        "",
        f"Library `{meta['target']}` of `{meta['model']}` ({meta['model_class']}), built {meta['built']} with "
        f"TVM {meta['versions'].get('apache-tvm', '?')}; ran on {where}.",
        f"Differing elements against the integer reference: **{bad:,} of {total:,}**"
        + (f"; shapes that did not run: {', '.join(failed)}" if failed else "") + ".",
        f"Times: median ms per forward of up to {reps} calls ({CELL_S:g} s at most per cell) after warm-up "
        "calls, numpy in and numpy out for every system (inputs to the device, outputs back).",
        "",
        table(rows, systems),
        "",
    ]
    lines += [f"- compute-sanitizer {s.tool}: {s.summary}" for s in sanitized]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def run_check(bundle: Path, unpacked: Path, meta: dict[str, Any], expected: Any, reps: int, deadline: float,
              logs: Path | None) -> tuple[str, bool]:
    """(the report, passed) of a bundle unpacked under `unpacked`."""
    from ..runner import Runner

    artifact_dir = unpacked / ARTIFACT
    gpu = has_gpu_code(artifact_dir)
    grid = [tuple(s) for s in meta["grid"]]
    notes = []
    with Runner(artifact_dir) as runner:
        where = environment(gpu)
        rows = check(runner, expected, grid)
        say(f"checked {len(rows)} shapes: {sum(r.differing or 0 for r in rows)} differing elements, "
            f"{sum(r.differing is None for r in rows)} shapes not run")
        models, why = (torch_models(unpacked / FP32_MODEL) if gpu
                       else ({}, "CPU library: the PyTorch columns are for GPUs"))
        if why:
            notes.append(why)
        else:
            notes.append("PyTorch: the checkpoint's weights, carried in bfloat16 (the bundle's size limit), run as "
                         f"FP32 with TF32 off and as FP16; torch {sys.modules['torch'].__version__}")
        sanitize_s = 2 * SANITIZER_S if gpu else 0.0
        notes += time_all(rows, runner, expected, models, reps, deadline - sanitize_s)
    sanitized = []
    exe = sanitizer_exe() if gpu else None
    shape = min(grid, key=lambda bs: (bs[0] < 2, bs[0] * bs[1]))  # a padded row beside a full one, if the grid has it
    if not gpu:
        notes.append("CPU library: nothing for compute-sanitizer to watch")
    elif exe is None:
        notes.append("compute-sanitizer not found (PATH, $CUDA_PATH/bin): memcheck and racecheck not run")
    else:
        for i, tool in enumerate(SANITIZERS):
            left = (deadline - time.monotonic()) / (len(SANITIZERS) - i)
            sanitized.append(sanitize(tool, exe, bundle, unpacked, shape, min(SANITIZER_S, left), logs))
            say(f"compute-sanitizer {tool}: {sanitized[-1].summary}")
        notes.append(f"compute-sanitizer ran {key(*shape)} once per tool; memcheck sees the VM's storage blocks, "
                     "so an overrun into a neighbouring tensor of the same block is not an error it can report")
    passed = (all(r.differing == 0 for r in rows) and all(s.clean is not False for s in sanitized))
    systems = [s for s in ("PyTorch FP32", "PyTorch FP16") if s in models]
    return report(meta, where, rows, systems, sanitized, notes, reps, passed), passed


def main(bundle: Path, argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="run.py", description="ibert-tvm's GPU check of this bundle (see "
                                 "ibert_tvm/evaluation/gpu_check.py); exit 0 pass, 1 fail, 2 not run")
    ap.add_argument("--out", type=Path, default=os.environ.get("OUT") or None,
                    help=f"folder for {REPORT} and the sanitizer logs (default: $OUT, else none)")
    ap.add_argument("--reps", type=int, default=REPS, help="timed calls per system and shape, at most")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run's time, at most")
    ap.add_argument("--oneshot", help=argparse.SUPPRESS)  # BxS: the child that compute-sanitizer watches
    ap.add_argument("--unpacked", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    deadline = time.monotonic() + a.budget_s
    meta = json.loads((bundle / META).read_text())
    expected = np.load(bundle / EXPECTED)
    if a.oneshot:
        use_runtime(a.unpacked)
        b, s = map(int, a.oneshot.split("x"))
        return oneshot(a.unpacked / ARTIFACT, expected, (b, s))
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
    faulthandler.dump_traceback_later(a.budget_s + 60, exit=True)  # a hung call still says where it hung
    with tempfile.TemporaryDirectory(prefix="ibert-tvm-gpu-check-") as tmp:
        try:
            python = f"{sys.version_info.major}.{sys.version_info.minor}"
            if meta["python"] != python:  # the wheel's compiled extension would fail to import, less clearly
                raise RuntimeError(f"this bundle carries tvm_ffi for Python {meta['python']}, this is Python {python}: "
                                   f"build it with scripts/gpu_bundle.py build --python-version {python}")
            unpack(bundle, Path(tmp))
            use_runtime(Path(tmp))
            say(f"unpacked the runtime, the artifact and the FP32 model into {tmp}")
            text, passed = run_check(bundle, Path(tmp), meta, expected, a.reps, deadline, a.out)
        except Exception:  # noqa: BLE001 - the bundle or the machine: say so, distinctly from a failed check
            text, passed = f"## ibert-tvm GPU check: NOT RUN\n\n```\n{traceback.format_exc()}```\n", None
    print(text, flush=True)
    if a.out is not None:
        (a.out / REPORT).write_text(text)
    return 0 if passed else EXIT_NOT_RUN if passed is None else EXIT_FAILED
