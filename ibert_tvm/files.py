"""Files that appear whole or not at all, and where caches live (standard library only: the
runtime, the compiler and the evaluation code share these)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """`$IBERT_TVM_CACHE`, else ~/.cache/ibert-tvm (created)."""
    d = Path(os.environ.get("IBERT_TVM_CACHE", Path.home() / ".cache" / "ibert-tvm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def readable(path: Path, mode: int = 0o666) -> None:
    """`mode` less the umask: what a plain open() would have given. mkstemp, mkdtemp and some
    writers (safetensors) create files only their owner can read, which a deployment user cannot."""
    umask = os.umask(0)
    os.umask(umask)
    Path(path).chmod(mode & ~umask)


def atomic_file(path: Path, make: Callable[[Path], object]) -> Path:
    """`make(tmp)` writes a uniquely named file beside `path`, which is then renamed onto it:
    readers, concurrent writers and an interrupted run never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        make(Path(tmp))
        readable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: Path, data: bytes | str) -> Path:
    return atomic_file(path, lambda tmp: tmp.write_bytes(data.encode() if isinstance(data, str) else data))
