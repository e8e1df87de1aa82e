"""POST /v1/batches end to end (issue #13 point 2): many cases of one program, each its own
run, results as NDJSON in the order they finish and a summary; the whole batch checked
before any case runs; stop_on_failure; cached files shared by the cases; each tenant's
files its own; a client that goes away takes its cases with it; the Python client and
`sbx batch`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import msgspec
import orjson
import psutil
import pytest

from sbx import Case, CaseDone, FromCache, SyncClient
from sbx.cli import main as sbx_main
from service.results import RunResult
from tests.service.conftest import (
    JUDGE_WALL_MAX,
    LIMITED_TOKEN,
    MAIN_TOKEN,
    Service,
)
from tests.service.own_service import OwnService, own_service

LIMITED = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
OCTETS = {"Content-Type": "application/octet-stream"}
PATH = {"PATH": "/bin"}
UNKNOWN = "sha256:" + "0" * 64
RESULT_FIELDS = {f.name for f in msgspec.structs.fields(RunResult) if f.required}
# Bounds the waits for what must happen (a run killed, a process gone): no speed is judged.
SETTLE_S = 30


def _sh(image: str, script: str, cases: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"image": image, "cmd": ["sh", "-c", script], "env": PATH, "cases": cases, **kw}


async def _batch(s: aiohttp.ClientSession, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """The status and, for a 200, the events (else the error body)."""
    async with s.post("/v1/batches", json=body, headers=headers) as r:
        if r.status != 200:
            return r.status, await r.json()
        assert r.content_type == "application/x-ndjson"
        return 200, [orjson.loads(line) for line in (await r.read()).splitlines()]


def _cases(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    assert events[-1]["event"] == "summary", events[-1]
    cases = [e for e in events[:-1] if e["event"] == "case"]
    assert len(cases) == len(events) - 1, events
    by_index = {e["index"]: e for e in cases}
    assert len(by_index) == len(cases), "a case was reported twice"
    return by_index


def _metric(url: str, name: str, token: str | None = MAIN_TOKEN) -> float:
    req = urllib.request.Request(url + "/metrics", headers={
        "Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(
        rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def _id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def _put(s: aiohttp.ClientSession, data: bytes,
               headers: dict[str, str] | None = None) -> str:
    async with s.post("/v1/files", data=data, headers={**OCTETS, **(headers or {})}) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["id"])


def _running(pid: int, marker: str) -> list[psutil.Process]:
    """The service's descendants whose last argument is `marker`."""
    found = []
    for p in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.cmdline()[-1:] == [marker]:
                found.append(p)
    return found


def _until(what: str, check: Any) -> None:
    deadline = time.monotonic() + SETTLE_S
    while not check():
        assert time.monotonic() < deadline, f"not within {SETTLE_S} s: {what}"
        time.sleep(0.05)


def test_every_case_gets_its_own_stdin_and_output(service: Service, images: Any) -> None:
    n = 40
    body = _sh(images.oci, 'read x; echo "$CASE_NAME $((x * 2))"',
               [{"id": f"t{i}", "stdin": f"{i}\n", "env": {"CASE_NAME": f"case{i}"}}
                for i in range(n)], policy="judge", parallelism=4)

    async def go(s: aiohttp.ClientSession) -> None:
        status, events = await _batch(s, body)
        assert status == 200, events
        cases = _cases(events)
        assert sorted(cases) == list(range(n))
        for i, e in cases.items():
            assert e["id"] == f"t{i}"
            assert set(e["result"]) == RESULT_FIELDS, e
            assert e["result"]["status"] == "ok", e
            assert e["result"]["stdout"] == f"case{i} {2 * i}\n", e
            assert e["elapsed_ms"] >= e["result"]["wall_ms"], e  # its time in the service
        summary = events[-1]
        assert {k: summary[k] for k in ("cases", "ran", "errors", "skipped", "by_status",
                                        "parallelism", "stopped")} == {
            "cases": n, "ran": n, "errors": 0, "skipped": 0, "by_status": {"ok": n},
            "parallelism": 4, "stopped": False}
        assert summary["wall_ms"] > 0

    service.call(go)


