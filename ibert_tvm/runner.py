"""Run a compiled artifact with the TVM runtime alone (numpy, tokenizers; no torch).

Integers come out of the library; `run` multiplies them by the scales in the manifest, the one
float step of the pipeline.

An artifact is native code: constructing a `Runner` loads `model.so`, which runs that code. Load
only artifacts you trust. Hashes detect corrupt or edited files; a signature (`verify_key`)
detects an artifact that did not come from your key; neither makes an untrusted artifact safe.
"""

from __future__ import annotations

import ctypes
import gc
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import artifact
from .targets import DEVICE_KINDS, check_runnable
from .threads import use_threads

CPU_DLPACK = 1  # DLPack's device type of host memory, which numpy reads in place
T = TypeVar("T")


class Runner:
    """A compiled artifact, ready to run.

    Thread safety: one Runner may be shared by any number of threads; each call runs whole under
    a lock, so results equal sequential calls, and the library runs on the Runner's one library
    thread. Measured on 2 cores (8 threads x 100 calls, default model): locking only the library
    calls gave 0.87x the sequential throughput (checks and padding beside a kernel slow its
    barrier-synchronised parallel loops), locking whole calls 0.87x as well (TVM gives each calling
    thread a worker pool of its own, whose idle workers spin), both together 0.97x.
    `close()` waits for a running call; calls after it raise RuntimeError.
    """

    def __init__(self, path: str | Path, threads: int | None = None, rpc: str | None = None,
                 rpc_timeout: float = 10.0, verify_key: Any = None):
        """`threads`: worker threads for the library (default: every CPU this process may use).
        `rpc`: HOST:PORT of a `python -m tvm.exec.rpc_server` (a board) that runs the library;
        the artifact stays here, its library is uploaded, inputs and outputs travel.
        `verify_key`: an Ed25519 public key (PEM path, PEM bytes or key object); the artifact must
        carry a signature by it (`compile --sign-key`). Every file is checked against the
        manifest's hashes and only the verified bytes are used."""
        import tvm
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: boards may have the runtime only

        self.path = Path(path)
        self.manifest = m = artifact.read(self.path, verify_key, check_files=False)
        self._session = None
        self._lock = threading.Lock()
        self._library = ThreadPoolExecutor(1, thread_name_prefix="ibert-tvm-library")
        if rpc:
            from .remote import check_timeout

            check_timeout(rpc_timeout)
        else:
            check_runnable(m.target.arch, m.target.cpu_flags)
        device_kind = DEVICE_KINDS.get(m.target.device)
        if device_kind is None:
            raise artifact.ArtifactError(f"{self.path}: field target.device is {m.target.device!r}; this runner "
                                         f"knows {', '.join(DEVICE_KINDS)}")
        library = artifact.read_member(self.path, m, artifact.LIBRARY)
        # verified now, parsed on first use: a tokenizer costs ~15 MiB that id-only callers never need
        self._tokenizer_json = None if m.tokenizer.file is None else artifact.read_member(self.path, m, m.tokenizer.file)
        if rpc:
            self.threads = None  # the board's runtime decides (TVM_NUM_THREADS there)
            self._dev = None
        else:
            self.threads = use_threads(threads)
            self._dev = device_kind.runtime_device(m.target)
        self._tensor = tvm.runtime.tensor
        host = rpc is None and self._dev.dlpack_device_type() == CPU_DLPACK

        def place(a: np.ndarray) -> Any:
            if host:  # the parameters stay where they were read, on huge pages (`memory`): TVM takes views
                return tvm.runtime.from_dlpack(a)
            return a if rpc else self._tensor(a, self._dev)  # over RPC: uploaded once the session is open

        # parameters before the library: nothing of the artifact runs until every byte is verified
        params = artifact.load_params(self.path, m, place, huge_pages=host)
        if rpc:
            from .remote import connect

            self._session = session = connect(rpc, rpc_timeout)
            session.upload(bytearray(library), artifact.LIBRARY)
            lib = session.load_module(artifact.LIBRARY)
            self._dev = session.cpu()
            params = [self._tensor(a, self._dev) for a in params]
        else:
            lib = _load_library(library, m.files[artifact.LIBRARY])
        self.batches, self.seq_len = list(m.batches), m.seq_len
        self.lengths = sorted({b.seq_len for b in m.buckets})
        self.functions = {(b.batch, b.seq_len): b.function for b in m.buckets}
        self.vocab, self.type_vocab, self.pad_id = m.vocab_size, m.type_vocab_size, m.pad_id
        self.model_class: str = m.model_class
        self.choices: int | None = m.choices  # multiple choice: inputs are [n, choices, seq]
        self.outputs = m.outputs
        self.scales = {o.name: np.asarray(o.scale) for o in self.outputs}
        self._vm = VirtualMachine(lib, self._dev)
        self._params = params
        self._inputs: dict[str, tuple[list[np.ndarray], list[Any]]] = {}  # function -> `_staging`
        self._in_place = host
        self._tokenizer = None

    def close(self) -> None:
        """Release the library; over RPC this ends the session (a board serves one at a time)."""
        with self._lock:
            self._library.shutdown(wait=True)
            self._vm = self._params = self._session = self._dev = None
            self._inputs.clear()
        gc.collect()  # the remote device and handles keep the session; some sit in reference cycles
        _trim_heap()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- text -------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self._tokenizer_json is None:
                raise FileNotFoundError(f"{self.path} has no tokenizer; pass token ids to run()")
            self._tokenizer = _tokenizer(self._tokenizer_json)  # two racing threads parse it twice, harmlessly
        return self._tokenizer

    def bucket(self, tokens: int) -> int:
        """The shortest compiled length that holds `tokens`."""
        return next(n for n in self.lengths if n >= tokens)

    def plan(self, rows: int) -> list[int]:
        """The compiled batch sizes whose calls cover `rows` rows at the least cost (see `plan_batches`)."""
        return plan_batches(rows, self.batches)

    def tokenize(self, texts: Sequence[str | tuple[str, str]] | str, truncation: bool = False) -> list[Any]:
        """`tokenizers` encodings of texts or (text, text) pairs; over-long text raises unless `truncation`."""
        texts = check_texts(texts)
        encodings = self.tokenizer.encode_batch(texts)
        long = [i for i, e in enumerate(encodings) if len(e.ids) > self.seq_len]
        if long and not truncation:
            raise ValueError(f"text {long[0]} is {len(encodings[long[0]].ids)} tokens, longer than the compiled "
                             f"length {self.seq_len} (truncation=True / --truncate cuts it)")
        if long:  # the tokenizer truncates before adding special tokens: [SEP] / </s> stay
            from tokenizers import Tokenizer

            cut = Tokenizer.from_str(self.tokenizer.to_str())
            cut.enable_truncation(self.seq_len)
            for i, e in zip(long, cut.encode_batch([texts[i] for i in long])):
                encodings[i] = e
        return encodings

    def pack(self, encodings: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Token ids, attention mask and token types [n, L], L the shortest compiled length that
        holds the longest encoding."""
        width = self.bucket(max(len(e.ids) for e in encodings))
        ids = np.full((len(encodings), width), self.pad_id, np.int32)
        mask, types = np.zeros_like(ids), np.zeros_like(ids)
        for i, e in enumerate(encodings):
            ids[i, : len(e.ids)], mask[i, : len(e.ids)], types[i, : len(e.ids)] = e.ids, 1, e.type_ids
        return ids, mask, types

    def encode(self, texts: Sequence[str | tuple[str, str]] | str, truncation: bool = False) -> dict[str, np.ndarray]:
        """`input_ids`, `attention_mask` and `token_type_ids` of texts or text pairs, ready for
        `run(**encoded)` (see `tokenize`, `pack`)."""
        ids, mask, types = self.pack(self.tokenize(texts, truncation))
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    # -- integers ---------------------------------------------------------------------------
    def _check(self, name: str, a: Any, like: np.ndarray | None = None, bools: bool = False) -> np.ndarray:
        try:
            a = np.asarray(a)
        except ValueError as err:  # ragged nested lists
            raise ValueError(f"{name} must be a rectangular array of integers: {err}") from None
        if a.dtype.kind == "b" and not bools:
            raise TypeError(f"{name} must hold integers, got booleans")
        if a.dtype.kind not in "iub":
            raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
        want = "[batch, choices, seq]" if self.choices else "[batch, seq]"
        if a.ndim == len(want.split(",")) - 1:
            a = a[None]
        if a.ndim != len(want.split(",")):
            raise ValueError(f"{name} must be {want} ({len(want.split(','))}-D), got shape {a.shape}")
        if a.shape[0] == 0 or a.shape[-1] == 0:
            raise ValueError(f"{name} is empty (shape {a.shape}): give at least one token of one sequence")
        if self.choices and a.shape[1] != self.choices:
            raise ValueError(f"{name} has {a.shape[1]} choices, the library was compiled for {self.choices}")
        if like is not None and a.shape != like.shape:
            raise ValueError(f"{name} has shape {a.shape}, input_ids has {like.shape}")
        if a.shape[-1] > self.seq_len:
            raise ValueError(f"{name} has {a.shape[-1]} tokens, the library was compiled for {self.seq_len}")
        return a

    @staticmethod
    def _in_range(name: str, a: np.ndarray, hi: int, what: str) -> np.ndarray:
        """`a` after checking [0, hi) on the values as given (a uint64 2**64-1 stays itself)."""
        if a.min() < 0 or a.max() >= hi:
            bad = (a < 0) | (a >= hi)
            shown = sorted({int(v) for v in a[bad].ravel()[:1000].tolist()})[:5]
            raise ValueError(f"{name} outside {what} [0, {hi}): {shown}")
        return a

    def run_integer(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> dict[str, Any]:
        """Raw integer outputs (names as transformers), plus `scales`: name -> per-channel scales."""
        with self._lock:  # a whole call at a time: see the class docstring
            if self._vm is None:
                raise RuntimeError(f"this Runner of {self.path} is closed")
            return self._run_integer(input_ids, attention_mask, token_type_ids)

    def _run_integer(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> dict[str, Any]:
        raw = self._check("input_ids", input_ids)
        ids = self._in_range("input_ids", raw, self.vocab, "the vocabulary")
        mask = None if attention_mask is None else self._check("attention_mask", attention_mask, raw, True)
        if mask is not None and (mask.min() < 0 or mask.max() > 1):
            raise ValueError("attention_mask must be 0 or 1")
        types = None if token_type_ids is None else self._in_range(
            "token_type_ids", self._check("token_type_ids", token_type_ids, raw), self.type_vocab,
            "the model's token types")
        n, s = ids.shape[0], ids.shape[-1]
        # padded to the shortest compiled length that fits and to the rows the planned calls take:
        # (given, padding, value where not given) per input
        inputs = ((ids, self.pad_id, None), (mask, 0, 1), (types, 0, 0))
        width, calls = self.bucket(s), self.plan(n)
        chunks = self._library.submit(self._invoke, width, calls, n, s, inputs).result()
        out: dict[str, Any] = {}
        for i, spec in enumerate(self.outputs):
            val = chunks[0][i] if len(chunks) == 1 else np.concatenate([c[i] for c in chunks])
            val, axis = val[:n], spec.seq_axis
            out[spec.name] = val if axis is None or s == width else np.take(val, np.arange(s), axis=axis)
        out["scales"] = self.scales
        return out

    def _invoke(self, width: int, calls: list[int], n: int, s: int,
                inputs: tuple[tuple[np.ndarray | None, int, int | None], ...]) -> list[list[np.ndarray]]:
        """The library's calls, on the library thread: one TVM worker pool however many callers.
        `n` rows of `s` tokens are given."""
        chunks, r = [], 0
        for batch in calls:
            main = self.functions[batch, width]
            shape = (batch, self.choices, width) if self.choices else (batch, width)
            host, tensors = self._staging(main, shape, len(inputs))
            rows = min(batch, n - r)
            for dst, (a, pad, default) in zip(host, inputs):
                if rows < batch or s < width:
                    dst.fill(pad)
                dst[:rows, ..., :s] = default if a is None else a[r : r + rows]
            r += batch
            if self._session is None:
                if not self._in_place:
                    for t, h in zip(tensors, host):
                        t.copyfrom(h)
                outputs = self._vm[main](*tensors, *self._params)
            else:  # the stateful calls, because over RPC a returned tuple is a remote handle
                self._vm.set_input(main, *(self._tensor(h, self._dev) for h in host), *self._params)
                self._vm.invoke_stateful(main)
                outputs = self._vm.get_outputs(main)
            # in place, each output is a tensor of its own (the library allocates outputs per call):
            # read where it lies, it lives as long as the array
            chunks.append([np.from_dlpack(o) if self._in_place else o.numpy() for o in outputs])
        return chunks

    def _staging(self, main: str, shape: tuple[int, ...], count: int) -> tuple[list[np.ndarray], list[Any]]:
        """Arrays to write a call's inputs into, and the tensors the call takes, kept per function
        (only the library thread uses them: a fresh tensor costs 3x the copy). On the CPU the
        arrays are the tensors' own memory, so nothing is copied."""
        kept = self._inputs.get(main)
        if kept is None:
            if self._session is not None:  # tensors made per call from the arrays
                kept = [np.zeros(shape, np.int32) for _ in range(count)], []
            else:
                tensors = [self._tensor(np.zeros(shape, np.int32), self._dev) for _ in range(count)]
                kept = [np.from_dlpack(t) if self._in_place else np.zeros(shape, np.int32) for t in tensors], tensors
            self._inputs[main] = kept
        return kept

    def set_instrument(self, fn: Any) -> None:
        """Call `fn(func, symbol, before, ret, *args)` before and after every call the library's VM
        makes (TVM's VM instrument; `ibert-tvm profile` times kernels with it); None removes it."""
        with self._lock:
            if self._vm is None:
                raise RuntimeError(f"this Runner of {self.path} is closed")
            self._vm.set_instrument(fn)

    def on_library_thread(self, fn: Callable[[], T]) -> T:
        """`fn()` on the library's thread, between calls: what times the library's functions
        (`ibert-tvm profile` replays a forward's kernels) runs them on the worker pool the calls
        use; another thread's pool would spin beside it."""
        with self._lock:
            if self._vm is None:
                raise RuntimeError(f"this Runner of {self.path} is closed")
            return self._library.submit(fn).result()

    def run(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> dict[str, np.ndarray]:
        """Float outputs: the integers times their scales."""
        ints = self.run_integer(input_ids, attention_mask, token_type_ids)
        scales = ints.pop("scales")
        return {k: v.astype(np.float32) * scales[k].astype(np.float32) for k, v in ints.items()}


# A library call's fixed cost, in rows of work: default model at 128 tokens on a 2-vCPU Xeon, one
# row took 5.0 ms and eight 29.3 ms (scripts/batch_check.py), i.e. 3.5 ms a row + 1.5 ms a call.
CALL_COST = 0.4


def plan_batches(rows: int, batches: list[int]) -> list[int]:
    """Batch sizes, largest first, whose calls cover `rows` rows at the least cost, a call of b rows
    costing b + CALL_COST: no padding where the sizes add up exactly, then the fewest calls.
    With {1, 8}: 9 rows are 8 + 1, 5 rows five single calls, 7 rows one call of 8."""
    best = [0.0] + [float("inf")] * rows
    last = [0] * (rows + 1)
    for r in range(1, rows + 1):
        for b in batches:
            cost = best[max(r - b, 0)] + b + CALL_COST
            if cost < best[r]:
                best[r], last[r] = cost, b
    calls, r = [], rows
    while r > 0:
        calls.append(last[r])
        r = max(r - last[r], 0)
    return sorted(calls, reverse=True)


def check_texts(texts: Any) -> list[str | tuple[str, str]]:
    """A non-empty list of texts or (text, text) pairs; a bad item is named by its index."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, tuple) and len(texts) == 2 and all(isinstance(t, str) for t in texts):
        raise TypeError("a tuple of two strings is ambiguous: pass [text, text] for two texts or "
                        "[(text, text)] for one pair")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}") from None
    if not texts:
        raise ValueError("no text given")
    for i, t in enumerate(texts):
        pair = isinstance(t, (tuple, list)) and len(t) == 2 and all(isinstance(x, str) for x in t)
        if not (isinstance(t, str) or pair):
            raise TypeError(f"text {i} is {type(t).__name__} {str(t)[:40]!r}, not a string or a (text, text) pair")
        if pair:
            texts[i] = tuple(t)
    return texts


def _tokenizer(data: bytes) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(data.decode())
    tok.no_padding()
    tok.no_truncation()
    return tok


_LIBRARIES: dict[str, Any] = {}  # sha256 -> loaded module: the dynamic loader never unloads a TVM library
_LIBRARIES_LOCK = threading.Lock()


def _load_library(data: bytes, digest: str) -> Any:
    """Load a verified library from a private copy: the file in the artifact may change after it
    was hashed, the copy (in a fresh folder only this user can enter) may not. Loaded once per
    content: each fresh copy would stay mapped for the life of the process."""
    import tvm

    with _LIBRARIES_LOCK:
        if digest not in _LIBRARIES:
            with tempfile.TemporaryDirectory(prefix="ibert-tvm-lib-") as tmp:
                path = Path(tmp) / artifact.LIBRARY
                path.write_bytes(data)
                _LIBRARIES[digest] = tvm.runtime.load_module(str(path))  # mapped: the copy may go
        return _LIBRARIES[digest]


def _trim_heap() -> None:
    """Return freed heap pages to the OS: glibc keeps them, and each closed Runner left ~10 MiB."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
