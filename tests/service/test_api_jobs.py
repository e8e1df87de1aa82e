"""Async jobs through the API (issue #13 point 4): POST /v1/jobs (a run or a batch) -> 202,
GET, list, SSE events, cancel, delete; callbacks to a real receiver on loopback, signed and
retried; the callback allowlist; each tenant's jobs its own; a restart with a queued and a
running job (services of this module's own: one slot for jobs, so a job can be held
queued)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
from aiohttp import web

from tests.service.conftest import LIMITED_TOKEN, MAIN_TOKEN
from tests.service.own_service import OwnService, own_service, two_tenants

A = {"Authorization": f"Bearer {MAIN_TOKEN}"}
B = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
MAX_QUEUED = 4
JSON_CAP = 1 << 20
WAIT_S = 60


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """Callbacks on 127.0.0.1, served from a thread of its own (the tests' loops come and
    go): /ok/... answers 200, /flaky/... 500 to its first two requests, then 200,
    /hang-once/... never answers its first request, then 200, /hang/... never answers."""

    port: int = 0
    got: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def to(self, path: str, n: int = 1) -> list[Request]:
        """The requests to `path`, once there are at least `n`."""
        return self._wait(lambda p: p == path, n, f"to {path}")

    def under(self, prefix: str, n: int) -> list[Request]:
        """The requests to paths under `prefix`, once there are at least `n`."""
        return self._wait(lambda p: p.startswith(prefix), n, f"under {prefix}")

    def _wait(self, match: Callable[[str], bool], n: int, what: str) -> list[Request]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with self.lock:
                found = [r for r in self.got if match(r.path)]
            if len(found) >= n:
                return found
            time.sleep(0.02)
        raise AssertionError(f"{n} callback(s) {what} never came; got {found}")

    async def handle(self, request: web.Request) -> web.Response:
        req = Request(request.path, dict(request.headers), await request.read())
        with self.lock:
            self.got.append(req)
            seen = sum(1 for r in self.got if r.path == request.path)
        if request.path.startswith("/flaky/") and seen <= 2:
            return web.Response(status=500)
        if request.path.startswith("/hang/") or (request.path.startswith("/hang-once/")
                                                 and seen == 1):
            await asyncio.Event().wait()
        return web.Response(status=200)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    app = web.Application()
    app.router.add_post("/{tail:.*}", rec.handle)
    # A hanging handler is cancelled at once at the end.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        rec.port = runner.addresses[0][1]
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        # Handlers of connections the client closed (a hanging one) are left to cancel.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(10)
    yield rec
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _config(registry: Any, receiver: Receiver, workers: int = 1,
            shutdown_deadline_s: int = 10, max_queued: int = MAX_QUEUED, attempts: int = 4,
            attempt_timeout_s: int = 10) -> str:
    return two_tenants(registry.host, "max_concurrent_runs = 1") + f"""
[server]
shutdown_deadline_s = {shutdown_deadline_s}

[jobs]
callback_hosts = ["127.0.0.1:{receiver.port}"]
callback_backoff_s = 0.01
callback_backoff_max_s = 0.05
callback_attempts = {attempts}
callback_timeout_s = {attempt_timeout_s}
workers = {workers}
max_queued_per_tenant = {max_queued}

