"""The deployable artifact: library, parameters, tokenizer and a manifest that hashes them all.

Trust model. An artifact holds native code: loading `model.so` runs it. The sha256 of every file
sits in the manifest, and compile seals a copy of the manifest (all but those hashes) into the
parameters' header, so editing any one file, the manifest included, is detected and named. That
detects corruption and careless edits; someone who rewrites several files consistently is caught
only by a signature (`sign`, `Runner(verify_key=...)`). Neither makes an untrusted artifact safe
to load. Every file is opened without following links, as a plain name inside the folder, and
the bytes that were verified are the bytes that are used.

Writing goes through `Staging`: an exclusive, lock-held folder beside the destination that is
renamed into place, so a failed or killed compile never leaves half an artifact, two writers to
one output never both succeed, and `force` replaces only a folder ibert-tvm wrote.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

import numpy as np

from .files import readable
from .manifest import FORMAT_VERSION, ArtifactError, Manifest, canonical, first_difference, is_plain_name
from .memory import Arena, aligned
from .signing import SIGNATURE, sign, verify  # ed25519 over the manifest's bytes (compile --sign-key)

__all__ = ["ArtifactError", "FORMAT_VERSION", "Manifest", "Staging", "read", "write", "write_dir", "reuse"]

MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.safetensors"
TOKENIZER = "tokenizer.json"
SEAL = "ibert_tvm.manifest"  # safetensors metadata key of the sealed manifest copy
OWNED = ".ibert-tvm"  # every folder Staging publishes lists its entries here: what --force may replace

T = TypeVar("T")
# the safetensors dtypes our parameters use (compile writes them with safetensors' own writer)
SAFETENSORS_DTYPES = {"I8": np.int8, "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64}


# -- reading ---------------------------------------------------------------------------------------
def open_member(folder: Path, name: str) -> BinaryIO:
    """`folder/name` for reading: a plain name, a regular file, never through a symbolic link."""
    if not is_plain_name(name):
        raise ArtifactError(f"{folder}: {name!r} is not a plain file name inside the artifact")
    try:
        fd = os.open(Path(folder) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise ArtifactError(f"{folder}: {name} is missing") from err
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ArtifactError(f"{folder}: {name} is a symbolic link; artifacts hold plain files") from err
        raise ArtifactError(f"{folder}: cannot open {name}: {err.strerror}") from err
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArtifactError(f"{folder}: {name} is not a regular file")
    return os.fdopen(fd, "rb")


def read_member(folder: Path, manifest: Manifest, name: str) -> bytes:
    """A file's bytes, checked against its sha256 in the manifest."""
    if name not in manifest.files:
        raise ArtifactError(f"{folder}: the manifest lists no {name}")
    with open_member(folder, name) as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != manifest.files[name]:
        raise ArtifactError(f"{folder}: {name} does not match its sha256 in the manifest (corrupt or tampered)")
    return data


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read(path: Path, verify_key: Any = None, check_files: bool = True) -> Manifest:
    """The manifest, validated against its schema; with `verify_key` its signature must hold;
    with `check_files` every file's sha256 and the sealed copy are checked too (the runner skips
    this and checks each file as it reads it, so nothing is read twice)."""
    path = Path(path)
    try:
        with open_member(path, MANIFEST) as f:
            data = f.read()
    except ArtifactError as err:
        if not (path / MANIFEST).exists():
            raise ArtifactError(f"{path} is not an ibert-tvm artifact (no {MANIFEST})") from err
        raise
    manifest = Manifest.from_json(data, str(path / MANIFEST))
    if verify_key is not None:
        try:
            with open_member(path, SIGNATURE) as f:
                signature = f.read()
        except ArtifactError as err:
            raise ArtifactError(f"{path} is not signed ({err}); a verify key was given") from err
        verify(path, data, signature, verify_key)
    for required in (LIBRARY, PARAMS):
        if required not in manifest.files:
            raise ArtifactError(f"{path}: manifest lists no {required}")
    check_seal(path, manifest, _sealed_of(path))  # names an edited field before anything else is read
    if check_files:
        for name in manifest.files:
            if name != PARAMS:
                read_member(path, manifest, name)
        load_params(path, manifest, lambda a: None)
    return manifest


