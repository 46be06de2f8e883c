"""How patch decides whether a Linear with zero blocks runs faster
block-sparse, and with which block shape.

Rule (documented in the README):

1. The block shapes scored are CANDIDATE_BLOCKS plus two hints, when there
   are such: the block shape of a torch sparse_bsr / sparse_bsc weight (the
   shape its user chose), and :func:`tiling_block`, the largest shape whose
   aligned blocks are each all zero or all non-zero, but for a few stray
   zeros -- the shape ``pyaccel.prune.prune_blocks`` pruned with (or a
   multiple), found again from the zeros themselves, so also after
   ``make_permanent`` or a state_dict round trip. A hint is used only with
   sides of at most MAX_HINT_SIDE and at least MIN_HINT_AREA entries (the
   candidates' range). For each shape, the fraction of all-zero blocks of
   the effective weight. A layer below MIN_ZERO_BLOCKS for every shape stays
   as it is without a measurement -- unless its weight is a torch sparse
   tensor and the layer is not quantized and not 2:4 (the alternative to a
   swap is then torch's sparse kernels, often slower than dense or without
   a kernel at all: such a layer is measured whatever its zero blocks).
2. The largest shape (by area) whose zero fraction is within 2 percentage
   points of the best one is the candidate (larger blocks run closer to
   dense-GEMM efficiency). When that is a hint, the pick among
   CANDIDATE_BLOCKS alone is measured too, so that a hint the kernels run
   slowly cannot cost the layer a swap (:func:`block_choices`).
3. The candidate modules are timed on the real shape, interleaved with the
   baselines, at PROBE_ROWS rows (a GEMV and a GEMM), with inputs of the
   weight's dtype (:func:`measured_times`). Not quantized, the baselines are
   dense ``F.linear`` on the effective weight, always, and the layer's own
   forward where that is something else (torch's sparse F.linear for a
   sparse weight; a prune mask, parametrization or weight_norm recomputed
   each call; a Conv1D's addmm). A block shape is swapped in only if, at
   every probe M, it is at least MIN_SPEEDUP faster than the layer's own
   forward AND at least as fast as dense F.linear -- for a plain Linear,
   whose own forward is dense F.linear, that is MIN_SPEEDUP over dense. So a
   swapped layer measured no slower than dense F.linear at either size,
   also where a prune mask's multiply makes the layer's own forward far
   slower than the GEMV at one row. Where the layer's own forward raises
   (torch has no kernel: a bfloat16 or non-square-block sparse_bsr weight, a
   sparse_coo one) and the layer would otherwise be left as it is, the
   fastest block shape is swapped in whatever its speed: a module that
   computes the layer's function beats one that fails (a 2:4 weight becomes
   Sparse24Linear otherwise: block-sparse then needs MIN_SPEEDUP over dense
   F.linear). With quantize="int8" the baseline
   is the dense Int8Linear, which replaces the layer otherwise, and the
   block shape needs MIN_SPEEDUP over it. The block shapes are ranked by
   their slower speed-up over dense F.linear (dense Int8Linear), a shape
   that passes first. When the weight is also 2:4, Sparse24Linear is timed
   the same way and block-sparse taken only where it passes and is faster.
   With quantize="int8" the modules are the int8 ones
   (BlockSparseInt8Linear, Sparse24Int8Linear).

Costs, on this project's 2-core test machine: planning counts a weight's
zeros; one with too few for any shape to reach the minimum (a dense one, or
one with a few stray zeros) is not scored at all (~10 ms for 4096 x 4096,
the 2:4 check included: it is skipped for a weight with more non-zeros than
2:4 keeps); a pruned one reads its zero pattern once (:func:`nonzero_map`),
then once per block shape and four times more for :func:`tiling_block`
(skipped where the zero entries are too few for its shape to reach the
minimum: :func:`tiling_could_reach`): ~0.2 s for 4096 x 4096 in all. The
measurement, at build time and only for the layers the filters select,
runs ~0.5 s per 4096 x 4096 layer on one thread, ~1.7 s under a prune
mask, whose forward is timed too.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from pyaccel.formats.block_sparse import kept_blocks

CANDIDATE_BLOCKS: Tuple[Tuple[int, int], ...] = ((64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (1, 8), (1, 4))
MIN_ZERO_BLOCKS = 0.3
MIN_SPEEDUP = 1.15
PROBE_ROWS: Tuple[int, ...] = (1, 64)
MAX_HINT_SIDE = 64  # a hint's sides: at most the largest candidate's
MIN_HINT_AREA = 4  # a hint's shape: at least as many entries as the smallest candidate's
STRAY_ZEROS = 1 / 32  # tiling_block: the share of stray zeros (exact zeros among kept weights) it looks through
EDGE_SHARE = 1 / 8  # tiling_block: a line differing from the one before in a smaller share is not a group edge

# measured_times' names of the baselines (the candidates are "block-sparse", "block-sparse 1x4", "2:4")
DENSE = "dense F.linear"
OWN = "the layer's own forward"
DENSE_INT8 = "dense int8"

Block = Tuple[int, int]
Fractions = List[Tuple[Block, float]]  # (block shape, zero-block fraction), largest area first


@dataclasses.dataclass
class BlockChoice:
    block: Block
    zero_fraction: float


def usable_hint(block: Optional[Sequence[int]]) -> Optional[Block]:
    """`block` as a hint shape if its sides are at most MAX_HINT_SIDE and it
    has at least MIN_HINT_AREA entries (a sparse_bsr weight's 1x1 or 128x128
    blocks are not: the candidates score such a weight), else None."""
    if block is None:
        return None
    r, c = int(block[0]), int(block[1])
    return (r, c) if max(r, c) <= MAX_HINT_SIDE and r * c >= MIN_HINT_AREA else None


def shapes_with(hints: Sequence[Optional[Block]] = ()) -> Tuple[Block, ...]:
    """CANDIDATE_BLOCKS and the hints (None entries ignored), once each,
    largest area first (a hint before a candidate of the same area)."""
    shapes: List[Block] = []
    for b in [*hints, *CANDIDATE_BLOCKS]:
        if b is not None and tuple(b) not in shapes:
            shapes.append((int(b[0]), int(b[1])))
    return tuple(sorted(shapes, key=lambda b: -b[0] * b[1]))  # stable: hints first among equals


def nonzero_map(w: Tensor) -> Tensor:
    """w [out, in] != 0, a contiguous bool tensor: what the scoring reads."""
    return (w.detach() != 0).contiguous()


def _fraction(nz: Tensor, block: Block) -> float:
    """pyaccel.formats.block_sparse.zero_block_fraction, from the nonzero map."""
    kept = kept_blocks(nz, block)
    return 1.0 - float(kept.float().mean()) if kept.numel() else 0.0


def block_fractions(w: Tensor, blocks: Sequence[Block] = CANDIDATE_BLOCKS, *,
                    nonzero: Optional[Tensor] = None) -> Fractions:
    """(shape, zero-block fraction of w [out, in]) for each of `blocks` that
    fits in w, in the order given; `nonzero`: nonzero_map(w), if already
    computed."""
    nz = nonzero_map(w) if nonzero is None else nonzero
    return [(b, _fraction(nz, b)) for b in blocks if b[0] <= nz.shape[0] and b[1] <= nz.shape[1]]


def any_could_reach(shape: Sequence[int], zeros: int, minimum: float) -> bool:
    """False when no block shape scored (sides at most MAX_HINT_SIDE: every
    candidate and hint) can have `minimum` zero blocks in a weight of
    `shape` with `zeros` zero entries: each all-zero block holds a zero
    entry, and no such shape has fewer blocks than 64 x 64."""
    n, k = int(shape[0]), int(shape[1])
    return zeros >= minimum * -(-n // MAX_HINT_SIDE) * -(-k // MAX_HINT_SIDE)


def tiling_could_reach(shape: Sequence[int], zeros: int, minimum: float) -> bool:
    """False when no block shape with sides at most MAX_HINT_SIDE --
    :func:`tiling_block`'s among them -- can have `minimum` zero blocks in a
    weight of `shape` with `zeros` zero entries: a shape's zero-block
    fraction is at most the zero entries' share plus the share of its
    partial edge blocks (at most 1 / block rows + 1 / block columns; none
    where the shape divides the weight's)."""
    n, k = int(shape[0]), int(shape[1])
    edges = 1 / -(-n // MAX_HINT_SIDE) + 1 / -(-k // MAX_HINT_SIDE)
    return zeros / max(1, n * k) + edges >= minimum


def _pick(fracs: Fractions, minimum: float) -> Optional[BlockChoice]:
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


def most_zero_blocks(fracs: Fractions) -> Optional[BlockChoice]:
    """The shape with the largest zero-block fraction among `fracs` (from
    :func:`block_fractions`; any fraction), or None when it is empty."""
    if not fracs:
        return None
    b, f = max(fracs, key=lambda t: t[1])
    return BlockChoice(b, f)


def candidate_block(w: Tensor, blocks: Sequence[Block] = CANDIDATE_BLOCKS) -> Optional[BlockChoice]:
    """The block shape to try for weight w [out, in] (rule steps 1-2 over
    `blocks`, listed largest first), or None."""
    return _pick(block_fractions(w, blocks), MIN_ZERO_BLOCKS)


def block_choices(fracs: Fractions, minimum: float = MIN_ZERO_BLOCKS) -> List[BlockChoice]:
    """The block shapes to measure (rule steps 1-2), from the fractions of
    CANDIDATE_BLOCKS and the hints (:func:`block_fractions` over
    :func:`shapes_with`): the pick over all of them, then, when that is a
    hint, the pick over CANDIDATE_BLOCKS alone (if it differs and reaches
    `minimum`). Empty when no shape reaches `minimum` zero blocks."""
    first = _pick(fracs, minimum)
    if first is None:
        return []
    plain = _pick([(b, f) for b, f in fracs if b in CANDIDATE_BLOCKS], minimum)
    return [first] + ([plain] if plain is not None and plain.block != first.block else [])


def _tiling_side(diff: Tensor, limit: float) -> Optional[int]:
    """The largest n <= MAX_HINT_SIDE such that every line (row or column)
    where the zero pattern changes falls on a boundary of aligned groups of
    n (0..n-1, n..2n-1, ...); diff[i]: in how many entries line i + 1
    differs from line i, a change where that is over `limit`. None when no
    line is one."""
    edges = (diff > limit).nonzero().flatten() + 1
    if edges.numel() == 0:
        return None
    g = math.gcd(*edges.tolist())  # every edge must fall on a group boundary: n divides each
    return max(d for d in range(1, min(g, MAX_HINT_SIDE) + 1) if g % d == 0)


def tiling_block(w: Tensor, *, nonzero: Optional[Tensor] = None) -> Optional[Block]:
    """The largest block shape (rows, cols), each side at most
    MAX_HINT_SIDE, whose aligned blocks of w [out, in] are each all zero or
    all non-zero, but for stray zeros (exact zeros among the kept weights):
    a row (column) starts a new group only where its zero pattern differs
    from the one before in more than one entry and in more than EDGE_SHARE
    of the non-zero entries two lines hold on average (stray zeros, up to
    STRAY_ZEROS of the kept weights, make such a line only by a rare
    chance), and the shape found is kept only if the zeros outside its
    all-zero blocks are at most STRAY_ZEROS of the entries of its other
    blocks. For a weight pruned with ``prune_blocks(block=(3, 3))`` it is
    (3, 3) or a multiple of it, also when some kept weights are exactly 0.
    Where all rows have (nearly) the same zero pattern -- whole zero
    columns, as torch's ``prune.random_structured(dim=1)`` or ``ln_structured``
    over inputs leave -- any row count tiles and the side is MAX_HINT_SIDE
    (zero rows likewise give MAX_HINT_SIDE columns). None when w has no zero
    or only zeros, and when only shapes of fewer than MIN_HINT_AREA entries
    tile (2:4 or unstructured zeros). `nonzero`:
    nonzero_map(w), if already computed. Reads the zero pattern four times
    (~75 ms for 4096 x 4096 on this project's 2-core test machine)."""
    nz = nonzero_map(w) if nonzero is None else nonzero
    n, k = nz.shape
    kept = int(torch.count_nonzero(nz))
    if kept in (0, n * k):
        return None
    u = nz.view(torch.uint8)  # XOR and an int32 sum: about twice as fast as != and a bool sum
    # no line where the pattern changes: every group size tiles that way
    rows = _tiling_side((u[1:] ^ u[:-1]).sum(1, dtype=torch.int32), max(1.0, EDGE_SHARE * 2 * kept / n)) \
        or MAX_HINT_SIDE
    cols = _tiling_side((u[:, 1:] ^ u[:, :-1]).sum(0, dtype=torch.int32), max(1.0, EDGE_SHARE * 2 * kept / k)) \
        or MAX_HINT_SIDE
    if rows * cols < MIN_HINT_AREA:
        return None
    zero_blocks = ~kept_blocks(nz, (rows, cols))
    nb, kb = zero_blocks.shape
    # the real (unpadded) entries of each block row / column: the last may be short
    rs = torch.full((nb,), float(rows), dtype=torch.float64)
    cs = torch.full((kb,), float(cols), dtype=torch.float64)
    rs[-1], cs[-1] = n - (nb - 1) * rows, k - (kb - 1) * cols
    covered = float(rs @ zero_blocks.to(torch.float64) @ cs)  # entries (all zero) of the all-zero blocks
    stray = (n * k - kept) - covered  # zeros inside blocks that hold a non-zero
    return (rows, cols) if stray <= STRAY_ZEROS * (n * k - covered) else None


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


def measured_times(w: Tensor, runners: Dict[str, Callable[[Tensor], Tensor]], rows: Sequence[int] = PROBE_ROWS,
                   rounds: int = 5) -> Dict[str, Dict[int, float]]:
    """Seconds per call of each runner (a module or function of x [m,
    w.shape[1]]: the candidate modules and the baselines) at each row count
    m: the fastest of `rounds` interleaved timings on random inputs of w's
    dtype (float32 unless that is bfloat16) and device (the minimum:
    interference from other work on the machine only adds time, and a
    descheduled thread can add a whole scheduler time slice to one timing)."""
    out: Dict[str, Dict[int, float]] = {name: {} for name in runners}
    dtype = w.dtype if w.dtype in (torch.float32, torch.bfloat16) else torch.float32
    gen = torch.Generator().manual_seed(0)  # a private generator: the caller's RNG stream stays as it was
    with torch.no_grad():
        for m in rows:
            x = torch.randn(m, w.shape[1], generator=gen).to(device=w.device, dtype=dtype)
            times: Dict[str, list] = {name: [] for name in runners}
            for _ in range(rounds):
                for name, fn in runners.items():
                    times[name].append(_time_per_call(lambda fn=fn: fn(x)))
            for name in runners:
                out[name][m] = min(times[name])
    return out


@dataclasses.dataclass(frozen=True)
class Baseline:
    """What a candidate is timed against: `key`, the runner's name in
    measured_times (also the short name in a reason), `label` in the report,
    `need` the speed-up over it a swap needs at every probe M."""

    key: str
    label: str
    need: float


def speedups(times: Dict[str, Dict[int, float]], name: str, base: Baseline) -> Dict[int, float]:
    """Speed-up of runner `name` over the baseline at each measured M."""
    return {m: times[base.key][m] / t for m, t in times[name].items()}


def shortfall(times: Dict[str, Dict[int, float]], name: str, baselines: Sequence[Baseline]) -> List[str]:
    """Which of the rule's conditions runner `name` fails, in words ("under
    x1.15 over the layer's own forward at M=64", "slower than dense F.linear
    at M=1"); empty when it passes them all."""
    out = []
    for base in baselines:
        short = [m for m, s in speedups(times, name, base).items() if s < base.need]
        if short:
            at = ", ".join(f"M={m}" for m in short)
            out.append(f"slower than {base.key} at {at}" if base.need <= 1.0
                       else f"under x{base.need:.2f} over {base.key} at {at}")
    return out


def describe(speedups: Dict[int, float]) -> str:
    return " / ".join(f"x{s:.2f} at M={m}" for m, s in speedups.items())


def describe_over(times: Dict[str, Dict[int, float]], name: str, baselines: Sequence[Baseline],
                  labels: bool = True) -> str:
    """"x4.10 at M=1 / x1.70 at M=64 over <first label>, x1.20 / x1.05 over
    <second label>" (labels=False: the first "over ..." left out)."""
    parts = []
    for i, base in enumerate(baselines):
        s = speedups(times, name, base)
        text = describe(s) if i == 0 else " / ".join(f"x{v:.2f}" for v in s.values())
        parts.append(text + (f" over {base.label}" if labels or i else ""))
    return ", ".join(parts)
