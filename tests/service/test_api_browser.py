"""A web page must not drive the service: JSON bodies must say they are JSON (a page sends a
body without Content-Type, or as text/plain, with no preflight), a Host that is not a name
of the service (DNS rebinding) and a cross-origin Origin (a page's fetch, form or
WebSocket) are refused with 403. Through a real service with tokens, and one without,
where a page's request would otherwise run code."""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from service.app import create_app
from service.config import ConfigError, load
from tests.service.conftest import MAIN_TOKEN, Service
from tests.service.own_service import OwnService, own_service

EVIL = "http://evil.example"


def _request(url: str, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """Exactly these headers (http.client adds Host, unless given, and Content-Length)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        raw = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
        conn.request(method, path, body=raw, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, orjson.loads(data) if data else {}
    finally:
        conn.close()


def _run(image: str) -> dict[str, Any]:
    return {"image": image, "cmd": ["true"]}


AUTH = {"Authorization": f"Bearer {MAIN_TOKEN}"}
JSON = {"Content-Type": "application/json"}


def test_a_json_body_must_say_it_is_json(service: Service, images: Any) -> None:
    status, body = _request(service.url, "POST", "/v1/runs", _run(images.oci), AUTH)
    assert status == 415, body
    assert "Content-Type: application/json" in body["error"]["message"], body
    assert "none was sent" in body["error"]["message"]
    status, body = _request(service.url, "POST", "/v1/runs", _run(images.oci),
                            {**AUTH, "Content-Type": "text/plain"})
    assert status == 415 and "not text/plain" in body["error"]["message"], body
    for ctype in ("application/json", "application/json; charset=utf-8",
                  "application/vnd.sandboxd.run+json"):
        status, body = _request(service.url, "POST", "/v1/runs", _run(images.oci),
                                {**AUTH, "Content-Type": ctype})
        assert status == 200 and body["status"] == "ok", (ctype, body)


def test_a_host_that_is_not_the_services_is_refused(service: Service) -> None:
    port = urlsplit(service.url).port
    for host in (f"rebound.example:{port}", "rebound.example", f"localhost.evil:{port}"):
        status, body = _request(service.url, "GET", "/v1/info", None, {**AUTH, "Host": host})
        assert status == 403, (host, body)
        assert "server.allowed_hosts" in body["error"]["message"], body
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST", f"127.0.0.2:{port}"):
        status, body = _request(service.url, "GET", "/v1/info", None, {**AUTH, "Host": host})
        assert status == 200, (host, body)


def test_a_cross_origin_request_is_refused(service: Service, images: Any) -> None:
    for origin in (EVIL, "null", f"{EVIL}:{urlsplit(service.url).port}"):
        status, body = _request(service.url, "POST", "/v1/runs", _run(images.oci),
                                {**AUTH, **JSON, "Origin": origin})
        assert status == 403 and "cross-origin" in body["error"]["message"], (origin, body)
    status, body = _request(service.url, "GET", "/v1/info", None, {**AUTH, "Origin": EVIL})
    assert status == 403, body
    # Its own origin is no other site.
    status, body = _request(service.url, "POST", "/v1/runs", _run(images.oci),
                            {**AUTH, **JSON, "Origin": service.url})
    assert status == 200, body

    async def ws(s: aiohttp.ClientSession) -> int:
        try:
            async with s.ws_connect("/v1/runs/ws", origin=EVIL):
                return 101
        except aiohttp.WSServerHandshakeError as e:
            return e.status
    assert service.call(ws) == 403


@pytest.fixture(scope="module")
def open_service(registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[OwnService]:
    """No tokens: anyone who reaches the port runs code, so only programs may reach it."""
    with own_service(tmp_path_factory.mktemp("sandboxd-open"), "") as svc:
        yield svc


def test_without_tokens_a_web_page_cannot_run_code(open_service: OwnService,
                                                   images: Any) -> None:
    url, port = open_service.url, open_service.port
    run = {"image": images.oci, "cmd": ["sh", "-c", "echo pwned"], "env": {"PATH": "/bin"}}
    # fetch(url, {method: "POST", mode: "no-cors", body: new Blob([json])}): no preflight.
    status, body = _request(url, "POST", "/v1/runs", run, {"Origin": EVIL})
    assert status == 403, body
    # The same body from a program that does not say it is JSON.
    status, body = _request(url, "POST", "/v1/runs", run)
    assert status == 415, body
    # A page whose name was rebound to 127.0.0.1 is same-origin to itself: its Host says so.
    rebound = f"rebound.example:{port}"
    status, body = _request(url, "POST", "/v1/runs", run,
                            {**JSON, "Host": rebound, "Origin": f"http://{rebound}"})
    assert status == 403, body
    status, body = _request(url, "GET", "/v1/containers", None, {"Host": rebound})
    assert status == 403, body

    async def ws() -> tuple[int, str]:
        async with aiohttp.ClientSession(url) as s:
            try:
                async with s.ws_connect("/v1/runs/ws", origin=EVIL) as w:
                    await w.send_json(run)
                    return 101, str(await w.receive_json(timeout=30))
            except aiohttp.WSServerHandshakeError as e:
                return e.status, ""
    assert asyncio.run(ws())[0] == 403
    # A program is served as before.
    status, body = _request(url, "POST", "/v1/runs", run, JSON)
    assert status == 200 and body["stdout"] == "pwned\n", body


def test_allowed_hosts_adds_names(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nallowed_hosts = ["Sandbox.Internal."]\n')
    config = load(cfg, env={"SANDBOXD_STATE_DIR": str(tmp_path)})
    assert config.allowed_hosts == ("sandbox.internal",)

    async def go() -> list[int]:
        never: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        app = create_app(lambda: never, config)
        async with TestClient(TestServer(app)) as client:
            out = []
            for host in ("sandbox.internal:8643", "SANDBOX.internal", "other.internal",
                         "[::1]:8643", "10.1.2.3"):
                async with client.get("/healthz", headers={"Host": host}) as r:
                    out.append(r.status)
            return out
    assert asyncio.run(go()) == [200, 200, 403, 200, 200]
    cfg.write_text("[server]\nallowed_hosts = \"sandbox.internal\"\n")
    with pytest.raises(ConfigError, match=r"server\.allowed_hosts"):
        load(cfg, env={"SANDBOXD_STATE_DIR": str(tmp_path)})