def load_params(folder: Path, manifest: Manifest, place: Callable[[np.ndarray], T], huge_pages: bool = False) -> list[T]:
    """`place(array)` of each of the manifest's parameters, read one at a time in file order while
    the whole file is hashed; then the hash and the sealed manifest copy are checked. With
    `huge_pages` the parameters are read into one buffer on transparent huge pages (`memory`),
    which their arrays are views of: `place` may keep them without a copy.

    Plain reads, not safetensors' memory map: the mapped file counts in the process's resident
    memory as it is read, which raised the runner's peak by the parameters' size again.
    """
    h = hashlib.sha256()
    where = f"{folder}: {PARAMS}"

    with open_member(folder, PARAMS) as f:
        total = os.fstat(f.fileno()).st_size

        def take(n: int) -> bytes:
            b = f.read(n)
            h.update(b)
            if len(b) != n:
                raise ArtifactError(f"{where} is truncated")
            return b

        size = int.from_bytes(take(8), "little")
        if size > total - 8:
            raise ArtifactError(f"{where} is truncated or corrupt (header of {size} bytes)")
        try:
            header = json.loads(take(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{where} has a corrupt header: {err}") from err
        meta = header.pop("__metadata__", None) or {} if isinstance(header, dict) else {}
        wanted = set(manifest.params)
        placed: dict[str, T] = {}
        pos = 0
        entries = _tensor_entries(header, total - 8 - size, where)
        arena = Arena(sum(aligned(e[2] - e[1]) for e in entries if e[0] in wanted)) if huge_pages else None
        for name, start, end, dtype, shape in entries:
            if start < pos:
                raise ArtifactError(f"{where}: tensor {name!r} overlaps another")
            take(start - pos)
            arr = arena.empty(shape, dtype) if arena is not None and name in wanted else np.empty(shape, dtype)
            if f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
                raise ArtifactError(f"{where}: tensor {name!r} is truncated")
            h.update(memoryview(arr).cast("B"))
            pos = end
            if name in wanted:
                placed[name] = place(arr)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != manifest.files.get(PARAMS):
        raise ArtifactError(f"{folder}: {PARAMS} does not match its sha256 in the manifest (corrupt or tampered)")
    check_seal(folder, manifest, meta.get(SEAL))
    missing = [n for n in manifest.params if n not in placed]
    if missing:
        raise ArtifactError(f"{where}: no integer tensor {missing[0]!r} (parameters and manifest disagree)")
    return [placed[n] for n in manifest.params]


def _tensor_entries(header: Any, data_size: int, where: str) -> list[tuple[str, int, int, Any, list[int]]]:
    """(name, start, end, dtype, shape) of each tensor in file order, each entry checked before
    anything is allocated for it (the header is not verified until the whole file is hashed)."""
    entries = []
    for name, e in header.items() if isinstance(header, dict) else []:
        try:
            (start, end), dtype, shape = e["data_offsets"], SAFETENSORS_DTYPES[e["dtype"]], [int(d) for d in e["shape"]]
            ok = 0 <= start <= end <= data_size and min(shape, default=0) >= 0 and \
                end - start == math.prod(shape) * np.dtype(dtype).itemsize
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ArtifactError(f"{where}: tensor {name!r} is corrupt (or not an integer tensor)")
        entries.append((name, start, end, dtype, shape))
    return sorted(entries, key=lambda e: e[1])


def check_seal(folder: Path, manifest: Manifest, sealed: str | None) -> None:
    """The manifest must equal the copy compile sealed into the (hash-checked) parameters."""
    if sealed is None:
        raise ArtifactError(f"{folder}: {PARAMS} carries no sealed manifest")
    diff = first_difference(json.loads(sealed), json.loads(canonical(manifest.to_dict(with_files=False))))
    if diff:
        raise ArtifactError(f"{folder}: {MANIFEST} field {diff} differs from what compile recorded "
                            "(the manifest was edited)")


def reuse(out: Path, build: Callable[[], Path]) -> Path:
    """`out` when it holds an intact artifact this version reads, else `build()`."""
    try:
        read(out)
        return Path(out)
    except ArtifactError:
        return build()


# -- writing ---------------------------------------------------------------------------------------
def _owned_entries(out: Path) -> set[str] | None:
    """The entries ibert-tvm wrote into `out`, or None if nothing says it wrote the folder."""
    try:
        return set(json.loads((out / OWNED).read_text())) | {OWNED}
    except (OSError, ValueError, TypeError):
        pass
    try:  # artifacts of formats before the OWNED list: their manifest lists their files
        legacy = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(legacy, dict) and "format_version" in legacy and isinstance(legacy.get("files"), dict):
        return set(legacy["files"]) | {MANIFEST, SIGNATURE}
    return None


def check_replaceable(out: Path, force: bool) -> None:
    """`out` is free, or `force` and a folder all of whose entries ibert-tvm wrote."""
    if not os.path.lexists(out):
        return
    if not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise FileExistsError(f"{out} is a {'symbolic link' if out.is_symlink() else 'file'}, not a folder "
                              "ibert-tvm wrote; not replacing it")
    owned = _owned_entries(out)
    present = sorted(p.name for p in out.iterdir())
    if owned is None:
        raise FileExistsError(f"{out} is not an ibert-tvm artifact or checkpoint (no {MANIFEST} or {OWNED} lists "
                              f"its files); not replacing it. It holds: {', '.join(present[:8]) or 'nothing'}")
    foreign = [p for p in present if p not in owned]
    if foreign:
        raise FileExistsError(f"{out} holds files ibert-tvm did not write ({', '.join(foreign[:8])}); "
                              "not replacing it")


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the file system lacks it."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):
        return False
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(f"{dst} appeared while it was being written; not replacing it")
    raise OSError(err, os.strerror(err), str(dst))


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class Staging:
    """The exclusive right to write `out` (a folder), from before the heavy work to its rename.

    `with Staging(out, force) as s:` checks that `out` may be (re)placed and that its parent is
    writable, and takes a lock in `.NAME.ibert-tvm-staging` beside it: a second writer fails at
    once, naming the first; a killed writer's leftovers are cleared by the next one. Fill
    `s.dir`, then `s.publish()`: a rename that never replaces what appeared meanwhile. The
    staging folder is gone when the block ends, whatever happened; so are parent folders it had
    to create when nothing was published.
    """

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out).absolute()
        self.force = force
        self.root = self.out.with_name(f".{self.out.name}.ibert-tvm-staging")
        self.dir = self.root / "new"
        self._lock: int | None = None
        self._made: list[Path] = []
        self.published = False

    def __enter__(self) -> "Staging":
        check_replaceable(self.out, self.force)
        missing = []
        parent = self.out.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write {self.out}: {parent} is not a writable folder")
        try:
            for d in reversed(missing):
                d.mkdir()
                self._made.append(d)
            self.root.mkdir(exist_ok=True)
            self._lock = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            self._remove_made()
            raise PermissionError(f"cannot write {self.out}: {err}") from err
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock)
            self._lock = None
            raise FileExistsError(f"another ibert-tvm process (pid {holder}) is writing {self.out} now") from None
        os.ftruncate(self._lock, 0)
        os.pwrite(self._lock, str(os.getpid()).encode(), 0)
        for leftover in self.root.iterdir():  # a killed writer's; the lock says none is running
            if leftover.name != "lock":
                shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
        self.dir.mkdir()
        readable(self.dir, 0o777)
        return self

    def publish(self) -> Path:
        """Rename the filled folder into place (listing its entries in OWNED first)."""
        names = sorted(p.name for p in self.dir.iterdir())
        (self.dir / OWNED).write_text(json.dumps(names))
        check_replaceable(self.out, self.force)  # what is there now, not what was there at the start
        if os.path.lexists(self.out):
            if not _renameat2(self.dir, self.out, RENAME_EXCHANGE):
                self.out.rename(self.root / "old")
                self.dir.rename(self.out)
        elif not _renameat2(self.dir, self.out, RENAME_NOREPLACE):
            if os.path.lexists(self.out):
                raise FileExistsError(f"{self.out} appeared while it was being written; not replacing it")
            self.dir.rename(self.out)
        self.published = True
        return self.out

    def _remove_made(self) -> None:
        for d in reversed(self._made):
            try:
                d.rmdir()
            except OSError:
                break
        self._made = []

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self._lock is None:
            return
        for p in self.root.iterdir():  # our staging folder, or the replaced one after an exchange
            if p.name != "lock":
                shutil.rmtree(p, ignore_errors=True)
        # removed while still locked: a writer that opened the old lock file finds its folder gone
        (self.root / "lock").unlink(missing_ok=True)
        try:
            self.root.rmdir()
        except OSError:
            pass
        os.close(self._lock)
        self._lock = None
        if not self.published:
            self._remove_made()


