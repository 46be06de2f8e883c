"""Interleaved timing: candidates take turns, one call each per round, so
machine noise (other tenants, clock changes) hits all of them alike."""
from __future__ import annotations

import dataclasses
import random
import statistics
import time
from typing import Callable, Dict, List


@dataclasses.dataclass
class Timing:
    median_s: float
    q1_s: float
    q3_s: float
    n: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3_s - self.q1_s) / self.median_s if self.median_s else 0.0


def _summary(samples: List[float]) -> Timing:
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 4 else [s[0], statistics.median(s), s[-1]]
    return Timing(statistics.median(s), q[0], q[2], len(s))


def interleaved(fns: Dict[str, Callable[[], object]], min_rounds: int = 7, max_rounds: int = 200,
                budget_s: float = 2.0, warmup: int = 2, inner: int = 1, first: bool = False) -> Dict[str, Timing]:
    """Time the callables round-robin until `budget_s` seconds or `max_rounds`
    rounds (at least `min_rounds`). Returns per-name medians.

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
    firsts: Dict[str, List[float]] = {k + " [first]": [] for k in fns} if first and inner > 1 else {}
    start = time.perf_counter()
    rounds = 0
    items = list(fns.items())
    order = random.Random(0)
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        order.shuffle(items)
        for name, f in items:
            if inner > 1:
                t0 = time.perf_counter()
                f()
                if firsts:
                    firsts[name + " [first]"].append(time.perf_counter() - t0)
            for _ in range(max(1, inner - 1)):
                t0 = time.perf_counter()
                f()
                samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {k: _summary(v) for k, v in {**samples, **firsts}.items()}
