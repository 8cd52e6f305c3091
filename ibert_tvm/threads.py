"""TVM's thread pool, sized before its first use (runtime: the runner, the tuner and the bench share it)."""

from __future__ import annotations

import os
import warnings


def use_threads(threads: int | None = None) -> int:
    """Size TVM's thread pool before its first use: all CPUs this process may run on by default.

    TVM's own default is half the logical CPUs (it assumes SMT siblings); on a 2-vCPU machine that
    is a single thread, and the library ran at half speed. The pool is created once per process,
    so a count set after the first parallel call cannot grow it. Order: `threads`, then the
    `TVM_NUM_THREADS` variable, then the CPU count.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    n = threads or int(os.environ.get("TVM_NUM_THREADS", 0)) or len(os.sched_getaffinity(0))
    os.environ["TVM_NUM_THREADS"] = str(n)
    import tvm

    if tvm.runtime.num_threads() != n:  # the pool existed already: it can shrink, not grow
        tvm.get_global_func("runtime.config_threadpool")(1, n)
    got = int(tvm.runtime.num_threads())
    if got != n:
        warnings.warn(f"TVM's thread pool was created earlier with {got} threads; {n} asked", stacklevel=2)
    return got
