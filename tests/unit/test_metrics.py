"""Request ids as OpenMetrics exemplars: present when they fit, left out when not."""

from __future__ import annotations

from service.logs import scope
from service.metrics import Metrics

OPENMETRICS = "application/openmetrics-text;version=1.0.0"


def test_a_request_id_too_long_for_an_exemplar_is_left_out() -> None:
    metrics = Metrics()
    # "request_id" and its value may be 128 characters together.
    for request_id in ("a" * 118, "b" * 119):
        with scope(request_id):
            metrics.observe_run("ok", 1.0, 2.0)
    text = metrics.render(OPENMETRICS)[0].decode()
    assert 'request_id="' + "a" * 118 + '"' in text
    assert "b" * 119 not in text


def test_plain_text_carries_no_exemplar() -> None:
    metrics = Metrics()
    with scope("case-1"):
        metrics.observe_run("ok", 1.0, 2.0)
    body, kind = metrics.render("")
    assert kind.startswith("text/plain") and b"case-1" not in body
    assert b'sandboxd_runs_total{status="ok"} 1.0' in body
