"""Faults that kill processes, seen through the API of a `sandboxd serve` of the test's own:
the spawner SIGKILLed while idle (/readyz says degraded, runs get 503 runtime_restarting
with Retry-After, never a 500, until a new spawner serves), the spawner and a container's
init SIGKILLed mid-run (that run's error, then the service serves on), and the whole
service SIGKILLed mid-run and started again on the same state directory (it serves, the
store verifies, nothing of the old instance is left).

Waits are bounded by WAIT_S only so that a hung service fails instead of hanging the suite:
they are not figures."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.service.conftest import start_service, stop, wait_ready
from tests.service.own_service import OwnService, own_service
from tests.service.test_api_crash import _cgroup_dirs, _mounts_under, _processes
from tests.support.stores import state_problems

CONFIG = """
[server]
shutdown_deadline_s = 2

[pools]
min_idle = 1
max_idle = 2
"""
WAIT_S = 60


def _request(url: str, method: str, path: str, body: Any = None,
             raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    """One request (a JSON body, or `raw` bytes); the status, headers and JSON answer."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
    kind = "application/json" if raw is None else "application/octet-stream"
    try:
        conn.request(method, path, body=raw if raw is not None else
                     None if body is None else json.dumps(body),
                     headers={"Content-Type": kind})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read() or b"null")
    finally:
        conn.close()


