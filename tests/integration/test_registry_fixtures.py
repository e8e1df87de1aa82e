"""The registry fixtures work, checked only with independent tools (skopeo, raw HTTP), never
with sandboxd's own registry client."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import io
import signal
import socket
import ssl
import tarfile
import threading
import urllib.parse
import zlib
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from testbed.registry import LocalRegistry, start_registry
from tests.support.fixtures import ProxyFactory
from tests.support.images import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    UNKNOWN_MEDIA_TYPE,
    AuthImages,
    PushedImages,
    Tools,
)
from tests.support.proxy import (
    Corrupt,
    FaultProxy,
    NoRange,
    Pad,
    Redirect,
    ResetAfter,
    Shorten,
    Status,
    Truncate,
)
from tests.support.token_server import TokenServer

pytestmark = pytest.mark.timeout(300)

ACCEPT = f"{OCI_MANIFEST}, {DOCKER_MANIFEST}, {OCI_INDEX}"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def request(base_url: str, path: str, *, method: str = "GET",
            headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
            ) -> Reply:
    """One raw HTTP request (no redirects, no proxy from the environment)."""
    url = urllib.parse.urlsplit(base_url)
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        conn = http.client.HTTPSConnection(url.netloc, timeout=30, context=context)
    else:
        conn = http.client.HTTPConnection(url.netloc, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def split_ref(images: PushedImages, ref: str) -> tuple[str, str]:
    repo, _, tag = ref[len(images.host) + 1:].rpartition(":")
    return repo, tag


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def tools(tmp_path: Path) -> Tools:
    return Tools(tmp_path)


def skopeo(tools: Tools, *args: str) -> str:
    return tools.run("skopeo", "--insecure-policy", *args)


def skopeo_fails(tools: Tools, *args: str) -> str:
    with pytest.raises(RuntimeError) as err:
        skopeo(tools, *args)
    return str(err.value)


# --- the plain registry and the images ------------------------------------------------


@pytest.mark.parametrize(("name", "media_type", "layer_type"), [
    ("v2s2", DOCKER_MANIFEST, DOCKER_LAYER),
    ("oci", OCI_MANIFEST, GZIP_LAYER),
    ("zstd", OCI_MANIFEST, ZSTD_LAYER),
])
def test_registry_serves_each_single_image_format(images: PushedImages, tools: Tools,
                                                 registry: LocalRegistry, name: str,
                                                 media_type: str, layer_type: str) -> None:
    ref = getattr(images, name)
    raw = skopeo(tools, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}").encode()
    assert sha256(raw) == images.digests[name]
    manifest = orjson.loads(raw)
    # umoci and skopeo leave out the optional mediaType of OCI manifests.
    assert manifest.get("mediaType", media_type) == media_type
    repo, tag = split_ref(images, ref)
    reply = request(registry.url, f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
    assert (reply.headers["Content-Type"], reply.body) == (media_type, raw)
    assert [layer["mediaType"] for layer in manifest["layers"]] == [layer_type]
    assert tuple(layer["digest"] for layer in manifest["layers"]) == images.layers[name]

    config = orjson.loads(skopeo(tools, "inspect", "--config", "--tls-verify=false",
                                 f"docker://{ref}"))
    assert config["config"]["Cmd"] == ["/bin/sh"]
    assert f"{config['os']}/{config['architecture']}" == images.native_platform


def test_layers_are_real_busybox_trees(images: PushedImages, registry: LocalRegistry) -> None:
    repo, _ = split_ref(images, images.oci)
    for name in ("oci", "zstd"):
        layer = images.layers[name][0]
        blob = request(registry.url, f"/v2/{repo}/blobs/{layer}").body
        assert sha256(blob) == layer
        if name == "zstd":
            assert blob[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
            continue
        with tarfile.open(fileobj=io.BytesIO(zlib.decompress(blob, 31))) as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        assert members["bin/busybox"].isfile()
        assert members["bin/sh"].issym()
        assert (members["bin/busybox"].uid, members["bin/busybox"].gid) == (0, 0)


def test_multi_is_an_index_with_an_entry_of_unknown_type_first(
        images: PushedImages, registry: LocalRegistry, tools: Tools) -> None:
    raw = skopeo(tools, "inspect", "--raw", "--tls-verify=false",
                 f"docker://{images.multi}").encode()
    assert sha256(raw) == images.digests["multi"]
    index = orjson.loads(raw)
    assert index["mediaType"] == OCI_INDEX
    unknown, *entries = index["manifests"]
    assert unknown["mediaType"] == UNKNOWN_MEDIA_TYPE
    assert f"{unknown['platform']['os']}/{unknown['platform']['architecture']}" == \
        images.native_platform.rsplit("/v", 1)[0]
    assert unknown["digest"] != images.platforms[images.native_platform]
    found = {"/".join(filter(None, (e["platform"]["os"], e["platform"]["architecture"],
                                    e["platform"].get("variant")))): e["digest"]
             for e in entries}
    assert found == images.platforms
    assert set(found) == {"linux/amd64", "linux/arm64/v8"}
    repo, _ = split_ref(images, images.multi)
    for digest in found.values():
        reply = request(registry.url, f"/v2/{repo}/manifests/{digest}",
                        headers={"Accept": ACCEPT})
        assert reply.status == 200 and sha256(reply.body) == digest
        arch = orjson.loads(request(
            registry.url, f"/v2/{repo}/blobs/{orjson.loads(reply.body)['config']['digest']}"
        ).body)["architecture"]
        assert next(p for p, d in found.items() if d == digest).split("/")[1] == arch


def test_shared_images_share_exactly_their_bottom_layer(images: PushedImages,
                                                        registry: LocalRegistry) -> None:
    a, b = images.layers["shared_a"], images.layers["shared_b"]
    assert len(a) == len(b) == 2
    assert a[0] == b[0] == images.shared_layer
    assert a[1] != b[1]
    for ref in (images.shared_a, images.shared_b):
        repo, tag = split_ref(images, ref)
        reply = request(registry.url, f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
        assert sha256(reply.body) == images.digests["shared_a" if "shared-a" in ref
                                                    else "shared_b"]
        head = request(registry.url, f"/v2/{repo}/blobs/{images.shared_layer}", method="HEAD")
        assert head.status == 200


def test_access_log_counts_successful_blob_gets(images: PushedImages,
                                                registry: LocalRegistry) -> None:
    layer = images.shared_layer
    before = registry.blob_gets(layer)
    repo_a, _ = split_ref(images, images.shared_a)
    repo_b, _ = split_ref(images, images.shared_b)
    assert request(registry.url, f"/v2/{repo_a}/blobs/{layer}").status == 200
    assert request(registry.url, f"/v2/{repo_b}/blobs/{layer}",
                   headers={"Range": "bytes=10-"}).status == 206
    assert request(registry.url, f"/v2/{repo_a}/blobs/{layer}", method="HEAD").status == 200
    assert request(registry.url, f"/v2/nothing/here/blobs/{layer}").status == 404
    assert registry.blob_gets(layer) == before + 2
    assert ("HEAD", f"/v2/{repo_a}/blobs/{layer}", 200) in registry.requests()


# --- basic auth, TLS, token auth ---------------------------------------------------------


def test_basic_registry_refuses_without_credentials_and_accepts_with_them(
        images: PushedImages, basic_registry: LocalRegistry, tools: Tools) -> None:
    assert basic_registry.username and basic_registry.password
    ping = request(basic_registry.url, "/v2/")
    assert ping.status == 401
    assert ping.headers["WWW-Authenticate"].startswith("Basic ")
    wrong = request(basic_registry.url, "/v2/",
                    headers=basic(basic_registry.username, "not-the-password"))
    assert wrong.status == 401
    right = request(basic_registry.url, "/v2/",
                    headers=basic(basic_registry.username, basic_registry.password))
    assert right.status == 200

    dest = f"docker://{basic_registry.host}/private/busybox:1"
    src = f"docker://{images.oci}"
    common = ("copy", "--src-tls-verify=false", "--dest-tls-verify=false")
    assert "authentication required" in skopeo_fails(tools, *common, src, dest)
    creds = f"{basic_registry.username}:{basic_registry.password}"
    skopeo(tools, *common, "--dest-creds", creds, src, dest)
    raw = skopeo(tools, "inspect", "--raw", "--tls-verify=false", "--creds", creds, dest)
    assert sha256(raw.encode()) == images.digests["oci"]


def test_tls_registry_is_trusted_through_its_ca_only(
        images: PushedImages, tls_registry: LocalRegistry, tools: Tools) -> None:
    assert tls_registry.url.startswith("https://") and tls_registry.ca_file is not None
    assert request(tls_registry.url, "/v2/", context=tls_registry.ssl_context()).status == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        request(tls_registry.url, "/v2/", context=ssl.create_default_context())
    cert_dir = str(tls_registry.ca_file.parent)
    dest = f"docker://{tls_registry.host}/test/busybox:oci"
    assert "certificate" in skopeo_fails(tools, "copy", "--src-tls-verify=false",
                                         f"docker://{images.oci}", dest)
    skopeo(tools, "copy", "--src-tls-verify=false", "--dest-cert-dir", cert_dir,
           f"docker://{images.oci}", dest)
    raw = skopeo(tools, "inspect", "--raw", "--cert-dir", cert_dir, dest)
    assert sha256(raw.encode()) == images.digests["oci"]


def test_token_registry_runs_the_bearer_flow_with_skopeo(
        images: PushedImages, token_registry: LocalRegistry, token_server: TokenServer,
        tools: Tools) -> None:
    creds = f"{token_registry.username}:{token_registry.password}"
    common = ("copy", "--src-tls-verify=false", "--dest-tls-verify=false")
    private = f"docker://{token_registry.host}/team/busybox:1"
    public = f"docker://{token_registry.host}/public/busybox:1"
    assert "authentication required" in skopeo_fails(tools, *common, f"docker://{images.oci}",
                                                     public)
    skopeo(tools, *common, "--dest-creds", creds, f"docker://{images.oci}", private)
    skopeo(tools, *common, "--dest-creds", creds, f"docker://{images.oci}", public)
    assert any(account == token_registry.username and
               "repository:team/busybox:pull,push" in scopes
               for account, scopes in token_server.issued)

    # Anonymous: public/ can be pulled, the rest cannot.
    raw = skopeo(tools, "inspect", "--raw", "--tls-verify=false", public)
    assert sha256(raw.encode()) == images.digests["oci"]
    assert ("", ("repository:public/busybox:pull",)) in token_server.issued
    assert "authentication required" in skopeo_fails(tools, "inspect", "--raw",
                                                     "--tls-verify=false", private)
    raw = skopeo(tools, "inspect", "--raw", "--tls-verify=false", "--creds", creds, private)
    assert sha256(raw.encode()) == images.digests["oci"]


def test_token_server_answers_the_docker_token_flow(token_registry: LocalRegistry,
                                                    token_server: TokenServer) -> None:
    challenge = request(token_registry.url, "/v2/").headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    params = dict(p.split("=", 1) for p in challenge[len("Bearer "):].split(","))
    realm, service = params["realm"].strip('"'), params["service"].strip('"')
    assert realm == token_server.realm

    def token_reply(scope: str, headers: dict[str, str] | None = None) -> Reply:
        query = urllib.parse.urlencode({"service": service, "scope": scope})
        return request(token_server.url, f"/token?{query}", headers=headers)

    refused = token_server.refused
    assert token_reply("repository:team/busybox:pull",
                       basic(str(token_registry.username), "wrong")).status == 401
    assert token_server.refused == refused + 1

    anonymous = orjson.loads(token_reply("repository:team/x:pull").body)
    assert set(anonymous) == {"token", "access_token", "expires_in", "issued_at"}
    assert anonymous["token"] == anonymous["access_token"]
    # The registry verifies our JWT: valid for /v2/, insufficient for a private repository.
    bearer = {"Authorization": f"Bearer {anonymous['token']}"}
    assert request(token_registry.url, "/v2/", headers=bearer).status == 200
    denied = request(token_registry.url, "/v2/team/x/tags/list", headers=bearer)
    assert denied.status == 401
    assert 'error="insufficient_scope"' in denied.headers["WWW-Authenticate"]

    user = orjson.loads(token_reply(
        "repository:team/x:pull",
        basic(str(token_registry.username), str(token_registry.password))).body)
    named = request(token_registry.url, "/v2/team/x/tags/list",
                    headers={"Authorization": f"Bearer {user['token']}"})
    assert named.status == 404  # authorised; the repository just does not exist
    assert orjson.loads(named.body)["errors"][0]["code"] == "NAME_UNKNOWN"


def test_auth_images_need_credentials_except_public(
        auth_images: AuthImages, basic_registry: LocalRegistry,
        token_registry: LocalRegistry, tools: Tools) -> None:
    inspect = ("inspect", "--raw", "--tls-verify=false")
    raw = skopeo(tools, *inspect, f"docker://{auth_images.token_public}")
    assert sha256(raw.encode()) == auth_images.digest
    for registry, ref in ((basic_registry, auth_images.basic),
                          (token_registry, auth_images.token_private)):
        assert "authentication required" in skopeo_fails(tools, *inspect, f"docker://{ref}")
        raw = skopeo(tools, *inspect, "--creds", f"{registry.username}:{registry.password}",
                     f"docker://{ref}")
        assert sha256(raw.encode()) == auth_images.digest


def test_registry_dies_with_the_thread_that_started_it(tmp_path: Path) -> None:
    started: list[LocalRegistry] = []
    thread = threading.Thread(target=lambda: started.append(
        start_registry(tmp_path / "reg", die_with_parent=True)))
    thread.start()
    thread.join(timeout=60)
    registry = started[0]
    try:
        # The parent-death signal fires when the starting thread is gone.
        assert registry.process.wait(timeout=30) == -signal.SIGTERM
    finally:
        registry.stop()


# --- the fault proxy --------------------------------------------------------------------


@pytest.fixture
def blob(images: PushedImages, registry: LocalRegistry) -> tuple[str, bytes]:
    repo, _ = split_ref(images, images.oci)
    layer = images.layers["oci"][0]
    path = f"/v2/{repo}/blobs/{layer}"
    return path, request(registry.url, path).body


def raw_exchange(proxy: FaultProxy, path: str) -> tuple[bytes, bytes, BaseException | None]:
    """GET `path` on a bare socket: (head, body received, the error that ended it)."""
    port = int(proxy.host.rsplit(":", 1)[1])
    received = bytearray()
    error: BaseException | None = None
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n".encode())
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError as e:
            error = e
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    return head, body, error


def test_proxy_passes_requests_through_and_records_them(
        registry: LocalRegistry, fault_proxy: ProxyFactory, blob: tuple[str, bytes]) -> None:
    proxy = fault_proxy(registry)
    path, data = blob
    reply = request(proxy.url, path)
    assert reply.status == 200 and reply.body == data
    assert request(proxy.url, path, headers={"Range": "bytes=5-"}).body == data[5:]
    assert proxy.requests == [("GET", path, 200), ("GET", path, 206)]


def test_proxy_speaks_tls_to_a_tls_upstream(tls_registry: LocalRegistry,
                                           fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(tls_registry)
    assert proxy.url.startswith("http://")
    assert request(proxy.url, "/v2/").status == 200
    assert proxy.requests == [("GET", "/v2/", 200)]


def test_proxy_status_faults_are_used_once_each_in_order(
        registry: LocalRegistry, fault_proxy: ProxyFactory, blob: tuple[str, bytes]) -> None:
    proxy = fault_proxy(registry)
    path, data = blob
    proxy.inject("GET", r"/blobs/sha256:", [
        Status(500), Status(429, {"Retry-After": "3"}, b"slow down")])
    assert request(proxy.url, path, method="HEAD").status == 200  # method does not match
    assert request(proxy.url, "/v2/").status == 200  # path does not match
    first = request(proxy.url, path)
    assert first.status == 500
    second = request(proxy.url, path)
    assert (second.status, second.headers["Retry-After"], second.body) == (429, "3", b"slow down")
    assert proxy.pending() == 0
    assert request(proxy.url, path).body == data
    assert [status for _, _, status in proxy.requests] == [200, 200, 500, 429, 200]


def test_proxy_reset_after_sends_part_of_the_body_then_resets(
        registry: LocalRegistry, fault_proxy: ProxyFactory, blob: tuple[str, bytes]) -> None:
    proxy = fault_proxy(registry)
    path, data = blob
    proxy.inject("GET", path, [ResetAfter(1000)])
    head, body, error = raw_exchange(proxy, path)
    assert isinstance(error, ConnectionResetError)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert f"Content-Length: {len(data)}".encode() in head
    assert data.startswith(body) and len(body) <= 1000


def test_proxy_truncate_closes_cleanly_after_fewer_bytes(
        registry: LocalRegistry, fault_proxy: ProxyFactory, blob: tuple[str, bytes]) -> None:
    proxy = fault_proxy(registry)
    path, data = blob
    proxy.inject("GET", path, [Truncate(1000)])
    head, body, error = raw_exchange(proxy, path)
    assert error is None
    assert f"Content-Length: {len(data)}".encode() in head
    assert body == data[:1000]


def test_proxy_corrupt_flips_one_byte(registry: LocalRegistry, fault_proxy: ProxyFactory,
                                      blob: tuple[str, bytes]) -> None:
    proxy = fault_proxy(registry)
    path, data = blob
    proxy.inject("GET", path, [Corrupt()])
    reply = request(proxy.url, path)
    assert reply.status == 200 and len(reply.body) == len(data)
    assert [i for i in range(len(data)) if reply.body[i] != data[i]] == [len(data) // 2]


def test_proxy_no_range_answers_the_whole_body(registry: LocalRegistry, fault_proxy: ProxyFactory,
                                               blob: tuple[str, bytes]) -> None:
    proxy = fault_proxy(registry)
    path, data = blob
    proxy.inject("*", path, [NoRange()])
    whole = request(proxy.url, path, headers={"Range": "bytes=100-"})
    assert (whole.status, whole.body) == (200, data)
    part = request(proxy.url, path, headers={"Range": "bytes=100-"})
    assert (part.status, part.body) == (206, data[100:])


def test_proxy_pad_adds_bytes_declared_or_not(
        registry: LocalRegistry, fault_proxy: ProxyFactory, blob: tuple[str, bytes]) -> None:
    proxy = fault_proxy(registry)
    path, data = blob
    proxy.inject("GET", path, [Pad(10), Pad(70_000, declared=False)])
    declared = request(proxy.url, path)
    assert declared.headers["Content-Length"] == str(len(data) + 10)
    assert declared.body == data + b" " * 10
    head, body, error = raw_exchange(proxy, path)
    assert error is None and b"content-length" not in head.lower()
    assert body == data + b" " * 70_000


def test_proxy_shorten_answers_a_complete_shorter_body(
        registry: LocalRegistry, fault_proxy: ProxyFactory, blob: tuple[str, bytes]) -> None:
    proxy = fault_proxy(registry)
    path, data = blob
    proxy.inject("GET", path, [Shorten(1000)])
    reply = request(proxy.url, path)
    assert (reply.status, reply.headers["Content-Length"], reply.body) == (200, "1000",
                                                                           data[:1000])


def test_proxy_redirects_keep_the_path_and_status_can_say_anything(
        registry: LocalRegistry, fault_proxy: ProxyFactory) -> None:
    proxy = fault_proxy(registry)
    proxy.inject("PUT", r"/uploads/", [Redirect(308, "http://elsewhere.test:9/")])
    proxy.inject("GET", r"^/v2/$", [Status(502, reason="db01 is down")])
    moved = request(proxy.url, "/v2/x/blobs/uploads/u?_state=a&digest=d", method="PUT")
    assert moved.status == 308
    assert moved.headers["Location"] == "http://elsewhere.test:9/v2/x/blobs/uploads/u?_state=a&digest=d"
    head, _, _ = raw_exchange(proxy, "/v2/")
    assert head.startswith(b"HTTP/1.1 502 db01 is down\r\n")


def test_proxy_listens_where_told_and_counts_connections_and_bytes(
        registry: LocalRegistry, blob: tuple[str, bytes]) -> None:
    path, data = blob
    with FaultProxy(registry, bind="127.0.0.2") as proxy:
        assert proxy.host == f"127.0.0.2:{proxy.port}"
        assert proxy.connections == 0
        assert request(proxy.url, path).body == data
        with socket.create_connection(("127.0.0.2", proxy.port), timeout=30) as sock:
            sock.sendall(b"\x16\x03\x01")  # a TLS hello, which the proxy hangs up on
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
        proxy.settle()
        assert proxy.connections == 2
        assert proxy.sent == [("GET", path, len(data))]


def test_token_server_canned_answers_and_every_request_seen(tmp_path: Path) -> None:
    with TokenServer(tmp_path, {"u": "p"}, bind="127.0.0.2") as server:
        assert server.host.startswith("127.0.0.2:")
        server.answer_next(307, {"Location": "http://elsewhere.test/token"}, b"moved")
        moved = request(server.url, "/token?service=x", headers=basic("u", "p"))
        assert (moved.status, moved.headers["Location"], moved.body) == (
            307, "http://elsewhere.test/token", b"moved")
        ok = request(server.url, f"/token?service={server.service}&scope=repository:a:pull")
        assert ok.status == 200 and "token" in orjson.loads(ok.body)
        assert server.seen == [
            ("GET", "/token?service=x", basic("u", "p")["Authorization"]),
            ("GET", f"/token?service={server.service}&scope=repository:a:pull", None)]


def test_skopeo_pushes_and_pulls_through_the_proxy(
        images: PushedImages, registry: LocalRegistry, fault_proxy: ProxyFactory,
        tools: Tools) -> None:
    proxy = fault_proxy(registry)
    # Upload Locations must point back at the proxy, or the push would bypass it.
    skopeo(tools, "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
           f"docker://{images.shared_a}", f"docker://{proxy.host}/via/proxy:1")
    methods = {m for m, p, _ in proxy.requests if p.startswith("/v2/via/proxy/")}
    assert {"POST", "PUT"} <= methods or {"POST", "PATCH", "PUT"} <= methods
    raw = skopeo(tools, "inspect", "--raw", "--tls-verify=false",
                 f"docker://{proxy.host}/via/proxy:1")
    assert sha256(raw.encode()) == images.digests["shared_a"]
