"""Registry authentication: WWW-Authenticate challenges, Bearer tokens (Docker's token flow
and OAuth2 refresh tokens), Basic credentials, and a token cache per host and scope set."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson
from yarl import URL

from sandbox.errors import AuthError, RegistryError
from sandbox.images.registry.credentials import Credential, CredentialStore
from sandbox.images.registry.transport import Reply, check_url, describe_error

log = logging.getLogger(__name__)

MIN_TOKEN_LIFETIME = 60  # seconds, as Docker's token spec says
_EARLY = 5.0  # renew a token this many seconds before it expires
TOKEN_BODY_MAX = 1 << 20
CLIENT_ID = "sandboxd"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "bearer", "basic"
    params: Mapping[str, str] = field(default_factory=dict)  # keys lowercase

    def get(self, key: str) -> str | None:
        return self.params.get(key)


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Every challenge in every WWW-Authenticate value (RFC 9110 §11.6.1). Hostile input
    never raises; what cannot be parsed is skipped."""
    out: list[Challenge] = []
    for value in values:
        out.extend(_parse_header(value[:8192]))
    return out


def _parse_header(value: str) -> list[Challenge]:
    found: list[tuple[str, dict[str, str]]] = []
    i, n = 0, len(value)
    while i < n:
        if value[i] in " \t,":
            i += 1
            continue
        m = _TOKEN.match(value, i)
        if m is None:
            i += 1
            continue
        name, i = m.group(), m.end()
        j = i
        while j < n and value[j] in " \t":
            j += 1
        if found and j < n and value[j] == "=":
            param, i = _param_value(value, j + 1)
            found[-1][1].setdefault(name.lower(), param)
        else:
            found.append((name.lower(), {}))
    return [Challenge(scheme, params) for scheme, params in found]


def _param_value(value: str, i: int) -> tuple[str, int]:
    n = len(value)
    while i < n and value[i] in " \t":
        i += 1
    if i < n and value[i] == '"':
        out, i = [], i + 1
        while i < n and value[i] != '"':
            if value[i] == "\\" and i + 1 < n:
                i += 1
            out.append(value[i])
            i += 1
        return "".join(out), i + 1
    m = _TOKEN.match(value, i)
    return (m.group(), m.end()) if m else ("", i)


def pick(challenges: Sequence[Challenge]) -> Challenge | None:
    """Bearer if offered (it carries scope), else Basic, else nothing we speak."""
    for scheme in ("bearer", "basic"):
        for c in challenges:
            if c.scheme == scheme:
                return c
    return None


def merge_scopes(first: Iterable[str], rest: Iterable[str]) -> tuple[str, ...]:
    """New scopes first: some token servers only read the first `scope` parameter."""
    out: list[str] = []
    for s in (*first, *rest):
        if s and s not in out:
            out.append(s)
    return tuple(out)


class AuthTarget(Protocol):
    """What the authenticator needs to know about a registry host."""

    name: str  # host[:port] we talk to (the token cache is per this)
    cred_host: str  # host whose credentials apply
    challenges: list[Challenge]

    @property
    def allow_http(self) -> bool: ...

    @property
    def ssl(self) -> object: ...

    def may_be_local(self, host: str) -> bool:
        """May `host` (a realm's, a redirect's) be a local or private address?"""
        ...


# (target, method, url, headers, form data or None) -> the realm's reply (read whole)
TokenSender = Callable[[AuthTarget, str, URL, dict[str, str], dict[str, str] | None],
                       Awaitable[Reply]]


@dataclass
class _Cached:
    value: str
    expires_at: float


