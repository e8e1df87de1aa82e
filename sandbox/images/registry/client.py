"""The registry client: manifests, blobs and tags pulled through mirrors and then the origin;
blobs and manifests pushed to the origin. Every byte from a registry is hostile input."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar
from urllib.parse import urlencode

import aiohttp
import orjson
from yarl import URL

from sandbox.errors import (
    AuthError,
    DigestMismatch,
    ImageError,
    ManifestError,
    NotFound,
    RegistryError,
)
from sandbox.images import digests
from sandbox.images.reference import Reference
from sandbox.images.registry.auth import Authenticator, AuthTarget, Challenge, parse_challenges
from sandbox.images.registry.config import ConfigError, RegistriesConfig, RegistryConfig
from sandbox.images.registry.credentials import CredentialStore
from sandbox.images.registry.download import download
from sandbox.images.registry.hosts import is_local_address, split_host
from sandbox.images.registry.transport import (
    ERROR_BODY_MAX,
    RETRY_STATUSES,
    Body,
    Reply,
    RetryPolicy,
    Transient,
    Transport,
    check_url,
    clean,
    describe_error,
    read_reply,
    same_origin,
    transient_from,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_ACCEPT: tuple[str, ...] = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST,
                                    DOCKER_MANIFEST)
MANIFEST_MAX = 4 << 20
TAGS_PAGE_MAX = 4 << 20
TAGS_PAGES_MAX = 1000
MIRROR_ATTEMPTS = 2  # a mirror that fails is left for the next source, not waited for
MIRROR_REST = 60.0  # seconds a mirror that could not be reached is skipped
# Content-Types that say nothing about which manifest this is: the body's mediaType decides.
_UNTYPED = frozenset({"", "application/json", "text/plain", "application/octet-stream"})
_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"})
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]*/[A-Za-z0-9][\w.+-]*")
DEFAULT_RETRY = RetryPolicy()
_LINK_NEXT = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')

__all__ = ["MANIFEST_ACCEPT", "FetchedManifest", "ManifestHead", "RegistryClient",
           "RetryPolicy"]


@dataclass(frozen=True)
class FetchedManifest:
    media_type: str
    digest: str  # computed by us from `body`
    body: bytes
    source: str  # host that served it (a mirror or the origin)


@dataclass(frozen=True)
class ManifestHead:
    media_type: str
    digest: str | None
    size: int | None


@dataclass(eq=False)
class _Host:
    """A server we talk to (an origin or a mirror), with what its /v2/ ping told us."""

    name: str  # host[:port]
    config: RegistryConfig
    home: str | None  # its host name when it may be local (spelled so, or configured)
    trusts: Callable[[str], bool]  # RegistriesConfig.trusts
    cred_host: str  # whose credentials apply ("docker.io" for registry-1.docker.io)
    schemes: tuple[str, ...]  # tried in order by the ping
    ssl: ssl.SSLContext | bool
    sem: asyncio.Semaphore
    mirror: bool
    challenges: list[Challenge] = field(default_factory=list)
    base: URL | None = None
    ping_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    failed_at: float | None = None

    @property
    def allow_http(self) -> bool:
        return self.config.allows_plain_http

    def may_be_local(self, host: str) -> bool:
        """Its own host name, and hosts the configuration names, may be local or private;
        anything else it leads us to (a redirect, a token realm) may not."""
        name = host.lower().rstrip(".")
        return name == self.home or self.trusts(name)


def _pull_scopes(ref: Reference) -> tuple[str, ...]:
    return (f"repository:{ref.path}:pull",)


def _push_scopes(ref: Reference, mount_from: str | None = None) -> tuple[str, ...]:
    scopes = (f"repository:{ref.path}:push,pull",)
    return (*scopes, f"repository:{mount_from}:pull") if mount_from else scopes


def check_manifest(content_type: str | None, body: bytes, accept: Sequence[str],
                   where: str) -> str:
    """The manifest's media type: the Content-Type (parameters dropped), which must agree with
    the body's own `mediaType` when it has one (CVE-2021-41190) and be one we asked for."""
    header = (content_type or "").split(";", 1)[0].strip().lower()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ManifestError(f"the manifest {where} is not JSON") from None
    if not isinstance(data, dict):
        raise ManifestError(f"the manifest {where} is not a JSON object")
    declared = data.get("mediaType")
    if declared is not None and (not isinstance(declared, str) or not declared):
        raise ManifestError(f"the manifest {where} has a mediaType that is not a string")
    declared = declared.lower() if declared else None
    media_type = declared if header in _UNTYPED else header
    if not media_type:
        raise ManifestError(f"the manifest {where} has no media type (no Content-Type and no "
                            "mediaType field)")
    if declared is not None and declared != media_type:
        raise ManifestError(f"the manifest {where} is served as {clean(media_type, 100)} but "
                            f"says it is {clean(declared, 100)}; refusing an ambiguous manifest")
    if media_type not in {a.lower() for a in accept}:
        hint = (" (Docker schema 1, which sandboxd does not support; push the image again "
                "with a current tool)" if "v1+" in media_type or "prettyjws" in media_type
                else "")
        raise ManifestError(f"the manifest {where} has media type {clean(media_type, 100)}"
                            f"{hint}, not one of those asked for: {', '.join(accept)}")
    return media_type