def test_cases_come_back_in_the_order_they_finish(service: Service, images: Any) -> None:
    """Case 0 never ends by itself (its wall limit ends it); the others finish first and
    are not held back behind it."""
    cases: list[dict[str, Any]] = [{"cmd": ["sleep", "1000"], "limits": {"wall_ms": 5000}},
                                   *({"stdin": f"{i}\n"} for i in range(1, 6))]
    body = _sh(images.oci, "cat", cases, policy="judge", parallelism=2)

    async def go(s: aiohttp.ClientSession) -> None:
        status, events = await _batch(s, body)
        assert status == 200, events
        order = [e["index"] for e in events[:-1]]
        assert order[-1] == 0 and sorted(order) == list(range(6)), order
        results = _cases(events)
        assert results[0]["result"]["status"] == "wall_limit"
        assert all(results[i]["result"]["stdout"] == f"{i}\n" for i in range(1, 6))
        assert events[-1]["by_status"] == {"ok": 5, "wall_limit": 1}

    service.call(go)


def test_stop_on_failure_starts_no_case_after_a_failure(service: Service,
                                                        images: Any) -> None:
    script = 'read x; [ "$x" != fail ]'
    stdins = ["a", "b", "fail", "c", "d"]

    async def go(s: aiohttp.ClientSession) -> None:
        status, events = await _batch(s, _sh(
            images.oci, script, [{"stdin": f"{x}\n"} for x in stdins], policy="judge",
            parallelism=1, stop_on_failure=True))
        assert status == 200, events
        assert [e["index"] for e in events[:-1]] == [0, 1, 2]
        assert events[2]["result"]["status"] == "nonzero_exit"
        summary = events[-1]
        assert (summary["ran"], summary["skipped"], summary["stopped"]) == (3, 2, True)
        assert summary["by_status"] == {"ok": 2, "nonzero_exit": 1}

        # In parallel: every case before the failing one still ran (they start in order).
        status, events = await _batch(s, _sh(
            images.oci, script, [{"stdin": f"{x}\n"} for x in stdins * 4], policy="judge",
            parallelism=2, stop_on_failure=True))
        assert status == 200, events
        assert {0, 1, 2} <= set(_cases(events)), events
        assert events[-1]["stopped"] is True and events[-1]["skipped"] > 0

        # Without it, the batch goes on.
        status, events = await _batch(s, _sh(
            images.oci, script, [{"stdin": f"{x}\n"} for x in stdins], policy="judge"))
        assert events[-1]["ran"] == 5 and events[-1]["stopped"] is False

    service.call(go)


def test_a_bad_case_is_refused_before_any_case_runs(service: Service, images: Any) -> None:
    good = {"stdin": "x\n"}
    runs_before = _metric(service.url, "sandboxd_runs_total")

    async def refused(s: aiohttp.ClientSession, cases: list[dict[str, Any]],
                      **kw: Any) -> dict[str, Any]:
        status, body = await _batch(s, _sh(images.oci, "cat", cases, policy="judge", **kw))
        assert status in (400, 404), body
        return dict(body["error"])

    async def go(s: aiohttp.ClientSession) -> None:
        many = [good] * 200
        err = await refused(s, [*many, {"stdin": "a", "stdin_base64": "YQ=="}])
        assert err["field"] == "cases[200].stdin_base64", err
        err = await refused(s, [*many, {"stdin_base64": "not base64!"}])
        assert err["field"] == "cases[200].stdin_base64", err
        assert err["message"].startswith("cases[200].stdin_base64: ")
        err = await refused(s, [good, {"limits": {"wall_ms": JUDGE_WALL_MAX + 1}}])
        assert err["field"] == "cases[1].limits.wall_ms", err
        assert str(JUDGE_WALL_MAX) in err["message"]
        err = await refused(s, [good, {"files": [{"path": "/tmp/x", "file_id": UNKNOWN}]}])
        assert err["field"] == "cases[1].files[0].file_id", err
        err = await refused(s, [good, {"files": [{"path": "tmp/x", "content": ""}]}])
        assert err["field"] == "cases[1].files[0].path", err
        err = await refused(s, [good, {"shell": "bash"}])
        assert err["field"] == "cases[1].shell", err
        err = await refused(s, [])
        assert err["field"] == "cases", err
        # The shared part is blamed as itself.
        err = await refused(s, [good], limits={"wall_ms": JUDGE_WALL_MAX + 1})
        assert err["field"] == "limits.wall_ms", err
        err = await refused(s, [good], files=[{"path": "/tmp/x", "file_id": UNKNOWN}])
        assert err["field"] == "files[0].file_id", err
        status, body = await _batch(s, {**_sh(images.oci, "cat", [good] * 3),
                                         "image": f"{service.registry_host}/batches/none:1"})
        assert (status, body["error"]["field"]) == (404, "image"), body

    service.call(go)
    assert _metric(service.url, "sandboxd_runs_total") == runs_before  # nothing ran


