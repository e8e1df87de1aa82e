"""What the open and shared endpoints show: /readyz (no token) gives the state only, never
why the engine failed (the log has it); /metrics (any tenant's token) aggregates the pools
by policy, never naming images, which would tell one tenant what another runs, and carries
request ids (exemplars) to the operator's token only."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.openmetrics import parser as openmetrics_parser

from service.app import create_app
from service.config import load
from tests.service.conftest import LIMITED_TOKEN, MAIN_TOKEN, Service

SECRET = "/srv/secret/state: Permission denied by host policy 0xdeadbeef"


def test_a_failed_start_is_told_to_the_log_not_to_callers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def fail() -> Any:
        raise PermissionError(SECRET)

    async def go() -> list[tuple[int, str]]:
        app = create_app(fail, load(None, env={"SANDBOXD_STATE_DIR": str(tmp_path)}))
        async with TestClient(TestServer(app)) as client:
            for _ in range(100):
                await asyncio.sleep(0.01)   # the start task fails at once
                async with client.get("/readyz") as r:
                    if (await r.json())["status"] == "failed":
                        break
            out = []
            for path in ("/readyz", "/v1/info", "/v1/images"):
                async with client.get(path) as r:
                    out.append((r.status, await r.text()))
            return out

    with caplog.at_level(logging.ERROR, logger="sandboxd.service"):
        answers = asyncio.run(go())
    assert answers[0] == (503, '{"status":"failed"}')
    for status, text in answers[1:]:
        assert status == 503 and "failed to start" in text and "log" in text, text
    assert all("secret" not in text and "Permission" not in text for _, text in answers)
    assert SECRET in caplog.text


def test_metrics_name_no_image(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> str:
        for policy in ("judge", "default"):
            async with s.post("/v1/runs", json={"image": images.oci, "cmd": ["true"],
                                                "policy": policy}) as r:
                assert r.status == 200, await r.text()
        # Another tenant scrapes.
        async with s.get("/metrics", headers={"Authorization": f"Bearer {LIMITED_TOKEN}"}
                         ) as r:
            assert r.status == 200
            return await r.text()
    text = service.call(go)
    idle = [line for line in text.splitlines() if line.startswith("sandboxd_pool_idle{")]
    assert idle and all(line.startswith('sandboxd_pool_idle{policy="') for line in idle), idle
    assert any('policy="judge"' in line for line in idle), idle
    assert "sha256:" not in text and "image=" not in text
    assert images.host not in text and "busybox" not in text


OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def test_request_ids_reach_the_operators_metrics_only(service: Service, images: Any) -> None:
    """The main token is `operator = true`: its OpenMetrics scrape names the request of a
    run as the exemplar of the run series; the other tenant, asking the same way, gets the
    plain text, which names no request."""
    request_id = "tenant-a:case-17"

    async def go(s: aiohttp.ClientSession) -> dict[str, tuple[str, str]]:
        async with s.post("/v1/runs", json={"image": images.oci, "cmd": ["true"]},
                          headers={"X-Request-Id": request_id}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["status"] == "ok"
        out = {}
        for who, token in (("operator", MAIN_TOKEN), ("other", LIMITED_TOKEN)):
            async with s.get("/metrics", headers={"Authorization": f"Bearer {token}",
                                                  "Accept": OPENMETRICS}) as r:
                assert r.status == 200
                out[who] = (r.headers["Content-Type"], await r.text())
        return out
    scrapes = service.call(go)
    kind, text = scrapes["operator"]
    assert kind.startswith("application/openmetrics-text"), kind
    exemplar = f'# {{request_id="{request_id}"}}'
    runs = [line for line in text.splitlines()
            if line.startswith('sandboxd_runs_total{status="ok"}')]
    assert runs and exemplar in runs[0], runs
    assert any(line.startswith("sandboxd_run_seconds_bucket") and exemplar in line
               for line in text.splitlines()), text
    # A Prometheus that negotiated OpenMetrics drops a whole scrape that breaks its rules.
    families = {f.name: f for f in openmetrics_parser.text_string_to_metric_families(text)}
    assert families["sandboxd_runs"].type == "counter"
    assert any(s.exemplar and s.exemplar.labels == {"request_id": request_id}
               for s in families["sandboxd_run_seconds"].samples)
    assert "sandboxd_pool_idle" in families
    kind, text = scrapes["other"]
    assert kind.startswith("text/plain"), kind
    assert request_id not in text and "request_id" not in text
    assert 'sandboxd_runs_total{status="ok"}' in text

