"""Names the graph gives its functions and kernels, and the one way to read them back.

A module holds one function per compiled (batch, sequence length) bucket; its kernels are
`b{B}_s{S}_` + the kernel's name, and a layer's kernels are named `l{i}_` + their kind. Tile records
are keyed by kind and shape (every layer has the same shapes), so tuning reads names with `kernel_kind`.
"""

from __future__ import annotations

import re


def function_name(batch: int, seq: int) -> str:
    """The module function that runs `batch` sequences of length `seq`."""
    return f"main_b{batch}_s{seq}"


def layer_kernel(layer: int, kind: str) -> str:
    return f"l{layer}_{kind}"


def bucket_symbol(batch: int, seq: int, kernel: str) -> str:
    """The symbol of `kernel` in the function of bucket (batch, seq): symbols are global in a library."""
    return f"b{batch}_s{seq}_{kernel}"


_PREFIXES = re.compile(r"^(b[0-9]+_s[0-9]+_)?(l[0-9]+_)?")  # what bucket_symbol and layer_kernel add


def kernel_kind(symbol: str) -> str:
    """`qkv` of `b1_s128_l3_qkv`: the inverse of bucket_symbol(layer_kernel(...))."""
    return _PREFIXES.sub("", symbol)
