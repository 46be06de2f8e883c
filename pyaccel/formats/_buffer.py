"""Memory for packed weights.

The kernels stream packed weights; on 4 KiB pages that costs a TLB miss every
4 KiB (and the hardware prefetchers restart at every page). Packed buffers
therefore live on private anonymous mappings marked MADV_HUGEPAGE before first touch,
aligned to 2 MiB, so that transparent huge pages back them where the kernel
allows it (the common "madvise" THP mode included):

- a buffer of at least 2 MiB gets its own mapping;
- smaller ones are carved (64-byte aligned) from shared 2 MiB arena chunks,
  so a model's many small layers share a few huge pages. A chunk stays
  mapped while any tensor carved from it lives.

Measured on the project machine (A/B, same modules built both ways): M = 1
int8 GEMV over rotated 4096² weights +1 – 4 % (own mappings); MiniLM-sized
layers (0.2 – 0.6 MB) streamed at M = 1: dense int8 −4 – 5 % time, 2:4 int8
0 – 3 % (arena chunks). PYACCEL_HUGEPAGES=0,
no MADV_HUGEPAGE or a failing mmap give plain torch.empty.
"""
from __future__ import annotations

import mmap
import os
import threading

import torch

HUGE_PAGE = 2 << 20
_ALIGN = 64


def _huge_mapping(nbytes: int) -> torch.Tensor:
    """nbytes on a fresh MADV_HUGEPAGE mapping, starting on a 2 MiB boundary."""
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(mm, dtype=torch.uint8)  # the tensor keeps the mapping alive
    skip = -whole.data_ptr() % HUGE_PAGE
    return whole[skip:skip + nbytes]


class _Arena:
    """Bump allocation of small buffers from 2 MiB huge-page chunks."""

    def __init__(self):
        self._lock = threading.Lock()
        self._chunk = None
        self._used = 0

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            start = (self._used + _ALIGN - 1) // _ALIGN * _ALIGN
            if self._chunk is None or start + nbytes > HUGE_PAGE:
                self._chunk = _huge_mapping(HUGE_PAGE)
                start = 0
            self._used = start + nbytes
            return self._chunk[start:start + nbytes]


_arena = _Arena()


def packed_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of nbytes (contents undefined), on huge pages where possible."""
    if nbytes <= 0 or os.environ.get("PYACCEL_HUGEPAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(max(nbytes, 0), dtype=torch.uint8)
    try:
        return _huge_mapping(nbytes) if nbytes >= HUGE_PAGE else _arena.take(nbytes)
    except (OSError, ValueError, AttributeError, RuntimeError):
        return torch.empty(nbytes, dtype=torch.uint8)
