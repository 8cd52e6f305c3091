"""Speed of the compiled INT8 library against PyTorch FP32 eager, measured in the same run.

    .venv/bin/python scripts/bench.py [--shapes 1x128 8x128] [--rounds 7] [--png bench.png]

Both systems run interleaved in blocks (so machine drift hits them alike) on the default model;
the table reports medians and the speed-up over FP32. Between blocks the process sleeps
briefly: TVM's and OpenMP's worker threads spin after a call, and on 2 cores a spinning pool
starves the other system's threads. Prints markdown; writes a PNG if matplotlib is installed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ibert_tvm.compile import CompileOptions, compile_model
from ibert_tvm.fp32 import fp32_model
from ibert_tvm.runner import Runner


SETTLE_S = 0.2


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["1x128", "8x128"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--png", default="artifacts/bench.png")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fp32 = fp32_model("default", "IBertModel")
    rows = []
    for shape in a.shapes:
        b, s = map(int, shape.split("x"))
        out = Path(f"artifacts/bench-default-{b}x{s}")
        if not (out / "manifest.json").exists():
            compile_model(CompileOptions(model="default", batch=b, seq_len=s, out=out, force=True))
        r = Runner(out)
        ids = np.random.default_rng(0).integers(1000, 20000, (b, s)).astype(np.int32)
        mask = np.ones_like(ids)
        ti, tm = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
        systems = {
            "ibert-tvm INT8": lambda: r.run_integer(ids, mask),
            "PyTorch FP32 eager": lambda: fp32(input_ids=ti, attention_mask=tm),
        }
        times: dict[str, list[float]] = {k: [] for k in systems}
        with torch.no_grad():
            for f in systems.values():
                f()  # warm-up
            for _ in range(a.rounds):
                for k, f in systems.items():
                    time.sleep(SETTLE_S)
                    times[k] += timed(f, a.reps)
        base = np.median(times["PyTorch FP32 eager"])
        for k, v in times.items():
            rows.append((f"MiniLM-L6 {b}x{s}", k, np.median(v) * 1e3, base / np.median(v)))
    print(f"| model, batch x seq | system | median ms | speed-up vs PyTorch FP32 |\n|---|---|---|---|")
    for shape, k, ms, sp in rows:
        print(f"| {shape} | {k} | {ms:.2f} | {sp:.2f}x |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = sorted({r[0] for r in rows})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, k in enumerate(dict.fromkeys(r[1] for r in rows)):
        vals = [next(r[2] for r in rows if r[0] == lab and r[1] == k) for lab in labels]
        ax.bar(np.arange(len(labels)) + i * 0.4, vals, 0.4, label=k)
    ax.set_xticks(np.arange(len(labels)) + 0.2, labels)
    ax.set_ylabel("median latency (ms)")
    ax.legend()
    fig.tight_layout()
    Path(a.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.png, dpi=120)
    print(f"\nplot: {a.png}")


if __name__ == "__main__":
    main()