class RegistryClient:
    """Talks to OCI/Docker registries. One aiohttp session; use as an async context manager
    (or call `close`) inside the event loop that uses it."""

    def __init__(self, config: RegistriesConfig | None = None, *,
                 retry: RetryPolicy = DEFAULT_RETRY, user_agent: str = "sandboxd/0.1") -> None:
        self.config = config if config is not None else RegistriesConfig()
        self._transport = Transport(retry, user_agent, trusts=self.config.trusts)
        self._credentials = CredentialStore(self.config)
        self._auth = Authenticator(self._token_request, self._credentials)
        self._hosts: dict[tuple[str, bool], _Host] = {}

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    # -- pull --------------------------------------------------------------------------------

    async def get_manifest(self, ref: Reference, *, accept: Sequence[str] = MANIFEST_ACCEPT,
                           size: int | None = None) -> FetchedManifest:
        """The manifest `ref` names. With `size` (a descriptor's), at most that many bytes are
        read and any other length is refused before the digest is even checked."""
        if size is not None and not 0 < size <= MANIFEST_MAX:
            raise ManifestError(f"the manifest {ref} claims {size} bytes; a manifest has 1 "
                                f"byte to {MANIFEST_MAX >> 20} MiB")

        async def attempt(host: _Host) -> FetchedManifest:
            return await self._manifest_from(host, ref, accept, size)
        return await self._from_sources(ref, attempt)

    async def head_manifest(self, ref: Reference) -> ManifestHead | None:
        """The manifest's type, digest and size without its body (does not count as a pull on
        Docker Hub), or None when it does not exist."""
        async def attempt(host: _Host) -> ManifestHead:
            head = await self._head_manifest_at(host, ref)
            if head is None:
                raise NotFound(f"manifest {ref} not found at {host.name}")
            return head
        try:
            return await self._from_sources(ref, attempt)
        except NotFound:
            return None

    async def fetch_blob(self, ref: Reference, digest: str, size: int, dest: Path, *,
                         on_progress: Callable[[int], None] | None = None,
                         urls: Sequence[str] = ()) -> None:
        """Stream the blob of `size` bytes (its descriptor's) into `dest`, verified: at most
        `size` bytes are read, and any other length fails. `dest` does not exist after a
        failure. Foreign `urls` (non-distributable layers) are tried first, without
        credentials."""
        digests.validate(digest, f"blob digest for {ref.repository}")
        if not 0 <= size <= self.config.max_blob_bytes:
            raise ManifestError(f"blob {digest} of {ref.repository} claims {size} bytes; a "
                                f"blob may have 0 to {self.config.max_blob_bytes} "
                                "(registries.max_blob_bytes), so it is not fetched")
        for url in urls:
            try:
                await self._download_foreign(url, digest, size, dest, on_progress)
                return
            except ImageError as e:
                log.info("foreign URL for %s failed, trying the next source: %s", digest, e)

        async def attempt(host: _Host) -> None:
            await download(lambda offset: self._open_blob(host, ref, digest, offset), digest,
                           size, dest, attempts=self._transport.retry.attempts,
                           pause=self._pause, where=f"{host.name}/{ref.path}",
                           on_progress=on_progress)
        await self._from_sources(ref, attempt)

    async def list_tags(self, ref: Reference) -> list[str]:
        host = self._origin(ref)
        url = await self._url(host, f"/v2/{ref.path}/tags/list")
        tags: list[str] = []
        for _ in range(TAGS_PAGES_MAX):
            what = f"GET tags of {ref.repository}"
            reply = await self._request(host, "GET", url, scopes=_pull_scopes(ref),
                                        limit=TAGS_PAGE_MAX, what=what)
            if reply.status != 200:
                raise self._failure(host, reply, what, f"repository {ref.repository}")
            try:
                data = orjson.loads(reply.body) if not reply.too_big else None
                page = data.get("tags") or []
            except (orjson.JSONDecodeError, AttributeError):
                raise RegistryError(f"{host.name}: the tag list of {ref.repository} is not "
                                    "a JSON object of at most 4 MiB") from None
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise RegistryError(f"{host.name}: the tag list of {ref.repository} is not a "
                                    "list of strings")
            tags.extend(page)
            m = _LINK_NEXT.search(reply.headers.get("Link", ""))
            if m is None:
                return tags
            url = reply.url.join(URL(m[1], encoded=True))
            if not same_origin(url, reply.url):
                raise RegistryError(f"{host.name}: the tag list of {ref.repository} continues "
                                    f"on another host ({clean(url.host or '', 100)}); refused")
        raise RegistryError(f"{host.name}: the tag list of {ref.repository} has more than "
                            f"{TAGS_PAGES_MAX} pages")

    # -- push --------------------------------------------------------------------------------

    async def blob_exists(self, ref: Reference, digest: str) -> bool:
        digests.validate(digest, f"blob digest for {ref.repository}")
        host = self._origin(ref)
        url = await self._url(host, f"/v2/{ref.path}/blobs/{digest}")
        what = f"HEAD blob {digest}"
        reply = await self._request(host, "HEAD", url, scopes=_push_scopes(ref), what=what)
        if reply.status == 200:
            return True
        if reply.status == 404:
            return False
        raise self._failure(host, reply, what, f"blob {digest} of {ref.repository}")

    async def mount_blob(self, ref: Reference, digest: str, from_path: str) -> bool:
        """Ask the registry to link the blob from another repository of its own: True when it
        did, False when it would not (the upload it opened instead is cancelled)."""
        digests.validate(digest, f"blob digest for {ref.repository}")
        Reference(domain=ref.domain, path=from_path)  # validates the source repository path
        host = self._origin(ref)
        url = (await self._url(host, f"/v2/{ref.path}/blobs/uploads/")).with_query(
            {"mount": digest, "from": from_path})
        what = f"mount blob {digest} from {from_path}"
        reply = await self._request(host, "POST", url, body=b"", what=what,
                                    scopes=_push_scopes(ref, from_path))
        if reply.status == 201:
            return True
        if reply.status != 202:
            raise self._failure(host, reply, what, f"repository {ref.repository}")
        location = reply.headers.get("Location")
        if location:
            try:
                target = self._upload_location(host, reply, location)
                await self._request(host, "DELETE", target, scopes=_push_scopes(ref),
                                    what="cancel the upload a refused mount opened")
            except ImageError as e:  # the registry expires abandoned uploads anyway
                log.info("could not cancel upload at %s: %s", host.name, e)
        return False

    async def upload_blob(self, ref: Reference, digest: str, size: int, src: Path) -> None:
        """Monolithic upload: POST for a session, then one PUT of the whole file."""
        digests.validate(digest, f"blob digest for {ref.repository}")
        actual = src.stat().st_size
        if actual != size:
            raise DigestMismatch(f"{src} holds {actual} bytes but blob {digest} should have "
                                 f"{size}; refusing to upload it")
        host = self._origin(ref)
        scopes = _push_scopes(ref)
        what = f"start upload of blob {digest} to {ref.repository}"
        url = await self._url(host, f"/v2/{ref.path}/blobs/uploads/")
        reply = await self._request(host, "POST", url, body=b"", scopes=scopes, what=what)
        if reply.status != 202 or not reply.headers.get("Location"):
            raise self._failure(host, reply, what, f"repository {ref.repository}")
        location = self._upload_location(host, reply, reply.headers["Location"])
        sep = "&" if location.raw_query_string else "?"
        put_url = URL(f"{location}{sep}digest={digest}", encoded=True)
        what = f"upload blob {digest} to {ref.repository}"
        reply = await self._request(
            host, "PUT", put_url, body=src, scopes=scopes, what=what,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
        if reply.status not in (201, 204):
            raise self._failure(host, reply, what, f"repository {ref.repository}")
        said = reply.headers.get("Docker-Content-Digest")
        if said is not None and said != digest:
            raise DigestMismatch(f"{host.name} stored blob {digest} as {clean(said, 80)}; the "
                                 "upload was corrupted on the way")

    async def put_manifest(self, ref: Reference, media_type: str, body: bytes) -> str:
        """Store `body` under the reference's tag (or digest); returns its digest."""
        if len(body) > MANIFEST_MAX:
            raise ManifestError(f"the manifest for {ref} is {len(body)} bytes; registries "
                                f"need only accept {MANIFEST_MAX >> 20} MiB")
        if not _MEDIA_TYPE.fullmatch(media_type):
            raise ManifestError(f"{media_type[:100]!r} is not a media type")
        digest = digests.of_bytes(body)
        if ref.digest is not None and ref.digest != digest:
            raise DigestMismatch(f"the manifest for {ref} hashes to {digest}")
        host = self._origin(ref)
        url = await self._url(host, f"/v2/{ref.path}/manifests/{ref.identifier}")
        what = f"PUT manifest {ref}"
        reply = await self._request(host, "PUT", url, body=body, scopes=_push_scopes(ref),
                                    headers={"Content-Type": media_type}, what=what)
        if not 200 <= reply.status < 300:
            raise self._failure(host, reply, what, f"repository {ref.repository}")
        said = reply.headers.get("Docker-Content-Digest")
        if said is not None and said != digest:
            raise DigestMismatch(f"{host.name} stored the manifest for {ref} as "
                                 f"{clean(said, 80)}, not {digest}")
        return digest

    # -- sources: mirrors, then the origin -------------------------------------------------

    def _host(self, name: str, cred_host: str, config: RegistryConfig, *, mirror: bool,
              scheme: str | None = None) -> _Host:
        host = self._hosts.get((name, mirror))
        if host is None:
            if scheme == "http" and not config.allows_plain_http:
                raise ConfigError(f"registry {name} is configured as http:// but is not marked "
                                  "insecure; add insecure = true for it, or use https")
            schemes = ((scheme,) if scheme else
                       ("https", "http") if config.allows_plain_http else ("https",))
            verify = config.ca_file is not None or not config.allows_plain_http
            bare = split_host(name)[0].lower().rstrip(".")
            home = bare if is_local_address(bare) or self.config.trusts(bare) else None
            host = _Host(name=name, config=config, home=home, trusts=self.config.trusts,
                         cred_host=cred_host, schemes=schemes,
                         ssl=self._transport.ssl_context(config.ca_file, verify),
                         sem=asyncio.Semaphore(config.max_concurrency), mirror=mirror)
            self._hosts[(name, mirror)] = host
        return host

    def _origin(self, ref: Reference) -> _Host:
        return self._host(ref.api_host, ref.domain, self.config.for_host(ref.domain),
                          mirror=False)

    def _sources(self, ref: Reference) -> list[tuple[_Host, bool]]:
        mirrors = self.config.for_host(ref.domain).mirror_list()
        out = [(self._host(m.host, m.host, self.config.for_host(m.host), mirror=True,
                           scheme=m.scheme), True) for m in mirrors]
        return [*out, (self._origin(ref), False)]

    async def _from_sources(self, ref: Reference,
                            attempt: Callable[[_Host], Awaitable[T]]) -> T:
        """`attempt` on each mirror in turn, then on the origin. A mirror that fails is
        passed over (and rested if it could not be reached); the origin's error is final."""
        for host, is_mirror in self._sources(ref):
            if not is_mirror:
                return await attempt(host)
            if host.failed_at is not None and time.monotonic() - host.failed_at < MIRROR_REST:
                continue
            try:
                return await attempt(host)
            except ImageError as e:
                if isinstance(e, RegistryError) and not isinstance(e, AuthError):
                    host.failed_at = time.monotonic()
                log.info("mirror %s failed for %s, trying the next source: %s",
                         host.name, ref, e)
        raise AssertionError("unreachable: the origin is always the last source")

    # -- requests ----------------------------------------------------------------------------

    async def _url(self, host: _Host, path: str) -> URL:
        if host.base is None:
            async with host.ping_lock:
                if host.base is None:
                    await self._ping(host)
        assert host.base is not None
        return host.base.with_path(path)

    async def _ping(self, host: _Host) -> None:
        """GET /v2/ once per host: which scheme it speaks and how it wants us to log in."""
        reply = None
        for i, scheme in enumerate(host.schemes):
            base = URL.build(scheme=scheme, authority=host.name)
            last = i == len(host.schemes) - 1
            try:
                reply = await self._transport.with_retries(
                    host.name, f"GET {base}/v2/",
                    lambda base=base: self._attempt(host, "GET", base.with_path("/v2/"), {},
                                                    None, None, ERROR_BODY_MAX),
                    attempts=None if last else 1)
            except RegistryError as e:
                if last:
                    raise
                log.debug("%s does not answer %s (%s); trying the next scheme",
                          host.name, scheme, e)
                continue
            if reply.status == 401:
                host.challenges = parse_challenges(reply.headers.getall("WWW-Authenticate", []))
            elif reply.status != 200:
                message, code = describe_error(reply.status, reply.body)
                raise RegistryError(f"{host.name}: GET /v2/ answered {message}; this is not a "
                                    "registry API endpoint; check the host and port",
                                    status=reply.status, code=code)
            host.base = base
            return

    async def _held(self, host: _Host, method: str, url: URL, headers: dict[str, str],
                    body: Body, authorization: str | None) -> aiohttp.ClientResponse:
        """One try, holding a place in the host's concurrency bound; on success the caller
        releases both the response and the place."""
        await host.sem.acquire()
        try:
            resp = await self._transport.send(
                method, url, headers=headers, body=body, ssl_ctx=host.ssl,
                authorization=authorization, allow_http=host.allow_http,
                may_be_local=host.may_be_local)
            if resp.status in RETRY_STATUSES:
                raise await transient_from(resp)
        except BaseException:
            host.sem.release()
            raise
        return resp

    async def _attempt(self, host: _Host, method: str, url: URL, headers: dict[str, str],
                       body: Body, authorization: str | None, limit: int | None
                       ) -> Reply | aiohttp.ClientResponse:
        """One try; the body is read whole when `limit` is given or the answer is a refusal,
        else the response is handed over open."""
        resp = await self._held(host, method, url, headers, body, authorization)
        if limit is None and resp.status not in (401, 403):
            return resp
        try:
            return await read_reply(resp, limit or ERROR_BODY_MAX)
        finally:
            host.sem.release()

    async def _exchange(self, host: _Host, method: str, url: URL, *, scopes: Sequence[str],
                        headers: dict[str, str] | None, body: Body, what: str,
                        limit: int | None) -> Reply | aiohttp.ClientResponse:
        """A request with retries and auth: asks for a token (or sends Basic credentials) as
        the host's challenge says, and once more after a 401 with what the 401 asked for."""
        attempts = min(MIRROR_ATTEMPTS, self._transport.retry.attempts) if host.mirror else None
        hdrs = dict(headers or {})

        async def run(authorization: str | None) -> Reply | aiohttp.ClientResponse:
            return await self._transport.with_retries(
                host.name, what,
                lambda: self._attempt(host, method, url, hdrs, body, authorization, limit),
                attempts=attempts)

        got = await run(await self._auth.header(host, scopes))
        if got.status == 401:
            assert isinstance(got, Reply)
            again = self._auth.after_unauthorized(
                host, scopes, parse_challenges(got.headers.getall("WWW-Authenticate", [])))
            if again is not None:
                got = await run(await self._auth.header(host, again))
        if got.status in (401, 403):
            assert isinstance(got, Reply)
            raise await self._denied(host, got, what)
        return got

    async def _request(self, host: _Host, method: str, url: URL, *, scopes: Sequence[str],
                       what: str, headers: dict[str, str] | None = None, body: Body = None,
                       limit: int = ERROR_BODY_MAX) -> Reply:
        got = await self._exchange(host, method, url, scopes=scopes, headers=headers,
                                   body=body, what=what, limit=limit)
        assert isinstance(got, Reply)
        return got

    @asynccontextmanager
    async def _open(self, host: _Host, method: str, url: URL, *, scopes: Sequence[str],
                    what: str, headers: dict[str, str] | None = None
                    ) -> AsyncIterator[aiohttp.ClientResponse]:
        got = await self._exchange(host, method, url, scopes=scopes, headers=headers,
                                   body=None, what=what, limit=None)
        assert isinstance(got, aiohttp.ClientResponse)
        try:
            yield got
        finally:
            got.release()
            host.sem.release()

    async def _token_request(self, target: AuthTarget, method: str, url: URL,
                             headers: dict[str, str], form: dict[str, str] | None) -> Reply:
        """A request to `target`'s token server (no concurrency bound: it is not the
        registry), whose realm URL the authenticator has checked."""
        hdrs = dict(headers)
        authorization = hdrs.pop("Authorization", None)
        body = None
        if form is not None:
            body = urlencode(form).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        ssl_ctx = target.ssl
        assert isinstance(ssl_ctx, ssl.SSLContext | bool)

        async def attempt() -> Reply:
            resp = await self._transport.send(method, url, headers=hdrs, body=body,
                                              ssl_ctx=ssl_ctx, authorization=authorization,
                                              allow_http=url.scheme == "http",
                                              may_be_local=target.may_be_local)
            if resp.status in RETRY_STATUSES:
                raise await transient_from(resp)
            return await read_reply(resp, 1 << 20)

        return await self._transport.with_retries(url.host or "token server",
                                                  f"{method} token", attempt)

    # -- answers -----------------------------------------------------------------------------

    def _failure(self, host: _Host, reply: Reply, what: str, subject: str) -> ImageError:
        message, code = describe_error(reply.status, reply.body)
        if reply.status == 404 or code in _NOT_FOUND_CODES:
            return NotFound(f"{subject} not found at {host.name} ({message}); check the name, "
                            "tag or digest")
        return RegistryError(f"{host.name}: {what} failed: {message}", status=reply.status,
                             code=code)

    async def _denied(self, host: _Host, reply: Reply, what: str) -> AuthError:
        message, code = describe_error(reply.status, reply.body)
        cred = await self._credentials.get(host.cred_host)
        if cred is not None:
            hint = (f"the registry refused the credentials from {cred.source}; check that "
                    "they are right and allowed to do this")
        else:
            hint = ("the repository may not exist, or it needs credentials: add a username "
                    f"and password for {host.cred_host} to the sandboxd registries config, "
                    f"or run docker login {host.cred_host}")
        return AuthError(f"{host.name}: {what}: {message}; {hint}", status=reply.status,
                         code=code)

    async def _manifest_from(self, host: _Host, ref: Reference, accept: Sequence[str],
                             size: int | None) -> FetchedManifest:
        url = await self._url(host, f"/v2/{ref.path}/manifests/{ref.identifier}")
        what = f"GET manifest {ref}"
        reply = await self._request(host, "GET", url, scopes=_pull_scopes(ref), what=what,
                                    headers={"Accept": ", ".join(accept)},
                                    limit=MANIFEST_MAX if size is None else size)
        if reply.status != 200:
            raise self._failure(host, reply, what, f"manifest {ref}")
        where = f"of {ref} from {host.name}"
        if size is not None and (reply.too_big or len(reply.body) != size):
            said = "more" if reply.too_big else len(reply.body)
            raise DigestMismatch(f"the manifest {where} has {said} bytes, its descriptor says "
                                 f"{size}; refusing it")
        if reply.too_big:
            raise ManifestError(f"the manifest {where} is larger than {MANIFEST_MAX >> 20} "
                                "MiB; refusing it")
        media_type = check_manifest(reply.headers.get("Content-Type"), reply.body, accept,
                                    where)
        digest = digests.of_bytes(reply.body)
        if ref.digest is not None and digest != ref.digest:
            raise DigestMismatch(f"the manifest {where} hashes to {digest}, not the digest "
                                 "asked for; refusing it")
        return FetchedManifest(media_type=media_type, digest=digest, body=reply.body,
                               source=host.name)

    async def _head_manifest_at(self, host: _Host, ref: Reference) -> ManifestHead | None:
        url = await self._url(host, f"/v2/{ref.path}/manifests/{ref.identifier}")
        what = f"HEAD manifest {ref}"
        reply = await self._request(host, "HEAD", url, scopes=_pull_scopes(ref), what=what,
                                    headers={"Accept": ", ".join(MANIFEST_ACCEPT)})
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise self._failure(host, reply, what, f"manifest {ref}")
        digest = reply.headers.get("Docker-Content-Digest")
        if digest is not None:
            digest = digests.validate(digest.strip(), f"digest {host.name} gives for {ref}")
            if ref.digest is not None and digest != ref.digest:
                raise DigestMismatch(f"{host.name} answers {digest} for {ref}")
        length = reply.headers.get("Content-Length", "")
        media_type = reply.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        return ManifestHead(media_type=media_type, digest=digest,
                            size=int(length) if length.isascii() and length.isdigit() else None)

    @asynccontextmanager
    async def _open_blob(self, host: _Host, ref: Reference, digest: str,
                         offset: int) -> AsyncIterator[aiohttp.ClientResponse]:
        url = await self._url(host, f"/v2/{ref.path}/blobs/{digest}")
        what = f"GET blob {digest}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        async with self._open(host, "GET", url, scopes=_pull_scopes(ref), what=what,
                              headers=headers) as resp:
            if resp.status not in (200, 206):
                raise self._failure(host, await _error_reply(resp), what,
                                    f"blob {digest} of {ref.repository}")
            yield resp

    async def _download_foreign(self, text: str, digest: str, size: int | None, dest: Path,
                                on_progress: Callable[[int], None] | None) -> None:
        """A non-distributable layer's own URL: https only, never a local address, and no
        credentials of ours (CVE-2020-15157)."""
        try:
            url = URL(text)
        except ValueError:
            raise RegistryError(f"foreign layer URL {clean(text, 100)!r} is not a URL"
                                ) from None
        check_url(url, allow_http=False, local_ok=False, what="a foreign layer points to")

        @asynccontextmanager
        async def open_at(offset: int) -> AsyncIterator[aiohttp.ClientResponse]:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            resp = await self._transport.with_retries(
                url.host or text, f"GET {url}",
                lambda: self._transport.send("GET", url, headers=headers, body=None,
                                             ssl_ctx=True, authorization=None,
                                             allow_http=False, may_be_local=_nowhere),
                attempts=1)
            try:
                if resp.status not in (200, 206):
                    reply = await _error_reply(resp)
                    message, _ = describe_error(reply.status, reply.body)
                    raise RegistryError(f"foreign layer URL {url.host}: {message}",
                                        status=reply.status)
                yield resp
            finally:
                resp.release()

        await download(open_at, digest, size, dest, attempts=self._transport.retry.attempts,
                       pause=self._pause, where=str(url.host), on_progress=on_progress)

    def _upload_location(self, host: _Host, reply: Reply, location: str) -> URL:
        """The upload session's URL exactly as the registry gave it (relative ones resolved
        against the request), provided it is on the same registry."""
        try:
            target = reply.url.join(URL(location, encoded=True))
        except ValueError:
            raise RegistryError(f"{host.name}: upload Location {clean(location, 100)!r} is "
                                "not a URL") from None
        assert host.base is not None
        if target.host != host.base.host or target.port != host.base.port:
            raise RegistryError(f"{host.name}: the upload session is on another host "
                                f"({clean(str(target.host), 100)}:{target.port}); refused")
        if target.scheme != host.base.scheme and not host.allow_http:
            raise RegistryError(f"{host.name}: the upload session URL is plain HTTP; refused "
                                "because the registry is not marked insecure")
        return target

    async def _pause(self, n: int) -> None:
        policy = self._transport.retry
        await self._transport.sleep(min(policy.first_delay * 2 ** (n - 1), policy.max_delay))


def _nowhere(host: str) -> bool:
    return False


async def _error_reply(resp: aiohttp.ClientResponse) -> Reply:
    """An error answer's body for its message; a body that breaks off is left out."""
    try:
        return await read_reply(resp, ERROR_BODY_MAX)
    except Transient:
        return Reply(resp.status, resp.headers, b"", resp.url)
