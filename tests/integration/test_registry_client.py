"""The registry client against real `docker-registry` servers (plain, htpasswd, token auth,
TLS), images built by umoci and skopeo, and a fault-injecting proxy."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from sandbox.errors import AuthError, DigestMismatch, NotFound, RegistryError
from sandbox.images.reference import Reference, parse
from sandbox.images.registry import RegistriesConfig, RegistryClient, RegistryConfig, RetryPolicy
from sandbox.images.registry.client import (
    DOCKER_MANIFEST,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    OCI_MANIFEST,
    FetchedManifest,
)
from testbed.registry import LocalRegistry
from tests.support.images import PushedImages
from tests.support.proxy import Corrupt, NoRange, ResetAfter, Status, Truncate
from tests.support.token_server import TokenServer

T = TypeVar("T")
FAST = RetryPolicy(attempts=4, first_delay=0.01, max_delay=0.1)


def run(make: Callable[[RegistryClient], Awaitable[T]], config: RegistriesConfig | None = None,
        retry: RetryPolicy = FAST) -> T:
    async def go() -> T:
        async with RegistryClient(config, retry=retry) as client:
            return await make(client)
    return asyncio.run(go())


def sha256_file(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def creds(reg: LocalRegistry, password: str | None = None) -> RegistriesConfig:
    assert reg.username is not None and reg.password is not None
    return RegistriesConfig(registries={reg.host: RegistryConfig(
        reg.host, username=reg.username, password=password or reg.password,
        ca_file=str(reg.ca_file) if reg.ca_file else None)})


async def pull_all(client: RegistryClient, ref: Reference, dest: Path) -> FetchedManifest:
    """The manifest, its config and its layers, each checked by the client."""
    got = await client.get_manifest(ref)
    manifest = orjson.loads(got.body)
    for desc in [manifest["config"], *manifest["layers"]]:
        await client.fetch_blob(ref, desc["digest"], desc["size"],
                                dest / desc["digest"].split(":")[1])
    return got


@pytest.mark.parametrize(("name", "media_type"), [
    ("v2s2", DOCKER_MANIFEST), ("oci", OCI_MANIFEST), ("zstd", OCI_MANIFEST)])
def test_every_format_pulls(images: PushedImages, tmp_path: Path, name: str,
                            media_type: str) -> None:
    ref = parse(getattr(images, name))
    got = run(lambda c: pull_all(c, ref, tmp_path))
    assert (got.media_type, got.digest, got.source) == (media_type, images.digests[name],
                                                         images.host)
    for layer in images.layers[name]:
        assert sha256_file(tmp_path / layer.split(":")[1]) == layer
    head = run(lambda c: c.head_manifest(ref))
    assert head is not None and (head.media_type, head.digest) == (media_type, got.digest)
    assert head.size == len(got.body)


def test_index_and_its_manifests_by_digest(images: PushedImages) -> None:
    ref = parse(images.multi)

    async def go(c: RegistryClient) -> list[FetchedManifest]:
        index = await c.get_manifest(ref)
        out = [index]
        for entry in orjson.loads(index.body)["manifests"]:
            if entry["mediaType"] in MANIFEST_ACCEPT:
                out.append(await c.get_manifest(ref.with_digest(entry["digest"])))
        return out
    index, *children = run(go)
    assert (index.media_type, index.digest) == (OCI_INDEX, images.digests["multi"])
    assert sorted(m.digest for m in children) == sorted(images.platforms.values())


def test_tags_and_not_found(images: PushedImages, tmp_path: Path) -> None:
    ref = parse(images.oci)
    tags = run(lambda c: c.list_tags(ref))
    assert {"v2s2", "oci", "zstd", "multi"} <= set(tags)
    missing = ref.with_tag("no-such-tag")
    with pytest.raises(NotFound, match=f"{missing}"):
        run(lambda c: c.get_manifest(missing))
    assert run(lambda c: c.head_manifest(missing)) is None
    with pytest.raises(NotFound, match="blob"):
        run(lambda c: c.fetch_blob(ref, "sha256:" + "1" * 64, 1, tmp_path / "x"))
    assert not (tmp_path / "x").exists()


async def push_small_image(c: RegistryClient, ref: Reference, tmp: Path) -> str:
    """A config blob and a manifest with no layers: the registry checks both exist."""
    config = orjson.dumps({"architecture": "amd64", "os": "linux",
                           "rootfs": {"type": "layers", "diff_ids": []}})
    digest = "sha256:" + hashlib.sha256(config).hexdigest()
    src = tmp / "config.json"
    src.write_bytes(config)
    if not await c.blob_exists(ref, digest):
        await c.upload_blob(ref, digest, len(config), src)
    assert await c.blob_exists(ref, digest)
    manifest = orjson.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest,
        "size": len(config)}, "layers": []})
    return await c.put_manifest(ref, OCI_MANIFEST, manifest)


def test_push_then_pull_back_and_mount(images: PushedImages, tmp_path: Path) -> None:
    ref = parse(f"{images.host}/test/pushed:1")

    async def go(c: RegistryClient) -> tuple[str, FetchedManifest, bool, bool]:
        digest = await push_small_image(c, ref, tmp_path)
        back = await c.get_manifest(ref)
        target = parse(f"{images.host}/test/mounted:1")
        mounted = await c.mount_blob(target, images.shared_layer, "test/shared-a")
        return digest, back, mounted, await c.blob_exists(target, images.shared_layer)
    digest, back, mounted, exists = run(go)
    assert back.digest == digest and back.media_type == OCI_MANIFEST
    assert mounted and exists


def test_basic_auth_registry(basic_registry: LocalRegistry, tmp_path: Path) -> None:
    ref = parse(f"{basic_registry.host}/team/app:1")
    digest = run(lambda c: push_small_image(c, ref, tmp_path), creds(basic_registry))
    assert run(lambda c: c.get_manifest(ref), creds(basic_registry)).digest == digest
    with pytest.raises(AuthError, match="refused the credentials") as info:
        run(lambda c: c.get_manifest(ref), creds(basic_registry, "wrong-password-x"))
    assert "wrong-password-x" not in str(info.value)
    with pytest.raises(AuthError, match="needs credentials"):
        run(lambda c: c.get_manifest(ref))


def test_token_registry(token_registry: LocalRegistry, token_server: TokenServer,
                        tmp_path: Path) -> None:
    public = parse(f"{token_registry.host}/public/app:1")
    private = parse(f"{token_registry.host}/private/app:1")
    before = len(token_server.issued)

    async def push_both(c: RegistryClient) -> tuple[str, str]:
        return (await push_small_image(c, public, tmp_path),
                await push_small_image(c, private, tmp_path))
    pub_digest, priv_digest = run(push_both, creds(token_registry))
    pushes = token_server.issued[before:]
    # One token per repository's push scope, reused for every request of that push.
    assert [scopes for _, scopes in pushes] == [
        ("repository:public/app:push,pull",), ("repository:private/app:push,pull",)]
    assert all(account == token_registry.username for account, _ in pushes)

    assert run(lambda c: c.get_manifest(public)).digest == pub_digest  # anonymous
    assert token_server.issued[-1] == ("", ("repository:public/app:pull",))
    assert run(lambda c: c.get_manifest(private), creds(token_registry)).digest == priv_digest
    with pytest.raises(AuthError):
        run(lambda c: c.get_manifest(private))
    with pytest.raises(AuthError, match="refused the credentials") as info:
        run(lambda c: c.get_manifest(private), creds(token_registry, "not-bobs-password"))
    assert "not-bobs-password" not in str(info.value)


def test_tls_registry(tls_registry: LocalRegistry, tmp_path: Path) -> None:
    ref = parse(f"{tls_registry.host}/team/app:1")
    with_ca = RegistriesConfig(registries={tls_registry.host: RegistryConfig(
        tls_registry.host, ca_file=str(tls_registry.ca_file))})
    digest = run(lambda c: push_small_image(c, ref, tmp_path), with_ca)
    assert run(lambda c: c.get_manifest(ref), with_ca).digest == digest
    strict = RegistriesConfig(registries={tls_registry.host: RegistryConfig(
        tls_registry.host, insecure=False)})
    with pytest.raises(RegistryError, match=r"TLS failed.*ca_file"):
        run(lambda c: c.get_manifest(ref), strict)


# -- faults -------------------------------------------------------------------------------

def via(proxy: Any, ref_text: str, images: PushedImages) -> Reference:
    return parse(ref_text.replace(images.host, proxy.host))


def biggest_layer(images: PushedImages, tmp_path: Path) -> tuple[str, int]:
    got = run(lambda c: c.get_manifest(parse(images.oci)))
    layer = max(orjson.loads(got.body)["layers"], key=lambda d: d["size"])
    return layer["digest"], layer["size"]


def test_5xx_and_429_are_retried(images: PushedImages, fault_proxy: Any) -> None:
    proxy = fault_proxy(f"http://{images.host}")
    proxy.inject("GET", r"/manifests/", [
        Status(500), Status(503, body=b"<html>busy</html>"),
        Status(429, headers={"Retry-After": "0"})])
    ref = via(proxy, images.oci, images)
    assert run(lambda c: c.get_manifest(ref)).digest == images.digests["oci"]
    statuses = [s for m, p, s in proxy.requests if "/manifests/" in p]
    assert statuses == [500, 503, 429, 200]


def test_retries_give_up_with_a_clear_error(images: PushedImages, fault_proxy: Any) -> None:
    proxy = fault_proxy(f"http://{images.host}")
    proxy.inject("GET", r"/manifests/", [Status(502)] * 10)
    with pytest.raises(RegistryError, match=rf"{proxy.host}.*4 attempts.*502") as info:
        run(lambda c: c.get_manifest(via(proxy, images.oci, images)))
    assert info.value.status == 502


@pytest.mark.parametrize(("faults", "statuses"), [
    ([ResetAfter(100_000)], [200, 206]),
    ([Truncate(50_000)], [200, 206]),
    ([ResetAfter(100_000), NoRange()], [200, 200]),  # the whole blob again: started over
])
def test_broken_blob_bodies_are_resumed(images: PushedImages, fault_proxy: Any,
                                        tmp_path: Path, faults: list[Any],
                                        statuses: list[int]) -> None:
    digest, size = biggest_layer(images, tmp_path)
    assert size > 100_000
    proxy = fault_proxy(f"http://{images.host}")
    proxy.inject("GET", r"/blobs/", faults)
    dest = tmp_path / "layer"
    run(lambda c: c.fetch_blob(via(proxy, images.oci, images), digest, size, dest))
    assert sha256_file(dest) == digest
    assert proxy.pending() == 0
    assert [s for m, p, s in proxy.requests if p.endswith(digest)] == statuses


def test_corrupt_blob_is_refused_and_removed(images: PushedImages, fault_proxy: Any,
                                             tmp_path: Path) -> None:
    digest, size = biggest_layer(images, tmp_path)
    proxy = fault_proxy(f"http://{images.host}")
    proxy.inject("GET", r"/blobs/", [Corrupt()])
    dest = tmp_path / "layer"
    with pytest.raises(DigestMismatch, match=digest):
        run(lambda c: c.fetch_blob(via(proxy, images.oci, images), digest, size, dest))
    assert not dest.exists()
