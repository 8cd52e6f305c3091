"""Batch buckets on the default model: what one text, 8 and 9 texts cost on a library built for
batches {1, 8} against libraries built for one batch size, rounds interleaved, median ms.

    python scripts/batch_check.py [--seq-len 128] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from ibert_tvm.compile import CompileOptions, compile_model
from ibert_tvm.evaluation.bench import cpu_model
from ibert_tvm.runner import Runner

BUILDS = {"1": (1,), "8": (8,), "1+8": (1, 8)}
ROWS = (1, 8, 9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args()
    runners, build_s, size = {}, {}, {}
    for name, batches in BUILDS.items():
        out = Path(f"artifacts/batch-check-{name.replace('+', '-')}-{a.seq_len}")
        t = time.perf_counter()
        compile_model(CompileOptions(model="default", batches=batches, seq_len=a.seq_len, out=out, force=True,
                                     progress=False))
        build_s[name], size[name] = time.perf_counter() - t, (out / "model.so").stat().st_size / 2**20
        runners[name] = Runner(out)
    rng = np.random.default_rng(0)
    inputs = {n: rng.integers(1000, 20000, (n, a.seq_len)).astype(np.int32) for n in ROWS}
    times: dict[tuple[str, int], list[float]] = {(b, n): [] for b in BUILDS for n in ROWS}
    for _ in range(a.rounds):
        for (b, n), ts in times.items():
            r = runners[b]
            r.run_integer(inputs[n])  # warm: caches and the worker pool belong to this library now
            t = time.perf_counter()
            for _ in range(3):
                r.run_integer(inputs[n])
            ts.append((time.perf_counter() - t) / 3 * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"default model, seq {a.seq_len}, {a.rounds} rounds, CPU: {cpu_model()}\n")
    print("| library batches | compile s | model.so MiB | " + " | ".join(f"{n} rows ms (calls)" for n in ROWS) + " |")
    print("|---|---|---|" + "---|" * len(ROWS))
    for b in BUILDS:
        cells = [f"{med[b, n]:.2f} ({'+'.join(map(str, runners[b].plan(n)))})" for n in ROWS]
        print(f"| {b} | {build_s[b]:.0f} | {size[b]:.1f} | " + " | ".join(cells) + " |")
    print(f"\none text on 1+8 / on 1: {med['1+8', 1] / med['1', 1]:.3f} (issue: <= 1.15)")
    print(f"9 texts / 8 texts on 1+8: {med['1+8', 9] / med['1+8', 8]:.3f} (issue: <= 1.3)")


if __name__ == "__main__":
    main()
