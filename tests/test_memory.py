"""The parameters on transparent huge pages: one aligned buffer, views of it, the same values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ibert_tvm import artifact as artifact_module
from ibert_tvm.memory import HUGE_PAGE, TENSOR_ALIGN, Arena, aligned, huge_page_buffer
from ibert_tvm.runner import Runner

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address`."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= address < hi:
                return next(x for x in lines[i + 1 :] if x.startswith("VmFlags:")).split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_buffer_is_zeroed_writable_and_starts_on_a_huge_page():
    buf = huge_page_buffer(3 * HUGE_PAGE + 5)
    assert buf.size == 3 * HUGE_PAGE + 5 and buf.dtype == np.uint8
    assert buf.ctypes.data % HUGE_PAGE == 0 and not buf.any()
    buf[-1] = 7
    assert buf[-1] == 7


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_buffer_is_advised_for_huge_pages():
    buf = huge_page_buffer(HUGE_PAGE)
    assert "hg" in _vm_flags(buf.ctypes.data)  # MADV_HUGEPAGE on its mapping


def test_arena_carves_aligned_arrays_and_names_an_overflow():
    sizes = [((3, 5), np.int8), ((7,), np.int32), ((2, 2), np.int64)]
    arena = Arena(sum(aligned(int(np.prod(s)) * np.dtype(d).itemsize) for s, d in sizes))
    arrays = [arena.empty(list(s), d) for s, d in sizes]
    assert [(a.shape, a.dtype) for a in arrays] == [(s, np.dtype(d)) for s, d in sizes]
    assert all(a.ctypes.data % TENSOR_ALIGN == 0 for a in arrays)
    for i, a in enumerate(arrays):  # no overlap: each keeps its own values
        a[...] = i + 1
    assert [int(a.min()) for a in arrays] == [int(a.max()) for a in arrays] == [1, 2, 3]
    with pytest.raises(ValueError, match="arena of 192 bytes has 0 left, not 1"):
        arena.empty([1], np.int8)


def test_parameters_on_huge_pages_equal_the_plain_read(artifact):
    m = artifact_module.read(artifact.path)
    plain = artifact_module.load_params(artifact.path, m, np.array)
    huge = artifact_module.load_params(artifact.path, m, lambda a: a, huge_pages=True)
    assert all(np.array_equal(p, h) and p.dtype == h.dtype for p, h in zip(plain, huge, strict=True))
    first = min(h.ctypes.data for h in huge)
    assert first % HUGE_PAGE == 0 and all(h.ctypes.data % TENSOR_ALIGN == 0 for h in huge)


def test_runner_keeps_its_parameters_where_they_were_read(artifact):
    """TVM's tensors are views of the huge-page buffer (DLPack), not copies of it."""
    with Runner(artifact.path, threads=1) as r:
        views = [np.from_dlpack(p) for p in r._params]
        starts = sorted(v.ctypes.data for v in views)
        assert starts[0] % HUGE_PAGE == 0
        ends = sorted(v.ctypes.data + v.nbytes for v in views)
        assert ends[-1] - starts[0] <= sum(aligned(v.nbytes) for v in views)  # one buffer, packed
