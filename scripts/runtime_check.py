"""Runtime safety numbers for artifacts: one Runner shared by threads against sequential calls
(differing results, errors, throughput) and resident memory over construct/close cycles.

    .venv/bin/python scripts/runtime_check.py artifacts/default-host [--threads 8 --calls 100 --cycles 200]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time

import numpy as np

from ibert_tvm.runner import Runner

CYCLES = """
import sys
from ibert_tvm.runner import Runner
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
Runner(sys.argv[1]).close()
base = rss()
for _ in range(int(sys.argv[2])):
    Runner(sys.argv[1]).close()
print(base, rss())
"""


def inputs(r: Runner, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, r.vocab, (r.batches[-1], int(rng.integers(r.seq_len // 2, r.seq_len + 1)))) for _ in range(n)]


def threaded(r: Runner, cases: list[np.ndarray], want: list[dict], threads: int, calls: int) -> tuple[int, int, float]:
    """(differing results, errors, seconds) of `threads` threads x `calls` calls on one Runner;
    results are compared after the clock stops, as the sequential loop does not compare either."""
    got: list[tuple[int, dict]] = []
    errors: list[Exception] = []

    def work(t: int) -> None:
        for k in range(calls):
            i = (t * calls + k) % len(cases)
            try:
                got.append((i, r.run_integer(cases[i])))
            except Exception as err:  # noqa: BLE001 - counted
                errors.append(err)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=1800)
    secs = time.perf_counter() - start
    differing = sum(any(not np.array_equal(out[o.name], want[i][o.name]) for o in r.outputs) for i, out in got)
    return differing + threads * calls - len(got) - len(errors), len(errors), secs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--calls", type=int, default=100, help="calls per thread")
    p.add_argument("--cycles", type=int, default=200, help="construct/close cycles for the memory check")
    a = p.parse_args()
    print("| artifact | threads x calls | differing | errors | sequential calls/s | threaded calls/s | ratio | "
          f"RSS growth over {a.cycles} cycles (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for path in a.artifacts:
        r = Runner(path)
        cases = inputs(r, 16)
        want = [r.run_integer(c) for c in cases]
        total = a.threads * a.calls
        start = time.perf_counter()
        for k in range(total):
            r.run_integer(cases[k % len(cases)])
        seq = total / (time.perf_counter() - start)
        differing, errors, secs = threaded(r, cases, want, a.threads, a.calls)
        r.close()
        res = subprocess.run([sys.executable, "-c", CYCLES, path, str(a.cycles)], capture_output=True, text=True,
                             check=True)
        base, end = map(float, res.stdout.split())
        thr = total / secs
        print(f"| {path} | {a.threads} x {a.calls} | {differing} | {errors} | {seq:.1f} | {thr:.1f} | {thr / seq:.2f} | "
              f"{end - base:+.1f} ({base:.0f} -> {end:.0f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
