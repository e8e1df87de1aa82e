"""Prometheus text exposition, by hand: counters, histograms, and gauges read at scrape."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from sandbox import PullProgress

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = (*labels, *extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


@dataclass
class Counter:
    name: str
    help: str
    values: dict[Labels, float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        if not self.values:
            yield f"{self.name} 0"
        for labels, v in sorted(self.values.items()):
            yield f"{self.name}{_labels(labels)} {_num(v)}"


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        cumulative = 0
        for le, c in zip(self.buckets, self.counts, strict=True):
            cumulative += c
            yield f'{self.name}_bucket{{le="{_num(le)}"}} {cumulative}'
        yield f'{self.name}_bucket{{le="+Inf"}} {self.n}'
        yield f"{self.name}_sum {_num(self.total)}"
        yield f"{self.name}_count {self.n}"


@dataclass
class Gauge:
    """Read when scraped: `read` gives (labels, value) pairs."""

    name: str
    help: str
    read: Callable[[], list[tuple[Labels, float]]]
    kind: str = "gauge"

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, v in self.read():
            yield f"{self.name}{_labels(labels)} {_num(v)}"


_SETUP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_RUN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self.runs = Counter("sandboxd_runs_total", "Runs finished, by status.")
        self.setup = Histogram("sandboxd_run_setup_seconds",
                               "From the exec request until init starts the program.",
                               _SETUP_BUCKETS)
        self.run = Histogram("sandboxd_run_seconds", "Wall time of runs.", _RUN_BUCKETS)
        self.pulls = Counter("sandboxd_pulls_total", "Image pulls that fetched from a registry.")
        self.pull_bytes = Counter("sandboxd_pull_bytes_total", "Bytes downloaded by pulls.")
        self.requests = Counter("sandboxd_http_requests_total", "HTTP requests, by status.")
        self.gauges: list[Gauge] = []

    def observe_run(self, status: str, setup_ms: float | None, wall_ms: float | None) -> None:
        self.runs.inc(status=status)
        if setup_ms is not None:
            self.setup.observe(setup_ms / 1000)
        if wall_ms is not None:
            self.run.observe(wall_ms / 1000)

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.runs, self.setup, self.run, self.pulls, self.pull_bytes, self.requests,
                  *self.gauges):
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


class PullWatcher:
    """A pull's progress callback that also feeds the pull metrics: a pull counts when it
    downloaded something; its bytes are each layer's last `done` while downloading."""

    def __init__(self, metrics: Metrics,
                 forward: Callable[[PullProgress], None] | None = None) -> None:
        self.metrics = metrics
        self.forward = forward
        self.bytes: dict[str, int] = {}

    def __call__(self, p: PullProgress) -> None:
        if p.status == "downloading" and p.layer:
            self.bytes[p.layer] = max(self.bytes.get(p.layer, 0), p.done)
        if self.forward is not None:
            self.forward(p)

    def finish(self) -> None:
        if self.bytes:
            self.metrics.pulls.inc()
            self.metrics.pull_bytes.inc(sum(self.bytes.values()))
