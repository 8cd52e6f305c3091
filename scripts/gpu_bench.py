"""On a machine with an NVIDIA GPU: the CUDA library's outputs against the integer reference (must
be 0 differing elements), and its speed against PyTorch FP32 (TF32 off) and FP16 on the same GPU,
over the paper's grid (batch 1/2/4/8 x seq 128/256; paper: INT8 3.08x FP32 on a T4).

    .venv/bin/python scripts/gpu_bench.py --target cuda-sm75 [--model default] [--reps 50]

Compiles one artifact per shape under artifacts/gpu-<target>-BxS (reused when present). Prints
a markdown table; PyTorch columns are left out if this torch has no CUDA.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ibert_tvm import artifact, reference
from ibert_tvm.compile import CompileOptions, compile_program, load_calibrated
from ibert_tvm.evaluation.fp32 import fp32_model
from ibert_tvm.importer import convert
from ibert_tvm.runner import Runner

GRID = [(b, s) for s in (128, 256) for b in (1, 2, 4, 8)]


def median_ms(fn, sync, reps: int) -> float:
    for _ in range(5):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="cuda-sm75")
    ap.add_argument("--model", default="default")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    import torch

    gpu_torch = torch.cuda.is_available()
    if gpu_torch:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        fp32 = fp32_model(a.model, "IBertModel").cuda().eval()
        fp16 = fp32_model(a.model, "IBertModel").cuda().half().eval()
    model, path = load_calibrated(CompileOptions(model=a.model, seq_len=128, progress=False))
    program = convert(model)
    print("| batch x seq | differing vs reference | ibert-tvm INT8 ms | PyTorch FP32 ms | PyTorch FP16 ms | FP32 / INT8 |")
    print("|---|---|---|---|---|---|")
    for b, s in GRID:
        out = Path(f"artifacts/gpu-{a.target}-{b}x{s}")
        opt = CompileOptions(model=a.model, target=a.target, batches=(b,), seq_len=s, out=out, force=True, progress=False)
        artifact.reuse(out, lambda: compile_program(program, path, opt))
        r = Runner(out)
        rng = np.random.default_rng(b * 1000 + s)
        ids = rng.integers(1000, program.vocab, (b, s)).astype(np.int32)
        mask = np.ones_like(ids)
        mask[-1, s // 2 :] = 0  # one padded row
        got = r.run_integer(ids, mask)
        want = reference.run(program, ids, mask)
        differing = sum(int((got[n] != want[n]).sum()) for n in program.outputs)
        ours = median_ms(lambda: r.run_integer(ids, mask), r._dev.sync, a.reps)
        row = [f"{b}x{s}", str(differing), f"{ours:.2f}", "-", "-", "-"]
        if gpu_torch:
            ti, tm = (torch.tensor(x, dtype=torch.long, device="cuda") for x in (ids, mask))
            with torch.no_grad():
                t32 = median_ms(lambda: fp32(input_ids=ti, attention_mask=tm), torch.cuda.synchronize, a.reps)
                t16 = median_ms(lambda: fp16(input_ids=ti, attention_mask=tm), torch.cuda.synchronize, a.reps)
            row[3:] = [f"{t32:.2f}", f"{t16:.2f}", f"{t32 / ours:.2f}x"]
        print("| " + " | ".join(row) + " |", flush=True)
        r.close()


if __name__ == "__main__":
    main()
