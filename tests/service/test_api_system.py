"""Info, health, readiness, metrics, the OpenAPI document, auth, configuration, admission."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sandbox.tenants import LOCAL
from service.admission import Admission
from service.app import create_app, routes
from service.auth import Principal
from service.config import ConfigError, load
from service.errors import ApiError
from service.schemas import doc_path
from tests.service.conftest import MAIN_TOKEN, ROOT, Service

METRICS = ("sandboxd_runs_total", "sandboxd_run_setup_seconds_bucket",
           "sandboxd_run_seconds_bucket", "sandboxd_pool_idle", "sandboxd_pool_hits_total",
           "sandboxd_pool_misses_total", "sandboxd_pulls_total", "sandboxd_pull_bytes_total",
           "sandboxd_live_containers")


def test_health_and_readiness_need_no_token(service: Service) -> None:
    async def go(s: aiohttp.ClientSession) -> list[tuple[int, Any]]:
        out = []
        for path in ("/healthz", "/readyz"):
            async with s.get(path, headers={"Authorization": ""}) as r:
                out.append((r.status, await r.json()))
        return out
    assert service.call(go) == [(200, {"status": "ok"}), (200, {"status": "ready"})]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-0123456789", "Basic abc",
                                  f"bearer{MAIN_TOKEN}"])
def test_without_a_valid_token_401(service: Service, auth: str | None) -> None:
    async def go(s: aiohttp.ClientSession) -> list[tuple[int, Any]]:
        out = []
        for method, path in (("GET", "/v1/info"), ("POST", "/v1/runs"), ("GET", "/metrics"),
                             ("GET", "/v1/images"), ("GET", "/v1/runs/ws"),
                             ("GET", "/v1/nothing")):
            headers = {"Authorization": auth} if auth else {}
            async with aiohttp.ClientSession(service.url, headers=headers) as bare, \
                    bare.request(method, path, json={"image": "x"}) as r:
                out.append((r.status, await r.json()))
        return out
    for status, body in service.call(go):
        assert status == 401 and body["error"]["code"] == "unauthorized", body


def test_info(service: Service) -> None:
    async def go(s: aiohttp.ClientSession) -> Any:
        async with s.get("/v1/info") as r:
            assert r.status == 200
            return await r.json()
    info = service.call(go)
    assert info["version"] and isinstance(info["pools"], list)
    assert isinstance(info["sessions"], int) and "user_namespaces" in info["host"]


def test_metrics_after_a_run(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> str:
        async with s.post("/v1/runs", json={"image": images.oci, "cmd": ["true"]}) as r:
            assert r.status == 200
        async with s.get("/metrics") as r:
            assert r.status == 200 and r.content_type == "text/plain"
            return await r.text()
    text = service.call(go)
    for name in METRICS:
        assert any(line.startswith(name) for line in text.splitlines()), name
    assert 'sandboxd_runs_total{status="ok"}' in text
    answered = [line for line in text.splitlines()
                if line.startswith('sandboxd_http_requests_total{status="200"} ')]
    assert answered and float(answered[0].split()[1]) >= 1  # the run's, at least
    pulls = [line for line in text.splitlines() if line.startswith("sandboxd_pulls_total ")]
    assert float(pulls[0].split()[1]) >= 1
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all(len(line.rsplit(" ", 1)) == 2 for line in samples)


def test_openapi_covers_every_route(service: Service, tmp_path: Path) -> None:
    async def go(s: aiohttp.ClientSession) -> Any:
        async with s.get("/openapi.json") as r:
            return await r.json()
    doc = service.call(go)
    assert doc["openapi"].startswith("3.")
    app = create_app(lambda: asyncio.sleep(0), load(None, env={
        "SANDBOXD_STATE_DIR": str(tmp_path)}))  # type: ignore[arg-type,return-value]
    registered = {(r.method.lower(), doc_path(r.resource.canonical))
                  for r in app.router.routes() if r.method != "HEAD"}
    # A WebSocket is its path's x-websocket (OpenAPI has none), served as a GET.
    documented = {("get" if m == "x-websocket" else m, p) for p, ops in doc["paths"].items()
                  for m in ops}
    assert registered == documented
    assert len(registered) == len(routes())
    operation_ids = set()
    for (method, path) in documented:
        op = doc["paths"][path].get(method) or doc["paths"][path]["x-websocket"]
        assert op["responses"] and op["summary"]
        operation_ids.add(op["operationId"])
    assert len(operation_ids) == len(documented)
    for name, schema in doc["components"]["schemas"].items():
        for ref in str(schema).split("'$ref': '")[1:]:
            assert ref.split("'")[0].rsplit("/", 1)[-1] in doc["components"]["schemas"], name
    run_body = doc["components"]["schemas"]["RunRequest"]
    assert run_body["required"] == ["image"] and run_body["additionalProperties"] is False


def test_the_config_file_and_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = 9000\nstate_dir = "/srv/x"\n'
                   '[[tokens]]\ntoken = "file-token-0123456789"\nname = "ci"\n'
                   'max_concurrent_runs = 2\nregistries = ["ghcr.io"]\n'
                   '[pools]\nmin_idle = 0\nmax_idle = 3\n[limits]\nmax_queued = 5\n')
    c = load(cfg, env={"SANDBOXD_TOKENS": "env-token-0123456789a, env-token-0123456789b",
                       "SANDBOXD_PORT": "9100", "SANDBOXD_STATE_DIR": str(tmp_path)})
    assert c.port == 9100 and c.state_dir == tmp_path and c.limits.max_queued == 5
    # Each token is a tenant; an unnamed one is named after its hash (stable, no secret).
    assert [t.name for t in c.tokens] == ["ci", *(
        "token-" + hashlib.sha256(t.encode()).hexdigest()[:12]
        for t in ("env-token-0123456789a", "env-token-0123456789b"))]
    assert c.tokens[0].registries == ("ghcr.io",) and c.tokens[0].max_concurrent_runs == 2
    assert c.engine_config().pools.max_idle == 3
    for text, words in (('[server]\nhost = 5\nstate_dir = "/x"', "server.host"),
                        ('[[tokens]]\ntoken = "short"\n[server]\nstate_dir = "/x"',
                         "tokens[0].token"),
                        ('[pools]\nmin_idle = 5\nmax_idle = 1\n[server]\nstate_dir = "/x"',
                         "min_idle"),
                        ('[limits]\nbogus = 1\n[server]\nstate_dir = "/x"', "limits.bogus"),
                        ("[server]\n", "state_dir"), ("not toml [", "TOML")):
        cfg.write_text(text)
        with pytest.raises(Exception, match=words.replace("[", r"\[").replace("]", r"\]")):
            load(cfg, env={})


def test_without_tokens_only_loopback_is_served(tmp_path: Path) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SANDBOXD_")}
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--host", "0.0.0.0",
                           "--port", "0", "--state-dir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "no API tokens are configured" in done.stderr and "loopback" in done.stderr
    with pytest.raises(ConfigError, match="loopback"):
        load(None, env={"SANDBOXD_STATE_DIR": str(tmp_path),
                        "SANDBOXD_HOST": "192.0.2.1"}).check_bind()


def test_admission_queues_then_refuses() -> None:
    async def go() -> None:
        adm = Admission(running=1, queued=1)
        who = Principal("t", LOCAL)
        release = asyncio.Event()

        async def hold() -> None:
            async with adm.slot(who):
                await release.wait()
        first = asyncio.ensure_future(hold())
        await asyncio.sleep(0)
        queued = asyncio.ensure_future(hold())
        await asyncio.sleep(0)
        assert (adm.running, adm.waiting) == (1, 1)
        with pytest.raises(ApiError) as refused:
            async with adm.slot(who):
                pass
        assert refused.value.status == 429 and refused.value.headers["Retry-After"]
        release.set()
        await asyncio.gather(first, queued)
        assert (adm.running, adm.waiting, who.active) == (0, 0, 0)
    asyncio.run(go())