def test_cases_share_cached_files_and_bring_their_own(service: Service,
                                                      images: Any) -> None:
    program = b'#!/bin/sh\nread n\necho "$(cat /tmp/data/greeting) $n"\n'

    async def go(s: aiohttp.ClientSession) -> None:
        prog, hello, bye = (await _put(s, program), await _put(s, b"hello"),
                            await _put(s, b"bye"))
        status, events = await _batch(s, {
            "image": images.oci, "cmd": ["/tmp/prog"], "env": PATH, "policy": "judge",
            "files": [{"path": "/tmp/prog", "file_id": prog, "mode": 0o755},
                      {"path": "/tmp/data/greeting", "file_id": hello}],
            "cases": [{"stdin": "1\n"}, {"stdin": "2\n"},
                      {"stdin": "3\n", "files": [{"path": "/tmp/data/greeting", "file_id": bye}]},
                      {"stdin": "4\n", "files": [{"path": "/tmp/data/greeting",
                                                  "content": "inline"}]}]})
        assert status == 200, events
        assert all("result" in e for e in events[:-1]), events
        out = {i: e["result"]["stdout"] for i, e in _cases(events).items()}
        assert out == {0: "hello 1\n", 1: "hello 2\n", 2: "bye 3\n", 3: "inline 4\n"}

    service.call(go)


def test_a_tenant_cannot_use_another_tenants_files_in_a_batch(service: Service,
                                                              images: Any) -> None:
    data = b"the main tenant's secret " + os.urandom(16).hex().encode()

    async def go(s: aiohttp.ClientSession) -> None:
        file_id = await _put(s, data)
        assert file_id == _id(data)
        for shared, case, field in (
                ([{"path": "/tmp/s", "file_id": file_id}], {}, "files[0].file_id"),
                ([], {"files": [{"path": "/tmp/s", "file_id": file_id}]},
                 "cases[0].files[0].file_id")):
            answers = []
            for fid in (file_id, UNKNOWN):
                body = _sh(images.oci, "cat /tmp/s", [case], files=shared)
                text = orjson.dumps(body).decode().replace(file_id, fid)
                status, err = await _batch(s, orjson.loads(text), LIMITED)
                answers.append((status, err))
            (theirs, their_err), (unknown, unknown_err) = answers
            assert theirs == unknown == 404, answers
            assert their_err["error"]["field"] == field, their_err
            assert their_err["error"]["message"].replace(file_id, UNKNOWN) == \
                unknown_err["error"]["message"]
        # Its owner's batch takes it.
        status, events = await _batch(s, _sh(images.oci, "cat /tmp/s", [{}], files=[
            {"path": "/tmp/s", "file_id": file_id}]))
        assert status == 200 and events[0]["result"]["stdout"] == data.decode(), events

    service.call(go)