def write_dir(out: Path, fill: Callable[[Path], None], force: bool = False) -> Path:
    """`fill(folder)` in a `Staging` of `out` and publish it (calibrated and fine-tuned checkpoints)."""
    with Staging(out, force) as s:
        fill(s.dir)
        return s.publish()


def write(stage: Staging, fill: Callable[[Path], Manifest], sign_key: Path | None = None) -> Path:
    """An artifact in `stage`: `fill(folder) -> Manifest` writes the library, tokenizer and (with
    `seal_params`) the parameters; the files' hashes complete the manifest; publish."""
    manifest = fill(stage.dir)
    for p in stage.dir.iterdir():
        readable(p, 0o777 if p.name == LIBRARY else 0o666)
    files = {p.name: sha256(p) for p in sorted(stage.dir.iterdir()) if p.is_file()}
    data = Manifest(**{**vars(manifest), "files": files}).to_json()
    (stage.dir / MANIFEST).write_bytes(data)
    if sign_key is not None:
        (stage.dir / SIGNATURE).write_bytes(sign(data, sign_key))
    check_seal(stage.out, Manifest.from_json(data), _sealed_of(stage.dir))
    return stage.publish()


def seal_params(manifest: Manifest) -> dict[str, str]:
    """The parameters file's metadata: the manifest copy `check_seal` compares with."""
    return {SEAL: manifest.sealed()}


def _sealed_of(folder: Path) -> str | None:
    """The sealed manifest in the parameters' header (unverified: load_params checks the hash)."""
    with open_member(folder, PARAMS) as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(min(size, 1 << 26)))
            return (header.get("__metadata__") or {}).get(SEAL)
        except (ValueError, AttributeError) as err:
            raise ArtifactError(f"{folder}: {PARAMS} has a corrupt header") from err