@contextlib.contextmanager
def _sent(url: str, method: str, path: str, body: Any = None) -> Iterator[
        http.client.HTTPResponse]:
    """A request written to the service's socket now (the kernel takes it even while the
    service is stopped); its response, for `_answer` to read later."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    data = b"" if body is None else json.dumps(body).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    sock.sendall(head + data)
    resp = http.client.HTTPResponse(sock)
    try:
        yield resp
    finally:
        resp.close()
        sock.close()


def _answer(resp: http.client.HTTPResponse) -> tuple[int, dict[str, str], Any]:
    resp.begin()
    return resp.status, dict(resp.getheaders()), json.loads(resp.read() or b"null")


def _spawner(service_pid: int) -> psutil.Process:
    (found,) = [p for p in psutil.Process(service_pid).children()
                if "sandbox.runtime.spawner" in " ".join(p.cmdline())]
    return found


def _until(what: str, done: Any) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (got := done()):
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_S} s"
        time.sleep(0.02)
    return got


def _ready(svc: OwnService) -> bool:
    return _request(svc.url, "GET", "/readyz")[0] == 200


def _judge_warm(svc: OwnService, images: Any) -> set[str]:
    """A judge pool with a warm container; the ids of the containers recorded now."""
    status, _, body = _request(svc.url, "POST", "/v1/runs", {
        "image": images.oci, "cmd": ["true"], "policy": "judge"})
    assert status == 200 and body["status"] == "ok", body
    _until("a warm judge container", lambda: any(
        p["policy"] == "judge" and p["idle"] >= 1
        for p in _request(svc.url, "GET", "/v1/info")[2]["pools"]))
    return _records(svc)


def _records(svc: OwnService) -> set[str]:
    return {p.name for p in (svc.log.parent / "state" / "containers").iterdir()}


def _run_ok(svc: OwnService, images: Any) -> None:
    status, _, body = _request(svc.url, "POST", "/v1/runs", {
        "image": images.oci, "cmd": ["echo", "ok"], "policy": "judge"})
    assert (status, body["status"], body["stdout"]) == (200, "ok", "ok\n"), body


def test_a_killed_spawner_makes_the_service_degraded_until_a_new_one_serves(
        images: Any, tmp_path: Path) -> None:
    with own_service(tmp_path, CONFIG) as svc:
        old = _judge_warm(svc, images)
        spawner = _spawner(svc.pid)
        # The service stopped while its spawner dies, and the requests already queued when
        # it resumes: what they see does not depend on how soon it would have looked. (A
        # new spawner answers once a new Python has started, ~0.1 s after; these are
        # answered within the first few turns of the event loop.)
        os.kill(svc.pid, signal.SIGSTOP)
        try:
            spawner.kill()
            _until("the spawner dies", lambda: spawner.status() == psutil.STATUS_ZOMBIE)
            with _sent(svc.url, "GET", "/readyz") as ready, \
                    _sent(svc.url, "POST", "/v1/runs",
                          {"image": images.oci, "cmd": ["true"], "policy": "judge"}) as run:
                os.kill(svc.pid, signal.SIGCONT)
                status, _, body = _answer(ready)
                assert (status, body["status"]) == (503, "degraded"), body
                assert "killed by SIGKILL" in body["reason"], body
                status, headers, body = _answer(run)
                assert (status, body["error"]["code"]) == (503, "runtime_restarting"), body
                assert int(headers["Retry-After"]) >= 1, headers
        finally:
            os.kill(svc.pid, signal.SIGCONT)
        _until("ready again", lambda: _ready(svc))
        _run_ok(svc, images)
        # The dead spawner's containers: records and cgroups gone, replaced by new ones.
        _until("the old containers' records removed", lambda: not _records(svc) & old)
        assert _cgroup_dirs(old) == []
        assert _spawner(svc.pid).pid != spawner.pid
        assert svc.metric("sandboxd_spawner_deaths_total") == 1
        assert "a new spawner process" in svc.log.read_text()


def _stream_until_up(svc: OwnService, images: Any) -> Any:
    """A streamed judge run, seen running (it printed "up"); its response, to read on."""
    host, port = svc.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
    conn.request("POST", "/v1/runs", body=json.dumps({
        "image": images.oci, "cmd": ["sh", "-c", "echo up; sleep 30"], "env": {"PATH": "/bin"},
        "policy": "judge"}), headers={"Accept": "application/x-ndjson",
                                      "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    assert json.loads(resp.readline()) == {"event": "stdout", "data": "up\n"}
    return resp


def _last_event(resp: Any) -> dict[str, Any]:
    events = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    return events[-1]


def test_runs_in_flight_when_the_spawner_or_an_init_dies_end_with_an_error(
        images: Any, tmp_path: Path) -> None:
    with own_service(tmp_path, CONFIG) as svc:
        _judge_warm(svc, images)
        # The spawner, mid-run: the run's container dies with it.
        resp = _stream_until_up(svc, images)
        _spawner(svc.pid).kill()
        last = _last_event(resp)
        assert last["event"] == "error", last
        assert last["error"]["code"] == "runtime_restarting", last
        assert "the run did not finish" in last["error"]["message"], last
        _until("ready again", lambda: _ready(svc))
        _run_ok(svc, images)

        # A container's init, mid-run: only that run fails; its container is replaced.
        _judge_warm(svc, images)
        resp = _stream_until_up(svc, images)
        spawner = _spawner(svc.pid)
        # The inits are the spawner's children named so (its helpers made ahead are too);
        # the busy one has the run's process (an idle one may hold the next run's child,
        # made ahead: a fork of init, so named).
        busy = [p for p in spawner.children() if p.name() == "sbx-init"
                and any(k.name() != "sbx-init" for k in p.children())]
        assert len(busy) == 1, busy
        # Its container's id, from the cgroup it sits in (c-<id>/init).
        (killed,) = set(re.findall(r"/c-([0-9a-f]+)/", Path(
            f"/proc/{busy[0].pid}/cgroup").read_text()))
        busy[0].kill()
        last = _last_event(resp)
        assert (last["event"], last["error"]["code"]) == ("error", "container_lost"), last
        assert "init exited" in last["error"]["message"], last
        assert "retry the run" in last["error"]["message"], last
        assert _ready(svc)
        _until("a warm judge container in its place", lambda: any(
            p["policy"] == "judge" and p["idle"] >= 1
            for p in _request(svc.url, "GET", "/v1/info")[2]["pools"]))
        _run_ok(svc, images)
        _until("the killed container's record removed", lambda: killed not in _records(svc))
        assert _cgroup_dirs({killed}) == []
        assert "Traceback" not in svc.log.read_text()


def test_a_killed_service_restarts_on_its_state_and_the_store_verifies(
        images: Any, tmp_path: Path) -> None:
    mounts_before = _mounts_under(tmp_path)
    old, log = start_service(tmp_path, CONFIG)
    new = None
    try:
        url = wait_ready(old, log)
        # Something in each store: an image (pulled by the first run) and a cached file.
        status, _, body = _request(url, "POST", "/v1/files", raw=b"kept across a crash\n")
        assert status == 201, body
        svc = OwnService(url, old.pid, log)
        _judge_warm(svc, images)
        resp = _stream_until_up(svc, images)
        ids = _records(svc)
        procs = _processes({p.pid for p in psutil.Process(old.pid).children(recursive=True)})
        old.kill()
        old.wait(WAIT_S)
        resp.close()
        _, alive = psutil.wait_procs(procs, timeout=WAIT_S)
        assert not alive, f"processes of the killed sandboxd still alive: {alive}"

        new, log = start_service(tmp_path, CONFIG)
        url = wait_ready(new, log)
        svc = OwnService(url, new.pid, log)
        assert not _records(svc) & ids and _cgroup_dirs(ids) == []
        _run_ok(svc, images)
        stop(new, log)
        assert _mounts_under(tmp_path) == mounts_before
        assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == []

        assert state_problems(tmp_path / "state") == []
    finally:
        for p in (old, new):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_no_run_gets_a_500_when_the_spawner_dies_under_load(
        images: Any, tmp_path: Path) -> None:
    """Clients running all the time while the spawner is SIGKILLed: each run is a result
    or a 503 runtime_restarting with Retry-After (those in flight, and those that came
    while it was down), never another error; runs succeed again afterwards."""
    workers, before, after = 4, 20, 20

    async def go(url: str, pid: int) -> list[tuple[int, str | None, str | None, bool]]:
        seen: list[tuple[int, str | None, str | None, bool]] = []
        killed, done = asyncio.Event(), asyncio.Event()

        async def client(s: aiohttp.ClientSession) -> None:
            while not done.is_set():
                async with s.post("/v1/runs", json={
                        "image": images.oci, "cmd": ["echo", "ok"], "policy": "judge"}) as r:
                    body = await r.json()
                    seen.append((r.status, (body.get("error") or {}).get("code"),
                                 r.headers.get("Retry-After"), killed.is_set()))

        def ok_after() -> int:
            return sum(1 for status, _, _, late in seen if late and status == 200)

        async with aiohttp.ClientSession(url) as s:
            tasks = [asyncio.create_task(client(s)) for _ in range(workers)]
            try:
                async with asyncio.timeout(WAIT_S):
                    while len(seen) < before:
                        await asyncio.sleep(0.01)
                    _spawner(pid).kill()
                    killed.set()
                    while ok_after() < after:
                        await asyncio.sleep(0.01)
            finally:
                done.set()
                await asyncio.gather(*tasks)
        return seen

    with own_service(tmp_path, CONFIG) as svc:
        _judge_warm(svc, images)
        seen = asyncio.run(go(svc.url, svc.pid))
        assert "Traceback" not in svc.log.read_text()
    wrong = [s for s in seen if s[0] != 200 and (s[0], s[1]) != (503, "runtime_restarting")]
    assert wrong == [], wrong
    assert all(int(retry or 0) >= 1 for status, _, retry, _ in seen if status == 503), seen


def test_a_batch_waits_out_a_spawner_restart_and_every_case_ends_ok(
        images: Any, tmp_path: Path) -> None:
    """A batch was accepted whole: a case whose container died with the spawner, or that
    came while it was down, waits for the new one and runs, as one waits for a slot; no
    case ends with runtime_restarting."""
    cases = 60

    async def go(url: str, pid: int) -> list[dict[str, Any]]:
        events = []
        async with aiohttp.ClientSession(url) as s, s.post("/v1/batches", json={
                "image": images.oci, "policy": "judge", "cmd": ["sh", "-c", "sleep 0.02; cat"],
                "parallelism": 2,
                "cases": [{"stdin": f"case {i}\n"} for i in range(cases)]}) as r:
            assert r.status == 200, await r.text()
            async with asyncio.timeout(WAIT_S):
                async for line in r.content:
                    events.append(json.loads(line))
                    if len(events) == cases // 4:
                        _spawner(pid).kill()
        return events

    with own_service(tmp_path, CONFIG) as svc:
        _judge_warm(svc, images)
        events = asyncio.run(go(svc.url, svc.pid))
        assert "Traceback" not in svc.log.read_text()
    summary = events[-1]
    assert summary["event"] == "summary", events[-3:]
    wrong = [e for e in events[:-1]
             if (e.get("result") or {}).get("stdout") != f"case {e['index']}\n"]
    assert wrong == [] and summary["ran"] == cases, (wrong, summary)


def test_a_session_whose_container_died_has_ended_for_every_operation(
        images: Any, tmp_path: Path) -> None:
    """Its container died with the spawner: an exec, a file put in or read out is a 404
    saying the session has ended (start a new one), never a retry that cannot succeed."""
    with own_service(tmp_path, CONFIG) as svc:
        status, _, body = _request(svc.url, "POST", "/v1/containers", {"image": images.oci})
        assert status == 201, body
        sid = body["id"]
        _spawner(svc.pid).kill()
        _until("a new spawner serves", lambda: _ready(svc) and svc.metric(
            "sandboxd_spawner_deaths_total") == 1)
        for method, path, raw, json_body in (
                ("POST", f"/v1/containers/{sid}/exec", None, {"cmd": ["true"]}),
                ("PUT", f"/v1/containers/{sid}/files?path=/tmp/a", b"x", None),
                ("GET", f"/v1/containers/{sid}/files?path=/etc/passwd", None, None)):
            status, _, body = _request(svc.url, method, path, json_body, raw=raw)
            assert (status, body["error"]["code"]) == (404, "not_found"), (method, body)
            assert "has ended" in body["error"]["message"], (method, body)
