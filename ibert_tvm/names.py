"""Names the graph gives its functions and kernels, and the one way to read them back.

A module holds one function per compiled sequence length; its kernels are `s{S}_` + the kernel's
name, and a layer's kernels are named `l{i}_` + their kind. Tile records are keyed by the kind
alone (every layer, every length has the same shapes), so tuning reads names with `kernel_kind`.
"""

from __future__ import annotations

import re


def function_name(seq: int) -> str:
    """The module function that runs sequences of length `seq`."""
    return f"main_s{seq}"


def layer_kernel(layer: int, kind: str) -> str:
    return f"l{layer}_{kind}"


def bucket_symbol(seq: int, kernel: str) -> str:
    """The symbol of `kernel` in the function for length `seq` (kernels are shared by name otherwise)."""
    return f"s{seq}_{kernel}"


_PREFIXES = re.compile(r"^(s[0-9]+_)?(l[0-9]+_)?")  # what bucket_symbol and layer_kernel add


def kernel_kind(symbol: str) -> str:
    """`qkv` of `s128_l3_qkv`: the inverse of bucket_symbol(layer_kernel(...))."""
    return _PREFIXES.sub("", symbol)
