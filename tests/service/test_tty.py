"""Runs with a terminal through the API: `tty` and `tty_size` on POST /v1/runs, session exec
and the exec WebSocket (binary stdin, resize), and where they are refused."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.service.conftest import Service

ENV = {"PATH": "/bin"}


async def _output_until(ws: aiohttp.ClientWebSocketResponse, marker: str,
                        seen: list[str]) -> dict[str, Any] | None:
    """Read events until the output (kept in `seen`) holds `marker` past what was seen
    before; the exit or error event if the run ended first."""
    start = len("".join(seen))
    while marker not in "".join(seen)[start:]:
        msg = await ws.receive_json(timeout=30)
        if msg["event"] in ("exit", "error"):
            return msg
        assert msg["event"] == "stdout", msg  # a terminal merges stderr into stdout
        seen.append(msg["data"])
    return None


def test_a_run_on_a_terminal(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/runs", json={
                "image": images.oci, "env": ENV, "tty": True,
                "tty_size": {"rows": 30, "cols": 100}, "stdin": "typed\n",
                "cmd": ["sh", "-c", "read l; tty; stty size; echo got $l $TERM; echo err >&2"]
                }) as r:
            body = await r.json()
        assert r.status == 200, body
        assert body["status"] == "ok", body
        # As a terminal gives it: the typed line echoed, CRLF, stderr merged.
        # TERM as Docker sets it for a run with a terminal.
        assert body["stdout"] == "typed\r\n/dev/pts/0\r\n30 100\r\ngot typed xterm\r\nerr\r\n"
        assert body["stderr"] == ""
    service.call(go)


def test_a_session_exec_on_a_terminal(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/containers", json={"image": images.oci}) as r:
            sid = (await r.json())["id"]
        try:
            async with s.post(f"/v1/containers/{sid}/exec", json={
                    "cmd": ["sh", "-c", "test -t 0 && stty size && echo $TERM"],
                    "env": {**ENV, "TERM": "vt100"}, "tty": True}) as r:
                body = await r.json()
            # The run's own TERM is kept.
            assert (body["status"], body["stdout"]) == ("ok", "24 80\r\nvt100\r\n"), body
        finally:
            async with s.delete(f"/v1/containers/{sid}"):
                pass
    service.call(go)


def test_where_a_terminal_is_refused(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        cases = [
            ("/v1/runs", {"image": images.oci, "cmd": ["true"],
                          "tty_size": {"rows": 2, "cols": 2}}, "tty_size"),
            ("/v1/runs", {"image": images.oci, "cmd": ["true"], "tty": False,
                          "tty_size": {"rows": 2, "cols": 2}}, "tty_size"),
            ("/v1/runs", {"image": images.oci, "tty": True, "tty_size": {"rows": 0, "cols": 2},
                          "cmd": ["true"]}, "tty_size.rows"),
            ("/v1/runs", {"image": images.oci, "tty": True,
                          "processes": [{"cmd": ["true"]}, {"cmd": ["cat"]}],
                          "pipes": [{"from": [0, 1], "to": [1, 0]}]}, "tty"),
            ("/v1/batches", {"image": images.oci, "cmd": ["true"], "tty": True,
                             "cases": [{}]}, "tty"),
        ]
        for path, body, field in cases:
            async with s.post(path, json=body) as r:
                got = await r.json()
            assert r.status == 400, (path, body, got)
            assert got["error"]["field"] == field, (path, body, got)
    service.call(go)


def test_an_interactive_terminal(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        seen: list[str] = []
        async with s.ws_connect("/v1/runs/ws") as ws:
            await ws.send_json({"image": images.oci, "cmd": ["sh"], "env": ENV, "tty": True})
            assert await _output_until(ws, "$ ", seen) is None
            await ws.send_bytes(b"echo h''i\n")   # binary frames: raw input
            assert await _output_until(ws, "hi\r\n", seen) is None
            await ws.send_json({"type": "resize", "rows": 40, "cols": 120})
            await ws.send_json({"type": "stdin", "data": "stty size\n"})
            assert await _output_until(ws, "40 120\r\n", seen) is None
            await ws.send_bytes(b"exit 3\n")
            end = await _output_until(ws, "never printed", seen)
        assert end is not None and end["event"] == "exit", end
        assert (end["status"], end["exit_code"]) == ("nonzero_exit", 3), end
    service.call(go)


def test_resize_without_a_terminal_is_refused(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        async with s.ws_connect("/v1/runs/ws") as ws:
            await ws.send_json({"image": images.oci, "cmd": ["sleep", "30"], "env": ENV})
            await ws.send_json({"type": "resize", "rows": 40, "cols": 120})
            msg = await ws.receive_json(timeout=30)
        assert msg["event"] == "error" and msg["error"]["field"] == "type", msg
        assert "tty" in msg["error"]["message"]
    service.call(go)


def test_a_client_that_leaves_takes_its_terminal_with_it(service: Service,
                                                         images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/containers", json={"image": images.oci}) as r:
            sid = (await r.json())["id"]
        try:
            async with s.ws_connect(f"/v1/containers/{sid}/exec/ws") as ws:
                await ws.send_json({"cmd": ["sh", "-c", "echo up; exec sleep 100"],
                                    "env": ENV, "tty": True})
                assert await _output_until(ws, "up", []) is None
            # Gone with the connection: the run, its process and its pty.
            deadline = time.monotonic() + 30
            while True:
                async with s.post(f"/v1/containers/{sid}/exec", json={
                        "cmd": ["sh", "-c", "ls -1 /dev/pts; ps -o args | grep -c '^sleep'"],
                        "env": ENV}) as r:
                    body = await r.json()
                if body["stdout"] == "ptmx\n0\n" or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert body["stdout"] == "ptmx\n0\n", body
        finally:
            async with s.delete(f"/v1/containers/{sid}"):
                pass
    service.call(go)
