"""The table loadtest.runtime and loadtest.api print: one row per figure, each beside its
baselines from the same run with the ratio (value / baseline)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from loadtest.baseline import SHORT, Loops

FIGURE_WIDTH = 60


@dataclass(frozen=True)
class Row:
    figure: str
    value: float
    baselines: tuple[tuple[str, float], ...] = ()   # (what, its figure in the same run)


def table(rows: list[Row]) -> str:
    lines = [f"{'figure':<{FIGURE_WIDTH}} {'value':>10}  "
             "baselines in the same run (value / baseline)"]
    for r in rows:
        bases = ", ".join(f"{what} {b:.3f} ({r.value / b:.2f}x)" for what, b in r.baselines)
        lines.append(f"{r.figure:<{FIGURE_WIDTH}} {r.value:10.3f}  {bases}")
    return "\n".join(lines)


def loop_bases(loops: Loops, by: str, suffix: str = "") -> tuple[tuple[str, float], ...]:
    """Each bare loop's figure `by` (a latency percentile, or runs_per_s), for a Row; each
    loop named by its method, then `suffix`."""
    return tuple((SHORT[m] + suffix, loop.runs_per_s if by == "runs_per_s"
                  else loop.latency_ms[by]) for m, loop in loops.items())


def policies_arg(text: str) -> tuple[str, ...]:
    """`--policy judge,default`: the policies to measure, in that order, each once."""
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"--policy {text!r}: give policy names once each, comma-separated")
    return names
