"""The Python client and the `sbx` CLI against a small fake of the REST API (the contract in
docs, served by aiohttp on a private loop in a thread), plus their pure parts: the stream
decoders and the safe tar extraction."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from sbx.cli import CliError, extract_tar, main
from sbx.client import (
    ApiError,
    Client,
    Exit,
    File,
    NdjsonDecoder,
    Output,
    Pulled,
    PullProgress,
    SseDecoder,
    SyncClient,
)

TOKEN = "s3cret"
DIGEST = "sha256:" + "ab" * 32


# The fake service


def _encode(body: dict[str, Any], text: bytes) -> str:
    if body.get("output_encoding") == "base64":
        return base64.b64encode(text).decode()
    return text.decode("utf-8", "replace")


def _error(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    err = {"code": code, "message": message} | ({"field": field} if field else {})
    return web.Response(status=status, body=orjson.dumps({"error": err}),
                        content_type="application/json")


def _outcome(body: dict[str, Any]) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """What the fake "runs": the output events and the result, chosen by cmd[0]."""
    cmd = body.get("cmd") or ["echo", "default"]
    result: dict[str, Any] = {"id": "r1", "status": "ok", "exit_code": 0, "signal": None,
                              "stdout_truncated": False, "stderr_truncated": False,
                              "cpu_ms": 3, "wall_ms": 5, "memory_peak_bytes": 1 << 20,
                              "setup_ms": 1, "measured_by": {"cpu": "cgroup", "memory":
                                                             "cgroup"},
                              "image": DIGEST, "pool_hit": True, "warnings": []}
    output: list[tuple[str, bytes]] = []
    match cmd[0]:
        case "echo":
            output = [("stdout", " ".join(cmd[1:]).encode() + b"\n")]
        case "both":
            output = [("stdout", b"out1\n"), ("stderr", b"err1\n"), ("stdout", b"out2\n")]
        case "cat":
            stdin = body.get("stdin", "").encode() or base64.b64decode(
                body.get("stdin_base64", ""))
            output = [("stdout", stdin)]
        case "binary":
            output = [("stdout", b"\xff\x00\xfe")]
        case "exit":
            result |= {"status": "nonzero_exit", "exit_code": int(cmd[1])}
        case "kill":
            result |= {"status": "signaled", "exit_code": None, "signal": 9}
        case "spin":
            result |= {"status": "time_limit", "exit_code": None, "signal": 9}
        case "bomb":
            result |= {"status": "memory_limit", "exit_code": None, "signal": 9}
    return output, result


class Fake:
    """The fake service: records every request, keeps containers and files in memory."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.files: dict[tuple[str, str], bytes] = {}
        self.tars: dict[str, bytes] = {}
        self.cut: set[str] = set()     # paths whose body the "service" cuts short
        self.containers: dict[str, dict[str, Any]] = {}
        self.token: str | None = None
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(self.app())
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [body for _, p, body in self.requests if p == path]

    def app(self) -> web.Application:
        @web.middleware
        async def auth(request: web.Request, handler: Any) -> web.StreamResponse:
            if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
                return _error(401, "unauthorized", "a bearer token is required")
            return await handler(request)

        app = web.Application(middlewares=[auth])
        app.router.add_post("/v1/runs", self.run)
        app.router.add_get("/v1/runs/ws", self.ws)
        app.router.add_post("/v1/containers", self.create)
        app.router.add_get("/v1/containers", self.list_containers)
        app.router.add_delete("/v1/containers/{id}", self.delete)
        app.router.add_post("/v1/containers/{id}/exec", self.run)
        app.router.add_put("/v1/containers/{id}/files", self.put_file)
        app.router.add_get("/v1/containers/{id}/files", self.get_file)
        app.router.add_post("/v1/images/pull", self.pull)
        app.router.add_get("/v1/images", self.images)
        app.router.add_get("/v1/images/{ref}", self.inspect)
        app.router.add_delete("/v1/images/{ref}", self.remove_image)
        app.router.add_post("/v1/images/push", self.push)
        app.router.add_post("/v1/images/import", self.import_image)
        app.router.add_get("/v1/info", self.info)
        app.router.add_get("/healthz", self.info)
        return app

    async def run(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append(("POST", request.path, body))
        image = body.get("image", "")
        if image == "missing:1":
            return _error(404, "image_not_found", "image missing:1 is not in the store; "
                          "pull it first", "image")
        if image == "proxy":
            return web.Response(status=502, text="<html>Bad Gateway</html>",
                                content_type="text/html")
        if image == "busy":
            resp = _error(429, "over_capacity", "too many runs; retry later")
            resp.headers["Retry-After"] = "3"
            return resp
        if "id" in request.match_info and request.match_info["id"] not in self.containers:
            return _error(404, "container_not_found", "no such container")
        output, result = _outcome(body)
        accept = request.headers.get("Accept", "")
        if "x-ndjson" not in accept and "event-stream" not in accept:
            streams = {"stdout": b"", "stderr": b""}
            for stream, data in output:
                streams[stream] += data
            return web.json_response({**result, **{k: _encode(body, v)
                                                   for k, v in streams.items()}},
                                     dumps=lambda o: orjson.dumps(o).decode())
        sse = "event-stream" in accept
        events: list[tuple[str, dict[str, Any]]] = [
            (stream, {"data": _encode(body, data)}) for stream, data in output]
        if body.get("cmd", [""])[0] == "crash":
            events = [("stdout", {"data": _encode(body, b"partial")}),
                      ("error", {"error": {"code": "internal_error",
                                           "message": "the container died"}})]
        else:
            events.append(("exit", result))
        if sse:
            payload = b"".join(b": keep-alive\r\nevent: " + name.encode() + b"\r\ndata: "
                               + orjson.dumps(obj) + b"\r\n\r\n" for name, obj in events)
        else:
            payload = b"".join(orjson.dumps({"event": name, **obj}) + b"\n"
                               for name, obj in events)
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream" if sse else "application/x-ndjson"})
        await resp.prepare(request)
        for i in range(0, len(payload), 5):  # pieces that split lines and \r\n pairs
            await resp.write(payload[i:i + 5])
        await resp.write_eof()
        return resp

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        body = orjson.loads((await ws.receive()).data)
        self.requests.append(("WS", request.path, body))
        result = _outcome(body)[1]
        async for msg in ws:
            m = orjson.loads(msg.data)
            if m["type"] == "stdin":
                data = m["data"].encode() if "data" in m else base64.b64decode(
                    m["data_base64"])
                await ws.send_str(orjson.dumps({"event": "stdout",
                                                "data": _encode(body, data.upper())}).decode())
            elif m["type"] == "close_stdin":
                break
            elif m["type"] == "signal":
                result |= {"status": "signaled", "exit_code": None, "signal": m["signal"]}
                break
        await ws.send_str(orjson.dumps({"event": "exit", **result}).decode())
        await ws.close()
        return ws

    async def create(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.requests.append(("POST", request.path, body))
        cid = f"c{len(self.containers) + 1}"
        self.containers[cid] = {"id": cid, "image": DIGEST, "names": [body["image"]],
                                "policy": body.get("policy", "default"), "created": 0,
                                "last_used": 0, "alive": True}
        return web.json_response(self.containers[cid], status=201)

    async def list_containers(self, request: web.Request) -> web.Response:
        return web.json_response({"containers": list(self.containers.values())})

    async def delete(self, request: web.Request) -> web.Response:
        if self.containers.pop(request.match_info["id"], None) is None:
            return _error(404, "container_not_found",
                          f"no container {request.match_info['id']}; list them with sbx ps")
        return web.Response(status=204)

    async def put_file(self, request: web.Request) -> web.Response:
        key = (request.match_info["id"], request.query["path"])
        self.files[key] = await request.read()
        self.requests.append(("PUT", request.path, dict(request.query)))
        return web.Response(status=204)

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        path = request.query["path"]
        if path in self.cut:  # as sandboxd does when a copy out fails once begun
            resp = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
            await resp.prepare(request)
            await resp.write(self.tars[path][:1024])
            assert request.transport is not None
            request.transport.close()
            return resp
        if path in self.tars:
            return web.Response(body=self.tars[path], content_type="application/x-tar")
        data = self.files.get((request.match_info["id"], path))
        if data is None:
            return _error(404, "path_not_found", f"{path} does not exist", "path")
        return web.Response(body=data, content_type="application/octet-stream")

    async def pull(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.requests.append(("POST", request.path, body))
        image = {"digest": DIGEST, "names": [body["reference"]], "size": 300}
        if "x-ndjson" not in request.headers.get("Accept", ""):
            return web.json_response(image)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        layer = "sha256:" + "cd" * 32
        for status, done in (("downloading", 0), ("downloading", 100), ("downloading", 300),
                             ("done", 300)):
            await resp.write(orjson.dumps({"event": "progress", "layer": layer,
                                           "status": status, "done": done,
                                           "total": 300}) + b"\n")
        await resp.write(orjson.dumps({"event": "done", **image}) + b"\n")
        await resp.write_eof()
        return resp

    async def images(self, request: web.Request) -> web.Response:
        return web.json_response({"images": [
            {"digest": DIGEST, "names": ["busybox:latest", "bb:1"], "size": 2 << 20,
             "created": 0}]})

    async def inspect(self, request: web.Request) -> web.Response:
        return web.json_response({"digest": DIGEST, "names": [request.match_info["ref"]]})

    async def remove_image(self, request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        if ref == "in-use:1" and request.query.get("force") != "true":
            return _error(409, "image_in_use", "a container uses in-use:1; remove it or force")
        return web.json_response({"removed": [ref]})

    async def push(self, request: web.Request) -> web.Response:
        self.requests.append(("POST", request.path, orjson.loads(await request.read())))
        return web.json_response({"digest": DIGEST})

    async def import_image(self, request: web.Request) -> web.Response:
        data = await request.read()
        self.requests.append(("POST", request.path, {"reference": request.query["reference"],
                                                     "size": len(data),
                                                     "type": request.content_type}))
        return web.json_response({"digest": DIGEST, "names": [request.query["reference"]]},
                                 status=201)

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.1.0", "status": "ok", "sessions": 0})


@pytest.fixture(scope="module")
def service() -> Iterator[Fake]:
    fake = Fake()
    yield fake
    fake.close()


@pytest.fixture
def fake(service: Fake, monkeypatch: pytest.MonkeyPatch) -> Fake:
    service.requests.clear()
    service.containers.clear()
    service.files.clear()
    service.tars.clear()
    service.token = None
    monkeypatch.setenv("SANDBOXD_URL", service.url)
    monkeypatch.delenv("SANDBOXD_TOKEN", raising=False)
    return service


def sbx(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# Stream decoders


NDJSON = (b'{"event":"stdout","data":"a\\nb"}\n\n{"event":"stderr","data":"\xc3\xa9"}\n'
          b'{"event":"exit","status":"ok"}')


def _feed_split(decoder: NdjsonDecoder | SseDecoder, payload: bytes,
                cut: int) -> list[dict[str, Any]]:
    return decoder.feed(payload[:cut]) + decoder.feed(payload[cut:]) + decoder.close()


def test_ndjson_is_the_same_wherever_the_chunks_split() -> None:
    expected = [{"event": "stdout", "data": "a\nb"}, {"event": "stderr", "data": "é"},
                {"event": "exit", "status": "ok"}]
    for cut in range(len(NDJSON) + 1):
        assert _feed_split(NdjsonDecoder(), NDJSON, cut) == expected, cut
    one_byte_at_a_time = NdjsonDecoder()
    events = [e for i in range(len(NDJSON)) for e in one_byte_at_a_time.feed(NDJSON[i:i + 1])]
    assert events + one_byte_at_a_time.close() == expected


def test_ndjson_refuses_garbage_and_endless_lines() -> None:
    with pytest.raises(ApiError, match="not JSON") as e:
        NdjsonDecoder().feed(b"<html>\n")
    assert e.value.code == "bad_response"
    with pytest.raises(ApiError, match="not a JSON object"):
        NdjsonDecoder().feed(b"[1, 2]\n")
    with pytest.raises(ApiError, match="exceeds 16 bytes"):
        NdjsonDecoder(max_line=16).feed(b"x" * 17)


SSE = (b': hello\r\nevent: stdout\r\ndata: {"data":\r\ndata: "x"}\r\n\r\n'
       b"event: stderr\ndata:{\"data\":\"y\"}\n\n"
       b"event: orphan\r\n\r\n"  # no data: nothing to dispatch
       b'event: exit\rdata: {"status":"ok","exit_code":0}\r\r'
       b'event: stdout\ndata: {"data":"never ended"}\n')


def test_sse_is_the_same_wherever_the_chunks_split() -> None:
    expected = [{"event": "stdout", "data": "x"}, {"event": "stderr", "data": "y"},
                {"event": "exit", "status": "ok", "exit_code": 0}]
    for cut in range(len(SSE) + 1):
        assert _feed_split(SseDecoder(), SSE, cut) == expected, cut
    for i in range(len(SSE) - 1):  # three chunks: catches a \r\n split and a stale \r
        for j in (i + 1, i + 2):
            d = SseDecoder()
            got = d.feed(SSE[:i]) + d.feed(SSE[i:j]) + d.feed(SSE[j:]) + d.close()
            assert got == expected, (i, j)


def test_sse_refuses_an_oversized_event() -> None:
    d = SseDecoder(max_event=32)
    with pytest.raises(ApiError, match="exceeds 32 bytes"):
        for _ in range(10):
            d.feed(b"data: " + b"x" * 10 + b"\n")


# The async client


def test_plain_run_sends_the_contract_body_and_reads_the_result(fake: Fake) -> None:
    async def go() -> None:
        async with Client() as c:
            r = await c.run("busybox", ["cat"], policy="judge", stdin=b"\x00bin",
                            env={"A": "1"}, cwd="/tmp", user="1000",
                            files=[File("/a", b"\x01"), File("/b", "text", 0o755)],
                            limits={"wall_ms": 500}, binary=True)
            assert (r.status, r.exit_code, r.stdout, r.stderr) == ("ok", 0, b"\x00bin", b"")
            assert r.pool_hit is True and r.raw["measured_by"] == {"cpu": "cgroup",
                                                                   "memory": "cgroup"}
            text = await c.run("busybox", ["cat"], stdin="héllo")
            assert text.stdout == "héllo"

    asyncio.run(go())
    first, second = fake.bodies("/v1/runs")
    assert first == {"image": "busybox", "cmd": ["cat"], "policy": "judge", "cwd": "/tmp",
                     "user": "1000", "env": {"A": "1"}, "limits": {"wall_ms": 500},
                     "stdin_base64": base64.b64encode(b"\x00bin").decode(),
                     "output_encoding": "base64",
                     "files": [{"path": "/a", "mode": 0o644, "content_base64": "AQ=="},
                               {"path": "/b", "mode": 0o755, "content": "text"}]}
    assert second == {"image": "busybox", "cmd": ["cat"], "stdin": "héllo"}


@pytest.mark.parametrize("sse", [False, True])
def test_streamed_run_yields_output_in_order_then_exit(fake: Fake, sse: bool) -> None:
    async def go() -> list[Any]:
        async with Client() as c:
            return [e async for e in c.run_stream("busybox", ["both"], sse=sse)]

    events = asyncio.run(go())
    assert events[:3] == [Output("stdout", "out1\n"), Output("stderr", "err1\n"),
                          Output("stdout", "out2\n")]
    assert isinstance(events[3], Exit) and events[3].result.status == "ok"
    assert events[3].result.stdout == "" and len(events) == 4


def test_error_event_mid_stream_raises_after_the_output(fake: Fake) -> None:
    async def go() -> list[Any]:
        seen = []
        async with Client() as c:
            with pytest.raises(ApiError, match="the container died") as e:
                async for event in c.run_stream("busybox", ["crash"], binary=True):
                    seen.append(event)
            assert e.value.code == "internal_error"
        return seen

    assert asyncio.run(go()) == [Output("stdout", b"partial")]


def test_error_bodies_become_api_errors(fake: Fake) -> None:
    async def go() -> None:
        async with Client() as c:
            with pytest.raises(ApiError) as e:
                await c.run("missing:1")
            assert (e.value.status, e.value.code, e.value.field) == (404, "image_not_found",
                                                                     "image")
            assert "pull it first" in str(e.value) and "(field: image)" in str(e.value)
            with pytest.raises(ApiError) as e:  # a streamed request fails the same way
                [x async for x in c.run_stream("missing:1")]
            assert e.value.code == "image_not_found"
            with pytest.raises(ApiError) as e:
                await c.run("proxy")
            assert (e.value.status, e.value.code) == (502, "http_502")
            assert "Bad Gateway" in e.value.message
            with pytest.raises(ApiError) as e:
                await c.run("busy")
            assert (e.value.status, e.value.retry_after) == (429, 3.0)

    asyncio.run(go())


def test_token_is_sent_and_its_absence_is_reported(fake: Fake) -> None:
    fake.token = TOKEN

    async def go() -> None:
        async with Client(token=TOKEN) as c:
            assert (await c.info())["version"] == "0.1.0"
        async with Client() as c:
            with pytest.raises(ApiError) as e:
                await c.info()
            assert (e.value.status, e.value.code) == (401, "unauthorized")

    asyncio.run(go())


def test_an_unreachable_service_is_an_api_error() -> None:
    async def go() -> None:
        async with Client("http://127.0.0.1:9", connect_timeout=5) as c:
            with pytest.raises(ApiError, match="cannot reach sandboxd") as e:
                await c.health()
            assert (e.value.status, e.value.code) == (0, "unreachable")

    asyncio.run(go())
    with pytest.raises(ValueError, match="not an http"):
        Client("unix:///run/sandboxd.sock")


def test_references_travel_as_one_path_segment(fake: Fake) -> None:
    ref = "127.0.0.1:5000/judge/gcc@" + DIGEST

    async def go() -> None:
        async with Client() as c:
            assert (await c.inspect_image(ref))["names"] == [ref]
            assert await c.remove_image("in-use:1", force=True) == ["in-use:1"]
            with pytest.raises(ApiError) as e:
                await c.remove_image("in-use:1")
            assert e.value.status == 409

    asyncio.run(go())


def test_pull_stream_gives_progress_then_the_image(fake: Fake) -> None:
    async def go() -> list[Any]:
        async with Client() as c:
            return [e async for e in c.pull_stream("busybox:latest")]

    events = asyncio.run(go())
    assert [e.done for e in events if isinstance(e, PullProgress)] == [0, 100, 300, 300]
    assert events[-1] == Pulled({"digest": DIGEST, "names": ["busybox:latest"], "size": 300})


def test_interactive_feeds_stdin_and_forwards_signals(fake: Fake) -> None:
    async def go() -> None:
        async with Client() as c:
            async with c.interactive("busybox", ["cat"]) as run:
                await run.send_stdin("abc")
                await run.send_stdin(b"\xffz")
                await run.close_stdin()
                events = [e async for e in run]
            assert events[:2] == [Output("stdout", "ABC"), Output("stdout", "\ufffdZ")]
            assert run.result is not None and run.result.status == "ok"
            async with c.interactive("busybox", ["cat"], binary=True) as run:
                await run.signal("SIGKILL")
                events = [e async for e in run]
            assert isinstance(events[-1], Exit)
            assert (events[-1].result.status, events[-1].result.signal) == ("signaled", 9)
            with pytest.raises(ValueError):
                async with c.interactive():
                    pass

    asyncio.run(go())


# The sync wrapper


def test_sync_client_runs_streams_and_raises(fake: Fake) -> None:
    with SyncClient() as c:
        assert c.run("busybox", ["echo", "hi"]).stdout == "hi\n"
        stream = c.run_stream("busybox", ["both"])
        assert next(stream) == Output("stdout", "out1\n")
        stream.close()  # leaving a stream early releases its connection
        with pytest.raises(ApiError) as e:
            c.run("missing:1")
        assert e.value.status == 404
        created = c.create_container("busybox")
        c.put_file(created["id"], "/x", b"data", mode=0o600)
        assert c.get_file(created["id"], "/x").data == b"data"
        assert [x["id"] for x in c.list_containers()] == [created["id"]]
        events = list(c.exec_stream(created["id"], ["echo", "in", "session"]))
        assert events[0] == Output("stdout", "in session\n")
        c.delete_container(created["id"])
        assert c.images()[0]["digest"] == DIGEST
    c.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        c.info()
    assert ("PUT", "/v1/containers/c1/files", {"path": "/x", "mode": "0600"}) in fake.requests


# The CLI


def test_sbx_run_streams_output_and_exits_with_the_runs_code(
        fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    assert sbx(capsys, "run", "busybox", "--", "both") == (0, "out1\nout2\n", "err1\n")
    assert sbx(capsys, "run", "busybox", "--", "exit", "3") == (3, "", "")
    assert sbx(capsys, "run", "busybox", "kill")[0] == 128 + 9
    code, _, err = sbx(capsys, "run", "busybox", "--", "spin")
    assert code == 124 and "CPU time limit" in err
    assert sbx(capsys, "run", "busybox", "bomb")[0] == 122


def test_sbx_run_writes_the_exact_bytes(
        fake: Fake, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["run", "busybox", "--", "binary"]) == 0
    assert capsysbinary.readouterr().out == b"\xff\x00\xfe"
    assert fake.bodies("/v1/runs")[-1]["output_encoding"] == "base64"


def test_sbx_run_sends_options_and_prints_figures(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "main.py"
    script.write_bytes(b"print(1)\n")
    script.chmod(0o750)
    monkeypatch.setenv("FROM_HERE", "yes")
    code, out, err = sbx(capsys, "run", "--policy", "judge", "--limit", "memory_bytes=64m",
                         "--limit", "wall_ms=2000", "-e", "A=1=2", "-e", "FROM_HERE",
                         "-w", "/work", "--file", f"{script}:/work/main.py", "-v",
                         "busybox", "--", "echo", "-v", "x")
    assert (code, out) == (0, "-v x\n")
    assert "status=ok" in err and "cpu_ms=3" in err and "pool_hit=True" in err
    body = fake.bodies("/v1/runs")[-1]
    assert body["limits"] == {"memory_bytes": 64 << 20, "wall_ms": 2000}
    assert body["env"] == {"A": "1=2", "FROM_HERE": "yes"}
    assert (body["policy"], body["cwd"], body["cmd"]) == ("judge", "/work", ["echo", "-v", "x"])
    assert body["files"] == [{"path": "/work/main.py", "mode": 0o750,
                              "content_base64": base64.b64encode(b"print(1)\n").decode()}]


def test_sbx_reports_errors_with_code_125(
        fake: Fake, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = sbx(capsys, "run", "missing:1", "--", "true")
    assert (code, out) == (125, "")
    assert err.startswith("sbx: image missing:1 is not in the store; pull it first")
    code, _, err = sbx(capsys, "run", "busybox", "crash")
    assert code == 125 and "sbx: the container died" in err
    code, _, err = sbx(capsys, "--url", "http://127.0.0.1:9", "info")
    assert code == 125 and "cannot reach sandboxd" in err
    code, _, err = sbx(capsys, "info", "--url", "ftp://x")
    assert code == 125 and "not an http(s) URL" in err
    fake.token = TOKEN
    assert sbx(capsys, "info")[0] == 125
    assert sbx(capsys, "info", "--token", TOKEN)[0] == 0
    with pytest.raises(SystemExit) as e:
        main(["run", "--limit", "memory_bytes=lots", "busybox"])
    assert e.value.code == 2


def test_sbx_run_interactive_feeds_stdin(
        fake: Fake, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = os.pipe()
    os.write(write, b"hello\n")
    os.close(write)
    with open(read, "rb") as stdin:
        monkeypatch.setattr("sys.stdin", stdin)
        assert sbx(capsys, "run", "-i", "busybox", "--", "cat") == (0, "HELLO\n", "")
    assert fake.requests[-1][:2] == ("WS", "/v1/runs/ws")


def test_sbx_sessions_exec_and_cp(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = sbx(capsys, "create", "--policy", "judge", "busybox")
    cid = out.strip()
    assert (code, cid) == (0, "c1")
    code, out, _ = sbx(capsys, "ps")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["ID", "IMAGE", "POLICY"]
    assert out.splitlines()[1].split()[:3] == ["c1", "busybox", "judge"]
    assert sbx(capsys, "exec", cid, "--", "echo", "hi") == (0, "hi\n", "")
    assert sbx(capsys, "exec", cid)[0] == 125
    src = tmp_path / "in.bin"
    src.write_bytes(b"\x00payload")
    assert sbx(capsys, "cp", str(src), f"{cid}:/data/in.bin")[0] == 0
    assert fake.files[(cid, "/data/in.bin")] == b"\x00payload"
    assert sbx(capsys, "cp", f"{cid}:/data/in.bin", str(tmp_path))[0] == 0
    assert (tmp_path / "in.bin").read_bytes() == b"\x00payload"
    assert sbx(capsys, "cp", f"{cid}:/data/in.bin", str(tmp_path / "copy"))[0] == 0
    assert (tmp_path / "copy").read_bytes() == b"\x00payload"
    code, _, err = sbx(capsys, "cp", str(src), str(tmp_path / "x"))
    assert code == 125 and "LOCAL ID:/PATH" in err
    assert sbx(capsys, "rm", cid, "c9") == (125, "c1\n", "sbx: c9: no container c9; list "
                                                         "them with sbx ps\n")


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
          link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    return info


def test_sbx_cp_unpacks_a_directory_or_keeps_the_tar(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fake.containers["c1"] = {}
    fake.tars["/dir"] = _tar((_info("dir", tarfile.DIRTYPE, 0o755), None),
                             (_info("dir/run.sh", mode=0o4777), b"#!/bin/sh\n"),
                             (_info("dir/sub/", tarfile.DIRTYPE, 0o500), None),
                             (_info("dir/sub/f"), b"f"),
                             (_info("dir/link", tarfile.SYMTYPE, link="run.sh"), None),
                             (_info("dir/hard", tarfile.LNKTYPE, link="dir/sub/f"), None))
    code, _, err = sbx(capsys, "cp", "c1:/dir", str(tmp_path / "out"))
    assert code == 0 and "6 entries" in err
    out = tmp_path / "out" / "dir"
    assert (out / "run.sh").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE((out / "run.sh").stat().st_mode) == 0o755  # no setuid, no o+w
    assert os.readlink(out / "link") == "run.sh"
    assert (out / "hard").read_bytes() == b"f"
    assert stat.S_IMODE((out / "sub").stat().st_mode) == 0o700
    assert sbx(capsys, "cp", "--tar", "c1:/dir", str(tmp_path / "d.tar"))[0] == 0
    assert (tmp_path / "d.tar").read_bytes() == fake.tars["/dir"]


@pytest.mark.parametrize(("members", "reason"), [
    ([(_info("ok.txt"), b"ok"), (_info("../escape.txt"), b"x")], "climbs out"),
    ([(_info("a/../../escape.txt"), b"x")], "climbs out"),
    ([(_info("/etc/escape.txt"), b"x")], "absolute path"),
    ([(_info("l", tarfile.SYMTYPE, link="/etc"), None)], "absolute path '/etc'"),
    ([(_info("d/l", tarfile.SYMTYPE, link="../../etc"), None)], "leads outside"),
    # Through an earlier link (issue #10): d -> . makes d/../x the parent of dest.
    ([(_info("d", tarfile.SYMTYPE, link="."), None), (_info("d/../x"), b"x")], "climbs out"),
    ([(_info("d", tarfile.SYMTYPE, link="."), None),
      (_info("l", tarfile.SYMTYPE, link="d/../escape.txt"), None)], "leads outside"),
    # ... or through a later one: what counts is the tree once everything is unpacked.
    ([(_info("l", tarfile.SYMTYPE, link="d/../escape.txt"), None),
      (_info("d", tarfile.SYMTYPE, link="."), None)], "leads outside"),
    ([(_info("a", tarfile.SYMTYPE, link="b/c"), None),
      (_info("b", tarfile.SYMTYPE, link="sub/.."), None),
      (_info("sub", tarfile.DIRTYPE), None), (_info("c", tarfile.SYMTYPE, link=".."), None)],
     "leads outside"),
    ([(_info("x", tarfile.SYMTYPE, link="y"), None),
      (_info("y", tarfile.SYMTYPE, link="x/.."), None)], "loops"),
    ([(_info("d", tarfile.SYMTYPE, link="."), None), (_info("d/x"), b"x")],
     "goes through the link 'd'"),
    ([(_info("d", tarfile.SYMTYPE, link="sub"), None),
      (_info("d", tarfile.SYMTYPE, link=".."), None)], "would replace the link 'd'"),
    ([(_info("f"), b"f"), (_info("f/x"), b"x")], "goes through the file 'f'"),
    ([(_info("h", tarfile.LNKTYPE, link="d/passwd"), None)], "not to a file earlier"),
    ([(_info("f"), b"f"), (_info("d", tarfile.SYMTYPE, link="."), None),
      (_info("h", tarfile.LNKTYPE, link="d/f"), None)], "not to a file earlier"),
    ([(_info("h", tarfile.LNKTYPE, link="/etc/passwd"), None)], "absolute path"),
    ([(_info("h", tarfile.LNKTYPE, link="later"), None), (_info("later"), b"")],
     "not to a file earlier"),
    ([(_info("fifo", tarfile.FIFOTYPE), None)], "device or FIFO"),
    ([(_info("null", tarfile.CHRTYPE), None)], "device or FIFO"),
])
def test_extract_refuses_hostile_archives_before_writing(
        tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]],
        reason: str) -> None:
    dest = tmp_path / "a" / "b"
    with pytest.raises(CliError, match=reason):
        extract_tar(_tar(*members), dest)
    assert not dest.exists() and not (tmp_path / "a" / "escape.txt").exists()


def test_extract_never_writes_through_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "up").symlink_to(outside)  # already there, or from the archive
    for members, reason in (([(_info("up/y"), b"y")], "goes through the link 'up'"),
                            ([(_info("l", tarfile.SYMTYPE, link="up/y"), None)],
                             "goes through 'up'"),
                            ([(_info("up", tarfile.SYMTYPE, link="."), None)],
                             "would replace the link 'up'")):
        with pytest.raises(CliError, match=reason):
            extract_tar(_tar(*members), tmp_path / "dest")
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["up"]


def test_extract_keeps_links_that_stay_inside(tmp_path: Path) -> None:
    """Links through links and '..' are fine while they resolve inside (a merged /usr)."""
    data = _tar((_info("r", tarfile.DIRTYPE, 0o755), None),
                (_info("r/usr/bin", tarfile.DIRTYPE, 0o755), None),
                (_info("r/bin", tarfile.SYMTYPE, link="usr/bin"), None),
                (_info("r/usr/bin/busybox", mode=0o755), b"elf"),
                (_info("r/usr/bin/sh", tarfile.SYMTYPE, link="busybox"), None),
                (_info("r/usr/bin/up", tarfile.SYMTYPE, link="../../bin/sh"), None),
                (_info("r/root", tarfile.SYMTYPE, link=".."), None),
                (_info("r/dangling", tarfile.SYMTYPE, link="nowhere/../../.."), None))
    assert extract_tar(io.BytesIO(data), tmp_path / "out") == 8
    out = tmp_path / "out" / "r"
    assert (out / "usr/bin/up").read_bytes() == b"elf"
    assert os.readlink(out / "root") == ".." and (out / "bin").resolve() == out / "usr/bin"
    # The same archive again over what it unpacked: the same links are no change.
    assert extract_tar(data, tmp_path / "out") == 8


def test_sbx_cp_of_a_copy_cut_short_writes_nothing(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fake.containers["c1"] = {}
    fake.tars["/big"] = _tar((_info("big"), os.urandom(64 << 10)))
    fake.cut.add("/big")
    code, _, err = sbx(capsys, "cp", "c1:/big", str(tmp_path / "out"))
    assert code == 125 and "stopped partway" in err
    assert not (tmp_path / "out").exists()
    with SyncClient(fake.url) as c, pytest.raises(ApiError, match="stopped partway") as e:
        c.get_file("c1", "/big")
    assert e.value.code == "incomplete"


def test_sbx_cp_refuses_a_tar_with_dotdot_entries(
        fake: Fake, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fake.containers["c1"] = {}
    fake.tars["/evil"] = _tar((_info("ok.txt"), b"ok"), (_info("../escape.txt"), b"x"))
    code, _, err = sbx(capsys, "cp", "c1:/evil", str(tmp_path / "dest"))
    assert code == 125 and "sbx: refusing the archive: entry '../escape.txt'" in err
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "dest").exists()


def test_sbx_image_commands(fake: Fake, capsys: pytest.CaptureFixture[str],
                            tmp_path: Path) -> None:
    code, out, err = sbx(capsys, "pull", "busybox:latest")
    assert (code, out) == (0, DIGEST + "\n")
    assert err.splitlines() == ["cdcdcdcdcdcd: downloading  [>                             ] "
                                "0 B/300 B",
                                "cdcdcdcdcdcd: done         [==============================] "
                                "300 B/300 B"]
    code, out, _ = sbx(capsys, "images")
    rows = [line.split() for line in out.splitlines()]
    assert code == 0 and [r[0] for r in rows] == ["NAME", "busybox:latest", "bb:1"]
    assert rows[1][1:4] == [DIGEST[:19], "2.0", "MiB"]
    assert orjson.loads(sbx(capsys, "images", "--json")[1])[0]["digest"] == DIGEST
    assert sbx(capsys, "rmi", "busybox:latest") == (0, "removed busybox:latest\n", "")
    code, _, err = sbx(capsys, "rmi", "in-use:1")
    assert code == 125 and "remove it or force" in err
    assert sbx(capsys, "push", "busybox:latest", "127.0.0.1:5000/bb:1")[:2] == (0, DIGEST + "\n")
    assert fake.bodies("/v1/images/push")[-1] == {"source": "busybox:latest",
                                                  "target": "127.0.0.1:5000/bb:1"}
    tar = tmp_path / "rootfs.tar"
    tar.write_bytes(_tar((_info("bin/sh", mode=0o755), b"#!")))
    assert sbx(capsys, "import", str(tar), "mine:1")[:2] == (0, DIGEST + "\n")
    assert fake.bodies("/v1/images/import")[-1] == {"reference": "mine:1",
                                                    "size": tar.stat().st_size,
                                                    "type": "application/x-tar"}
    assert sbx(capsys, "import", str(tmp_path / "none.tar"), "x:1")[0] == 125
    code, out, _ = sbx(capsys, "info")
    assert code == 0 and orjson.loads(out)["version"] == "0.1.0"
