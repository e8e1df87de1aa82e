"""A client's pace holds back its own run, never the service's memory: an NDJSON or a
WebSocket client that stops reading while its run prints 64 MiB, and a WebSocket client
that floods 64 MiB of stdin into a run that never reads it. The service's peak RSS (the
kernel's VmHWM, reset before each test) must stay far below the data size; each run ends
at its wall limit (it waits for its client), which is when the peak is read."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.service.own_service import OwnService, own_service

MiB = 1 << 20
DATA = 64 * MiB
# Generous: the code before backpressure grew by 64-238 MiB here (all the data queued, and
# the output kept twice); with it, by 0-1 MiB (the pump's high-water mark at most).
GROWTH_BOUND = 16 * MiB
WALL_MS = 3000


@pytest.fixture(scope="module")
def quiet(registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[OwnService]:
    """A service of these tests' own: nothing else allocates in it meanwhile. The flood
    test's client leaves its connection open with megabytes unsent when its event loop
    ends (asyncio drops a transport's buffer unflushed): the stop need not wait the
    default 10 s for that handler."""
    config = "[server]\nshutdown_deadline_s = 1\n"
    with own_service(tmp_path_factory.mktemp("sandboxd-slow"), config) as svc:
        yield svc


def _runs_done(svc: OwnService) -> float:
    return svc.metric("sandboxd_runs_total")


def _wait_for_runs(svc: OwnService, count: float) -> None:
    deadline = time.monotonic() + WALL_MS / 1000 + 60
    while _runs_done(svc) < count:
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.1)


def _warm_up(svc: OwnService, image: str) -> None:
    """The image pulled and a run made, so the peak measured is the test's own."""
    async def go() -> None:
        async with aiohttp.ClientSession(svc.url) as s, s.post("/v1/runs", json={
                "image": image, "cmd": ["true"]}) as r:
            assert r.status == 200, await r.text()
    asyncio.run(go())


def test_an_ndjson_client_that_stops_reading_holds_back_its_run(quiet: OwnService,
                                                                images: Any) -> None:
    _warm_up(quiet, images.oci)
    body = orjson.dumps({
        "image": images.oci, "env": {"PATH": "/bin"},
        "cmd": ["sh", "-c", f"yes abcdefghijklmnopqrstuvwxyz0123456789 | head -c {DATA}"],
        "limits": {"output_bytes": DATA, "wall_ms": WALL_MS}})
    before_runs = _runs_done(quiet)
    base = quiet.rss()
    quiet.reset_peak()
    with socket.create_connection(("127.0.0.1", quiet.port)) as client:
        client.sendall(b"POST /v1/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                       b"Content-Type: application/json\r\nAccept: application/x-ndjson\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert client.recv(4096).startswith(b"HTTP/1.1 200")
        # ... and reads no more: the run waits for it until its wall limit.
        _wait_for_runs(quiet, before_runs + 1)
        growth = quiet.peak() - base
    assert growth < GROWTH_BOUND, f"the service grew by {growth / MiB:.0f} MiB"
    assert quiet.metric("sandboxd_runs_total") == before_runs + 1


def test_a_websocket_client_that_stops_reading_holds_back_its_run(quiet: OwnService,
                                                                   images: Any) -> None:
    _warm_up(quiet, images.oci)
    before_runs = _runs_done(quiet)

    async def go() -> int:
        async with aiohttp.ClientSession(quiet.url) as s, s.ws_connect("/v1/runs/ws") as ws:
            await ws.send_json({
                "image": images.oci, "env": {"PATH": "/bin"},
                "cmd": ["sh", "-c", f"yes abcdefghijklmnopqrstuvwxyz | head -c {DATA}"],
                "limits": {"output_bytes": DATA, "wall_ms": WALL_MS}})
            # ... and receives nothing: aiohttp stops reading the socket when its own
            # queue is full.
            await asyncio.to_thread(_wait_for_runs, quiet, before_runs + 1)
            return quiet.peak()

    base = quiet.rss()
    quiet.reset_peak()
    growth = asyncio.run(go()) - base
    assert growth < GROWTH_BOUND, f"the service grew by {growth / MiB:.0f} MiB"


def test_a_stdin_flood_into_a_run_that_does_not_read_it_is_held_back(quiet: OwnService,
                                                                     images: Any) -> None:
    _warm_up(quiet, images.oci)
    chunk = "x" * (64 << 10)
    sent = 0

    async def go() -> dict[str, Any]:
        nonlocal sent
        async with aiohttp.ClientSession(quiet.url) as s, s.ws_connect("/v1/runs/ws") as ws:
            await ws.send_json({"image": images.oci, "cmd": ["sleep", "60"],
                                "env": {"PATH": "/bin"}, "limits": {"wall_ms": WALL_MS}})

            async def flood() -> None:
                nonlocal sent
                while sent < DATA:
                    await ws.send_json({"type": "stdin", "data": chunk})
                    sent += len(chunk)
            flooding = asyncio.ensure_future(flood())
            try:
                while True:
                    msg = await ws.receive_json(timeout=WALL_MS / 1000 + 60)
                    if msg["event"] in ("exit", "error"):
                        return dict(msg)
            finally:
                flooding.cancel()
                await asyncio.gather(flooding, return_exceptions=True)

    base = quiet.rss()
    quiet.reset_peak()
    end = asyncio.run(go())
    growth = quiet.peak() - base
    assert end["event"] == "exit" and end["status"] == "wall_limit", end
    assert growth < GROWTH_BOUND, (f"the service grew by {growth / MiB:.0f} MiB "
                                   f"({sent / MiB:.0f} MiB of stdin sent)")
