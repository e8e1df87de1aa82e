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


@dataclass(frozen=True)
class OwnTime:
    """exit0's figures (loadtest/cbuild.py) and the sandbox's own time per run: each
    program's warm median less its bare one."""

    exit0_median_ms: float
    exit0_p99_ms: float
    true_over_bare_ms: float
    exit0_over_bare_ms: float


def own_time_rows(policy: str, what: str, own: OwnTime, exit0: Loops) -> list[Row]:
    """The rows of `own` for `policy`, exit0's beside its bare loops; `what` names a run
    ("warm run", "exec")."""
    return [
        Row(f"{policy}: {what} of exit0 (no libc) median (ms)", own.exit0_median_ms,
            loop_bases(exit0, "p50")),
        Row(f"{policy}: {what} of exit0 (no libc) p99 (ms)", own.exit0_p99_ms,
            loop_bases(exit0, "p99")),
        Row(f"{policy}:   the sandbox's own time: {what} minus bare median, `true` (ms)",
            own.true_over_bare_ms),
        Row(f"{policy}:   the sandbox's own time: {what} minus bare median, exit0 (ms)",
            own.exit0_over_bare_ms),
    ]


def policies_arg(text: str) -> tuple[str, ...]:
    """`--policy judge,default`: the policies to measure, in that order, each once."""
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    if not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"--policy {text!r}: give policy names once each, comma-separated")
    return names
