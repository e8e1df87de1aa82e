"""Who may call, and how much at once: bearer tokens (compared in constant time), each
token's allowed registries and cap on concurrent runs, and the service-wide admission of
runs (a bounded number running, a bounded queue waiting, then 429)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from sandbox.errors import InvalidReference
from sandbox.reference import parse
from service.config import TokenConfig
from service.errors import ApiError, from_sandbox

PRINCIPAL = web.RequestKey("principal", object)
RETRY_AFTER_S = 1


LOCAL_TENANT = "local"   # the one tenant of a service without tokens


@dataclass
class Principal:
    name: str
    max_concurrent_runs: int | None = None
    registries: tuple[str, ...] | None = None
    active: int = 0
    # Whose things (image names, sessions, warm containers, quotas) this caller's requests
    # see and make: every token is a tenant; without tokens there is one, LOCAL_TENANT.
    tenant: str = LOCAL_TENANT

    def allow_image(self, reference: str, field: str) -> None:
        """403 unless this token may use the registry `reference` lives in."""
        if self.registries is None:
            return
        try:
            domain = parse(reference).domain
        except InvalidReference as e:
            raise from_sandbox(e, field) from e
        if domain not in self.registries:
            raise ApiError(403, "forbidden", f"{field}: this token may not use registry "
                           f"{domain}; allowed: {', '.join(self.registries) or 'none'}", field)


ANONYMOUS = Principal("anonymous")


class Tokens:
    def __init__(self, tokens: tuple[TokenConfig, ...]) -> None:
        # Compared as SHA-256 digests: equal lengths, so compare_digest leaks nothing about
        # a token's length either.
        self._tokens = []
        for i, t in enumerate(tokens):
            digest = hashlib.sha256(t.token.encode()).digest()
            self._tokens.append((digest, Principal(t.name, t.max_concurrent_runs, t.registries,
                                                   tenant=f"token-{i}")))

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def authenticate(self, header: str | None) -> Principal:
        if not self._tokens:
            return ANONYMOUS
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("send Authorization: Bearer <token>")
        given = hashlib.sha256(token.strip().encode(errors="surrogateescape")).digest()
        found = None
        for digest, principal in self._tokens:  # every entry, whichever matches
            if hmac.compare_digest(digest, given):
                found = principal
        if found is None:
            raise _unauthorized("the token is not valid")
        return found


def _unauthorized(why: str) -> ApiError:
    return ApiError(401, "unauthorized", f"authentication required: {why}",
                    headers={"WWW-Authenticate": 'Bearer realm="sandboxd"'})


def auth_middleware(tokens: Tokens, open_paths: frozenset[str]) -> Callable[..., Awaitable[
        web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[
            web.StreamResponse]]) -> web.StreamResponse:
        if request.path in open_paths:
            request[PRINCIPAL] = ANONYMOUS
        else:
            request[PRINCIPAL] = tokens.authenticate(request.headers.get("Authorization"))
        return await handler(request)
    return middleware


def principal(request: web.Request) -> Principal:
    p = request.get(PRINCIPAL)
    return p if isinstance(p, Principal) else ANONYMOUS


def over_capacity(message: str) -> ApiError:
    return ApiError(429, "over_capacity", message,
                    headers={"Retry-After": str(RETRY_AFTER_S)})


class Admission:
    """At most `running` runs execute at once; up to `queued` more wait; the rest get 429."""

    def __init__(self, running: int, queued: int) -> None:
        self._slots = asyncio.Semaphore(running)
        self.limit_running = running
        self.limit_queued = queued
        self.running = 0
        self.waiting = 0
        self.closed = False

    @contextlib.asynccontextmanager
    async def slot(self, who: Principal) -> AsyncIterator[None]:
        if self.closed:
            raise ApiError(503, "unavailable", "sandboxd is shutting down; retry on another "
                           "instance or after it restarts", headers={"Retry-After": "5"})
        if who.max_concurrent_runs is not None and who.active >= who.max_concurrent_runs:
            raise over_capacity(f"this token may have {who.max_concurrent_runs} run(s) at "
                                "once; wait for one to finish")
        if self._slots.locked() and self.waiting >= self.limit_queued:
            raise over_capacity(f"{self.running} runs are executing and {self.waiting} "
                                "waiting, the configured maximum; retry shortly")
        who.active += 1
        self.waiting += 1
        try:
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
            self.running += 1
            try:
                yield
            finally:
                self.running -= 1
                self._slots.release()
        finally:
            who.active -= 1
