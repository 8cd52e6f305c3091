"""Host memory for a library's parameters: one buffer on transparent huge pages.

Every forward streams all of the weights from memory (roberta-base: 85 MiB, far past L2). On
4 KiB pages that stream takes a TLB miss every 4 KiB and the hardware prefetchers stop at each page
boundary; in one buffer advised for 2 MiB pages, roberta-base's forward at 1x128 ran about 15%
faster (the same artifact in separate processes, interleaved; AMX Xeon). TVM allocates each
tensor with `posix_memalign`, which does not ask for huge pages, so the runner reads the
parameters into this buffer and hands TVM views of it (DLPack: no copy).
"""

from __future__ import annotations

import mmap

import numpy as np

HUGE_PAGE = 2 << 20
TENSOR_ALIGN = 64  # TVM's kernels assume 64-byte aligned tensors (its kAllocAlignment)


def aligned(nbytes: int) -> int:
    """`nbytes` rounded up to TENSOR_ALIGN."""
    return -(-nbytes // TENSOR_ALIGN) * TENSOR_ALIGN


def huge_page_buffer(nbytes: int) -> np.ndarray:
    """A zeroed uint8 array of `nbytes` starting on a 2 MiB boundary, advised for transparent huge
    pages where the kernel has them (else plain pages: the same memory, only slower)."""
    # private: a shared anonymous map is shmem, which takes huge pages only where shmem_enabled says
    # so (by default never); the unaligned head and tail are never touched, never resident
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no MADV_HUGEPAGE on this OS, or THP compiled out
        pass
    whole = np.frombuffer(m, np.uint8)  # holds the mapping for as long as any view of it lives
    start = -whole.ctypes.data % HUGE_PAGE
    return whole[start : start + nbytes]


class Arena:
    """Arrays carved one after another out of one huge-page buffer of `nbytes` (each TENSOR_ALIGN
    aligned: size the buffer with `aligned`)."""

    def __init__(self, nbytes: int):
        self._buffer = huge_page_buffer(nbytes)
        self._used = 0

    def empty(self, shape: list[int], dtype: np.dtype) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if self._used + n > self._buffer.size:
            raise ValueError(f"arena of {self._buffer.size} bytes has {self._buffer.size - self._used} left, not {n}")
        out = self._buffer[self._used : self._used + n].view(dtype).reshape(shape)
        self._used += aligned(n)
        return out
