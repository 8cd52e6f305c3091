"""Build, here, the bundle of the one-call GPU check (ibert_tvm/evaluation/gpu_check.py says what runs
there and what it prints):

    .venv/bin/python scripts/gpu_bundle.py build [--target cuda-sm90] [--model default] [--out bundle/gpu-check]

Compiles the model for the target over the grid (batch 1/2/4/8 x seq 128/256) into one library, a
function per shape and the weights stored once; computes the reference's integers for fixed inputs;
and packs them with TVM's runtime (its runtime libraries and Python files, not the 250 MiB compiler
library), the apache-tvm-ffi wheel for the GPU machine's Python (pip download: needs a package index),
this package's Python files and the checkpoint's weights in bfloat16 for the PyTorch columns. Fails
when the bundle is over 64 MiB, what the device tool carries with the working tree. Then, there:

    python3 bundle/gpu-check/run.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ibert_tvm.evaluation.gpu_check import (
    ARTIFACT,
    EXPECTED,
    FFI_WHEEL,
    FP32_MODEL,
    GRID,
    LIMIT_MIB,
    META,
    PAYLOAD,
    RUN_PY,
    SITE,
    SOURCES,
    expected_entries,
    fixed_inputs,
)

if TYPE_CHECKING:
    from ibert_tvm.program import IntProgram

REPO = Path(__file__).resolve().parents[1]
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_runtime_cuda.so")  # tvm/lib without libtvm_compiler.so
MIB = 1 << 20


def download_ffi(into: Path, python: str, arch: str) -> Path:
    """The apache-tvm-ffi wheel of the installed version for CPython `python` on Linux `arch`."""
    version = metadata.version("apache-tvm-ffi")
    platforms = [f"manylinux_2_{n}_{arch}" for n in (28, 24, 17)] + [f"manylinux2014_{arch}"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--retries", "1",
           "--timeout", "20", "--no-deps", "--only-binary=:all:", "--implementation", "cp", "--python-version",
           python, *(x for p in platforms for x in ("--platform", p)), "-d", str(into), f"apache-tvm-ffi=={version}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"pip could not download apache-tvm-ffi=={version} for CPython {python} on {arch}. The GPU "
                         "machine has no network, so the wheel is fetched here, from a package index; pip said:\n"
                         + res.stderr[-2000:])
    (wheel,) = into.glob(FFI_WHEEL)
    return wheel


def expected_integers(program: IntProgram, grid: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    from ibert_tvm import reference

    out = {}
    for shape in grid:
        ids, mask = fixed_inputs(program.vocab, *shape)
        out.update(expected_entries(shape, ids, mask, reference.run(program, ids, mask)))
    return out


def save_fp32_model(model: str, into: Path) -> None:
    """The checkpoint as FP32 IBert (quant_mode=False), saved in bfloat16: half the bytes of its
    float32 weights, which with the library would not fit the bundle; loaded again as float32."""
    import torch

    from ibert_tvm.checkpoint import transformers_quiet
    from ibert_tvm.evaluation.fp32 import fp32_model

    net = fp32_model(model, "IBertModel").to(torch.bfloat16)
    with transformers_quiet():  # its progress bars
        net.save_pretrained(into)


def payload_members(work: Path) -> list[tuple[Path, str]]:
    """(file or folder here, its name in the payload): tvm's Python files and runtime libraries, the
    compiled artifact and the FP32 model."""
    import tvm

    root = Path(tvm.__file__).parent
    py = [p for p in sorted(root.rglob("*.py")) if not {"__pycache__", "3rdparty"} & set(p.relative_to(root).parts)]
    return ([(p, f"{SITE}/tvm/{p.relative_to(root)}") for p in py]
            + [(root / "lib" / name, f"{SITE}/tvm/lib/{name}") for name in RUNTIME_LIBS]
            + [(work / ARTIFACT, ARTIFACT), (work / FP32_MODEL, FP32_MODEL)])


def copy_sources(into: Path) -> None:
    import ibert_tvm

    package = Path(ibert_tvm.__file__).parent
    for p in sorted(package.rglob("*.py")):
        if "__pycache__" not in p.parts:
            dest = into / "ibert_tvm" / p.relative_to(package)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def tracked_size() -> int | None:
    """Bytes of the repository's tracked files, which travel with the bundle; None outside git."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((REPO / n).stat().st_size for n in names.decode().split("\0") if n and (REPO / n).is_file())


