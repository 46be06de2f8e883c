"""Interleaved timing: candidates take turns, one call each per round, so
machine noise (other tenants, clock changes) hits all of them alike."""
from __future__ import annotations

import dataclasses
import random
import statistics
import time
from typing import Callable, Dict, List, Tuple


@dataclasses.dataclass
class Timing:
    median_s: float
    q1_s: float
    q3_s: float
    n: int
    # the median of this candidate's timed calls in each round, in round order
    # (what paired_ratio pairs across candidates)
    rounds: Tuple[float, ...] = ()

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3_s - self.q1_s) / self.median_s if self.median_s else 0.0


def _quartiles(v: List[float]) -> Tuple[float, float, float]:
    """(q1, median, q3) of v (non-empty)."""
    s = sorted(v)
    if len(s) < 4:
        return s[0], statistics.median(s), s[-1]
    q = statistics.quantiles(s, n=4)
    return q[0], statistics.median(s), q[2]


def _summary(samples: List[float], rounds: List[List[float]] = ()) -> Timing:
    q1, med, q3 = _quartiles(samples)
    return Timing(med, q1, q3, len(samples), tuple(statistics.median(r) for r in rounds if r))


def paired_ratio(base: Timing, ours: Timing) -> Tuple[float, float, float]:
    """Speed-up of `ours` over `base` from the rounds they shared: (median, q1,
    q3) of base_round / ours_round over the rounds.

    Both took their turns in the same rounds (interleaved), so each round's pair
    ran within the same second or so: a machine whose speed drifts between
    rounds (other tenants, clock changes) moves both terms of a pair alike,
    where the ratio of the two overall medians can pair a fast phase of one
    with a slow phase of the other. Falls back to the ratio of the medians
    (spread 0) when the per-round times are missing or of unequal count.
    """
    if not base.rounds or len(base.rounds) != len(ours.rounds):
        r = base.median_s / ours.median_s
        return r, r, r
    q1, med, q3 = _quartiles([b / o for b, o in zip(base.rounds, ours.rounds)])
    return med, q1, q3


def interleaved(fns: Dict[str, Callable[[], object]], min_rounds: int = 7, max_rounds: int = 200,
                budget_s: float = 2.0, warmup: int = 2, inner: int = 1, first: bool = False) -> Dict[str, Timing]:
    """Time the callables round-robin until `budget_s` seconds or `max_rounds`
    rounds (at least `min_rounds`). Returns per-name Timings: the median and
    quartiles of all timed calls, and the median of each round's calls
    (Timing.rounds, for paired_ratio; a "[first]" entry has one per round).

    inner = 1: one timed call of each per round. inner > 1: each candidate runs
    `inner` calls in a row per round and only the last inner - 1 are timed, so
    its data is warm in cache (the "hot" case) while the rounds still alternate.
    first (with inner > 1): also time each round's untimed first call, returned
    as ``name + " [first]"`` (the "cold" case: right after another candidate).

    The order is shuffled every round (a fixed seed: reproducible), so every
    candidate follows every other about equally often: with a fixed order the
    first one always ran right after the last one's cache and allocator
    footprint (a binary conv after torch.ao's) and the second always right
    after the first (warm).
    """
    for f in fns.values():
        for _ in range(warmup):
            f()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    per_round: Dict[str, List[List[float]]] = {k: [] for k in fns}
    firsts: Dict[str, List[float]] = {k + " [first]": [] for k in fns} if first and inner > 1 else {}
    start = time.perf_counter()
    rounds = 0
    items = list(fns.items())
    order = random.Random(0)
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        order.shuffle(items)
        for name, f in items:
            per_round[name].append([])
            if inner > 1:
                t0 = time.perf_counter()
                f()
                if firsts:
                    firsts[name + " [first]"].append(time.perf_counter() - t0)
            for _ in range(max(1, inner - 1)):
                t0 = time.perf_counter()
                f()
                dt = time.perf_counter() - t0
                samples[name].append(dt)
                per_round[name][-1].append(dt)
        rounds += 1
    out = {k: _summary(v, per_round[k]) for k, v in samples.items()}
    out.update({k: _summary(v, [[t] for t in v]) for k, v in firsts.items()})
    return out
