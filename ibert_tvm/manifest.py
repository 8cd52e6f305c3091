"""The artifact's manifest: one typed description, written by compile and read by the runner.

Reading validates every field against the dataclasses below (their annotations are the schema)
and then the relations between fields, so a missing, mistyped or inconsistent field is an
`ArtifactError` that names it rather than a KeyError or a silently different output.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any

# 2: sequence-length buckets; 3: every IBert class; 4: schema, type vocabulary, sealed manifest; 5: batch buckets
FORMAT_VERSION = 5
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ArtifactError(RuntimeError):
    """An artifact that is missing, of another format, corrupt, tampered with or inconsistent."""


@dataclass(frozen=True)
class Target:
    preset: str
    tvm: dict[str, Any]
    arch: str  # platform.machine() of machines that can run the library
    cpu_flags: list[str]
    device: str
    built_on: str


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: list[int]
    dtype: str


@dataclass(frozen=True)
class Output(Tensor):
    scale: list[float]  # per output channel, or one for the whole tensor
    seq_axis: int | None  # the per-token axis the runner cuts back to the input length


@dataclass(frozen=True)
class TokenizerInfo:
    file: str | None
    max_length: int
    pad_id: int


@dataclass(frozen=True)
class Bucket:
    """A function of the library: it runs exactly `batch` sequences of `seq_len` tokens."""

    batch: int
    seq_len: int
    function: str


@dataclass(frozen=True)
class Pooling:
    """How feature extraction turns token vectors into one sentence vector (sentence-transformers'
    `1_Pooling` and `2_Normalize`)."""

    mode: str  # one of POOLING_MODES
    normalize: bool


POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens")


@dataclass(frozen=True)
class Manifest:
    model_class: str
    source: str
    target: Target
    batches: list[int]  # compiled batch sizes, ascending
    seq_len: int  # the longest compiled length
    buckets: list[Bucket]  # every (batch, length) pair of the compiled batches and lengths
    vocab_size: int
    type_vocab_size: int
    pad_id: int
    choices: int | None  # multiple choice: inputs are [batch, choices, seq]
    inputs: list[Tensor]
    outputs: list[Output]
    label_names: list[str]
    tokenizer: TokenizerInfo
    params: list[str]  # the library's parameters, in call order
    packages: dict[str, str]
    pooling: Pooling | None = None  # a sentence-transformers model's pooling; None: not one
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256; filled when written
    format_version: int = FORMAT_VERSION

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self, with_files: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not with_files:
            del d["files"]
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    def sealed(self) -> str:
        """Canonical JSON of everything but `files`: the copy compile seals into the parameters."""
        return canonical(self.to_dict(with_files=False))

    @classmethod
    def from_json(cls, data: bytes, where: str = "manifest.json") -> "Manifest":
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{where} is corrupt: {err}") from err
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where} is not a JSON object")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{where}: format version {version}, this runner reads {FORMAT_VERSION} "
                                "(compile the model again)")
        manifest = _parse(cls, raw, where)
        manifest.validate(where)
        return manifest

    # -- relations between fields ---------------------------------------------------------------
    def validate(self, where: str = "manifest.json") -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ArtifactError(f"{where}: field {name} {why}")

        for name in ("seq_len", "vocab_size", "type_vocab_size"):
            need(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        need(0 <= self.pad_id < self.vocab_size, "pad_id", f"must lie in [0, vocab_size={self.vocab_size})")
        need(self.choices is None or self.choices >= 1, "choices", f"must be at least 1 or null, got {self.choices}")
        need(bool(self.batches) and self.batches == sorted(set(self.batches)) and self.batches[0] >= 1, "batches",
             f"must be distinct positive sizes in ascending order, got {self.batches}")
        lengths = sorted({b.seq_len for b in self.buckets})
        need(bool(lengths) and lengths[0] >= 1 and lengths[-1] == self.seq_len, "buckets",
             f"must hold lengths in [1, seq_len={self.seq_len}], seq_len among them, got {lengths}")
        pairs = sorted((b.batch, b.seq_len) for b in self.buckets)
        need(pairs == [(n, s) for n in self.batches for s in lengths], "buckets",
             f"must hold each compiled batch {self.batches} at each compiled length {lengths} once")
        need(len({b.function for b in self.buckets}) == len(self.buckets), "buckets", "must name distinct functions")
        need(len(self.outputs) >= 1, "outputs", "is empty")
        for i, o in enumerate(self.outputs):
            need(len(o.scale) >= 1 and all(math.isfinite(s) for s in o.scale), f"outputs[{i}].scale",
                 "must be finite numbers")
            need(o.seq_axis is None or 0 < o.seq_axis < len(o.shape), f"outputs[{i}].seq_axis",
                 f"must be an axis of shape {o.shape} or null")
        need(len(set(self.params)) == len(self.params) >= 1, "params", "must name distinct tensors")
        for name, digest in self.files.items():
            need(is_plain_name(name), "files", f"names {name!r}, not a plain file name inside the artifact")
            need(bool(_SHA256.fullmatch(digest)), f"files[{name!r}]", "is not a sha256 hex digest")
        need(self.pooling is None or self.pooling.mode in POOLING_MODES, "pooling.mode",
             f"must be one of {', '.join(POOLING_MODES)}")
        tok = self.tokenizer.file
        need(tok is None or tok in self.files, "tokenizer.file", f"names {tok!r}, which files does not list")


def is_plain_name(name: str) -> bool:
    """A file directly inside the artifact folder: no separators, no parent or hidden names."""
    return bool(name) and name == name.strip() and not name.startswith(".") and not any(c in name for c in "/\\\0")


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The path (`outputs[0].scale[1]`) of the first place where two JSON values differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            where = f"{path}.{key}" if path else key
            found = where if key not in a or key not in b else first_difference(a[key], b[key], where)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((f for i, (x, y) in enumerate(zip(a, b)) if (f := first_difference(x, y, f"{path}[{i}]"))), None)
    return None if a == b and type(a) is type(b) else (path or "(root)")


def _parse(cls: type, raw: Any, where: str, path: str = "") -> Any:
    """`raw` checked against the dataclass `cls` field by field; the error names the field."""
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where}: field {path or '(root)'} must be an object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    extra = sorted(set(raw) - known)
    if extra:
        raise ArtifactError(f"{where}: unknown field {(path + '.' if path else '') + extra[0]}")
    values = {}
    for f in fields(cls):
        name = f"{path}.{f.name}" if path else f.name
        if f.name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ArtifactError(f"{where}: field {name} is missing")
            continue
        values[f.name] = _value(hints[f.name], raw[f.name], where, name)
    return cls(**values)


def _value(hint: Any, v: Any, where: str, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, v, where, name)
    if is_dataclass(hint):
        return _parse(hint, v, where, name)
    if origin is list:
        if not isinstance(v, list):
            raise ArtifactError(f"{where}: field {name} must be a list, got {type(v).__name__}")
        return [_value(args[0], x, where, f"{name}[{i}]") for i, x in enumerate(v)]
    if origin is dict:
        if not isinstance(v, dict):
            raise ArtifactError(f"{where}: field {name} must be an object, got {type(v).__name__}")
        return {k: _value(args[1], x, where, f"{name}[{k!r}]") for k, x in v.items()}
    if hint is Any:
        return v
    ok = {int: lambda x: type(x) is int, float: lambda x: type(x) in (int, float), str: lambda x: type(x) is str,
          bool: lambda x: type(x) is bool}
    if not ok[hint](v):
        raise ArtifactError(f"{where}: field {name} must be {hint.__name__}, got {json.dumps(v)[:40]}")
    return float(v) if hint is float else v
