"""POST /v1/runs end to end: JSON results, NDJSON and SSE parsed as a client would, pools."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import msgspec
import orjson

from service.results import RunResult
from tests.service.conftest import Service

# The fields of every result (copy_out's come only when asked for: test_api_filecache).
RESULT_FIELDS = {f.name for f in msgspec.structs.fields(RunResult) if f.required}


def sh(image: str, script: str, **kw: Any) -> dict[str, Any]:
    return {"image": image, "cmd": ["sh", "-c", script], "env": {"PATH": "/bin"}, **kw}


async def run(s: aiohttp.ClientSession, body: dict[str, Any], **kw: Any) -> tuple[int, Any]:
    async with s.post("/v1/runs", json=body, **kw) as r:
        return r.status, await r.json()


def test_a_run_returns_its_output_and_figures(service: Service, images: Any) -> None:
    status, body = service.call(lambda s: run(s, sh(images.oci, "echo hello; echo err >&2")))
    assert status == 200, body
    assert set(body) == RESULT_FIELDS
    assert body["stdout"] == "hello\n" and body["stderr"] == "err\n"
    assert body["status"] == "ok" and body["exit_code"] == 0 and body["signal"] is None
    assert body["image"].startswith("sha256:") and isinstance(body["pool_hit"], bool)
    assert body["wall_ms"] > 0 and {"cpu", "memory"} <= set(body["measured_by"])


def test_stdin_files_env_and_cwd_reach_the_program(service: Service, images: Any) -> None:
    req = sh(images.oci, 'cat /work/a.txt /work/b.bin; stat -c %a /work/b.bin; cat; '
                         'echo "$GREETING"; pwd',
             stdin="from stdin\n", env={"PATH": "/bin", "GREETING": "hi there"}, cwd="/work",
             files=[{"path": "/work/a.txt", "content": "text file\n"},
                    {"path": "/work/b.bin", "content_base64": base64.b64encode(
                        b"binary\n").decode(), "mode": 0o600}])
    status, body = service.call(lambda s: run(s, req))
    assert status == 200, body
    assert body["stdout"] == "text file\nbinary\n600\nfrom stdin\nhi there\n/work\n", body


def test_output_encodings(service: Service, images: Any) -> None:
    script = r"printf 'ok\377\n'"
    _, utf8 = service.call(lambda s: run(s, sh(images.oci, script)))
    assert utf8["stdout"] == "ok\ufffd\n"
    _, b64 = service.call(lambda s: run(s, sh(images.oci, script, output_encoding="base64")))
    assert base64.b64decode(b64["stdout"]) == b"ok\xff\n"
    _, stdin = service.call(lambda s: run(s, sh(
        images.oci, "cat", stdin_base64=base64.b64encode(b"\0\1\2").decode(),
        output_encoding="base64")))
    assert base64.b64decode(stdin["stdout"]) == b"\0\1\2"


def test_verdicts_come_through(service: Service, images: Any) -> None:
    _, failed = service.call(lambda s: run(s, sh(images.oci, "exit 3")))
    assert failed["status"] == "nonzero_exit" and failed["exit_code"] == 3
    _, slow = service.call(lambda s: run(s, sh(images.oci, "sleep 10",
                                               limits={"wall_ms": 300})))
    assert slow["status"] == "wall_limit"
    _, flood = service.call(lambda s: run(s, sh(images.oci, "yes",
                                                limits={"output_bytes": 1000})))
    assert flood["status"] == "output_limit" and flood["stdout_truncated"] is True
    assert len(flood["stdout"]) == 1000


def _events_ndjson(raw: bytes) -> list[dict[str, Any]]:
    lines = raw.split(b"\n")
    assert lines[-1] == b"", "the stream ends with a newline"
    return [orjson.loads(line) for line in lines[:-1]]


def test_ndjson_streams_output_then_the_exit_event(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> tuple[str, list[dict[str, Any]]]:
        async with s.post("/v1/runs", json=sh(images.oci, "echo one; echo two >&2; exit 4"),
                          headers={"Accept": "application/x-ndjson"}) as r:
            assert r.status == 200
            return r.content_type, _events_ndjson(await r.read())
    ctype, events = service.call(go)
    assert ctype == "application/x-ndjson"
    out = "".join(e["data"] for e in events if e["event"] == "stdout")
    err = "".join(e["data"] for e in events if e["event"] == "stderr")
    assert (out, err) == ("one\n", "two\n")
    exit_ = events[-1]
    assert exit_["event"] == "exit" and exit_["status"] == "nonzero_exit"
    assert exit_["exit_code"] == 4 and "stdout" not in exit_ and "stderr" not in exit_
    assert set(exit_) == RESULT_FIELDS - {"stdout", "stderr"} | {"event"}


def test_ndjson_output_arrives_before_the_run_ends(service: Service, images: Any) -> None:
    """The first line is readable while the program still waits on its stdin... which is
    closed, so it waits on a sleep the test does not outlast: the line must come first."""
    async def go(s: aiohttp.ClientSession) -> tuple[dict[str, Any], dict[str, Any]]:
        async with s.post("/v1/runs", json=sh(images.oci, "echo early; sleep 2; echo late"),
                          headers={"Accept": "application/x-ndjson"}) as r:
            first = orjson.loads(await r.content.readline())
            rest = _events_ndjson(await r.read())
            return first, rest[-1]
    first, last = service.call(go)
    assert first == {"event": "stdout", "data": "early\n"}
    assert last["event"] == "exit" and last["status"] == "ok"


def test_sse_gives_the_same_events(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> tuple[str, bytes]:
        async with s.post("/v1/runs", json=sh(images.oci, "echo hi"),
                          headers={"Accept": "text/event-stream"}) as r:
            return r.content_type, await r.read()
    ctype, raw = service.call(go)
    assert ctype == "text/event-stream"
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields["event"], orjson.loads(fields["data"])))
    assert events[0] == ("stdout", {"data": "hi\n"})
    assert events[-1][0] == "exit" and events[-1][1]["status"] == "ok"


def test_errors_before_the_stream_starts_are_plain_json(service: Service, images: Any) -> None:
    missing = f"{service.registry_host}/test/nothing-here:1"

    async def go(s: aiohttp.ClientSession) -> tuple[int, str, Any]:
        async with s.post("/v1/runs", json=sh(missing, "true"),
                          headers={"Accept": "application/x-ndjson"}) as r:
            return r.status, r.content_type, await r.json()
    status, ctype, body = service.call(go)
    assert status == 404 and ctype == "application/json"
    assert body["error"]["code"] == "not_found" and body["error"]["field"] == "image"
    assert "nothing-here" in body["error"]["message"]


def test_a_warm_judge_container_is_hit_and_counted(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> tuple[dict[str, Any], str]:
        req = sh(images.v2s2, "echo warm", policy="judge")
        status, first = await run(s, req)
        assert status == 200, first
        for _ in range(200):  # until the pool holds an idle container (refilled off-path)
            async with s.get("/v1/info") as r:
                pools = (await r.json())["pools"]
            if any(p["image"] == first["image"] and p["policy"] == "judge" and p["idle"]
                   for p in pools):
                break
            await asyncio.sleep(0.05)
        _, second = await run(s, req)
        async with s.get("/metrics") as r:
            return second, await r.text()
    second, metrics = service.call(go)
    assert second["pool_hit"] is True and second["stdout"] == "warm\n"
    hits = [line for line in metrics.splitlines() if line.startswith("sandboxd_pool_hits_total")]
    assert hits and float(hits[0].split()[-1]) >= 1


def test_a_writable_root_is_never_reused(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> list[dict[str, Any]]:
        out = []
        for _ in range(3):
            out.append((await run(s, sh(images.oci, "cat /left 2>/dev/null; echo x > /left",
                                        policy="default", user="0")))[1])
            await asyncio.sleep(0.1)
        return out
    results = service.call(go)
    assert all(r["status"] == "ok" and r["stdout"] == "" for r in results), results
