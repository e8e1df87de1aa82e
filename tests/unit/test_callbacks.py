"""Job callbacks (service/jobs/callbacks.py) against real receivers on loopback: signed as
documented, retried with the same idempotency key until a 2xx, bounded, never redirected,
never sent to a host the operator did not list or to a listed name that resolves to a local
address (SSRF)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from service.config import JobsConfig
from service.errors import ApiError
from service.jobs.callbacks import (
    IDEMPOTENCY_KEY,
    SIGNATURE,
    TIMESTAMP,
    Deliverer,
    allowed,
    sign,
    target,
)

SECRET = "ab" * 32
BODY = b'{"id": "job_1", "status": "done"}'


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    port: int
    got: list[Received] = field(default_factory=list)


Answer = Callable[[int], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def receiver(answer: Answer) -> AsyncIterator[Receiver]:
    """An HTTP server on 127.0.0.1 that records each request, then answers `answer(n)`
    (n: the request's number from 1)."""
    rec = Receiver(0)

    async def handle(request: web.Request) -> web.StreamResponse:
        rec.got.append(Received(dict(request.headers), await request.read()))
        return await answer(len(rec.got))

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    # A hanging handler is cancelled at once when the test ends.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.port = runner.addresses[0][1]
    try:
        yield rec
    finally:
        await runner.cleanup()


def _config(*hosts: str, attempts: int = 4) -> JobsConfig:
    return JobsConfig(callback_hosts=hosts, callback_attempts=attempts,
                      callback_timeout_s=0.5, callback_backoff_s=0.01,
                      callback_backoff_max_s=0.05)


async def _deliver(config: JobsConfig, url: str) -> tuple[str | None, list[str | None]]:
    """Why the delivery failed (None: delivered), and how each attempt ended."""
    started: list[None] = []
    attempts: list[str | None] = []
    deliverer = Deliverer(config, "sandboxd/test")
    try:
        error = await deliverer.deliver(url, BODY, "job_1:done", "job_1", lambda: SECRET,
                                        starting=lambda: started.append(None),
                                        ended=attempts.append,
                                        attempts=config.callback_attempts)
    finally:
        await deliverer.close()
    assert len(started) == len(attempts)
    return error, attempts


def _valid(r: Received) -> bool:
    """What a receiver checks, written from the documentation: the HMAC-SHA256 of
    timestamp "." body under the secret's text."""
    mac = hmac.new(SECRET.encode(), r.headers[TIMESTAMP].encode() + b"." + r.body,
                   hashlib.sha256).hexdigest()
    return hmac.compare_digest(r.headers[SIGNATURE], "sha256=" + mac)


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, BODY) == "sha256=" + expected
    assert sign(SECRET, 1700000001, BODY) != sign(SECRET, 1700000000, BODY)


def test_a_callback_url_must_name_a_listed_host() -> None:
    hosts = ("hooks.example.com", "10.0.0.5:8080", "[::1]:9000")
    assert target("https://hooks.example.com/x?y=1", hosts).port == 443
    assert target("http://HOOKS.example.com.:8443/", hosts).port == 8443
    assert target("http://10.0.0.5:8080/cb", hosts).port == 8080
    assert target("http://[::1]:9000/cb", hosts).host == "::1"
    for url, why in [("http://10.0.0.5:8081/cb", "is not one callbacks may reach"),
                     ("http://169.254.169.254/latest/meta-data", "is not one"),
                     ("http://127.0.0.1:8080/", "is not one"),
                     ("http://hooks.example.com.evil.net/", "is not one"),
                     ("ftp://hooks.example.com/", "http:// or https://"),
                     ("http://user:pw@hooks.example.com/", "credentials"),
                     ("http://hooks.example.com:99999/", "not a valid URL")]:
        with pytest.raises(ApiError) as e:
            target(url, hosts)
        assert (e.value.status, e.value.field) == (400, "callback_url"), url
        assert why in e.value.message, (url, e.value.message)
    assert not allowed((), "hooks.example.com", 443)


def test_a_receiver_that_fails_twice_gets_the_same_key_until_it_answers_2xx() -> None:
    async def answer(n: int) -> web.Response:
        return web.Response(status=503 if n <= 2 else 204)

    async def go() -> None:
        async with receiver(answer) as rec:
            error, attempts = await _deliver(_config(f"127.0.0.1:{rec.port}"),
                                             f"http://127.0.0.1:{rec.port}/hook")
        assert error is None
        assert attempts == ["the receiver answered 503"] * 2 + [None]
        assert len(rec.got) == 3
        assert {r.headers[IDEMPOTENCY_KEY] for r in rec.got} == {"job_1:done"}
        assert [r.headers["Sandboxd-Attempt"] for r in rec.got] == ["1", "2", "3"]
        assert all(r.body == BODY and _valid(r) for r in rec.got)
    asyncio.run(go())


def test_attempts_are_bounded_and_a_hanging_receiver_times_out() -> None:
    async def hang(n: int) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def go() -> None:
        async with receiver(hang) as rec:
            error, attempts = await _deliver(_config(f"127.0.0.1:{rec.port}", attempts=2),
                                             f"http://127.0.0.1:{rec.port}/")
        assert error is not None and "no answer within 0.5 s" in error
        assert len(attempts) == len(rec.got) == 2
    asyncio.run(go())


def test_a_redirect_is_never_followed() -> None:
    async def go() -> None:
        async with receiver(lambda n: _ok()) as inner:
            async def redirect(n: int) -> web.Response:
                raise web.HTTPFound(f"http://127.0.0.1:{inner.port}/metadata")

            async with receiver(redirect) as outer:
                # Both listed: even a redirect to a listed host is not followed.
                config = _config(f"127.0.0.1:{outer.port}", f"127.0.0.1:{inner.port}",
                                 attempts=2)
                error, _ = await _deliver(config, f"http://127.0.0.1:{outer.port}/")
            assert error == "the receiver answered 302 (a redirect: never followed)"
            assert len(outer.got) == 2 and inner.got == []
    asyncio.run(go())


async def _ok() -> web.Response:
    return web.Response(status=200)


def test_a_listed_name_that_resolves_to_a_local_address_is_refused_at_delivery() -> None:
    """The allowlist passes `localhost:PORT` at submit; at delivery it resolves to 127.0.0.1,
    which only an entry naming the address itself may reach: refused, never retried."""
    async def go() -> None:
        async with receiver(lambda n: _ok()) as rec:
            config = _config(f"localhost:{rec.port}")
            url = f"http://localhost:{rec.port}/hook"
            target(url, config.callback_hosts)  # what submit checks: listed
            error, attempts = await _deliver(config, url)
        assert error is not None and "a local or private address" in error, error
        assert attempts == [error] and rec.got == []
    asyncio.run(go())


def test_a_host_no_longer_listed_is_refused_at_delivery() -> None:
    async def go() -> None:
        async with receiver(lambda n: _ok()) as rec:
            error, attempts = await _deliver(_config("127.0.0.1:1"),
                                             f"http://127.0.0.1:{rec.port}/")
        assert error is not None and "jobs.callback_hosts" in error
        assert len(attempts) == 1 and rec.got == []
    asyncio.run(go())