def build(a: argparse.Namespace) -> Path:
    from ibert_tvm import artifact, targets
    from ibert_tvm.compile import CompileOptions, compile_program, load_calibrated, versions
    from ibert_tvm.importer import convert

    preset = targets.get(a.target)
    seqs, batches = sorted(set(a.seq_lens)), sorted(set(a.batches))
    grid = [(b, s) for s in seqs for b in batches]
    start = time.monotonic()

    def step(what: str) -> None:
        print(f"[{time.monotonic() - start:6.1f} s] {what}", flush=True)

    def fill(out: Path) -> None:
        wheel = download_ffi(out, a.python_version, preset.arch)  # first: offline, fail in seconds
        step(f"downloaded {wheel.name}")
        with tempfile.TemporaryDirectory(prefix="ibert-tvm-bundle-") as tmp:
            work = Path(tmp)
            opt = CompileOptions(model=a.model, target=a.target, batches=tuple(batches), seq_len=seqs[-1],
                                 buckets=tuple(seqs[:-1]), out=work / ARTIFACT, progress=False)
            model, checkpoint_dir = load_calibrated(opt)
            program = convert(model)
            if program.multiple_choice:
                raise SystemExit("the GPU check feeds [batch, seq] inputs; multiple-choice models take "
                                 "[batch, choices, seq]")
            step(f"calibrated {a.model}; compiling {a.target} for {' '.join(f'{b}x{s}' for b, s in grid)}")
            compile_program(program, checkpoint_dir, opt)
            step("compiled; computing the reference's integers")
            np.savez_compressed(out / EXPECTED, **expected_integers(program, grid))
            step("reference done; packing")
            save_fp32_model(a.model, work / FP32_MODEL)
            with tarfile.open(out / PAYLOAD, "w:xz") as tar:
                for src, name in payload_members(work):
                    tar.add(src, name)
        copy_sources(out / SOURCES)
        (out / "run.py").write_text(RUN_PY)
        meta = {"target": a.target, "model": a.model, "model_class": program.model_class, "grid": grid,
                "python": a.python_version, "built": time.strftime("%Y-%m-%d"), "versions": versions()}
        (out / META).write_text(json.dumps(meta, indent=1) + "\n")
        size = size_of(out)
        sizes = ", ".join(f"{p.name} {size_of(p) if p.is_dir() else p.stat().st_size:,}" for p in sorted(out.iterdir()))
        step(f"bundle {size / MIB:.1f} MiB (limit {LIMIT_MIB} MiB): {sizes} bytes")
        if size > LIMIT_MIB * MIB:
            raise SystemExit(f"the bundle is {size / MIB:.1f} MiB, over the {LIMIT_MIB} MiB the device tool carries")

    out = artifact.write_dir(a.out, fill, force=True)
    tracked = tracked_size()
    if tracked is not None:
        total = (size_of(out) + tracked) / MIB
        print(f"with the repository's tracked files ({tracked / MIB:.1f} MiB) {total:.1f} MiB travel"
              + (f": OVER the device tool's {LIMIT_MIB} MiB" if total > LIMIT_MIB else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile, compute the reference's integers and pack the bundle (here)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--target", default="cuda-sm90", help="a preset of `ibert-tvm targets`")
    b.add_argument("--model", default="default", help="checkpoint folder, `default` or a cached hub id")
    b.add_argument("--out", type=Path, default=REPO / "bundle" / "gpu-check",
                   help="the bundle folder (replaced when this script wrote it)")
    b.add_argument("--batches", type=int, nargs="+", default=sorted({b for b, _ in GRID}))
    b.add_argument("--seq-lens", type=int, nargs="+", default=sorted({s for _, s in GRID}))
    b.add_argument("--python-version", default="3.12", help="the GPU machine's Python, whose tvm_ffi wheel is packed")
    a = ap.parse_args(argv)
    out = build(a)
    print(f"built {out}; there: python3 {out}/run.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
