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

Each tensor's storage is exactly its own bytes (torch.frombuffer over a
memoryview of its part of the mapping), so what copies or serializes whole
storages (torch.jit.trace constants, torch.export) sees only those bytes; and
the tensors are normal ones even when made under torch.inference_mode (an
inference tensor cannot be saved for backward, and a buffer carved from an
inference-mode chunk would be one).

Measured on the project machine (A/B, same modules built both ways): M = 1
int8 GEMV over rotated 4096² weights +1 – 4 % (own mappings); MiniLM-sized
layers (0.2 – 0.6 MB) streamed at M = 1: dense int8 −4 – 5 % time, 2:4 int8
0 – 3 % (arena chunks). PYACCEL_HUGEPAGES=0,
no MADV_HUGEPAGE or a failing mmap give plain torch.empty.
"""
from __future__ import annotations

import collections
import mmap
import os
import threading
import weakref

import torch

HUGE_PAGE = 2 << 20
_ALIGN = 64


def _huge_region(nbytes: int) -> memoryview:
    """nbytes of a fresh MADV_HUGEPAGE mapping, starting on a 2 MiB boundary
    (the memoryview keeps the mapping alive)."""
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)
    with torch.inference_mode(False):
        base = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
    skip = -base % HUGE_PAGE
    return memoryview(mm)[skip:skip + nbytes]


def _tensor_over(region: memoryview) -> torch.Tensor:
    """A normal uint8 tensor whose storage is exactly `region` (which it keeps alive)."""
    with torch.inference_mode(False):
        return torch.frombuffer(region, dtype=torch.uint8)


class _Arena:
    """Bump allocation of small buffers from 2 MiB huge-page chunks. A buffer
    freed while it is the last one taken from the current chunk gives its bytes
    back (a module's constructor packs a placeholder that its builder
    replaces at once: without this, half of every chunk held dead placeholders).
    Frees are queued by the storages' finalizers and applied at the next take,
    under the lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._chunk = None
        self._used = 0
        self._taken = []  # the current chunk's live ranges, in order taken: [start, end, alive]
        self._freed = collections.deque()  # ranges whose tensors died, not yet applied

    def _release(self, chunk, rng) -> None:
        self._freed.append((chunk, rng))  # (any thread, any time: deque.append is atomic)

    def _apply_frees(self) -> None:
        while self._freed:
            chunk, rng = self._freed.popleft()
            if chunk is self._chunk:
                rng[2] = False
        while self._taken and not self._taken[-1][2]:
            self._taken.pop()
            self._used = self._taken[-1][1] if self._taken else 0

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            self._apply_frees()
            start = (self._used + _ALIGN - 1) // _ALIGN * _ALIGN
            if self._chunk is None or start + nbytes > HUGE_PAGE:
                self._chunk = _huge_region(HUGE_PAGE)
                self._taken = []
                start = 0
            self._used = start + nbytes
            rng = [start, start + nbytes, True]
            self._taken.append(rng)
            region = self._chunk[start:start + nbytes]
            # fires when the last storage over the region dies
            weakref.finalize(region, self._release, self._chunk, rng).atexit = False
            return _tensor_over(region)


_arena = _Arena()


def packed_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of nbytes (contents undefined), on huge pages where possible."""
    if nbytes <= 0 or os.environ.get("PYACCEL_HUGEPAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        with torch.inference_mode(False):
            return torch.empty(max(nbytes, 0), dtype=torch.uint8)
    try:
        return _tensor_over(_huge_region(nbytes)) if nbytes >= HUGE_PAGE else _arena.take(nbytes)
    except (OSError, ValueError, AttributeError, RuntimeError):
        with torch.inference_mode(False):
            return torch.empty(nbytes, dtype=torch.uint8)
