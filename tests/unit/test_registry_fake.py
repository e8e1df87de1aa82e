"""The registry client against small aiohttp servers on 127.0.0.1 that misbehave on purpose:
auth flows, retries, redirects, mirrors, manifests, resumed blobs and push."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from sandbox.errors import AuthError, DigestMismatch, ManifestError, NotFound, RegistryError
from sandbox.images.reference import Reference, parse
from sandbox.images.registry import (
    RegistriesConfig,
    RegistryClient,
    RegistryConfig,
    RetryPolicy,
)
from sandbox.images.registry.client import OCI_MANIFEST

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FAST = RetryPolicy(attempts=3, first_delay=0.01, max_delay=0.05)
BLOB = bytes(range(256)) * 4096  # 1 MiB
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


@dataclass
class Server:
    handler: Handler
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    port: int = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ref(self, name: str = "test/app:1") -> Reference:
        return parse(f"{self.host}/{name}")

    def paths(self, method: str | None = None) -> list[str]:
        return [p for m, p, _ in self.seen if method is None or m == method]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path_qs, dict(request.headers)))
        return await self.handler(request)


@asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server._handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = runner.addresses[0][1]
    try:
        yield server
    finally:
        await runner.cleanup()


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def client(config: RegistriesConfig | None = None, sleeps: list[float] | None = None
           ) -> RegistryClient:
    c = RegistryClient(config, retry=FAST)
    if sleeps is not None:
        async def sleep(delay: float) -> None:
            sleeps.append(delay)
        c._transport.sleep = sleep
    return c


def oci_manifest(**extra: Any) -> bytes:
    return orjson.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                         "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                    "digest": BLOB_DIGEST, "size": len(BLOB)},
                         "layers": [], **extra})


async def v2_open(request: web.Request) -> web.StreamResponse | None:
    return web.Response(text="{}") if request.path == "/v2/" else None


def registry(routes: dict[str, Handler]) -> Handler:
    """/v2/ answers 200; other paths by exact match; the rest 404 with a JSON error."""
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/v2/":
            return web.Response(text="{}")
        route = routes.get(request.path)
        if route is None:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN",
                                                  "message": "repository name not known"}]},
                                     status=404)
        return await route(request)
    return handle


def manifest_route(body: bytes, media_type: str = OCI_MANIFEST) -> Handler:
    async def h(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type=media_type)
    return h


# -- auth ---------------------------------------------------------------------------------

def test_bearer_flow_tokens_cached_and_basic_only_to_the_token_server() -> None:
    async def go() -> None:
        async def token(request: web.Request) -> web.StreamResponse:
            return web.json_response({"token": "tok-1", "expires_in": 300})
        async with serve(token) as auth:
            realm = f"http://{auth.host}/token"

            async def reg(request: web.Request) -> web.StreamResponse:
                if request.headers.get("Authorization") != "Bearer tok-1":
                    return web.json_response(
                        {"errors": [{"code": "UNAUTHORIZED", "message": "authenticate"}]},
                        status=401, headers={"WWW-Authenticate":
                                             f'Bearer realm="{realm}",service="svc"'})
                return web.Response(body=oci_manifest(), content_type=OCI_MANIFEST)
            async with serve(reg) as r:
                cfg = RegistriesConfig(registries={r.host: RegistryConfig(
                    r.host, username="u", password="pw")})
                async with client(cfg) as c:
                    a = await c.get_manifest(r.ref("test/app:1"))
                    b = await c.get_manifest(r.ref("test/app:2"))
                assert a.media_type == b.media_type == OCI_MANIFEST
                assert r.paths() == ["/v2/", "/v2/test/app/manifests/1",
                                     "/v2/test/app/manifests/2"]
                assert all("Basic" not in h.get("Authorization", "") for _, _, h in r.seen)
                assert len(auth.seen) == 1  # the token was cached
                _, path, headers = auth.seen[0]
                assert path == "/token?service=svc&scope=repository:test/app:pull"
                assert headers["Authorization"] == "Basic " + base64.b64encode(b"u:pw").decode()
    run(go())


def test_insufficient_scope_is_asked_for_once() -> None:
    async def go() -> None:
        async def token(request: web.Request) -> web.StreamResponse:
            return web.json_response({"token": "+".join(request.query.getall("scope"))})
        async with serve(token) as auth:
            challenge = f'Bearer realm="http://{auth.host}/token",service="svc"'

            async def reg(request: web.Request) -> web.StreamResponse:
                if request.path == "/v2/":
                    return web.Response(status=401, headers={"WWW-Authenticate": challenge})
                if "repository:other:pull" not in request.headers.get("Authorization", ""):
                    return web.Response(status=401, headers={"WWW-Authenticate": challenge + (
                        ',scope="repository:other:pull",error="insufficient_scope"')})
                return web.Response(body=oci_manifest(), content_type=OCI_MANIFEST)
            async with serve(reg) as r, client() as c:
                await c.get_manifest(r.ref())
                assert [p.split("scope=", 1)[1] for p in auth.paths()] == [
                    "repository:test/app:pull",
                    "repository:other:pull&scope=repository:test/app:pull"]
    run(go())


def test_basic_registry_and_wrong_password() -> None:
    async def go() -> None:
        good = "Basic " + base64.b64encode(b"u:right").decode()

        async def reg(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Authorization") != good:
                return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="r"'})
            return web.Response(body=oci_manifest(), content_type=OCI_MANIFEST)
        async with serve(reg) as r:
            for password, ok in (("right", True), ("wrong-secret", False)):
                cfg = RegistriesConfig(registries={r.host: RegistryConfig(
                    r.host, username="u", password=password)})
                async with client(cfg) as c:
                    if ok:
                        await c.get_manifest(r.ref())
                        continue
                    with pytest.raises(AuthError, match="refused the credentials") as info:
                        await c.get_manifest(r.ref())
                    assert "wrong-secret" not in str(info.value)
            async with client() as c:
                with pytest.raises(AuthError, match="needs credentials"):
                    await c.get_manifest(r.ref())
    run(go())


# -- retries ------------------------------------------------------------------------------

def test_5xx_and_429_are_retried_honouring_retry_after() -> None:
    async def go() -> None:
        answers = [web.Response(status=503, text="<html>down</html>", content_type="text/html"),
                   web.Response(status=429, headers={"Retry-After": "3600"}),
                   web.Response(status=429, headers={"Retry-After": "0"})]

        async def m(request: web.Request) -> web.StreamResponse:
            if answers:
                return answers.pop(0)
            return web.Response(body=oci_manifest(), content_type=OCI_MANIFEST)
        sleeps: list[float] = []
        async with serve(registry({"/v2/test/app/manifests/1": m})) as r, \
                client(sleeps=sleeps) as c:
            c._transport.retry = RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.05)
            await c.get_manifest(r.ref())
            assert len(r.paths("GET")) == 5  # ping + 4 tries
            assert sleeps[1:] == [0.05, 0.0]  # Retry-After, capped at max_delay
    run(go())


def test_retries_are_bounded_and_4xx_is_not_retried() -> None:
    async def go() -> None:
        async def m(request: web.Request) -> web.StreamResponse:
            if request.path.endswith("/1"):
                return web.json_response({"errors": [{"code": "UNAVAILABLE",
                                                      "message": "try later"}]}, status=502)
            return web.json_response({"errors": [{"code": "MANIFEST_INVALID",
                                                  "message": "bad"}]}, status=400)
        async with serve(registry({"/v2/test/app/manifests/1": m,
                                   "/v2/test/app/manifests/2": m})) as r, \
                client(sleeps=[]) as c:
            with pytest.raises(RegistryError, match=rf"{r.host}.*3 attempts.*502") as info:
                await c.get_manifest(r.ref())
            assert info.value.status == 502
            with pytest.raises(RegistryError, match="400 MANIFEST_INVALID: bad") as info:
                await c.get_manifest(r.ref("test/app:2"))
            assert r.paths().count("/v2/test/app/manifests/1") == 3
            assert r.paths().count("/v2/test/app/manifests/2") == 1
    run(go())


def test_not_found_names_the_reference_and_head_says_none() -> None:
    async def go() -> None:
        async with serve(registry({})) as r, client() as c:
            with pytest.raises(NotFound, match=rf"{r.host}/test/app:nope.*NAME_UNKNOWN"):
                await c.get_manifest(r.ref("test/app:nope"))
            assert await c.head_manifest(r.ref("test/app:nope")) is None
    run(go())


# -- redirects ----------------------------------------------------------------------------

def test_redirected_blob_gets_no_authorization(tmp_path: Path) -> None:
    async def go() -> None:
        async def storage(request: web.Request) -> web.StreamResponse:
            return web.Response(body=BLOB)
        async with serve(storage) as s:
            async def blob(request: web.Request) -> web.StreamResponse:
                raise web.HTTPTemporaryRedirect(f"http://{s.host}/bucket/x?sig=1")

            async def reg(request: web.Request) -> web.StreamResponse:
                if not request.headers.get("Authorization"):
                    return web.Response(status=401, headers={"WWW-Authenticate": "Basic"})
                return await registry({f"/v2/test/app/blobs/{BLOB_DIGEST}": blob})(request)
            async with serve(reg) as r:
                cfg = RegistriesConfig(registries={r.host: RegistryConfig(
                    r.host, username="u", password="pw")})
                dest = tmp_path / "blob"
                async with client(cfg) as c:
                    await c.fetch_blob(r.ref(), BLOB_DIGEST, len(BLOB), dest)
                assert dest.read_bytes() == BLOB
                assert r.seen[-1][2]["Authorization"].startswith("Basic ")
                assert s.paths() == ["/bucket/x?sig=1"]
                assert "Authorization" not in s.seen[0][2]
    run(go())


# -- mirrors ------------------------------------------------------------------------------

def test_mirrors_in_order_then_origin_without_origin_credentials() -> None:
    async def go() -> None:
        body = oci_manifest()
        async with serve(registry({})) as m1, \
                serve(registry({"/v2/test/app/manifests/1": manifest_route(body)})) as m2, \
                serve(registry({"/v2/test/app/manifests/2": manifest_route(body)})) as origin:
            cfg = RegistriesConfig(registries={origin.host: RegistryConfig(
                origin.host, mirrors=(m1.host, f"http://{m2.host}"), username="u",
                password="origin-pw")})
            async with client(cfg) as c:
                got = await c.get_manifest(origin.ref())
                assert got.source == m2.host
                got = await c.get_manifest(origin.ref("test/app:2"))
                assert got.source == origin.host
            assert m1.paths() == ["/v2/", "/v2/test/app/manifests/1",
                                  "/v2/test/app/manifests/2"]
            assert origin.paths() == ["/v2/", "/v2/test/app/manifests/2"]
            for server in (m1, m2):
                assert all("Authorization" not in h for _, _, h in server.seen)
    run(go())


def test_a_dead_mirror_is_passed_over() -> None:
    async def go() -> None:
        async with serve(registry({"/v2/test/app/manifests/1": manifest_route(
                oci_manifest())})) as origin:
            async with serve(registry({})) as dead:
                dead_host = dead.host
            cfg = RegistriesConfig(registries={origin.host: RegistryConfig(
                origin.host, mirrors=(dead_host,))})
            async with client(cfg, sleeps=[]) as c:
                assert (await c.get_manifest(origin.ref())).source == origin.host
                assert (await c.get_manifest(origin.ref())).source == origin.host
    run(go())


def test_insecure_false_never_speaks_plain_http() -> None:
    async def go() -> None:
        async with serve(registry({})) as r:
            cfg = RegistriesConfig(registries={r.host: RegistryConfig(r.host, insecure=False)})
            async with client(cfg, sleeps=[]) as c:
                with pytest.raises(RegistryError):
                    await c.get_manifest(r.ref())
            assert r.seen == []
    run(go())


# -- manifests ----------------------------------------------------------------------------

def test_manifest_checks() -> None:
    async def go() -> None:
        good = oci_manifest()
        routes = {
            "/v2/test/app/manifests/1": manifest_route(good),
            "/v2/test/app/manifests/confused": manifest_route(
                oci_manifest(mediaType="application/vnd.oci.image.index.v1+json")),
            "/v2/test/app/manifests/huge": manifest_route(oci_manifest(pad="x" * (4 << 20))),
            "/v2/test/app/manifests/" + BLOB_DIGEST: manifest_route(good),
        }
        async with serve(registry(routes)) as r, client() as c:
            got = await c.get_manifest(r.ref())
            assert got.digest == "sha256:" + hashlib.sha256(good).hexdigest()
            assert got.body == good and got.source == r.host
            with pytest.raises(ManifestError, match="ambiguous"):
                await c.get_manifest(r.ref("test/app:confused"))
            with pytest.raises(ManifestError, match="larger than 4 MiB"):
                await c.get_manifest(r.ref("test/app:huge"))
            with pytest.raises(DigestMismatch, match="hashes to"):
                await c.get_manifest(r.ref(f"test/app@{BLOB_DIGEST}"))
            head = await c.head_manifest(r.ref())
            assert head is not None and head.media_type == OCI_MANIFEST
            assert head.size == len(good)
            sent = [h for m, p, h in r.seen if p == "/v2/test/app/manifests/1"]
            assert all("application/vnd.docker.distribution.manifest.list.v2+json"
                       in h["Accept"] for h in sent)
    run(go())


# -- blobs --------------------------------------------------------------------------------

def blob_server(behaviours: list[str]) -> Handler:
    """Serves BLOB; each request takes the next behaviour: "reset" (cut after 300000 bytes),
    "norange" (200, whole body), "badrange" (206 with a wrong Content-Range), "corrupt",
    "long" (the blob plus one byte); then correct answers honouring Range."""
    async def blob(request: web.Request) -> web.StreamResponse:
        how = behaviours.pop(0) if behaviours else "ok"
        start = 0
        rng = request.headers.get("Range")
        if rng and how not in ("norange", "badrange"):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
        data = BLOB[start:]
        status = 206 if start else 200
        headers = {"Content-Length": str(len(data))}
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}"
        if how == "badrange":
            status, headers["Content-Range"] = 206, f"bytes 0-{len(BLOB) - 1}/{len(BLOB)}"
            data = BLOB
            headers["Content-Length"] = str(len(data))
        if how == "corrupt":
            data = data[:-1] + b"!"
        resp = web.StreamResponse(status=status, headers=headers)
        if how == "long":
            resp = web.StreamResponse(status=status)
            resp.enable_chunked_encoding()
            data = data + b"+"
        await resp.prepare(request)
        if how == "reset":
            await resp.write(data[:300000])
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write(data)
        await resp.write_eof()
        return resp
    return registry({f"/v2/test/app/blobs/{BLOB_DIGEST}": blob})


def fetch(tmp_path: Path, behaviours: list[str], size: int = len(BLOB),
          config: RegistriesConfig | None = None
          ) -> tuple[Path, list[int], list[str | None], BaseException | None]:
    async def go() -> tuple[Path, list[int], list[str | None], BaseException | None]:
        dest = tmp_path / "blob"
        progress: list[int] = []
        async with serve(blob_server(behaviours)) as r, client(config, sleeps=[]) as c:
            try:
                await c.fetch_blob(r.ref(), BLOB_DIGEST, size, dest,
                                   on_progress=progress.append)
                err = None
            except Exception as e:
                err = e
            ranges = [h.get("Range") for m, p, h in r.seen if "/blobs/" in p]
        return dest, progress, ranges, err
    return run(go())


def test_reset_mid_body_is_resumed_with_range(tmp_path: Path) -> None:
    dest, progress, ranges, err = fetch(tmp_path, ["reset"])
    assert err is None and dest.read_bytes() == BLOB
    assert ranges[0] is None and ranges[1] is not None
    resumed_from = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= 300000
    assert progress[-1] == len(BLOB) and progress == sorted(progress)


@pytest.mark.parametrize("second", ["norange", "badrange"])
def test_a_resume_without_an_exact_range_starts_over(tmp_path: Path, second: str) -> None:
    dest, progress, ranges, err = fetch(tmp_path, ["reset", second])
    assert err is None and dest.read_bytes() == BLOB
    assert ranges[1] is not None
    if second == "badrange":  # refused, then asked again from the start
        assert ranges[2] is None
    assert progress[-1] == len(BLOB)


def test_resets_are_bounded(tmp_path: Path) -> None:
    dest, _, ranges, err = fetch(tmp_path, ["reset"] * 10)
    assert isinstance(err, RegistryError) and "broke off 3 times" in str(err)
    assert len(ranges) == 3 and not dest.exists()


@pytest.mark.parametrize(("behaviour", "size", "problem"), [
    ("corrupt", len(BLOB), "hashes to"),
    ("ok", len(BLOB) + 1, "manifest says"),
    ("long", len(BLOB), "longer than"),
    ("ok", len(BLOB) - 1, "manifest says"),
    ("long", len(BLOB) + 1, "hashes to"),
])
def test_bad_blobs_are_refused_and_removed(tmp_path: Path, behaviour: str, size: int,
                                           problem: str) -> None:
    dest, _, _, err = fetch(tmp_path, [behaviour], size)
    assert isinstance(err, DigestMismatch) and problem in str(err)
    assert BLOB_DIGEST in str(err) and not dest.exists()


@pytest.mark.parametrize("size", [len(BLOB), -1])
def test_a_blob_over_the_cap_is_not_fetched(tmp_path: Path, size: int) -> None:
    config = RegistriesConfig(max_blob_bytes=len(BLOB) - 1)
    dest, _, ranges, err = fetch(tmp_path, [], size, config)
    assert isinstance(err, ManifestError) and "max_blob_bytes" in str(err)
    assert ranges == [] and not dest.exists()


def test_foreign_urls_must_be_https_and_not_local(tmp_path: Path) -> None:
    async def go() -> None:
        async with serve(blob_server([])) as r, client() as c:
            dest = tmp_path / "blob"
            await c.fetch_blob(r.ref(), BLOB_DIGEST, len(BLOB), dest, urls=[
                f"http://{r.host}/foreign", f"https://{r.host}/foreign", "not a url"])
            assert dest.read_bytes() == BLOB
            assert not any("foreign" in p for p in r.paths())
    run(go())


# -- push ---------------------------------------------------------------------------------

def test_upload_keeps_the_location_and_puts_the_whole_file(tmp_path: Path) -> None:
    async def go() -> None:
        got: dict[str, Any] = {}

        async def start(request: web.Request) -> web.StreamResponse:
            if request.query.get("mount"):
                if request.query["mount"] == BLOB_DIGEST:
                    return web.Response(status=201)
                return web.Response(status=202, headers={"Location": "/upload/m?_state=a%2Fb"})
            return web.Response(status=202, headers={"Location": "/upload/u1?_state=x%2By=="})

        async def upload(request: web.Request) -> web.StreamResponse:
            if request.method == "DELETE":
                got["deleted"] = request.path_qs
                return web.Response(status=204)
            got["put"] = (request.path_qs, request.headers["Content-Type"],
                          request.headers["Content-Length"], await request.read())
            return web.Response(status=201, headers={"Docker-Content-Digest": BLOB_DIGEST})
        async with serve(registry({"/v2/test/app/blobs/uploads/": start,
                                   "/upload/u1": upload, "/upload/m": upload})) as r, \
                client() as c:
            src = tmp_path / "src"
            src.write_bytes(BLOB)
            assert not await c.blob_exists(r.ref(), BLOB_DIGEST)
            assert await c.mount_blob(r.ref(), BLOB_DIGEST, "test/base")
            other = "sha256:" + "0" * 64
            assert not await c.mount_blob(r.ref(), other, "test/base")
            assert got["deleted"] == "/upload/m?_state=a%2Fb"
            await c.upload_blob(r.ref(), BLOB_DIGEST, len(BLOB), src)
            assert got["put"] == (f"/upload/u1?_state=x%2By==&digest={BLOB_DIGEST}",
                                  "application/octet-stream", str(len(BLOB)), BLOB)
            with pytest.raises(DigestMismatch, match="holds"):
                await c.upload_blob(r.ref(), BLOB_DIGEST, len(BLOB) + 1, src)
    run(go())


def test_upload_location_on_another_host_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        async def start(request: web.Request) -> web.StreamResponse:
            return web.Response(status=202, headers={"Location": "http://127.0.0.2:9/up"})
        async with serve(registry({"/v2/test/app/blobs/uploads/": start})) as r, client() as c:
            src = tmp_path / "src"
            src.write_bytes(b"x")
            with pytest.raises(RegistryError, match="another host"):
                await c.upload_blob(r.ref(), "sha256:" + hashlib.sha256(b"x").hexdigest(), 1,
                                    src)
    run(go())


def test_put_manifest_and_digest_check() -> None:
    async def go() -> None:
        body = oci_manifest()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        stored: dict[str, tuple[str, bytes]] = {}

        async def put(request: web.Request) -> web.StreamResponse:
            stored[request.path] = (request.content_type, await request.read())
            said = digest if request.path.endswith("/1") else BLOB_DIGEST
            return web.Response(status=201, headers={"Docker-Content-Digest": said})
        async with serve(registry({"/v2/test/app/manifests/1": put,
                                   "/v2/test/app/manifests/2": put})) as r, client() as c:
            assert await c.put_manifest(r.ref(), OCI_MANIFEST, body) == digest
            assert stored["/v2/test/app/manifests/1"] == (OCI_MANIFEST, body)
            with pytest.raises(DigestMismatch, match="stored the manifest"):
                await c.put_manifest(r.ref("test/app:2"), OCI_MANIFEST, body)
            with pytest.raises(DigestMismatch):
                await c.put_manifest(r.ref(f"test/app@{BLOB_DIGEST}"), OCI_MANIFEST, body)
    run(go())


def test_list_tags_follows_links_on_the_same_host() -> None:
    async def go() -> None:
        async def tags(request: web.Request) -> web.StreamResponse:
            if request.query.get("last") == "b":
                return web.json_response({"name": "test/app", "tags": ["c"]})
            return web.json_response({"name": "test/app", "tags": ["a", "b"]}, headers={
                "Link": '</v2/test/app/tags/list?n=2&last=b>; rel="next"'})
        async with serve(registry({"/v2/test/app/tags/list": tags})) as r, client() as c:
            assert await c.list_tags(r.ref()) == ["a", "b", "c"]
    run(go())


def test_concurrency_is_bounded_per_registry() -> None:
    async def go() -> None:
        state = {"now": 0, "max": 0}

        async def slow(request: web.Request) -> web.StreamResponse:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
            await asyncio.sleep(0.02)
            state["now"] -= 1
            return web.Response(body=oci_manifest(), content_type=OCI_MANIFEST)
        async with serve(registry({"/v2/test/app/manifests/1": slow})) as r:
            cfg = RegistriesConfig(registries={r.host: RegistryConfig(r.host,
                                                                      max_concurrency=2)})
            async with client(cfg) as c:
                await asyncio.gather(*(c.get_manifest(r.ref()) for _ in range(8)))
        assert 1 <= state["max"] <= 2
    run(go())
