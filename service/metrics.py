"""The service's Prometheus metrics, through prometheus_client: counters and histograms
kept as runs, pulls and requests happen, and gauges read when scraped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder

from sandbox import PullProgress, Traffic
from service.logs import current_request_id

Labels = tuple[tuple[str, str], ...]

# Every counter's `_created` series (its creation time) would double what a scrape reads,
# and nothing of ours needs it.
disable_created_metrics()


@dataclass
class Gauge:
    """Read when scraped: `read` gives (labels, value) pairs; `kind` "counter" for a total
    kept elsewhere (the pools' hits), named with its `_total`."""

    name: str
    help: str
    read: Callable[[], list[tuple[Labels, float]]]
    kind: str = "gauge"

    def family(self) -> Metric:
        metric = Metric(self.name.removesuffix("_total"), self.help, self.kind)
        for labels, value in self.read():
            metric.add_sample(self.name, dict(labels), value)
        return metric


class _Readings:
    """Metrics.gauges as one collector, read at every scrape."""

    def __init__(self, gauges: list[Gauge]) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        for gauge in self.gauges:
            yield gauge.family()


_SETUP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_RUN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0, 300.0)


class Metrics:
    """One service's metrics, in a registry of its own (not the process-wide default: a
    process may hold several services, as tests do)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs = Counter("sandboxd_runs", "Runs finished, by status.", ["status"],
                            registry=r)
        self.setup = Histogram("sandboxd_run_setup_seconds",
                               "From the exec request until init starts the program.",
                               buckets=_SETUP_BUCKETS, registry=r)
        self.run = Histogram("sandboxd_run_seconds", "Wall time of runs.",
                             buckets=_RUN_BUCKETS, registry=r)
        self.pulls = Counter("sandboxd_pulls", "Image pulls that fetched from a registry.",
                             registry=r)
        self.pull_bytes = Counter("sandboxd_pull_bytes", "Bytes downloaded by pulls.",
                                  registry=r)
        self.requests = Counter("sandboxd_http_requests", "HTTP requests, by status.",
                                ["status"], registry=r)
        self.network_bytes = Counter("sandboxd_network_bytes", "Bytes proxy and full runs "
                                     "sent and received.", ["direction", "mode"], registry=r)
        self.proxy_denied = Counter("sandboxd_proxy_denied", "Connections the proxy refused.",
                                    registry=r)
        self.gauges: list[Gauge] = []
        r.register(_Readings(self.gauges))

    def observe_run(self, status: str, setup_ms: float | None, wall_ms: float | None) -> None:
        """A run's figures, with the request (or job) it ran for as their exemplar."""
        exemplar = _exemplar(current_request_id())
        self.runs.labels(status=status).inc(exemplar=exemplar)
        if setup_ms is not None:
            self.setup.observe(setup_ms / 1000, exemplar)
        if wall_ms is not None:
            self.run.observe(wall_ms / 1000, exemplar)

    def observe_request(self, status: int, request_id: str | None) -> None:
        self.requests.labels(status=str(status)).inc(exemplar=_exemplar(request_id))

    def observe_network(self, traffic: Traffic) -> None:
        self.network_bytes.labels(direction="sent", mode=traffic.mode).inc(traffic.bytes_sent)
        self.network_bytes.labels(direction="received", mode=traffic.mode).inc(
            traffic.bytes_received)
        self.proxy_denied.inc(traffic.denied)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition `accept` asks for, and its content type: OpenMetrics (with each
        series' last request id as its exemplar) or, by default, Prometheus text (which
        cannot carry exemplars)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


# OpenMetrics caps an exemplar's label names and values at 128 characters together, and a
# client's X-Request-Id may be 128 long: such an id is left out rather than cut (a cut id
# would name no request).
_EXEMPLAR_CHARS = 128


def _exemplar(request_id: str | None) -> dict[str, str] | None:
    if request_id is None or len("request_id") + len(request_id) > _EXEMPLAR_CHARS:
        return None
    return {"request_id": request_id}


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
