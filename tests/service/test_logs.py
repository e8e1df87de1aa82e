"""Structured logs and the request id: `sandboxd serve --log-format json` writes one JSON
object per line (an access line per request, a traceback as one field); every response
carries X-Request-Id, the client's when it is a fair one, never a hostile one echoed; the id
is in the request's log lines and in its results (runs, session exec, the WebSocket's exit
event, jobs, batches), and another tenant's id never shows in them."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from service import logs
from tests.service.conftest import (
    LIMITED_TOKEN,
    MAIN_TOKEN,
    Service,
    start_service,
    stop_service,
    wait_ready,
)
from tests.service.own_service import two_tenants

MADE = re.compile(r"[0-9a-f]{32}")     # an id the service made
CMD = {"env": {"PATH": "/bin"}}
A = {"Authorization": f"Bearer {MAIN_TOKEN}"}
B = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
B_ID = "tenant-b.chosen:42"


@pytest.mark.parametrize("header", ["abc", "0" * 128, "svc:job-42.3_x", B_ID])
def test_a_fair_client_id_is_kept(header: str) -> None:
    assert logs.request_id_of(header) == header


@pytest.mark.parametrize("header", [None, "", "0" * 129, "a b", "a\r\nX-Evil: 1", "a\nb",
                                    "caf\u00e9", "\u0661\u0662", "a\x00b", '"quoted"'])
def test_anything_else_is_replaced_by_a_new_id(header: str | None) -> None:
    made = logs.request_id_of(header)
    assert MADE.fullmatch(made) and made != header


def test_a_json_line_holds_the_scope_extras_and_the_whole_traceback() -> None:
    record = logging.LogRecord("sandboxd.test", logging.ERROR, __file__, 1, "failed: %s",
                               ("why",), None)
    try:
        raise ValueError("line one\nline two")
    except ValueError:
        record.exc_info = sys.exc_info()
    record.status = 500
    with logs.scope("rid-1", lambda: "a"):
        text = logs.JsonFormatter().format(record)
    assert "\n" not in text
    line = orjson.loads(text)
    assert {k: line[k] for k in ("level", "logger", "message", "request_id", "tenant",
                                 "status")} == {
        "level": "ERROR", "logger": "sandboxd.test", "message": "failed: why",
        "request_id": "rid-1", "tenant": "a", "status": 500}
    assert line["exception"].startswith("Traceback") and "line two" in line["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert "request_id" not in orjson.loads(logs.JsonFormatter().format(record))


@pytest.fixture(scope="module")
def json_service(registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[Service]:
    """Two tenants, a and b, and the JSON log ([server] log_format)."""
    workdir = tmp_path_factory.mktemp("sandboxd-json")
    proc, log = start_service(workdir, '[server]\nlog_format = "json"\n'
                              + two_tenants(registry.host))
    svc = Service(wait_ready(proc, log), proc, log, workdir / "state", registry.host)
    yield svc
    stop_service(svc, workdir)


def test_the_command_line_format_wins_over_the_config(tmp_path: Path) -> None:
    proc, log = start_service(tmp_path, '[server]\nlog_format = "text"\n', "--log-format",
                              "json")
    svc = Service(wait_ready(proc, log), proc, log, tmp_path / "state", "")
    stop_service(svc, tmp_path)
    lines = _lines(svc)   # each line one JSON object, or this raises
    assert any("listening on" in line["message"] for line in lines)


def _lines(svc: Service) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in svc.log_text().splitlines()]


async def _run(s: aiohttp.ClientSession, url: str, image: str, headers: dict[str, str]
               ) -> tuple[str, dict[str, Any]]:
    async with s.post(url + "/v1/runs", headers=headers,
                      json={"image": image, "cmd": ["echo", "hi"], **CMD}) as r:
        assert r.status == 200, await r.text()
        return r.headers[logs.HEADER], await r.json()


def test_the_json_log_has_the_request_id_the_tenant_and_an_access_line(
        json_service: Service, images: Any) -> None:
    url = json_service.url

    async def go() -> list[tuple[str, dict[str, Any]]]:
        async with aiohttp.ClientSession() as s:
            return [await _run(s, url, images.oci, {**B, logs.HEADER: B_ID}),
                    await _run(s, url, images.oci, A)]
    (b_header, b_result), (a_header, a_result) = asyncio.run(go())
    assert b_header == b_result["request_id"] == B_ID
    assert MADE.fullmatch(a_header) and a_result["request_id"] == a_header

    lines = _lines(json_service)   # each line one JSON object, or this raises
    access = {line["request_id"]: line for line in lines if line["logger"] == "sandboxd.access"}
    assert {k: access[a_header][k] for k in ("method", "path", "status", "tenant")} == {
        "method": "POST", "path": "/v1/runs", "status": 200, "tenant": "a"}
    assert access[a_header]["duration_ms"] > 0
    # B's id is on B's own lines only, never on A's results or lines.
    assert all(line["tenant"] == "b" for line in lines if B_ID in orjson.dumps(line).decode())
    assert access[B_ID]["tenant"] == "b"
    started = next(line for line in lines if "listening on" in line["message"])
    assert "request_id" not in started


def _raw_get(url: str, header: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as c:
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + host.encode() + b"\r\nX-Request-Id: "
                  + header + b"\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := c.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("header", [b"x" * 129, "caf\u00e9-id".encode(), b"two words",
                                    b"ab\rcd-evil", b"\xff\xfe-evil"])
def test_a_hostile_request_id_is_replaced_never_echoed(json_service: Service,
                                                       header: bytes) -> None:
    answer = _raw_get(json_service.url, header)
    head, _, _ = answer.partition(b"\r\n\r\n")
    assert header not in answer
    if head.startswith(b"HTTP/1.1 200"):
        made = re.search(rb"\r\nX-Request-Id: ([^\r]*)", head)
        assert made is not None and MADE.fullmatch(made.group(1).decode())
    else:  # a CR inside a header is the parser's to refuse, before any middleware
        assert re.match(rb"HTTP/1\.[01] 400 ", head), head
    assert header.decode(errors="replace") not in json_service.log_text()


def test_results_carry_the_request_id_everywhere(service: Service, images: Any) -> None:
    """Session exec, the WebSocket's exit event, a job (its submitting request's id) and
    each case of a batch (the batch request's)."""
    image = images.oci

    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/containers", json={"image": image}) as r:
            sid = (await r.json())["id"]
        try:
            async with s.post(f"/v1/containers/{sid}/exec", headers={logs.HEADER: "exec-1"},
                              json={"cmd": ["true"], **CMD}) as r:
                assert (await r.json())["request_id"] == "exec-1"
            async with s.ws_connect(f"/v1/containers/{sid}/exec/ws",
                                    headers={logs.HEADER: "ws-1"}) as ws:
                assert ws._response.headers[logs.HEADER] == "ws-1"
                await ws.send_json({"cmd": ["true"], **CMD})
                events = [orjson.loads(msg.data) async for msg in ws]
            assert events[-1]["event"] == "exit" and events[-1]["request_id"] == "ws-1"
        finally:
            async with s.delete(f"/v1/containers/{sid}") as r:
                assert r.status == 204
        async with s.post("/v1/jobs", headers={logs.HEADER: "job-1"},
                          json={"run": {"image": image, "cmd": ["true"], **CMD}}) as r:
            job_id = (await r.json())["id"]
        async with s.get(f"/v1/jobs/{job_id}/events") as r:
            await r.read()  # the stream ends with the job
        async with s.get(f"/v1/jobs/{job_id}", headers={logs.HEADER: "job-poll"}) as r:
            job = await r.json()
        assert job["status"] == "done" and job["result"]["request_id"] == "job-1", job
        async with s.post("/v1/batches", headers={logs.HEADER: "batch-1"},
                          json={"image": image, "cmd": ["true"], **CMD,
                                "cases": [{}, {}]}) as r:
            events = [orjson.loads(line) for line in (await r.read()).splitlines()]
        cases = [e for e in events if e["event"] == "case"]
        assert len(cases) == 2 and {c["result"]["request_id"] for c in cases} == {"batch-1"}
    service.call(go)
