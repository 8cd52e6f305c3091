"""The deployable artifact: library, parameters, tokenizer and a manifest that hashes them all.

It is written into a temporary folder beside the destination and renamed into place, so a
failed compile never leaves a half-written artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

FORMAT_VERSION = 3  # 2: one function per sequence-length bucket; 3: every IBert class (choices, seq_axis)
MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.safetensors"
TOKENIZER = "tokenizer.json"


class ArtifactError(RuntimeError):
    pass


T = TypeVar("T")
# the safetensors dtypes our parameters use (compile writes them with safetensors' own writer)
SAFETENSORS_DTYPES = {"I8": np.int8, "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


def load_params(path: Path, names: list[str], place: Callable[[np.ndarray], T]) -> list[T]:
    """`place(array)` of each named tensor of a safetensors file, read one at a time.

    Plain reads, not safetensors' memory map: the mapped file counts in the process's resident
    memory as it is read, which raised the runner's peak by the parameters' size again.
    """
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        placed = []
        for name in names:
            entry = header.get(name)
            if entry is None or entry["dtype"] not in SAFETENSORS_DTYPES:
                raise ArtifactError(f"{path}: no integer tensor {name!r} (parameters and manifest disagree)")
            arr = np.empty(entry["shape"], SAFETENSORS_DTYPES[entry["dtype"]])
            start, end = entry["data_offsets"]
            f.seek(8 + size + start)
            if end - start != arr.nbytes or f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
                raise ArtifactError(f"{path}: tensor {name!r} is truncated")
            placed.append(place(arr))
    return placed


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable(out: Path, force: bool) -> None:
    """Fail before any heavy work if `out` cannot be (re)placed."""
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    existing = out.resolve().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the artifact {out}: {existing} is not a writable folder")


def write_dir(out: Path, fill: Callable[[Path], None], force: bool = False) -> Path:
    """`fill(tmpdir)` a folder beside `out`, then rename it into place: never a half-written `out`
    (artifacts, calibrated and fine-tuned checkpoints)."""
    out = Path(out)
    check_writable(out, force)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.resolve().parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the folder private to its writer
    try:
        fill(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write(out: Path, fill: Callable[[Path], dict[str, Any]], force: bool = False) -> Path:
    """Create the artifact via `fill(tmpdir) -> manifest fields`, hash every file, rename into place."""

    def fill_and_hash(tmp: Path) -> None:
        manifest = {"format_version": FORMAT_VERSION, **fill(tmp)}
        manifest["files"] = {p.name: sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))

    return write_dir(out, fill_and_hash, force)


def read(path: Path) -> dict[str, Any]:
    """The manifest, after checking the format version and every file's sha256."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as err:
        raise ArtifactError(f"{path} is not an ibert-tvm artifact (no {MANIFEST})") from err
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path / MANIFEST} is corrupt: {err}") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')}, this runner reads {FORMAT_VERSION}")
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: {name} is missing")
        if sha256(f) != digest:
            raise ArtifactError(f"{path}: {name} does not match its sha256 in the manifest (corrupt or tampered)")
    for required in (LIBRARY, PARAMS):
        if required not in manifest.get("files", {}):
            raise ArtifactError(f"{path}: manifest lists no {required}")
    return manifest


def reuse(out: Path, build: Callable[[], Path]) -> Path:
    """`out` when it holds an artifact this version reads (hashes checked), else `build()`."""
    try:
        read(out)
        return Path(out)
    except ArtifactError:
        return build()
