"""Wall-clock timing shared by the micro-benchmarks: the ways being compared run alternating, so
that a shared machine's slow phases hit all of them alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def alternating_median_ms(ways: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median milliseconds per call of each way: ``warmup`` untimed calls each, then ``reps``
    rounds in which every way runs once, in order."""
    for f in ways.values():
        for _ in range(warmup):
            f()
    times = {w: [] for w in ways}
    for _ in range(reps):
        for w, f in ways.items():
            t0 = time.perf_counter()
            f()
            times[w].append((time.perf_counter() - t0) * 1e3)
    return {w: statistics.median(t) for w, t in times.items()}
