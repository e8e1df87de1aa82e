"""What the open and shared endpoints show: /readyz (no token) gives the state only, never
why the engine failed (the log has it); /metrics (any tenant's token) aggregates the pools
by policy, never naming images, which would tell one tenant what another runs."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.app import create_app
from service.config import load
from tests.service.conftest import LIMITED_TOKEN, Service

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
