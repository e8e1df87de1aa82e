"""HTTP for the registry client: one aiohttp session, bounded retries (tenacity) with
Retry-After, redirects followed by hand so that Authorization and request bodies never leave
their origin, a resolver that keeps untrusted names off local addresses (SSRF), and error
answers turned into short messages of our own words and the registry's error codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path
from typing import TypeVar

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDictProxy
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from yarl import URL

from sandbox.errors import RegistryError
from sandbox.images.registry.hosts import is_local_address, is_local_ip

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 10
ERROR_BODY_MAX = 64 << 10
ERRORS_SHOWN = 3  # of a registry's error list
ERROR_MESSAGE_MAX = 120  # characters of each error's message
_ERROR_CODE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 120.0  # per read: a stalled connection fails, a long download does not


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failing request is repeated (tests pass tiny delays)."""

    attempts: int = 5
    first_delay: float = 0.5
    max_delay: float = 30.0


class Transient(Exception):
    """A failure worth repeating: a connection problem, 429 or a 5xx."""

    def __init__(self, cause: str, *, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.status = status
        self.code = code
        self.retry_after = retry_after


@dataclass(frozen=True)
class Reply:
    """A response read whole (bodies that fit in memory: manifests, tokens, errors)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    url: URL
    too_big: bool = False  # the body was longer than the reader's limit; `body` is a prefix


Body = bytes | Path | None


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After in seconds or as an HTTP date -> seconds from now (never negative)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def clean(text: str, limit: int = 300) -> str:
    """Text from a registry, made safe to put in a message: printable, bounded."""
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "(no standard meaning)"


def describe_error(status: int, body: bytes) -> tuple[str, str | None]:
    """An error answer as a message and its first OCI error code: "404 MANIFEST_UNKNOWN:
    manifest unknown; ..." from `{"errors": [{"code", "message"}]}`, each message printable and
    capped, else the status and its standard phrase. Nothing else of the answer is repeated
    (not its body, not its reason phrase): it may be an internal page the caller must not see."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        data = None
    errors = data.get("errors") if isinstance(data, dict) else None
    parts: list[str] = []
    first: str | None = None
    for err in errors[:ERRORS_SHOWN] if isinstance(errors, list) else ():
        code = err.get("code") if isinstance(err, dict) else None
        if not isinstance(code, str) or not _ERROR_CODE.fullmatch(code):
            continue
        message = err.get("message")
        message = clean(message, ERROR_MESSAGE_MAX) if isinstance(message, str) else ""
        first = first or code
        parts.append(f"{code}: {message}" if message else code)
    if parts:
        return f"{status} " + "; ".join(parts), first
    return f"{status} {_phrase(status)}", None


def failure_text(e: BaseException) -> str:
    """What went wrong with a connection or a body, in our words: an OS error's text names
    only our own host and port; other aiohttp errors can quote what the server sent (a
    banner of whatever listens there), so only their kind is given."""
    if isinstance(e, aiohttp.ClientOSError):
        return f"{type(e).__name__}: {clean(str(e), 200)}"
    return type(e).__name__


def same_origin(a: URL, b: URL) -> bool:
    return (a.scheme, a.host, a.explicit_port or a.port) == (b.scheme, b.host,
                                                            b.explicit_port or b.port)


def _carries(body: Body) -> bool:
    return isinstance(body, Path) or bool(body)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, with the local and private addresses (`is_local_ip`) dropped from
    what a name resolves to unless `may_be_local(name)`. The connector connects only to the
    addresses this returns, so the address checked is the address connected to: a name that
    resolves to a public address once and to 127.0.0.1 the next time (DNS rebinding) gains
    nothing. IP literals never come here; `check_url` judges them by their spelling."""

    def __init__(self, may_be_local: Callable[[str], bool],
                 inner: AbstractResolver | None = None) -> None:
        self._may_be_local = may_be_local
        self._inner = inner if inner is not None else aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if self._may_be_local(host):
            return found
        public = [r for r in found if not is_local_ip(r["host"])]
        if not public:
            # The addresses go to the operator's log only: a tenant may not map the network.
            log.warning("refused to connect to %s, which resolves to %s", host,
                        ", ".join(r["host"] for r in found))
            raise RegistryError(
                f"{clean(host, 100)} resolves to a local or private address; refused, "
                "because a registry may not lead sandboxd into its own machine or network "
                "(SSRF). If it is one of yours (a registry, its token server or storage), "
                "name it under [registries] in the configuration")
        return public

    async def close(self) -> None:
        await self._inner.close()


class Transport:
    """The session and the rules every request follows. Create and use inside one loop."""

    def __init__(self, retry: RetryPolicy, user_agent: str,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, *,
                 trusts: Callable[[str], bool] = lambda host: False) -> None:
        """`trusts(name)`: the operator named this host (a configured registry or mirror),
        so it may resolve to a local or private address."""
        self.retry = retry
        self.sleep = sleep
        self._user_agent = user_agent
        self._trusts = trusts
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None
        self._ssl: dict[str | None, ssl.SSLContext] = {}

    def _may_resolve_local(self, host: str) -> bool:
        # `localhost` names only get here past check_url, which decided whether they may.
        return is_local_address(host) or self._trusts(host)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._resolver = GuardedResolver(self._may_resolve_local)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=self._resolver),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT,
                                              sock_read=READ_TIMEOUT),
                # Blob bytes are hashed as they arrive: nothing may decode them on the way.
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": self._user_agent, "Accept-Encoding": "identity"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    def ssl_context(self, ca_file: str | None, verify: bool) -> ssl.SSLContext | bool:
        if not verify:
            return False
        if ca_file is None:
            return True
        ctx = self._ssl.get(ca_file)
        if ctx is None:
            try:
                ctx = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as e:
                raise RegistryError(f"cannot load the CA file {ca_file}: {e}; fix the "
                                    "registry's ca_file setting") from None
            self._ssl[ca_file] = ctx
        return ctx

    def _delay(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Transient) and exc.retry_after is not None:
            return min(exc.retry_after, self.retry.max_delay)
        delay = self.retry.first_delay * 2 ** (state.attempt_number - 1)
        return min(delay * random.uniform(1.0, 1.1), self.retry.max_delay)

    async def with_retries(self, host: str, what: str, attempt: Callable[[], Awaitable[T]],
                           *, attempts: int | None = None) -> T:
        """Run `attempt` until it does not raise Transient, at most `attempts` times."""
        n = max(1, attempts or self.retry.attempts)
        retrying = AsyncRetrying(stop=stop_after_attempt(n), wait=self._delay,
                                 retry=retry_if_exception_type(Transient), reraise=True,
                                 sleep=self.sleep)
        try:
            async for state in retrying:
                with state:
                    return await attempt()
        except Transient as e:
            tries = f"{n} attempts" if n > 1 else "one attempt"
            advice = ("the registry is rate-limiting us; wait and try again, or log in for a "
                      "higher limit" if e.status == 429 else
                      "check that the registry is up and reachable, then try again")
            raise RegistryError(f"{host}: {what} failed after {tries}; last error: {e.cause}; "
                                f"{advice}", status=e.status, code=e.code) from None
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def send(self, method: str, url: URL, *, headers: Mapping[str, str], body: Body,
                   ssl_ctx: ssl.SSLContext | bool, authorization: str | None,
                   allow_http: bool, may_be_local: Callable[[str], bool]
                   ) -> aiohttp.ClientResponse:
        """One request, following redirects. Authorization goes only to `url`'s own origin,
        and so does a body (a 307/308 elsewhere would re-send it: refused, as Go's client
        does for a body it cannot rewind, which is how containers/image streams blobs). A
        redirect may not downgrade to http (unless `allow_http`) nor name a local address
        (unless `may_be_local(host)`). Connection failures raise Transient."""
        origin = url
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = dict(headers)
            if authorization is not None and same_origin(url, origin):
                hdrs["Authorization"] = authorization
            resp = await self._send_once(method, url, hdrs, body,
                                         ssl_ctx if same_origin(url, origin) else True)
            if resp.status not in _REDIRECTS or "Location" not in resp.headers:
                return resp
            location = resp.headers["Location"]
            resp.release()
            try:
                target = url.join(URL(location, encoded=True))
            except ValueError:
                raise RegistryError(f"{url.host}: redirect to a malformed URL "
                                    f"{clean(location, 100)!r}") from None
            check_url(target, allow_http=allow_http, local_ok=may_be_local(target.host or ""),
                      what=f"{url.host} redirected to")
            if resp.status == 303 or (resp.status in (301, 302) and method == "POST"):
                method, body = "GET", None
            elif _carries(body) and not same_origin(target, origin):
                raise RegistryError(
                    f"{url.host}: {method} {clean(url.path, 100)} was redirected "
                    f"({resp.status}) to another host, {target.host}; sandboxd sends what it "
                    "uploads only to the registry it pushes to, so the push stops here. "
                    f"Push to {target.host} directly if that is where this registry keeps "
                    "its data")
            url = target
        raise RegistryError(f"{origin.host}: more than {MAX_REDIRECTS} redirects for "
                            f"{origin.path}; the registry or its storage is misconfigured")

    async def _send_once(self, method: str, url: URL, headers: dict[str, str], body: Body,
                         ssl_ctx: ssl.SSLContext | bool) -> aiohttp.ClientResponse:
        try:
            if isinstance(body, Path):
                with body.open("rb") as f:
                    return await self.session.request(method, url, headers=headers, data=f,
                                                      allow_redirects=False, ssl=ssl_ctx)
            return await self.session.request(method, url, headers=headers, data=body,
                                              allow_redirects=False, ssl=ssl_ctx)
        except aiohttp.ClientSSLError as e:
            raise RegistryError(f"{url.host}: TLS failed: {e}; set ca_file for this registry "
                                "(or insecure = true if you trust the network)") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as e:
            raise Transient(failure_text(e)) from None
        except aiohttp.ClientError as e:
            raise RegistryError(f"{url.host}: {method} {clean(url.path, 100)} failed: the "
                                f"answer is not HTTP a registry speaks ({failure_text(e)}); "
                                "check the host and port") from None


def check_url(url: URL, *, allow_http: bool, local_ok: bool, what: str) -> None:
    """Refuse plain http (unless allowed) and hosts spelled as local addresses (unless
    `local_ok`): a registry must not make us talk to the machine or network we run on (SSRF).
    Names that only resolve to such addresses are the resolver's to refuse."""
    if url.scheme not in ("https", "http") or not url.host:
        raise RegistryError(f"{what} {clean(str(url), 100)!r}, which is not an http(s) URL")
    if url.scheme == "http" and not allow_http:
        raise RegistryError(f"{what} plain-HTTP URL {url.host}; refused because the registry "
                            "is not marked insecure")
    if not local_ok and is_local_address(url.host):
        raise RegistryError(f"{what} {url.host}, a local or private address; refused, because "
                            "only the registry's own host or a host named under [registries] "
                            "in the configuration may be one (SSRF)")


async def read_reply(resp: aiohttp.ClientResponse, limit: int) -> Reply:
    """Read at most `limit` bytes of the body and release the connection."""
    try:
        length = resp.content_length
        if length is not None and length > limit:
            return Reply(resp.status, resp.headers, b"", resp.url, too_big=True)
        chunks: list[bytes] = []
        got = 0
        async for chunk in resp.content.iter_any():
            chunks.append(chunk)
            got += len(chunk)
            if got > limit:
                return Reply(resp.status, resp.headers, b"".join(chunks)[:limit], resp.url,
                             too_big=True)
        return Reply(resp.status, resp.headers, b"".join(chunks), resp.url)
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as e:
        raise Transient(f"the body broke off: {failure_text(e)}") from None
    finally:
        resp.release()


async def transient_from(resp: aiohttp.ClientResponse) -> Transient:
    """The Transient for a 429/5xx response (its body read for the message)."""
    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    body = b""
    with contextlib.suppress(Transient):
        body = (await read_reply(resp, ERROR_BODY_MAX)).body
    message, code = describe_error(resp.status, body)
    return Transient(message, status=resp.status, code=code, retry_after=retry_after)