class Authenticator:
    """Builds Authorization headers for registry requests; caches tokens until they expire."""

    def __init__(self, send: TokenSender, credentials: CredentialStore, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._send = send
        self._credentials = credentials
        self._clock = clock
        self._tokens: dict[tuple[str, frozenset[str]], _Cached] = {}
        self._locks: dict[tuple[str, frozenset[str]], asyncio.Lock] = {}

    async def header(self, target: AuthTarget, scopes: Sequence[str]) -> str | None:
        challenge = pick(target.challenges)
        if challenge is None:
            return None
        cred = await self._credentials.get(target.cred_host)
        if challenge.scheme == "basic":
            return _basic(cred.basic) if cred is not None and cred.basic else None
        key = (target.name, frozenset(scopes))
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached is not None and self._clock() < cached.expires_at:
                return "Bearer " + cached.value
            token, lifetime = await self._fetch(target, challenge, scopes, cred)
            self._tokens[key] = _Cached(token, self._clock() + lifetime - _EARLY)
            return "Bearer " + token

    def after_unauthorized(self, target: AuthTarget, scopes: Sequence[str],
                           challenges: Sequence[Challenge]) -> tuple[str, ...] | None:
        """A 401 arrived: the scopes to ask for once more, or None when asking again would
        not help (the same credentials were already refused)."""
        challenge = pick(challenges)
        if not target.challenges and challenge is not None:
            # The ping needed no auth but this repository does.
            target.challenges = list(challenges)
            return tuple(scopes)
        if challenge is None or challenge.scheme != "bearer":
            return None
        self._tokens.pop((target.name, frozenset(scopes)), None)
        wanted = challenge.get("scope")
        if challenge.get("error") == "insufficient_scope" and wanted:
            return merge_scopes(wanted.split(" "), scopes)
        return tuple(scopes)  # the token may have been revoked: ask for a fresh one

    async def _fetch(self, target: AuthTarget, challenge: Challenge, scopes: Sequence[str],
                     cred: Credential | None) -> tuple[str, float]:
        realm_text = challenge.get("realm")
        if not realm_text:
            raise AuthError(f"{target.name} asks for a Bearer token but names no realm "
                            "(token server); the registry is misconfigured")
        try:
            realm = URL(realm_text)
        except ValueError:
            raise AuthError(f"{target.name}: the token realm {realm_text[:100]!r} is not a "
                            "URL") from None
        try:
            check_url(realm, allow_http=target.allow_http,
                      local_ok=target.may_be_local(realm.host or ""),
                      what=f"{target.name} sends us for a token to")
        except RegistryError as e:
            raise AuthError(str(e)) from None
        service = challenge.get("service")
        reply = None
        if cred is not None and cred.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": cred.identity_token,
                    "client_id": CLIENT_ID, "scope": " ".join(scopes)}
            if service:
                form["service"] = service
            reply = await self._send(target, "POST", realm, {}, form)
            if reply.status == 404:  # not every token server speaks OAuth2
                reply = None
        if reply is None:
            query: list[tuple[str, str]] = [("service", service)] if service else []
            query += [("scope", s) for s in scopes]
            headers = {}
            if cred is not None and cred.basic:
                headers["Authorization"] = _basic(cred.basic)
            reply = await self._send(target, "GET", realm.extend_query(query), headers, None)
        return self._token_from(target, realm, reply, cred, scopes)

    def _token_from(self, target: AuthTarget, realm: URL, reply: Reply,
                    cred: Credential | None, scopes: Sequence[str]) -> tuple[str, float]:
        if reply.status in (401, 403):
            who = (f"the credentials for {cred.username or 'the identity token'} from "
                   f"{cred.source}" if cred is not None else "an anonymous request")
            raise AuthError(f"the token server {realm.host} for {target.name} refused {who} "
                            f"({reply.status}); check the username and password (or run "
                            "docker login again)", status=reply.status)
        if reply.status != 200 or reply.too_big:
            message, code = describe_error(reply.status, reply.body)
            raise AuthError(f"the token server {realm.host} for {target.name} failed: "
                            f"{message if not reply.too_big else 'an oversized answer'}",
                            status=reply.status, code=code)
        try:
            data = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            data = None
        token = None
        if isinstance(data, dict):
            token = data.get("token") or data.get("access_token")
        if not isinstance(token, str) or not token or not token.isprintable():
            raise AuthError(f"the token server {realm.host} for {target.name} answered "
                            "without a token; the registry's auth is misconfigured")
        lifetime = data.get("expires_in") if isinstance(data, dict) else None
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float):
            lifetime = MIN_TOKEN_LIFETIME
        log.debug("token from %s for %s scopes %s, %ss", realm.host, target.name,
                  " ".join(scopes), lifetime)
        return token, max(float(lifetime), MIN_TOKEN_LIFETIME)


def _basic(pair: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{pair[0]}:{pair[1]}".encode()).decode()
