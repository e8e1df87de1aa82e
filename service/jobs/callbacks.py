"""A job's callback: the job's JSON POSTed to its callback_url once it ends, signed with its
tenant's secret, retried with exponential backoff and jitter, to hosts the operator listed.

The receiver checks, with the secret GET /v1/jobs/secret gives the tenant:

    Sandboxd-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>
    Sandboxd-Timestamp: <Unix seconds when this attempt was signed>
    Idempotency-Key:    <job id>:<status>   (the same on every attempt of the delivery)

No SSRF: the URL's host must be listed in `[jobs] callback_hosts` (checked at submit and
again at each attempt, the list may have changed since); a listed *name* is resolved at
each attempt by a resolver that keeps only public addresses, and the connection goes to
an address it kept, so a name that resolves (or is rebound) to 127.0.0.1, a private network
or a cloud's metadata address is refused, never reached; a receiver on such an address is
listed by that address. Redirects are never followed (a 3xx is a failed attempt)."""

from __future__ import annotations

import hashlib
import hmac
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

from sandbox import is_local_ip, parse_ip, split_host
from service.config import JobsConfig
from service.errors import ApiError, bad_request

SIGNATURE = "Sandboxd-Signature"
TIMESTAMP = "Sandboxd-Timestamp"
IDEMPOTENCY_KEY = "Idempotency-Key"
JOB = "Sandboxd-Job"
ATTEMPT = "Sandboxd-Attempt"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 keyed by the secret's text."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def _same_host(a: str, b: str) -> bool:
    ip_a, ip_b = parse_ip(a), parse_ip(b)
    if ip_a is not None or ip_b is not None:
        return ip_a == ip_b
    return a == b


def allowed(hosts: tuple[str, ...], host: str, port: int) -> bool:
    """Whether `host` (as a URL gives it, no brackets) on `port` is listed: an entry without
    a port allows any port of its host."""
    host = host.lower().rstrip(".")
    for entry in hosts:
        name, entry_port = split_host(entry)
        if _same_host(name, host) and entry_port in (None, port):
            return True
    return False


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int


def target(url: str, hosts: tuple[str, ...], field: str = "callback_url") -> Target:
    """The URL checked against the allowlist; a 400 naming `field` says what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise bad_request(f"{field}: not a valid URL ({e})", field) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad_request(f"{field}: give an http:// or https:// URL with a host", field)
    if parts.username is not None or parts.password is not None:
        raise bad_request(f"{field}: credentials in the URL are refused; authenticate the "
                          "callback by its signature (GET /v1/jobs/secret)", field)
    port = port if port is not None else (443 if parts.scheme == "https" else 80)
    if not allowed(hosts, parts.hostname, port):
        listed = ", ".join(hosts) if hosts else "none are"
        raise bad_request(f"{field}: host {parts.hostname}:{port} is not one callbacks may "
                          f"reach (jobs.callback_hosts: {listed}); ask the operator to list "
                          "it", field)
    return Target(url, parts.hostname, port)


class Refused(Exception):
    """The callback may not go to this host (now): not retried."""


class Failed(Exception):
    """This attempt failed (network, timeout, non-2xx): retried while attempts are left."""


class PublicResolver(AbstractResolver):
    """Names resolve to their public addresses only; the connector connects to what this
    returns, so the address checked is the address connected to. IP literals never come
    here: the allowlist names them exactly."""

    def __init__(self) -> None:
        self._inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if not is_local_ip(r["host"])]
        if not public:
            raise Refused(f"{host} resolves to {', '.join(r['host'] for r in found)}, a local "
                          "or private address: refused (SSRF); list the receiver's address in "
                          "jobs.callback_hosts to call back to it")
        return public

    async def close(self) -> None:
        await self._inner.close()


class Deliverer:
    """Delivers callbacks; one HTTP session, made in the event loop on first use."""

    def __init__(self, config: JobsConfig, user_agent: str) -> None:
        self.config = config
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=PublicResolver(), use_dns_cache=False),
                cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
                headers={"User-Agent": self._user_agent})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def deliver(self, url: str, body: bytes, key: str, job_id: str,
                      secret: Callable[[], str], *, starting: Callable[[], None],
                      ended: Callable[[str | None], None], attempts: int,
                      first: int = 1) -> str | None:
        """POST `body` until a 2xx or `attempts` are spent (numbered from `first`: a
        delivery a restart cut short goes on where it was); None when delivered, else why
        not. `starting()` is told before each attempt, `ended(error)` after it."""
        cfg = self.config
        number = first - 1

        async def attempt() -> None:
            nonlocal number
            number += 1
            starting()
            try:
                await self._post(url, body, key, job_id, secret(), number)
            except (Failed, Refused) as e:
                ended(str(e))
                raise
            ended(None)

        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            # "Full jitter": a random wait up to backoff * 2^n, so receivers that fail
            # together are not retried together.
            wait=wait_random_exponential(multiplier=cfg.callback_backoff_s,
                                         max=cfg.callback_backoff_max_s),
            retry=retry_if_exception_type(Failed), reraise=True)
        try:
            await retrying(attempt)
        except (Failed, Refused) as e:
            return str(e)
        return None

    async def _post(self, url: str, body: bytes, key: str, job_id: str, secret: str,
                    number: int) -> None:
        try:
            t = target(url, self.config.callback_hosts)  # the list may have changed since
        except ApiError as e:
            raise Refused(e.message) from None
        now = int(time.time())
        headers = {"Content-Type": "application/json", TIMESTAMP: str(now),
                   SIGNATURE: sign(secret, now, body), IDEMPOTENCY_KEY: key, JOB: job_id,
                   ATTEMPT: str(number)}
        try:
            async with self._client().post(
                    t.url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.config.callback_timeout_s)) as r:
                if 200 <= r.status < 300:
                    return
                why = " (a redirect: never followed)" if 300 <= r.status < 400 else ""
                raise Failed(f"the receiver answered {r.status}{why}")
        except aiohttp.ClientError as e:
            raise Failed(f"{type(e).__name__}: {e}") from None
        except TimeoutError:
            raise Failed(f"no answer within {self.config.callback_timeout_s:g} s "
                         "(jobs.callback_timeout_s)") from None