[limits]
json_body_bytes = {JSON_CAP}
"""


@pytest.fixture(scope="module")
def svc(registry: Any, images: Any, receiver: Receiver,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnService]:
    with own_service(tmp_path_factory.mktemp("sandboxd-jobs"), _config(registry, receiver)) as s:
        yield s


def _call(svc: OwnService, fn: Any) -> Any:
    async def go() -> Any:
        async with aiohttp.ClientSession(svc.url, headers=A) as s:
            return await fn(s)
    return asyncio.run(go())


def _sh(image: str, script: str) -> dict[str, Any]:
    return {"image": image, "cmd": ["sh", "-c", script], "env": {"PATH": "/bin"}}


async def _submit(s: aiohttp.ClientSession, body: dict[str, Any],
                  headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with s.post("/v1/jobs", json=body, headers=headers) as r:
        data = await r.json()
        if r.status == 202:
            assert r.headers["Location"] == f"/v1/jobs/{data['id']}"
        return r.status, data


async def _get(s: aiohttp.ClientSession, job_id: str,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with s.get(f"/v1/jobs/{job_id}", headers=headers) as r:
        return r.status, await r.json()


async def _until(s: aiohttp.ClientSession, job_id: str, *statuses: str,
                 headers: dict[str, str] | None = None) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        status, job = await _get(s, job_id, headers)
        assert status == 200, job
        if job["status"] in statuses:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} never became {statuses}: {job}")


async def _events(s: aiohttp.ClientSession, job_id: str,
                  headers: dict[str, str] | None = None) -> list[tuple[int, str, Any]]:
    """The SSE stream read to its end: (id, event, data) of each event."""
    out = []
    async with s.get(f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status == 200 and r.content_type == "text/event-stream", await r.text()
        fields: dict[str, str] = {}
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line:
                name, _, value = line.partition(": ")
                fields[name] = value
            elif fields:
                out.append((int(fields["id"]), fields["event"], orjson.loads(fields["data"])))
                fields = {}
    return out


async def _secret(s: aiohttp.ClientSession, headers: dict[str, str] | None = None) -> str:
    async with s.get("/v1/jobs/secret", headers=headers) as r:
        body = await r.json()
        assert r.status == 200 and body["algorithm"] == "HMAC-SHA256", body
        return str(body["secret"])


def _signed_by(req: Request, secret: str) -> bool:
    """The receiver's check, as the documentation gives it."""
    mac = hmac.new(secret.encode(), req.headers["Sandboxd-Timestamp"].encode() + b"."
                   + req.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(req.headers["Sandboxd-Signature"], f"sha256={mac}")


def test_a_run_job_runs_and_its_signed_callback_carries_the_result(
        svc: OwnService, images: Any, receiver: Receiver) -> None:
    async def go(s: aiohttp.ClientSession) -> tuple[Any, str]:
        status, job = await _submit(s, {"run": _sh(images.oci, "echo hello"),
                                        "callback_url": receiver.url("/ok/run")})
        assert status == 202 and job["status"] == "queued" and job["kind"] == "run", job
        assert job["id"].startswith("job_") and "result" not in job
        done = await _until(s, job["id"], "done", "failed")
        return done, await _secret(s)

    job, secret = _call(svc, go)
    assert job["status"] == "done", job
    assert job["result"]["stdout"] == "hello\n" and job["result"]["status"] == "ok"
    assert job["finished"] >= job["started"] >= job["created"]
    assert job["expires"] > job["finished"]
    (req,) = receiver.to("/ok/run")
    assert _signed_by(req, secret)
    assert not _signed_by(req, "0" * 64)
    assert req.headers["Idempotency-Key"] == f"{job['id']}:done"
    sent = orjson.loads(req.body)
    assert sent["id"] == job["id"] and sent["status"] == "done" and "callback" not in sent
    assert sent["result"] == job["result"]
    assert _call(svc, lambda s: _delivered(s, job["id"])) == {
        "status": "delivered", "attempts": 1, "last_error": None}
    assert svc.metric("sandboxd_jobs_running", MAIN_TOKEN) >= 0
    assert svc.metric("sandboxd_job_callbacks_delivering", MAIN_TOKEN) >= 0


async def _delivered(s: aiohttp.ClientSession, job_id: str) -> Any:
    """The job's callback state once its delivery has ended."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        _, job = await _get(s, job_id)
        if job["callback"]["status"] != "pending":
            return job["callback"]
        await asyncio.sleep(0.02)
    raise AssertionError(f"the callback of {job_id} is still pending")


def test_a_receiver_that_fails_twice_gets_the_same_delivery_three_times(
        svc: OwnService, images: Any, receiver: Receiver) -> None:
    async def go(s: aiohttp.ClientSession) -> tuple[Any, str]:
        _, job = await _submit(s, {"run": _sh(images.oci, "true"),
                                   "callback_url": receiver.url("/flaky/1")})
        return await _until(s, job["id"], "done"), await _secret(s)

    job, secret = _call(svc, go)
    reqs = receiver.to("/flaky/1", 3)
    assert {r.headers["Idempotency-Key"] for r in reqs} == {f"{job['id']}:done"}
    assert [r.headers["Sandboxd-Attempt"] for r in reqs] == ["1", "2", "3"]
    assert all(_signed_by(r, secret) for r in reqs)
    assert len({r.body for r in reqs}) == 1
    assert _call(svc, lambda s: _delivered(s, job["id"])) == {
        "status": "delivered", "attempts": 3, "last_error": None}


def test_events_replay_then_follow_and_resume_after_the_last_id(svc: OwnService,
                                                                images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> tuple[Any, Any]:
        _, job = await _submit(s, {"run": _sh(images.oci, "sleep 0.5; echo late")})
        events = await _events(s, job["id"])  # connected while it waits or runs: follows
        resumed = await _events(s, job["id"], {"Last-Event-ID": "2"})
        return events, resumed

    events, resumed = _call(svc, go)
    assert [(i, e) for i, e, _ in events] == [(1, "status"), (2, "status"), (3, "result"),
                                              (4, "status")]
    assert [d.get("status") for _, e, d in events if e == "status"] == [
        "queued", "running", "done"]
    assert events[2][2]["result"]["stdout"] == "late\n"
    assert resumed == events[2:]


def test_numbers_in_the_query_and_headers_must_be_ascii_digits(svc: OwnService,
                                                               images: Any) -> None:
    # '\u00b3' passes str.isdigit() and fails int(): it must be a 400, not a 500.
    async def go(s: aiohttp.ClientSession) -> list[tuple[int, Any]]:
        _, job = await _submit(s, {"run": _sh(images.oci, "true")})
        out = []
        for path, headers in (("/v1/jobs?limit=\u00b3", None),
                              (f"/v1/jobs/{job['id']}/events", {"Last-Event-ID": "\u00b3"})):
            async with s.get(path, headers=headers) as r:
                out.append((r.status, (await r.json())["error"]["field"]))
        return out

    assert _call(svc, go) == [(400, "limit"), (400, "Last-Event-ID")]


def test_a_callback_host_not_listed_is_refused_at_submit(svc: OwnService, images: Any,
                                                         receiver: Receiver) -> None:
    async def go(s: aiohttp.ClientSession) -> list[Any]:
        out = []
        for url in (f"http://127.0.0.2:{receiver.port}/", f"http://localhost:{receiver.port}/",
                    "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd"):
            out.append(await _submit(s, {"run": _sh(images.oci, "true"), "callback_url": url}))
        return out

    for status, body in _call(svc, go):
        assert status == 400 and body["error"]["field"] == "callback_url", body


def test_a_bad_body_is_refused_at_submit_and_nothing_is_queued(svc: OwnService,
                                                               images: Any) -> None:
    unknown_file = "sha256:" + "0" * 64
    cases = [
        ({"run": {**_sh(images.oci, "true"), "limits": {"cpu_ms": 0}}}, 400,
         "run.limits.cpu_ms"),
        ({"run": {**_sh(images.oci, "true"), "policy": "no-such-policy"}}, 400, "run.policy"),
        ({"run": {**_sh(images.oci, "true"), "image": "Not A Reference"}}, 400, "run.image"),
        ({"run": {**_sh(images.oci, "true"), "files": [
            {"path": "/a", "file_id": unknown_file}]}}, 404, "run.files[0].file_id"),
        ({"batch": {**_sh(images.oci, "cat"), "cases": [
            {"stdin": "x"}, {"limits": {"wall_ms": 0}}]}}, 400, "batch.cases[1].limits.wall_ms"),
        ({"run": _sh(images.oci, "true"), "batch": {**_sh(images.oci, "true"), "cases": [{}]}},
         400, "batch"),
        ({"callback_url": "http://127.0.0.1/"}, 400, "run"),
    ]

    async def go(s: aiohttp.ClientSession) -> tuple[list[Any], int, int]:
        async with s.get("/v1/jobs") as r:
            before = len((await r.json())["jobs"])
        out = [await _submit(s, body) for body, _, _ in cases]
        async with s.get("/v1/jobs") as r:
            return out, before, len((await r.json())["jobs"])

    answers, before, after = _call(svc, go)
    for (body, status, where), (got, answer) in zip(cases, answers, strict=True):
        assert (got, answer["error"]["field"]) == (status, where), (body, answer)
    assert after == before


def test_a_job_body_at_the_size_limit_is_kept_whole(svc: OwnService, images: Any) -> None:
    def body(size: int) -> dict[str, Any]:
        run = {**_sh(images.oci, "wc -c"), "stdin": ""}
        room = size - len(orjson.dumps({"run": run}))
        return {"run": {**run, "stdin": "x" * room}}

    async def post(s: aiohttp.ClientSession, size: int) -> tuple[int, Any]:
        async with s.post("/v1/jobs", data=orjson.dumps(body(size)),
                          headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json()

    async def go(s: aiohttp.ClientSession) -> tuple[Any, int]:
        status, job = await post(s, JSON_CAP)
        assert status == 202, job
        over, _ = await post(s, JSON_CAP + 1)
        return await _until(s, job["id"], "done", "failed"), over

    job, over = _call(svc, go)
    stdin = len(body(JSON_CAP)["run"]["stdin"])
    assert job["status"] == "done" and job["result"]["stdout"].strip() == str(stdin), job
    assert over == 413


def test_a_batch_job_keeps_every_case_and_the_summary(svc: OwnService, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> Any:
        status, job = await _submit(s, {"batch": {**_sh(images.oci, "cat"), "cases": [
            {"id": "one", "stdin": "1"}, {"id": "two", "stdin": "2"}]}})
        assert status == 202 and job["kind"] == "batch", job
        return await _until(s, job["id"], "done", "failed")

    job = _call(svc, go)
    assert job["status"] == "done", job
    cases = {e["id"]: e["result"]["stdout"] for e in job["events"] if e["event"] == "case"}
    assert cases == {"one": "1", "two": "2"}
    assert job["events"][-1]["event"] == "summary" and job["events"][-1]["ran"] == 2


def _sleeping(svc: OwnService, marker: str) -> list[psutil.Process]:
    """The service's descendants running `sleep <marker>`."""
    found = []
    for p in psutil.Process(svc.pid).children(recursive=True):
        try:
            if p.cmdline()[-2:] == ["sleep", marker]:
                found.append(p)
        except psutil.Error:
            pass
    return found


def test_cancel_kills_a_running_job_and_the_callback_says_cancelled(
        svc: OwnService, images: Any, receiver: Receiver) -> None:
    marker = "987"

    async def go(s: aiohttp.ClientSession) -> Any:
        _, job = await _submit(s, {"run": _sh(images.oci, f"exec sleep {marker}"),
                                   "callback_url": receiver.url("/ok/cancel")})
        await _until(s, job["id"], "running")
        deadline = time.monotonic() + WAIT_S
        while not _sleeping(svc, marker) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert _sleeping(svc, marker), "the job's run never started"
        async with s.post(f"/v1/jobs/{job['id']}/cancel") as r:
            assert r.status == 200
            cancelled = await r.json()
        async with s.post(f"/v1/jobs/{job['id']}/cancel") as r:  # again: left as it is
            assert (r.status, (await r.json())["status"]) == (200, "cancelled")
        return cancelled

    job = _call(svc, go)
    assert job["status"] == "cancelled" and "result" not in job, job
    assert _sleeping(svc, marker) == []
    (req,) = receiver.to("/ok/cancel")
    assert orjson.loads(req.body)["status"] == "cancelled"
    assert req.headers["Idempotency-Key"] == f"{job['id']}:cancelled"


def test_another_tenant_gets_the_404_of_an_unknown_job(svc: OwnService, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        _, job = await _submit(s, {"run": _sh(images.oci, "exec sleep 600")})
        mine = job["id"]
        unknown = "job_" + "0" * 32

        async def answers(job_id: str) -> list[tuple[int, Any]]:
            out = []
            for method, path in (("GET", ""), ("GET", "/events"), ("POST", "/cancel"),
                                 ("DELETE", "")):
                async with s.request(method, f"/v1/jobs/{job_id}{path}", headers=B) as r:
                    text = (await r.text()).replace(job_id, "ID")
                    out.append((r.status, orjson.loads(text)))
            return out

        theirs = await answers(mine)
        assert theirs == await answers(unknown)
        assert {status for status, _ in theirs} == {404}
        async with s.get("/v1/jobs", headers=B) as r:
            assert mine not in {j["id"] for j in (await r.json())["jobs"]}
        assert (await _get(s, mine))[1]["status"] in ("queued", "running")  # untouched
        assert await _secret(s) != await _secret(s, B)
        theirs = await _secret(s, B)
        async with s.post("/v1/jobs/secret", headers=B) as r:
            rotated = (await r.json())["secret"]
        assert rotated != theirs and await _secret(s, B) == rotated
        async with s.post(f"/v1/jobs/{mine}/cancel") as r:
            assert (await r.json())["status"] == "cancelled"
    _call(svc, go)


def test_an_idempotency_key_gives_the_same_job_for_the_same_body(svc: OwnService,
                                                                 images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        body = {"run": _sh(images.oci, "echo once")}
        key = {"Idempotency-Key": "submission-42"}
        status, first = await _submit(s, body, key)
        async with s.post("/v1/jobs", json=body, headers=key) as r:
            again = await r.json()
            assert (r.status, r.headers["Idempotent-Replayed"]) == (202, "true")
        assert again["id"] == first["id"] and again["idempotency_key"] == "submission-42"
        status, other = await _submit(s, {"run": _sh(images.oci, "echo twice")}, key)
        assert (status, other["error"]["field"]) == (409, "Idempotency-Key"), other
        assert (await _submit(s, body, {"Idempotency-Key": "has space"}))[0] == 400
        # Another tenant's same key is its own.
        status, theirs = await _submit(s, body, {**key, **B})
        assert status == 202 and theirs["id"] != first["id"]
        await _until(s, first["id"], "done")
        # A retry is answered its job, not checked again: the file it names may be gone.
        async with s.post("/v1/files", data=b"kept for a while",
                          headers={"Content-Type": "application/octet-stream"}) as r:
            file_id = (await r.json())["id"]
        with_file = {"run": {**_sh(images.oci, "cat /f"), "files": [
            {"path": "/f", "file_id": file_id}]}}
        key = {"Idempotency-Key": "with-a-file"}
        status, job = await _submit(s, with_file, key)
        assert status == 202, job
        await _until(s, job["id"], "done")
        async with s.delete(f"/v1/files/{file_id}") as r:
            assert r.status == 204
        status, again = await _submit(s, with_file, key)
        assert (status, again["id"]) == (202, job["id"]), again
    _call(svc, go)


def test_queued_jobs_are_capped_and_finished_ones_deleted(svc: OwnService,
                                                          images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        ids = []
        for _ in range(MAX_QUEUED):
            status, job = await _submit(s, {"run": _sh(images.oci, "exec sleep 600")})
            assert status == 202, job
            ids.append(job["id"])
        async with s.post("/v1/jobs", json={"run": _sh(images.oci, "true")}) as r:
            body = await r.json()
            assert (r.status, body["error"]["code"]) == (429, "quota_exceeded"), body
            assert "Retry-After" not in r.headers
            assert "jobs.max_queued_per_tenant" in body["error"]["message"]
        async with s.delete(f"/v1/jobs/{ids[0]}") as r:
            assert r.status == 409 and "cancel it first" in (await r.json())["error"]["message"]
        for job_id in ids:
            async with s.post(f"/v1/jobs/{job_id}/cancel") as r:
                assert (await r.json())["status"] == "cancelled"
        async with s.get("/v1/jobs", params={"status": "cancelled", "limit": "2"}) as r:
            listed = (await r.json())["jobs"]
            assert [j["id"] for j in listed] == ids[::-1][:2]
        async with s.delete(f"/v1/jobs/{ids[0]}") as r:
            assert r.status == 204
        assert (await _get(s, ids[0]))[0] == 404
    _call(svc, go)


def test_a_restart_runs_queued_jobs_and_reports_running_ones_interrupted(
        registry: Any, images: Any, receiver: Receiver,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """At SIGTERM: jobs that outlast the shutdown's deadline (killed: interrupted after the
    restart), one that ends within it (done), and one of tenant B held queued by B's one run
    at a time (it runs after the restart)."""
    workdir: Path = tmp_path_factory.mktemp("sandboxd-jobs-restart")
    config = _config(registry, receiver, workers=3, shutdown_deadline_s=5)

    def sleeper(path: str) -> dict[str, Any]:
        return {"run": _sh(images.oci, "exec sleep 600"), "callback_url": receiver.url(path)}

    async def before(s: aiohttp.ClientSession) -> tuple[str, str, str, str]:
        _, long = await _submit(s, sleeper("/ok/interrupted"))
        _, short = await _submit(s, {"run": _sh(images.oci, "sleep 1; echo in time"),
                                     "callback_url": receiver.url("/ok/in-time")})
        _, b_long = await _submit(s, sleeper("/ok/b-interrupted"), B)
        _, queued = await _submit(s, {"run": _sh(images.oci, "echo after the restart"),
                                      "callback_url": receiver.url("/ok/after")}, B)
        for job, who in ((long, A), (short, A), (b_long, B)):
            await _until(s, job["id"], "running", "done", headers=who)
        assert (await _get(s, queued["id"], B))[1]["status"] == "queued"  # behind b_long
        return long["id"], short["id"], b_long["id"], queued["id"]

    with own_service(workdir, config) as first:
        long, short, b_long, queued = _call(first, before)

    async def after(s: aiohttp.ClientSession) -> tuple[Any, Any, Any]:
        return (await _until(s, long, "interrupted"), (await _get(s, short))[1],
                await _until(s, queued, "done", "failed", headers=B))

    with own_service(workdir, config) as second:
        interrupted, in_time, done = _call(second, after)
    assert interrupted["error"]["code"] == "interrupted", interrupted
    assert in_time["status"] == "done" and in_time["result"]["stdout"] == "in time\n"
    assert done["status"] == "done" and done["result"]["stdout"] == "after the restart\n"
    for path, job_id in (("/ok/interrupted", long), ("/ok/b-interrupted", b_long)):
        (req,) = receiver.to(path)
        sent = orjson.loads(req.body)
        assert (sent["id"], sent["status"]) == (job_id, "interrupted")
        assert req.headers["Idempotency-Key"] == f"{job_id}:interrupted"
    assert orjson.loads(receiver.to("/ok/in-time")[0].body)["status"] == "done"
    assert orjson.loads(receiver.to("/ok/after")[0].body)["status"] == "done"

def _sbx(svc: OwnService, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "SANDBOXD_URL": svc.url, "SANDBOXD_TOKEN": MAIN_TOKEN}
    return subprocess.run([sys.executable, "-m", "sbx.cli", *argv], input=stdin,
                          capture_output=True, env=env, timeout=WAIT_S)


def test_sbx_job_submits_waits_lists_and_removes(svc: OwnService, images: Any) -> None:
    body = orjson.dumps({"run": _sh(images.oci, "echo from sbx")})
    done = _sbx(svc, "job", "submit", "--wait", "--key", "sbx-1", "-", stdin=body)
    assert done.returncode == 0, done.stderr
    job = orjson.loads(done.stdout)
    assert job["status"] == "done" and job["result"]["stdout"] == "from sbx\n"
    again = _sbx(svc, "job", "submit", "--key", "sbx-1", "-", stdin=body)
    assert again.stdout.decode().strip() == job["id"]  # the same key and body: the same job
    listed = _sbx(svc, "job", "ls", "--status", "done")
    assert job["id"] in listed.stdout.decode()
    events = [orjson.loads(line) for line in _sbx(svc, "job", "events", job["id"]).stdout
              .splitlines()]
    assert [e["event"] for e in events] == ["status", "status", "result", "status"]
    assert _sbx(svc, "job", "rm", job["id"]).returncode == 0
    gone = _sbx(svc, "job", "get", job["id"])
    assert gone.returncode != 0 and b"no job" in gone.stderr


def test_a_job_whose_cached_file_went_while_it_waited_fails_saying_why(
        svc: OwnService, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> Any:
        async with s.post("/v1/files", data=b"data",
                          headers={"Content-Type": "application/octet-stream"}) as r:
            file_id = (await r.json())["id"]
        _, blocker = await _submit(s, {"run": _sh(images.oci, "exec sleep 600")})
        await _until(s, blocker["id"], "running")  # the one worker is busy: the next waits
        status, job = await _submit(s, {"run": {**_sh(images.oci, "cat /f"), "files": [
            {"path": "/f", "file_id": file_id}]}})
        assert status == 202, job
        async with s.delete(f"/v1/files/{file_id}") as r:
            assert r.status == 204
        async with s.post(f"/v1/jobs/{blocker['id']}/cancel"):
            pass
        return await _until(s, job["id"], "done", "failed")

    job = _call(svc, go)
    assert job["status"] == "failed" and "result" not in job, job
    assert (job["error"]["code"], job["error"]["field"]) == ("not_found",
                                                            "run.files[0].file_id")


def test_a_pipeline_is_a_run_job(svc: OwnService, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> Any:
        status, job = await _submit(s, {"run": {
            "image": images.oci, "env": {"PATH": "/bin"},
            "processes": [{"cmd": ["echo", "piped"]}, {"cmd": ["cat"]}],
            "pipes": [{"from": [0, 1], "to": [1, 0]}]}})
        assert status == 202 and job["kind"] == "run", job
        return await _until(s, job["id"], "done", "failed")

    job = _call(svc, go)
    assert job["status"] == "done", job
    assert job["result"]["status"] == "ok"
    assert job["result"]["processes"][1]["stdout"] == "piped\n"


def test_a_delivery_cut_short_by_a_restart_goes_on_after_it(
        registry: Any, images: Any, receiver: Receiver,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir: Path = tmp_path_factory.mktemp("sandboxd-jobs-redeliver")
    config = _config(registry, receiver)

    async def submit(s: aiohttp.ClientSession) -> str:
        _, job = await _submit(s, {"run": _sh(images.oci, "true"),
                                   "callback_url": receiver.url("/hang-once/1")})
        return str(job["id"])

    with own_service(workdir, config) as first:
        job_id = _call(first, submit)
        receiver.to("/hang-once/1")  # the first attempt is under way, and hangs

    with own_service(workdir, config) as second:
        state = _call(second, lambda s: _delivered(s, job_id))
    first_try, second_try = receiver.to("/hang-once/1", 2)
    assert {r.headers["Idempotency-Key"] for r in (first_try, second_try)} == {
        f"{job_id}:done"}
    assert second_try.headers["Sandboxd-Attempt"] == "2"
    assert first_try.body == second_try.body
    assert state == {"status": "delivered", "attempts": 2, "last_error": None}


def test_a_tenant_whose_receiver_hangs_holds_only_its_share_of_deliveries(
        registry: Any, images: Any, receiver: Receiver,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tenant A's receiver never answers (and an attempt may wait longer than this test):
    A's deliveries hang, at most 8 at once, and B's callback still goes out."""
    hung = 34   # more than all deliveries at once (32)
    config = _config(registry, receiver, workers=4, max_queued=hung, attempts=1,
                     attempt_timeout_s=600)

    async def go(s: aiohttp.ClientSession) -> None:
        ids = []
        for i in range(hung):
            status, job = await _submit(s, {"run": _sh(images.oci, "true"),
                                            "callback_url": receiver.url(f"/hang/{i}")})
            assert status == 202, job
            ids.append(job["id"])
        for job_id in ids:
            await _until(s, job_id, "done")
        _, theirs = await _submit(s, {"run": _sh(images.oci, "true"),
                                      "callback_url": receiver.url("/ok/fair")}, B)
        await _until(s, theirs["id"], "done", headers=B)

    with own_service(tmp_path_factory.mktemp("sandboxd-jobs-fair"), config) as svc:
        _call(svc, go)
        receiver.to("/ok/fair")
        assert len(receiver.under("/hang/", 8)) == 8
