"""How far the compiled integer library is from HF's `quant_mode=True` simulation and from FP32.

    .venv/bin/python scripts/accuracy.py [--sentences 64] [--seq-len 64]

On real movie-review sentences (not the calibration ones) with the default model: differing
elements between TVM and the NumPy integer reference (must be 0), and for the reference, HF's
simulation and FP32: max / mean abs difference of last_hidden_state on real tokens and the cosine
of mean-pooled sentence embeddings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ibert_tvm import reference
from ibert_tvm.compile import CompileOptions, compile_program, default_calibration_texts, load_calibrated
from ibert_tvm.evaluation.data import movie_sentences
from ibert_tvm.evaluation.fp32 import fp32_model
from ibert_tvm.importer import convert
from ibert_tvm.pipelines import pool
from ibert_tvm.runner import Runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=64)
    a = ap.parse_args()
    calib = set(default_calibration_texts())
    held_out = [t for _, t in movie_sentences()[1::37] if t not in calib][: a.sentences]

    # one calibration serves HF's simulation, the reference and the compiled library
    opt = CompileOptions(model="default", batches=(8,), seq_len=a.seq_len, out=Path(f"artifacts/accuracy-default-{a.seq_len}"),
                         force=True, progress=False)
    model, path = load_calibrated(opt)
    program = convert(model)
    runner = Runner(compile_program(program, path, opt))
    enc = runner.encode(held_out, truncation=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]

    tvm_int = runner.run_integer(ids, mask)["last_hidden_state"]
    ref_int = reference.run(program, ids, mask)["last_hidden_state"]
    t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    with torch.no_grad():
        hf_sim = model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.numpy()
        fp32 = fp32_model("default", "IBertModel")(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.numpy()
    ours = ref_int * program.hidden_scale
    keep = mask.astype(bool)

    print(f"{len(held_out)} held-out sentences, seq_len {a.seq_len}, largest hidden scale {np.max(program.hidden_scale):.5f}")
    print(f"TVM vs integer reference: {int((tvm_int != ref_int).sum())} differing elements of {tvm_int.size}")
    print("\n| pair | max abs diff | mean abs diff | embedding cosine mean | min |\n|---|---|---|---|---|")
    for name, x, y in (("ibert-tvm vs HF quant_mode=True", ours, hf_sim), ("ibert-tvm vs FP32", ours, fp32),
                       ("HF quant_mode=True vs FP32", hf_sim, fp32)):
        d = np.abs(x - y)[keep]
        cos = (pool(x, mask) * pool(y, mask)).sum(1)
        print(f"| {name} | {d.max():.4f} | {d.mean():.4f} | {cos.mean():.4f} | {cos.min():.4f} |")


if __name__ == "__main__":
    main()
