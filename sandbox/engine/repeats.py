"""A run made N times (`repeat`): the spread of its times, and which run stands for all.

The main result is the median run's by CPU time (the lower of the two middle ones when N is
even; by wall time when there is no CPU figure): a real run's output and verdict, not an
average no run produced.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from sandbox.runtime.results import RunResult


@dataclass(frozen=True)
class Spread:
    min: float
    median: float
    max: float
    spread: float          # (max - min) / median: 0.01 is a 1 % spread, the worst pair
    cv: float              # standard deviation / mean: the typical run-to-run spread


@dataclass(frozen=True)
class Repeats:
    n: int
    cpu_ms: Spread | None  # None when a run has no CPU figure
    wall_ms: Spread
    statuses: dict[str, int]
    main: int              # which run (from 0) the result is


def _spread(values: list[float]) -> Spread:
    median, mean = statistics.median(values), statistics.fmean(values)
    low, high = min(values), max(values)
    cv = statistics.stdev(values) / mean if len(values) > 1 and mean else 0.0
    return Spread(low, median, high, (high - low) / median if median else 0.0, cv)


def summarize(results: list[RunResult]) -> Repeats:
    cpu = [r.cpu_ms for r in results]
    times = [r.wall_ms if c is None else c for r, c in zip(results, cpu, strict=True)]
    order = sorted(range(len(results)), key=times.__getitem__)
    known = [c for c in cpu if c is not None]
    return Repeats(n=len(results),
                   cpu_ms=_spread(known) if len(known) == len(cpu) else None,
                   wall_ms=_spread([r.wall_ms for r in results]),
                   statuses=dict(Counter(str(r.status) for r in results)),
                   main=order[(len(order) - 1) // 2])
