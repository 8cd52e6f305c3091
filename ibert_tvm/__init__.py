"""ibert-tvm: integer-only I-BERT compiled through Apache TVM, and the runtime that runs it.

`from ibert_tvm import Runner` (or `pipeline`, transformers' API over it) loads only the runtime (numpy;
TVM when a Runner is made); the compiler (torch, transformers) is imported by the commands that need it.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

try:
    __version__ = metadata.version("ibert-tvm")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["Runner", "__version__", "pipeline"]


def __getattr__(name: str) -> Any:
    # lazily, so that `import ibert_tvm` (and every submodule import) stays as light as the runtime
    if name == "Runner":
        from .runner import Runner

        return Runner
    if name == "pipeline":
        from .pipelines import pipeline

        return pipeline
    raise AttributeError(f"module 'ibert_tvm' has no attribute {name!r}")