def test_a_tokens_allowance_caps_the_parallelism(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        status, events = await _batch(s, _sh(images.oci, "true", [{}] * 3, parallelism=8),
                                      LIMITED)
        assert status == 200, events
        assert events[-1]["parallelism"] == 1 and events[-1]["ran"] == 3  # max_concurrent_runs
        status, events = await _batch(s, _sh(images.oci, "true", [{}] * 3, parallelism=8))
        assert events[-1]["parallelism"] == 3  # no more than there are cases
        status, events = await _batch(s, _sh(images.oci, "true", [{}] * 64))
        cpus = len(psutil.Process(service.proc.pid).cpu_affinity() or [])
        assert events[-1]["parallelism"] == cpus  # by default, one case per CPU

    service.call(go)


def test_a_case_waits_for_room_rather_than_fail(service: Service, images: Any) -> None:
    """The limited token's one run at a time is taken by a run of its own: the batch's
    cases wait for it (a plain run would get 429), then all run."""
    script = f"sleep 3; : {os.urandom(4).hex()}"  # sh's last argument: ours alone

    async def go(s: aiohttp.ClientSession) -> None:
        run = asyncio.ensure_future(s.post("/v1/runs", headers=LIMITED, json={
            "image": images.oci, "cmd": ["sh", "-c", script], "env": PATH}))
        await asyncio.to_thread(_until, "the token's run started",
                                lambda: _running(service.proc.pid, script))
        async with s.post("/v1/runs", headers=LIMITED, json={"image": images.oci}) as r:
            assert r.status == 429  # the token's allowance is in use
        status, events = await _batch(s, _sh(images.oci, "true", [{}] * 3), LIMITED)
        assert status == 200, events
        assert events[-1]["by_status"] == {"ok": 3} and events[-1]["errors"] == 0, events
        async with await run as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"

    service.call(go)


def test_a_client_that_goes_away_leaves_nothing_running(service: Service,
                                                        images: Any) -> None:
    marker = str(900_000 + int.from_bytes(os.urandom(2)))  # sleep's argument: ours alone
    body = _sh(images.oci, "true", [{"cmd": ["sleep", marker]}] * 6, policy="judge",
               parallelism=2, limits={"wall_ms": JUDGE_WALL_MAX})

    async def go() -> None:
        async with aiohttp.ClientSession(service.url, headers=service.headers()) as s:
            r = await s.post("/v1/batches", json=body)
            assert r.status == 200
            await asyncio.to_thread(_until, "two cases running",
                                    lambda: len(_running(service.proc.pid, marker)) == 2)
            r.close()  # the client goes, mid-batch

    asyncio.run(go())
    _until("the cases killed", lambda: not _running(service.proc.pid, marker))
    _until("their slots given back",
           lambda: _metric(service.url, "sandboxd_runs_running") == 0)
    time.sleep(1)  # the next cases would have started by now, were they not cancelled
    assert not _running(service.proc.pid, marker)


def test_the_python_client_and_sbx_batch(service: Service, images: Any,
                                         tmp_path: Any, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with SyncClient(service.url, MAIN_TOKEN) as c:
        script = c.put_cached_file(b'read x; echo "got $x"; [ "$x" != 3 ]\n')["id"]
        events = list(c.batch(images.oci, [Case(f"c{i}", stdin=f"{i}\n") for i in range(5)],
                              ["sh", "/tmp/s"], files=[FromCache("/tmp/s", script)], env=PATH,
                              policy="judge"))
    done = {e.index: e for e in events if isinstance(e, CaseDone)}
    assert {i: (d.id, d.result.stdout if d.result else None) for i, d in done.items()} == {
        i: (f"c{i}", f"got {i}\n") for i in range(5)}
    assert done[3].result is not None and done[3].result.status == "nonzero_exit"
    summary = events[-1]
    assert not isinstance(summary, CaseDone)
    assert (summary.cases, summary.ran, summary.by_status) == (5, 5, {"ok": 4,
                                                                       "nonzero_exit": 1})

    body = tmp_path / "batch.json"
    body.write_bytes(orjson.dumps(_sh(images.oci, 'read x; [ "$x" != 1 ]',
                                      [{"id": "a", "stdin": "0\n"}, {"id": "b", "stdin": "1\n"}],
                                      policy="judge")))
    args = ["--url", service.url, "--token", MAIN_TOKEN, "batch"]
    assert sbx_main([*args, str(body)]) == 1  # case b failed
    out, err = capsys.readouterr()
    lines = sorted(out.splitlines())
    assert [line.split("\t")[:3] for line in lines] == [["0", "a", "ok"],
                                                         ["1", "b", "nonzero_exit"]], out
    assert "2 cases: 1 nonzero_exit, 1 ok" in err, err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(body.read_bytes())))
    assert sbx_main([*args, "--json", "-"]) == 1
    events = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["case", "case", "summary"]
    assert sbx_main([*args, str(tmp_path / "missing.json")]) == 125


