"""Who may call: bearer tokens (compared in constant time), each token's allowed registries
and cap on concurrent runs (enforced by service/admission.py)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from sandbox import (
    InvalidReference,
    Kept,
    Tenant,
    is_digest,
    is_local_address,
    parse_reference,
    split_host,
)
from service.config import ServiceConfig
from service.errors import ApiError, from_sandbox

PRINCIPAL = web.RequestKey("principal", object)


@dataclass
class Principal:
    name: str
    # Whose things (image names, sessions, warm containers, quotas) this caller's requests
    # see and make: every token is a tenant; without tokens there is one, LOCAL.
    tenant: Tenant
    max_concurrent_runs: int | None = None
    registries: tuple[str, ...] | None = None
    active: int = 0
    # Which registries on a local address (loopback, private, link-local) a token may name:
    # those the operator configured ([registries]) or listed in its `registries`; None for
    # the one local user of a service without tokens, who may name any. Else a tenant could
    # make the service probe its own machine and network (SSRF).
    configured: Callable[[str], bool] | None = None
    # May see what belongs to every tenant (request ids in /metrics): a token the operator
    # marked `operator = true`, or the one local user of a service without tokens.
    operator: bool = False
    # References allow_image let through: a judge names one image for every run, and what
    # decides (the token and the config) never changes.
    _allowed: Kept[str, bool] = field(default_factory=Kept, repr=False, compare=False)

    def allow_image(self, reference: str, field: str) -> None:
        """403 unless this caller may use the registry `reference` lives in. Each reference
        allowed is parsed once (~4-15 µs each time on a run's path), as many as Kept keeps;
        a refused one every time."""
        if reference not in self._allowed:
            self._check_image(reference, field)
            self._allowed.keep(reference, True)

    def _check_image(self, reference: str, field: str) -> None:
        if is_digest(reference.strip()):
            return  # a bare digest names one of the tenant's own images, not a registry
        try:
            domain = parse_reference(reference).domain
        except InvalidReference as e:
            raise from_sandbox(e, field) from e
        if self.registries is not None and domain not in self.registries:
            raise ApiError(403, "forbidden", f"{field}: this token may not use registry "
                           f"{domain}; allowed: {', '.join(self.registries) or 'none'}", field)
        if (self.configured is not None and self.registries is None
                and is_local_address(split_host(domain)[0]) and not self.configured(domain)):
            raise ApiError(403, "forbidden", f"{field}: registry {domain} is on a local "
                           "address, which tokens may use only when the operator lists it "
                           f'([registries."{domain}"] or the token\'s registries)', field)


class Tokens:
    def __init__(self, config: ServiceConfig) -> None:
        # Compared as SHA-256 digests: equal lengths, so compare_digest leaks nothing about
        # a token's length either.
        self._tokens = []
        registries = config.engine_config().registries.registries

        def configured(domain: str) -> bool:  # exactly, port included
            return domain in registries
        for t in config.tokens:
            digest = hashlib.sha256(t.token.encode()).digest()
            self._tokens.append((digest, Principal(t.name, config.tenant(t),
                                                   t.max_concurrent_runs, t.registries,
                                                   configured=configured,
                                                   operator=t.operator)))
        # Every caller without tokens; with tokens, only the open paths (no tenant's things).
        self.anonymous = Principal("anonymous", config.tenant(None),
                                   operator=not self._tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def of_tenant(self, tenant_id: str) -> Principal | None:
        """The caller a tenant's requests come as (its caps counted on the same object), for
        work done after the request has gone (a job); None once its token is unconfigured."""
        if not self._tokens:
            return self.anonymous if tenant_id == self.anonymous.tenant.id else None
        return next((p for _, p in self._tokens if p.tenant.id == tenant_id), None)

    def authenticate(self, header: str | None) -> Principal:
        if not self._tokens:
            return self.anonymous
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
            request[PRINCIPAL] = tokens.anonymous
        else:
            request[PRINCIPAL] = tokens.authenticate(request.headers.get("Authorization"))
        return await handler(request)
    return middleware


def principal(request: web.Request) -> Principal:
    """Who is calling: set for every request by auth_middleware."""
    p = request[PRINCIPAL]
    assert isinstance(p, Principal)
    return p
