"""Run a compiled artifact with the TVM runtime alone (numpy, tokenizers; no torch).

Integers come out of the library; `run` multiplies them by the scales in the manifest, the one
float step of the pipeline.
"""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from . import artifact
from .targets import check_runnable


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


class Runner:
    def __init__(self, path: str | Path, threads: int | None = None, rpc: str | None = None,
                 rpc_timeout: float = 10.0):
        """`threads`: worker threads for the library (default: every CPU this process may use).
        `rpc`: HOST:PORT of a `python -m tvm.exec.rpc_server` (a board) that runs the library;
        the artifact stays here, its library is uploaded, inputs and outputs travel."""
        import tvm
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: boards may have the runtime only

        self.path = Path(path)
        self.manifest = m = artifact.read(self.path)
        self._session = None
        if rpc:
            from .remote import connect

            self.threads = None  # the board's runtime decides (TVM_NUM_THREADS there)
            self._session = session = connect(rpc, rpc_timeout)
            session.upload(str(self.path / artifact.LIBRARY))
            lib = session.load_module(artifact.LIBRARY)
            self._dev = session.cpu()
        else:
            self.threads = use_threads(threads)
            check_runnable(m["target"]["arch"], m["target"]["cpu_flags"])
            if m["target"].get("device") == "cuda":
                from .cuda import gpu_for

                self._dev = gpu_for(m["target"]["tvm"]["arch"])
            else:
                self._dev = tvm.cpu()
            lib = tvm.runtime.load_module(str(self.path / artifact.LIBRARY))
        self.batch, self.seq_len = m["batch"], m["seq_len"]
        self.buckets: dict[int, str] = {int(n): f for n, f in sorted(m["buckets"].items(), key=lambda b: int(b[0]))}
        self.vocab, self.pad_id = m["vocab_size"], m["pad_id"]
        self.model_class: str = m["model_class"]
        self.choices: int | None = m.get("choices")  # multiple choice: inputs are [n, choices, seq]
        self.outputs: list[dict[str, Any]] = m["outputs"]
        self.scales = {o["name"]: np.asarray(o["scale"]) for o in self.outputs}
        self._vm = VirtualMachine(lib, self._dev)
        self._params = artifact.load_params(self.path / artifact.PARAMS, m["params"],
                                            lambda a: tvm.runtime.tensor(a, self._dev))
        self._tensor = tvm.runtime.tensor
        self._tokenizer = None

    def close(self) -> None:
        """Release the library; over RPC this ends the session (a board serves one at a time)."""
        self._vm = self._params = self._session = self._dev = None
        gc.collect()  # the remote device and handles keep the session; some sit in reference cycles

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- text -------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            f = self.path / artifact.TOKENIZER
            if not f.exists():
                raise FileNotFoundError(f"{self.path} has no tokenizer; pass token ids to run()")
            tok = Tokenizer.from_file(str(f))
            tok.no_padding()
            tok.no_truncation()
            self._tokenizer = tok
        return self._tokenizer

    def bucket(self, tokens: int) -> int:
        """The shortest compiled length that holds `tokens`."""
        return next(n for n in self.buckets if n >= tokens)

    def tokenize(self, texts: list[str | tuple[str, str]] | str, truncate: bool = False) -> list[Any]:
        """`tokenizers` encodings of texts (or text pairs); over-long text raises unless `truncate`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no text given")
        encodings = self.tokenizer.encode_batch(texts)
        long = [i for i, e in enumerate(encodings) if len(e.ids) > self.seq_len]
        if long and not truncate:
            raise ValueError(f"text {long[0]} is {len(encodings[long[0]].ids)} tokens, longer than the compiled "
                             f"length {self.seq_len} (truncate=True / --truncate cuts it)")
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

    def encode(self, texts: list[str] | str, truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask of single texts (see `tokenize`, `pack`)."""
        ids, mask, _ = self.pack(self.tokenize(texts, truncate))
        return ids, mask

    # -- integers ---------------------------------------------------------------------------
    def _check(self, name: str, a: Any, like: np.ndarray | None = None) -> np.ndarray:
        a = np.asarray(a)
        if a.dtype.kind not in "iub":
            raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
        want = "[batch, choices, seq]" if self.choices else "[batch, seq]"
        if a.ndim == len(want.split(",")) - 1:
            a = a[None]
        if a.ndim != len(want.split(",")):
            raise ValueError(f"{name} must be {want} ({len(want.split(','))}-D), got shape {a.shape}")
        if self.choices and a.shape[1] != self.choices:
            raise ValueError(f"{name} has {a.shape[1]} choices, the library was compiled for {self.choices}")
        if like is not None and a.shape != like.shape:
            raise ValueError(f"{name} has shape {a.shape}, input_ids has {like.shape}")
        if a.shape[-1] > self.seq_len:
            raise ValueError(f"{name} has {a.shape[-1]} tokens, the library was compiled for {self.seq_len}")
        return a.astype(np.int64)

    def run_integer(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> dict[str, Any]:
        """Raw integer outputs (names as transformers), plus `scales`: name -> per-channel scales."""
        ids = self._check("input_ids", input_ids)
        mask = np.ones_like(ids) if attention_mask is None else self._check("attention_mask", attention_mask, ids)
        types = np.zeros_like(ids) if token_type_ids is None else self._check("token_type_ids", token_type_ids, ids)
        bad = (ids < 0) | (ids >= self.vocab)
        if bad.any():
            raise ValueError(f"token ids outside the vocabulary [0, {self.vocab}): {sorted(set(ids[bad].tolist()))[:5]}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must be 0 or 1")
        n, s = ids.shape[0], ids.shape[-1]
        # pad to the shortest compiled length that fits and a whole number of compiled batches
        width, rows = self.bucket(s), -(-n // self.batch) * self.batch
        main = self.buckets[width]
        pads = [(0, rows - n)] + [(0, 0)] * (ids.ndim - 2) + [(0, width - s)]
        full = lambda a, fill: np.pad(a, pads, constant_values=fill).astype(np.int32)  # noqa: E731
        ids_p, mask_p, types_p = full(ids, self.pad_id), full(mask, 0), full(types, 0)
        chunks: list[list[np.ndarray]] = []
        for r in range(0, rows, self.batch):
            args = [self._tensor(a[r : r + self.batch], self._dev) for a in (ids_p, mask_p, types_p)]
            # the stateful calls, because over RPC a returned tuple is a remote handle
            self._vm.set_input(main, *args, *self._params)
            self._vm.invoke_stateful(main)
            chunks.append([o.numpy() for o in self._vm.get_outputs(main)])
        out: dict[str, Any] = {}
        for i, spec in enumerate(self.outputs):
            val = np.concatenate([c[i] for c in chunks])[:n]
            axis = spec["seq_axis"]
            out[spec["name"]] = val if axis is None else np.take(val, np.arange(s), axis=axis)
        out["scales"] = self.scales
        return out

    def run(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> dict[str, np.ndarray]:
        """Float outputs: the integers times their scales."""
        ints = self.run_integer(input_ids, attention_mask, token_type_ids)
        scales = ints.pop("scales")
        return {k: v.astype(np.float32) * scales[k].astype(np.float32) for k, v in ints.items()}

    def embed(self, texts: list[str] | str, truncate: bool = False) -> np.ndarray:
        """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' pooling)."""
        ids, mask = self.encode(texts, truncate)
        return mean_pool(self.run(ids, mask)["last_hidden_state"], mask)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Average of the real tokens' vectors, L2-normalised."""
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