# A service of this module's own: a small case cap, two runs at once, two tenants.

CASE_CAP = 20
TOKEN_A = "batches-tenant-a-0123456789"
TOKEN_B = "batches-tenant-b-0123456789"


@pytest.fixture(scope="module")
def small(registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[OwnService]:
    config = f"""
[[tokens]]
token = "{TOKEN_A}"
name = "a"

[[tokens]]
token = "{TOKEN_B}"
name = "b"

[registries."{registry.host}"]

[limits]
batch_cases = {CASE_CAP}
max_running = 2
"""
    with own_service(tmp_path_factory.mktemp("sandboxd-batches"), config) as svc:
        yield svc


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_more_cases_than_the_service_takes_is_a_400_naming_the_setting(
        small: OwnService, images: Any) -> None:
    runs_before = small.metric("sandboxd_runs_total", TOKEN_A)

    async def go() -> None:
        async with aiohttp.ClientSession(small.url, headers=_as(TOKEN_A)) as s:
            status, body = await _batch(s, _sh(images.oci, "true", [{}] * (CASE_CAP + 1)))
            assert status == 400, body
            assert body["error"]["field"] == "cases", body
            assert "limits.batch_cases" in body["error"]["message"], body
            status, events = await _batch(s, _sh(images.oci, "true", [{}] * CASE_CAP))
            assert status == 200 and events[-1]["ran"] == CASE_CAP, events

    asyncio.run(go())
    assert small.metric("sandboxd_runs_total", TOKEN_A) == runs_before + CASE_CAP


def test_a_batch_takes_a_slot_per_case_not_the_service(small: OwnService,
                                                       images: Any) -> None:
    """Tenant A's batch fills both of the service's run slots; tenant B's run, sent while
    it goes on, gets the next free slot rather than waiting for the whole batch."""
    script = f"sleep 0.5; : {os.urandom(4).hex()}"

    async def go() -> None:
        async with aiohttp.ClientSession(small.url) as s:
            a = await s.post("/v1/batches", headers=_as(TOKEN_A), json=_sh(
                images.oci, script, [{}] * CASE_CAP, parallelism=2))
            assert a.status == 200
            events: list[dict[str, Any]] = []

            async def read_a() -> None:
                async for line in a.content:
                    events.append(orjson.loads(line))

            reading = asyncio.ensure_future(read_a())
            await asyncio.to_thread(_until, "A's cases running",
                                    lambda: len(_running(small.pid, script)) == 2)
            async with s.post("/v1/runs", headers=_as(TOKEN_B), json={
                    "image": images.oci, "cmd": ["true"]}) as r:
                assert r.status == 200 and (await r.json())["status"] == "ok"
            # B was answered while A's batch still had cases to run.
            assert not reading.done() and len(events) < CASE_CAP, events
            await reading
            a.release()
        assert events[-1]["ran"] == CASE_CAP, events[-1]

    asyncio.run(go())
