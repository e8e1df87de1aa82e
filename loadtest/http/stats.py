"""What one measured phase records: latencies in an HdrHistogram, outcomes, a timeline."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

# Microseconds, 1 us to one hour, 3 significant digits (0.1 % resolution).
LOWEST_US = 1
HIGHEST_US = 3_600_000_000
DIGITS = 3
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9))
ERROR_SAMPLES = 5
TIMELINE_BUCKETS = 60


@dataclass(frozen=True)
class Outcome:
    """One request's end: `http` is the HTTP status as text, or "transport" when no
    response came; `status` the run's status (or the error code); ok when it did what the
    workload expects."""

    ok: bool
    http: str
    status: str
    error: str = ""
    pool_hit: bool | None = None


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def _record(h: HdrHistogram, seconds: float) -> None:
    h.record_value(min(max(round(seconds * 1e6), LOWEST_US), HIGHEST_US))


@dataclass
class Recorder:
    latency: HdrHistogram = field(default_factory=new_histogram)
    # Open loop: from the actual send, the figure a coordinated-omission client would show.
    service: HdrHistogram = field(default_factory=new_histogram)
    http: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    pool_hits: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)   # seconds since the phase began
    ok: int = 0
    failed: int = 0

    def add(self, outcome: Outcome, latency_s: float, service_s: float, done_s: float) -> None:
        _record(self.latency, latency_s)
        _record(self.service, service_s)
        self.http[outcome.http] += 1
        self.statuses[outcome.status] += 1
        if outcome.pool_hit is not None:
            self.pool_hits["hit" if outcome.pool_hit else "miss"] += 1
        self.done_at.append(done_s)
        if outcome.ok:
            self.ok += 1
        else:
            self.failed += 1
            if len(self.errors) < ERROR_SAMPLES:
                self.errors.append(outcome.error or f"{outcome.http} {outcome.status}")

    @property
    def count(self) -> int:
        return self.ok + self.failed


def percentiles_ms(h: HdrHistogram) -> dict[str, float]:
    if h.get_total_count() == 0:
        return {}
    out = {k: h.get_value_at_percentile(q) / 1000 for k, q in PERCENTILES}
    out |= {"min": h.get_min_value() / 1000, "max": h.get_max_value() / 1000,
            "mean": h.get_mean_value() / 1000}
    return {k: round(v, 3) for k, v in out.items()}


def cdf_ms(h: HdrHistogram) -> list[list[float]]:
    """[latency ms, cumulative fraction] points, denser towards the tail."""
    if h.get_total_count() == 0:
        return []
    points: list[list[float]] = []
    for item in h.get_percentile_iterator(5):
        point = [round(item.value_iterated_to / 1000, 3), round(item.percentile / 100, 6)]
        if not points or point != points[-1]:
            points.append(point)
        if item.percentile >= 100.0:
            break
    return points


def timeline(done_at: list[float], elapsed_s: float) -> dict[str, Any]:
    """Completions per second in up to TIMELINE_BUCKETS equal buckets."""
    if not done_at or elapsed_s <= 0:
        return {"bucket_s": 0.0, "per_s": []}
    width = elapsed_s / TIMELINE_BUCKETS if elapsed_s > TIMELINE_BUCKETS * 0.1 else 0.1
    buckets = [0] * (int(elapsed_s / width) + 1)
    for t in done_at:
        buckets[min(int(t / width), len(buckets) - 1)] += 1
    return {"bucket_s": round(width, 4), "per_s": [round(c / width, 2) for c in buckets]}


def summary(r: Recorder, elapsed_s: float, open_loop: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "requests": r.count, "ok": r.ok, "errors": r.failed,
        "elapsed_s": round(elapsed_s, 3),
        "throughput_per_s": round(r.count / elapsed_s, 2) if elapsed_s > 0 else 0.0,
        # Little's law: how many requests were in flight on average.
        "in_flight_mean": (round(r.latency.get_mean_value() / 1e6 * r.count / elapsed_s, 2)
                           if elapsed_s > 0 and r.count else 0.0),
        "latency_ms": percentiles_ms(r.latency),
        "http": dict(sorted(r.http.items())), "statuses": dict(sorted(r.statuses.items())),
        "error_samples": list(r.errors),
        "cdf_ms": cdf_ms(r.latency), "timeline": timeline(r.done_at, elapsed_s),
    }
    if r.pool_hits:
        out["pool"] = dict(sorted(r.pool_hits.items()))
    if open_loop:
        out["service_ms"] = percentiles_ms(r.service)
    return out
