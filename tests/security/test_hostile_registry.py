"""A hostile registry, for real: Debian's docker-registry behind the fault-injecting proxy
(tests/support/proxy.py), the token server (tests/support/token_server.py), and a name that
the system resolver maps to this machine. Each test holds shut one way a registry could lead
sandboxd into its own machine or network (SSRF), re-send what it pushes to another host, show
the caller an internal page, or make it read or keep more than a descriptor promised."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import re
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from sandbox.errors import DigestMismatch, ImageError, ManifestError, RegistryError
from sandbox.images.manifest import OCI_MANIFEST, ImageManifest, parse_manifest
from sandbox.images.reference import Reference, parse
from sandbox.images.registry import RegistriesConfig, RegistryClient, RegistryConfig, RetryPolicy
from sandbox.images.store.blobs import BlobStore
from testbed.registry import LocalRegistry
from tests.support.images import PushedImages
from tests.support.proxy import FaultProxy, Pad, Redirect, Shorten, Status
from tests.support.token_server import TokenServer

T = TypeVar("T")
FAST = RetryPolicy(attempts=2, first_delay=0.01, max_delay=0.05)
SECRET = "db01.corp.internal:5432 password=hunter2"
USERS = {"alice": "registry-secret-1"}
ENDLESS = 64 << 20  # more than any buffer between the proxy and the client holds
SEND_BUFFER = 64 << 10  # the proxy's: else the kernel grows it to 4 MiB (tcp_wmem)


def run(make: Callable[[RegistryClient], Awaitable[T]],
        config: RegistriesConfig | None = None) -> T:
    async def go() -> T:
        async with RegistryClient(config, retry=FAST) as client:
            return await make(client)
    return asyncio.run(go())


def via(host: str, ref_text: str, images: PushedImages) -> Reference:
    return parse(ref_text.replace(images.host, host))


def oci_manifest(images: PushedImages) -> tuple[bytes, dict[str, Any]]:
    got = run(lambda c: c.get_manifest(parse(images.oci)))
    return got.body, orjson.loads(got.body)


def biggest_layer(images: PushedImages) -> tuple[str, int]:
    layer = max(oci_manifest(images)[1]["layers"], key=lambda d: d["size"])
    return layer["digest"], layer["size"]


ProxyFactory = Callable[..., FaultProxy]


@pytest.fixture
def fault_proxy() -> Iterator[ProxyFactory]:
    """Factory: `fault_proxy(upstream, **options)` starts a FaultProxy (options: bind,
    send_buffer); every proxy made is closed when the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda upstream, **options: stack.enter_context(FaultProxy(upstream, **options))


@pytest.fixture(scope="module")
def local_name() -> tuple[str, str]:
    """(name, address): this machine's host name and the address the system resolver gives
    for it (/etc/hosts: 127.0.0.1 or 127.0.1.1 on Debian, its own address in a container).
    Nothing in its spelling says it is local: only resolving it shows where it goes."""
    name = socket.gethostname()
    try:
        found = {ai[4][0] for ai in socket.getaddrinfo(name, None, socket.AF_INET,
                                                       socket.SOCK_STREAM)}
    except socket.gaierror:
        found = set()
    if name == "localhost" or not found or any(ipaddress.ip_address(a).is_global
                                               for a in found):
        pytest.skip(f"this machine's name {name!r} does not resolve to a local address only "
                    f"({sorted(found)}); these tests need a name that does")
    address = sorted(found)[0]
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            pytest.skip(f"{name} resolves to {address}, which is not on this machine")
    return name, address


def where(request: pytest.FixtureRequest, kind: str) -> tuple[str, str]:
    """(host as a URL names it, address to listen on) for a local host other than the
    registry's own 127.0.0.1."""
    if kind == "resolved name":
        name, address = request.getfixturevalue("local_name")
        return name, address
    return {"localhost": ("localhost", "127.0.0.1"), "127.0.0.2": ("127.0.0.2", "127.0.0.2"),
            "[::1]": ("[::1]", "::1")}[kind]


# -- SSRF: names, redirects and realms ------------------------------------------------------

def test_a_registry_whose_name_resolves_locally_is_not_contacted(
        images: PushedImages, registry: LocalRegistry, fault_proxy: ProxyFactory,
        local_name: tuple[str, str]) -> None:
    name, address = local_name
    proxy = fault_proxy(registry, bind=address)
    host = f"{name}:{proxy.port}"
    ref = via(host, images.oci, images)
    with pytest.raises(RegistryError, match=f"{re.escape(name)} resolves to a local"):
        run(lambda c: c.get_manifest(ref))
    assert proxy.connections == 0
    # Named in the configuration, the same registry is one of ours.
    ours = RegistriesConfig(registries={host: RegistryConfig(host, insecure=True)})
    assert run(lambda c: c.get_manifest(ref), ours).digest == images.digests["oci"]


