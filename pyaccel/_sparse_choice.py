"""How patch decides whether a Linear with zero blocks runs faster
block-sparse, and with which block shape.

Rule (documented in the README):

1. The block shapes scored are CANDIDATE_BLOCKS plus two hints, when there
   are such: the block shape of a torch sparse_bsr / sparse_bsc weight (the
   shape its user chose), and :func:`tiling_block`, the largest shape whose
   aligned blocks are each all zero or all non-zero -- the shape
   ``pyaccel.prune.prune_blocks`` pruned with (or a multiple), found again
   from the zeros themselves, so also after ``make_permanent`` or a state_dict
   round trip. For each shape, the fraction of all-zero blocks of the
   effective weight. A layer below MIN_ZERO_BLOCKS for every shape stays as it
   is without a measurement -- unless its weight is a torch sparse tensor and
   the layer is not quantized and not 2:4 (the alternative to a swap is then
   torch's sparse kernels, often slower than dense: such a layer is measured
   whatever its zero blocks).
2. The largest shape (by area) whose zero fraction is within 2 percentage
   points of the best one is the candidate (larger blocks run closer to
   dense-GEMM efficiency). When that is a hint, the pick among
   CANDIDATE_BLOCKS alone is measured too, so that a hint the kernels run
   slowly cannot cost the layer a swap (:func:`block_choices`).
3. The candidate modules and the baseline are timed on the real shape,
   interleaved, at PROBE_ROWS rows (a GEMV and a GEMM), with inputs of the
   weight's dtype. The baseline is what the layer runs if it is not swapped:
   its own forward (dense F.linear; torch's sparse F.linear for a sparse
   weight; a prune mask, parametrization or weight_norm recomputed each call
   included), or dense ``F.linear`` on the effective weight where that
   forward raises (e.g. a bfloat16 sparse_bsr weight) -- so a layer still
   under a prune mask is measured with its mask multiply, which can cost
   more than the GEMV at one row (make_permanent first to judge it against
   dense F.linear alone); with quantize="int8"
   the dense Int8Linear, which replaces the layer otherwise. The faster
   block shape is swapped in only if the slower of its two speed-ups is at
   least MIN_SPEEDUP, so a swapped layer is not slower than that baseline at
   either size. When the weight is also 2:4, Sparse24Linear is timed the
   same way and the faster of the two is taken. With quantize="int8" the
   modules are the int8 ones (BlockSparseInt8Linear, Sparse24Int8Linear).

A measurement takes a few ms per layer for 4096 x 4096 weights; finding the
hints reads the weight's zero pattern once more (cheap next to the scores).
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyaccel.formats.block_sparse import zero_block_fraction

CANDIDATE_BLOCKS: Tuple[Tuple[int, int], ...] = ((64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (1, 8), (1, 4))
MIN_ZERO_BLOCKS = 0.3
MIN_SPEEDUP = 1.15
PROBE_ROWS: Tuple[int, ...] = (1, 64)
MAX_TILING_SIDE = 64  # tiling_block's sides: at most the largest candidate's
MIN_TILING_AREA = 4  # tiling_block's shapes: at least as many entries as the smallest candidate's


@dataclasses.dataclass
class BlockChoice:
    block: Tuple[int, int]
    zero_fraction: float


def shapes_with(hints: Sequence[Tuple[int, int]] = ()) -> Tuple[Tuple[int, int], ...]:
    """CANDIDATE_BLOCKS and the hints (None entries ignored), once each,
    largest area first (a hint before a candidate of the same area)."""
    shapes: List[Tuple[int, int]] = []
    for b in [*hints, *CANDIDATE_BLOCKS]:
        if b is not None and tuple(b) not in shapes:
            shapes.append((int(b[0]), int(b[1])))
    return tuple(sorted(shapes, key=lambda b: -b[0] * b[1]))  # stable: hints first among equals


def _fractions(w: Tensor, blocks: Sequence[Tuple[int, int]]) -> List[Tuple[Tuple[int, int], float]]:
    return [(b, zero_block_fraction(w, b)) for b in blocks if b[0] <= w.shape[0] and b[1] <= w.shape[1]]


def _pick(fracs: Sequence[Tuple[Tuple[int, int], float]], minimum: float) -> Optional[BlockChoice]:
    """Rule step 2 over (shape, zero fraction) pairs listed largest first."""
    if not fracs:
        return None
    best = max(f for _, f in fracs)
    if best < minimum:
        return None
    for b, f in fracs:  # largest first
        if f >= best - 0.02:
            return BlockChoice(b, f)
    return None  # pragma: no cover - the best one always qualifies


def most_zero_blocks(w: Tensor, blocks: Sequence[Tuple[int, int]] = CANDIDATE_BLOCKS) -> Optional[BlockChoice]:
    """The block shape with the largest zero-block fraction in w (any fraction), or None."""
    fracs = _fractions(w, blocks)
    if not fracs:
        return None
    b, f = max(fracs, key=lambda t: t[1])
    return BlockChoice(b, f)


def candidate_block(w: Tensor, blocks: Sequence[Tuple[int, int]] = CANDIDATE_BLOCKS) -> Optional[BlockChoice]:
    """The block shape to try for weight w [out, in] (rule steps 1-2 over
    `blocks`, listed largest first), or None."""
    return _pick(_fractions(w, blocks), MIN_ZERO_BLOCKS)


def block_choices(w: Tensor, hints: Sequence[Optional[Tuple[int, int]]] = (),
                  minimum: float = MIN_ZERO_BLOCKS) -> List[BlockChoice]:
    """The block shapes to measure for weight w [out, in] (rule steps 1-2):
    the pick over CANDIDATE_BLOCKS and the hints, then, when that is a hint,
    the pick over CANDIDATE_BLOCKS alone (if it differs and reaches
    `minimum`). Empty when no shape reaches `minimum` zero blocks."""
    fracs = _fractions(w, shapes_with(hints))
    first = _pick(fracs, minimum)
    if first is None:
        return []
    plain = _pick([(b, f) for b, f in fracs if b in CANDIDATE_BLOCKS], minimum)
    return [first] + ([plain] if plain is not None and plain.block != first.block else [])


def _tiling_side(z: Tensor) -> Optional[int]:
    """The largest n <= MAX_TILING_SIDE such that z's rows within every
    aligned group of n (0..n-1, n..2n-1, ...; the last may be short) are
    equal; None when all rows are equal (any n would do)."""
    edges = (z[1:] != z[:-1]).any(1).nonzero().flatten() + 1  # rows that differ from the row above
    if edges.numel() == 0:
        return None
    g = math.gcd(*edges.tolist())  # every edge must fall on a group boundary: n divides each
    return max(d for d in range(1, min(g, MAX_TILING_SIDE) + 1) if g % d == 0)


def tiling_block(w: Tensor) -> Optional[Tuple[int, int]]:
    """The largest block shape (rows, cols), each side at most
    MAX_TILING_SIDE, whose aligned blocks of w [out, in] are each all zero or
    all non-zero: every zero of w then lies in a zero block of that shape
    (the zero-block fraction equals the fraction of zero entries). For a
    weight pruned with ``prune_blocks(block=(3, 3))`` it is (3, 3) or a
    multiple of it. None when w has no zero or only zeros, when all its rows
    or all its columns have the same zero pattern (zero rows or columns:
    the candidate shapes find those), and when only shapes of fewer than
    MIN_TILING_AREA entries tile (2:4 or unstructured zeros, or an exact zero
    inside a kept block: then only 1 x 1 does)."""
    z = w.detach() == 0
    if z.numel() == 0 or not bool(z.any()) or bool(z.all()):
        return None
    rows = _tiling_side(z)
    cols = None if rows is None else _tiling_side(z.t())
    if rows is None or cols is None or rows * cols < MIN_TILING_AREA:
        return None
    return rows, cols


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
                      baseline: Optional[Callable[[Tensor], Tensor]] = None) -> Dict[str, Dict[int, float]]:
    """Speed-up of each candidate module over the baseline -- `baseline` (the
    layer's own forward, or the dense Int8Linear when quantizing), or by
    default dense ``F.linear(x, w, b)`` -- at each row count: the fastest of
    `rounds` interleaved timings on random inputs of w's dtype (float32
    unless that is bfloat16) (the minimum: interference from other work on the machine
    only adds time, and a descheduled thread can add a whole scheduler time
    slice to one timing)."""
    out: Dict[str, Dict[int, float]] = {name: {} for name in candidates}
    dtype = w.dtype if w.dtype in (torch.float32, torch.bfloat16) else torch.float32
    wd, bd = w.to(dtype), None if b is None else b.to(dtype)
    dense = baseline if baseline is not None else (lambda x: F.linear(x, wd, bd))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in rows:
            # a private generator: the caller's RNG stream stays as it was
            x = torch.randn(m, w.shape[1], generator=gen).to(device=w.device, dtype=dtype)
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
