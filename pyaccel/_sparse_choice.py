"""How patch decides whether a Linear with zero blocks runs faster
block-sparse, and with which block shape.

Rule (documented in the README):

1. For each candidate block shape (CANDIDATE_BLOCKS, largest first) compute
   the fraction of all-zero blocks of the effective weight. A layer below
   MIN_ZERO_BLOCKS for every shape stays dense without a measurement.
2. The largest block whose zero fraction is within 2 percentage points of the best one is the
   candidate (larger blocks run closer to dense-GEMM efficiency).
3. The candidate module and dense ``F.linear`` on the same weight are timed on
   the real shape, interleaved, at PROBE_ROWS rows (a GEMV and a GEMM);
   the layer is swapped only if the slower of the two speed-ups is at least
   MIN_SPEEDUP, so a swapped layer is not slower than dense at either size.
   When the weight is also 2:4, Sparse24Linear is timed the same way and the
   faster of the two is taken. With quantize="int8" the modules are the int8
   ones (BlockSparseInt8Linear, Sparse24Int8Linear) and the baseline is the
   dense Int8Linear.

A measurement takes a few ms per layer for 4096 x 4096 weights.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyaccel.formats.block_sparse import zero_block_fraction

CANDIDATE_BLOCKS: Tuple[Tuple[int, int], ...] = ((64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (1, 8), (1, 4))
MIN_ZERO_BLOCKS = 0.3
MIN_SPEEDUP = 1.15
PROBE_ROWS: Tuple[int, ...] = (1, 64)


@dataclasses.dataclass
class BlockChoice:
    block: Tuple[int, int]
    zero_fraction: float


def most_zero_blocks(w: Tensor, blocks: Sequence[Tuple[int, int]] = CANDIDATE_BLOCKS) -> Optional[BlockChoice]:
    """The candidate block shape with the largest zero-block fraction in w (any fraction), or None."""
    fracs = [(b, zero_block_fraction(w, b)) for b in blocks if b[0] <= w.shape[0] and b[1] <= w.shape[1]]
    if not fracs:
        return None
    b, f = max(fracs, key=lambda t: t[1])
    return BlockChoice(b, f)


def candidate_block(w: Tensor, blocks: Sequence[Tuple[int, int]] = CANDIDATE_BLOCKS) -> Optional[BlockChoice]:
    """The block shape to try for weight w [out, in] (rule steps 1-2), or None."""
    fracs = [(b, zero_block_fraction(w, b)) for b in blocks if b[0] <= w.shape[0] and b[1] <= w.shape[1]]
    if not fracs:
        return None
    best = max(f for _, f in fracs)
    if best < MIN_ZERO_BLOCKS:
        return None
    for b, f in fracs:  # largest first
        if f >= best - 0.02:
            return BlockChoice(b, f)
    return None  # pragma: no cover - the best one always qualifies


def _time_per_call(fn: Callable[[], Tensor], budget_s: float = 1e-3) -> float:
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-7)
    reps = max(1, min(50, int(budget_s / one)))
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def measured_speedups(w: Tensor, b: Optional[Tensor], candidates: Dict[str, nn.Module],
                      rows: Sequence[int] = PROBE_ROWS, rounds: int = 5,
                      baseline: Optional[nn.Module] = None) -> Dict[str, Dict[int, float]]:
    """Speed-up of each candidate module over the dense baseline -- ``F.linear(x,
    w, b)``, or `baseline` (e.g. the dense Int8Linear when quantizing) -- at each
    row count: the fastest of `rounds` interleaved timings on random inputs (the
    minimum: interference from other work on the machine only adds time, and a
    descheduled thread can add a whole scheduler time slice to one timing)."""
    out: Dict[str, Dict[int, float]] = {name: {} for name in candidates}
    wf, bf = w.float(), None if b is None else b.float()
    dense = baseline if baseline is not None else (lambda x: F.linear(x, wf, bf))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in rows:
            x = torch.randn(m, w.shape[1], generator=gen).to(w.device)  # a private generator: the caller's RNG stream stays as it was
            times: Dict[str, list] = {name: [] for name in ["dense", *candidates]}
            for _ in range(rounds):
                times["dense"].append(_time_per_call(lambda: dense(x)))
                for name, mod in candidates.items():
                    times[name].append(_time_per_call(lambda mod=mod: mod(x)))
            t_dense = min(times["dense"])
            for name in candidates:
                out[name][m] = t_dense / min(times[name])
    return out


def describe(speedups: Dict[int, float]) -> str:
    return " / ".join(f"x{s:.2f} at M={m}" for m, s in speedups.items())