@pytest.mark.parametrize("what", ["blob", "manifest"])
@pytest.mark.parametrize("kind", ["resolved name", "localhost", "127.0.0.2", "[::1]"])
def test_a_redirect_to_another_local_host_is_refused(
        images: PushedImages, registry: LocalRegistry, fault_proxy: ProxyFactory,
        request: pytest.FixtureRequest, tmp_path: Path, what: str, kind: str) -> None:
    host, address = where(request, kind)
    proxy = fault_proxy(registry)
    canary = fault_proxy(registry, bind=address)
    proxy.inject("GET", f"/{what}s/", [Redirect(307, f"http://{host}:{canary.port}")])
    ref = via(proxy.host, images.oci, images)
    digest, size = biggest_layer(images)
    dest = tmp_path / "blob"

    async def fetch(c: RegistryClient) -> object:
        if what == "blob":
            return await c.fetch_blob(ref, digest, size, dest)
        return await c.get_manifest(ref)

    refused = rf"{re.escape(host.strip('[]'))}\S* .*local or private"
    with pytest.raises(RegistryError, match=refused):
        run(fetch)
    assert canary.connections == 0
    assert not dest.exists()


@pytest.mark.parametrize("kind", ["resolved name", "localhost"])
def test_a_token_realm_on_another_local_host_is_not_asked(
        images: PushedImages, registry: LocalRegistry, fault_proxy: ProxyFactory,
        request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> None:
    host, address = where(request, kind)
    with TokenServer(tmp_path / "token", USERS, bind=address) as token:
        proxy = fault_proxy(registry)
        proxy.inject("GET", r"^/v2/$", [Status(401, {"WWW-Authenticate": (
            f'Bearer realm="http://{host}:{token.port}/token",service="{token.service}"')})])
        config = RegistriesConfig(registries={proxy.host: RegistryConfig(
            proxy.host, username="alice", password=USERS["alice"])})
        with pytest.raises(RegistryError, match=rf"{re.escape(host)}\S* .*local or private"):
            run(lambda c: c.get_manifest(via(proxy.host, images.oci, images)), config)
        assert token.seen == []  # and so never saw the registry's password


@pytest.mark.parametrize("kind", ["resolved name", "localhost"])
def test_a_token_server_may_not_redirect_to_another_local_host(
        images: PushedImages, registry: LocalRegistry, fault_proxy: ProxyFactory,
        request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> None:
    host, address = where(request, kind)
    with TokenServer(tmp_path / "token", USERS) as token, \
            TokenServer(tmp_path / "canary", USERS, bind=address) as canary:
        token.answer_next(307, {"Location": f"http://{host}:{canary.port}/token?scope=x"})
        proxy = fault_proxy(registry)
        proxy.inject("GET", r"^/v2/$", [Status(401, {"WWW-Authenticate": (
            f'Bearer realm="{token.realm}",service="{token.service}"')})])
        with pytest.raises(RegistryError, match=rf"{re.escape(host)}\S* .*local or private"):
            run(lambda c: c.get_manifest(via(proxy.host, images.oci, images)))
        assert len(token.seen) == 1 and canary.seen == []


# -- pushes: a body goes to its own origin only --------------------------------------------

def random_blob(tmp_path: Path) -> tuple[Path, str, int]:
    data = os.urandom(200_000)
    path = tmp_path / "upload"
    path.write_bytes(data)
    return path, "sha256:" + hashlib.sha256(data).hexdigest(), len(data)


@pytest.mark.parametrize("code", [307, 308])
@pytest.mark.parametrize("what", ["blob", "manifest"])
def test_a_push_is_not_resent_to_another_origin(
        images: PushedImages, registry: LocalRegistry, fault_proxy: ProxyFactory,
        tmp_path: Path, code: int, what: str) -> None:
    proxy = fault_proxy(registry)
    canary = fault_proxy(registry)  # the same registry, so a client that follows succeeds
    ref = parse(f"{proxy.host}/test/busybox:redirected-{code}")
    src, digest, size = random_blob(tmp_path)
    body, _ = oci_manifest(images)
    proxy.inject("PUT", r"/blobs/uploads/" if what == "blob" else r"/manifests/",
                 [Redirect(code, canary.url)])

    async def push(c: RegistryClient) -> object:
        if what == "blob":
            return await c.upload_blob(ref, digest, size, src)
        return await c.put_manifest(ref, OCI_MANIFEST, body)
    with pytest.raises(RegistryError, match=rf"redirected \({code}\) to another host, "
                                            r"127\.0\.0\.1; .*the push stops here"):
        run(push)
    assert canary.connections == 0
    direct = parse(f"{registry.host}/test/busybox:redirected-{code}")
    assert not run(lambda c: c.blob_exists(direct, digest))
    assert run(lambda c: c.head_manifest(direct)) is None


def test_a_push_redirected_within_its_origin_goes_on(
        registry: LocalRegistry, fault_proxy: ProxyFactory, tmp_path: Path) -> None:
    proxy = fault_proxy(registry)
    proxy.inject("PUT", r"/blobs/uploads/", [Redirect(307, proxy.url)])
    src, digest, size = random_blob(tmp_path)
    ref = parse(f"{proxy.host}/test/pushed:1")
    run(lambda c: c.upload_blob(ref, digest, size, src))
    assert [s for m, _, s in proxy.requests if m == "PUT"] == [307, 201]
    assert run(lambda c: c.blob_exists(parse(f"{registry.host}/test/pushed:1"), digest))


# -- error answers: codes, never pages ------------------------------------------------------

@pytest.mark.parametrize("fault", [
    Status(404, {"Content-Type": "text/plain"}, f"no such thing; {SECRET}".encode()),
    Status(401, {"Content-Type": "text/plain"}, f"login at {SECRET}".encode()),
    Status(502, {"Content-Type": "text/plain"}, b"", reason=SECRET),
    Status(500, {"Content-Type": "application/json"}, orjson.dumps(
        {"errors": [{"code": "<b>500</b>", "message": SECRET}], "detail": SECRET})),
], ids=["404 text", "401 text", "reason phrase", "json without a code"])
def test_an_internal_error_page_is_not_shown(
        images: PushedImages, registry: LocalRegistry, fault_proxy: ProxyFactory,
        fault: Status) -> None:
    proxy = fault_proxy(registry)
    proxy.inject("GET", r"/manifests/", [fault] * FAST.attempts)
    with pytest.raises(ImageError, match=rf"\b{fault.code} ") as info:
        run(lambda c: c.get_manifest(via(proxy.host, images.oci, images)))
    assert "db01" not in str(info.value) and "hunter2" not in str(info.value)


def test_the_registrys_error_codes_are_shown_with_a_short_printable_message(
        images: PushedImages, registry: LocalRegistry, fault_proxy: ProxyFactory) -> None:
    message = "rate limit\x1b[2J\r\n" + "x" * 10_000
    proxy = fault_proxy(registry)
    proxy.inject("GET", r"/manifests/", [Status(403, {"Content-Type": "application/json"},
                                                orjson.dumps({"errors": [
                                                    {"code": "DENIED", "message": message},
                                                    {"code": "TOOMANYREQUESTS"}]}))])
    with pytest.raises(RegistryError, match="403 DENIED: rate limit") as info:
        run(lambda c: c.get_manifest(via(proxy.host, images.oci, images)))
    text = str(info.value)
    assert "TOOMANYREQUESTS" in text and text.isprintable() and text.count("x") < 200


@pytest.fixture
def banner_server() -> Iterator[str]:
    """Something that is not a registry on 127.0.0.1 (an SSH server, say): it answers any
    connection with its banner. Yields its host:port."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(f"SSH-2.0-OpenSSH_9.2 {SECRET}\r\n".encode())
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_what_a_non_registry_answers_is_not_shown(banner_server: str) -> None:
    with pytest.raises(RegistryError, match="not HTTP a registry speaks") as info:
        run(lambda c: c.get_manifest(parse(f"{banner_server}/x/y:1")))
    assert "db01" not in str(info.value) and "hunter2" not in str(info.value)


# -- sizes: the descriptor's, enforced --------------------------------------------------------

def hostile_manifest(images: PushedImages, claim: int) -> bytes:
    _, doc = oci_manifest(images)
    doc["layers"][-1]["size"] = claim
    return orjson.dumps(doc)


async def pull_all(c: RegistryClient, ref: Reference, dest: Path) -> None:
    """What a pull does with a registry: the manifest, parsed, then its blobs."""
    got = await c.get_manifest(ref)
    manifest = parse_manifest(got.body, got.media_type)
    assert isinstance(manifest, ImageManifest)
    for desc in (manifest.config, *manifest.layers):
        await c.fetch_blob(ref, desc.digest, desc.size, dest / desc.digest.split(":")[1])


@pytest.mark.parametrize("claim", [64 << 30, 1 << 62])
def test_a_blob_claiming_more_than_the_cap_is_never_requested(
        images: PushedImages, registry: LocalRegistry, fault_proxy: ProxyFactory,
        tmp_path: Path, claim: int) -> None:
    proxy = fault_proxy(registry)
    proxy.inject("GET", r"/manifests/oci$", [Status(200, {"Content-Type": OCI_MANIFEST},
                                                     hostile_manifest(images, claim))])
    ref = via(proxy.host, images.oci, images)
    with pytest.raises(ManifestError, match=f"claims {claim} bytes, over the 17179869184"):
        run(lambda c: pull_all(c, ref, tmp_path))
    # A caller that fetches without parsing is refused by the client all the same.
    digest = orjson.loads(hostile_manifest(images, claim))["layers"][-1]["digest"]
    with pytest.raises(ManifestError, match="max_blob_bytes"):
        run(lambda c: c.fetch_blob(ref, digest, claim, tmp_path / "blob"))
    assert not any("/blobs/" in p for _, p, _ in proxy.requests)
    assert list(tmp_path.iterdir()) == []


def test_the_blob_cap_can_be_set(images: PushedImages, registry: LocalRegistry,
                                 fault_proxy: ProxyFactory, tmp_path: Path) -> None:
    digest, size = biggest_layer(images)
    proxy = fault_proxy(registry)
    ref = via(proxy.host, images.oci, images)
    config = RegistriesConfig.from_dict({"max_blob_bytes": size - 1})
    with pytest.raises(ManifestError, match=f"claims {size} bytes"):
        run(lambda c: c.fetch_blob(ref, digest, size, tmp_path / "blob"), config)
    assert proxy.requests == []
    run(lambda c: c.fetch_blob(ref, digest, size, tmp_path / "blob"),
        RegistriesConfig.from_dict({"max_blob_bytes": size}))
    assert (tmp_path / "blob").stat().st_size == size


def sent_for(proxy: FaultProxy, path_end: str) -> list[int]:
    """Body bytes the proxy got into the connection for each answer to a path ending so."""
    proxy.settle()
    return [n for _, p, n in proxy.sent if p.endswith(path_end)]


@pytest.mark.parametrize("fault", [Pad(1), Pad(ENDLESS, declared=False), Shorten(1000)],
                         ids=["longer, declared", "longer, undeclared", "shorter, declared"])
def test_a_blob_longer_or_shorter_than_its_descriptor_fails_and_nothing_is_kept(
        images: PushedImages, registry: LocalRegistry, fault_proxy: ProxyFactory,
        tmp_path: Path, fault: Pad | Shorten) -> None:
    digest, size = biggest_layer(images)
    proxy = fault_proxy(registry)
    proxy.inject("GET", r"/blobs/", [fault] * FAST.attempts)
    ref = via(proxy.host, images.oci, images)
    store = BlobStore(tmp_path / "blobs")

    async def fetch(c: RegistryClient) -> object:
        return await store.ensure(digest, lambda temp: c.fetch_blob(ref, digest, size, temp))

    with pytest.raises(ImageError, match=digest):
        run(fetch)
    assert not store.has(digest) and list(store.tmp.iterdir()) == []
    assert all(n < ENDLESS // 2 for n in sent_for(proxy, digest))  # it stopped reading


@pytest.mark.parametrize("lie", [-1, 1])
def test_a_descriptor_that_lies_about_a_blobs_size_fails_the_fetch(
        images: PushedImages, tmp_path: Path, lie: int) -> None:
    digest, size = biggest_layer(images)
    dest = tmp_path / "blob"
    with pytest.raises(ImageError, match=digest):
        run(lambda c: c.fetch_blob(parse(images.oci), digest, size + lie, dest))
    assert not dest.exists()


@pytest.mark.parametrize(("fault", "lie"), [
    (Pad(1), 0), (Pad(ENDLESS, declared=False), 0), (Shorten(100), 0), (None, -1), (None, 1)],
    ids=["longer, declared", "longer, undeclared", "shorter, declared",
         "descriptor says less", "descriptor says more"])
def test_a_manifest_by_digest_is_read_no_further_than_its_descriptor(
        images: PushedImages, registry: LocalRegistry, fault_proxy: ProxyFactory,
        fault: Pad | Shorten | None, lie: int) -> None:
    entry = orjson.loads(run(lambda c: c.get_manifest(parse(images.multi))).body)
    child = next(d for d in entry["manifests"] if d["mediaType"] == OCI_MANIFEST)
    proxy = fault_proxy(registry, send_buffer=SEND_BUFFER)
    if fault is not None:
        proxy.inject("GET", r"/manifests/", [fault])
    ref = via(proxy.host, images.multi, images).with_digest(child["digest"])
    size = child["size"] + lie
    with pytest.raises(DigestMismatch, match=f"its descriptor says {size}"):
        run(lambda c: c.get_manifest(ref, size=size))
    # At most the descriptor's bytes were read, the buffers between hold the rest: some
    # hundreds of KiB, where reading up to the 4 MiB any manifest may have takes more.
    assert all(n < (2 << 20) for n in sent_for(proxy, child["digest"]))
