"""Images of two tenants in one store, against the real test registry: names and digests
are each tenant's own, content is shared, and a tenant uses stored content only once its
own registry has served it (a HEAD's digest, a digest it merely knows, or an image config
naming another tenant's layer gives it nothing)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from sandbox.errors import DigestMismatch, Forbidden, NotFound, QuotaExceeded
from sandbox.images import ImageService, PublicNames, digests
from sandbox.images.manifest import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
)
from sandbox.tenants import Tenant
from tests.conftest import Session
from tests.integration.test_images import (
    _config,
    _desc,
    _layer_tgz,
    _push_raw,
    make_service,
)

A = Tenant("tenant-a")
B = Tenant("tenant-b")


def _layer(files: dict[str, bytes]) -> bytes:
    return _layer_tgz(files)[0]


async def _push_image(registry: Any, repo_tag: str, layer: bytes, diff_id: str) -> str:
    """Push a one-layer image whose config claims `diff_id` for `layer` (honestly or not);
    returns the manifest digest."""
    config = _config([diff_id])
    repo, tag = repo_tag.split(":")
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": _desc(OCI_CONFIG, config), "layers": [_desc(OCI_LAYER_GZIP, layer)]}
    await _push_raw(registry, repo, tag, [layer, config], manifest, OCI_MANIFEST)
    return digests.of_bytes(json.dumps(manifest).encode())


@pytest.fixture
def svc(session: Session, tmp_path: Path) -> ImageService:
    s = make_service(tmp_path / "state")
    yield s
    session.run(s.close())


def test_names_and_digests_are_each_tenants_own(session: Session, svc: ImageService,
                                                images: Any, tmp_path: Path) -> None:
    image = session.run(svc.pull(images.oci, tenant=A))
    for ref in (images.oci, image.digest, image.config_digest):
        with pytest.raises(NotFound):
            session.run(svc.resolve(ref, tenant=B))
        with pytest.raises(NotFound):
            svc.inspect(ref, tenant=B)
        with pytest.raises(NotFound):
            svc.tag(ref, "b/stolen:1", tenant=B)
        with pytest.raises(NotFound):
            svc.remove(ref, tenant=B)
        with pytest.raises(NotFound):
            session.run(svc.push(ref, f"{images.host}/b/stolen:1", tenant=B))
    assert svc.list(tenant=B) == []
    assert [s.digest for s in svc.list(tenant=A)] == [image.digest]
    # A name B gives an image of its own does not change what A's name means.
    tar = tmp_path / "b.tar"
    tar.write_bytes(_layer({"marker": b"b's image"}))
    session.run(svc.import_tar(tar, images.oci, tenant=B))
    assert session.run(svc.resolve(images.oci, tenant=A)).digest == image.digest
    assert session.run(svc.resolve(images.oci, tenant=B)).digest != image.digest
    svc.remove(images.oci, tenant=B)
    assert session.run(svc.resolve(images.oci, tenant=A)).digest == image.digest


def test_a_second_tenant_fetches_what_the_store_has_from_its_own_registry(
        session: Session, svc: ImageService, images: Any, registry: Any) -> None:
    """B's first pull of an image A pulled goes to the registry for the manifest and every
    blob (proof that B's registry serves them), but unpacks nothing again."""
    a = session.run(svc.pull(images.v2s2, tenant=A))
    before = registry.requests()
    b = session.run(svc.pull(images.v2s2, tenant=B))
    served = registry.requests()[len(before):]
    assert b.digest == a.digest and b.layers == a.layers
    fetched = {path.rsplit("/", 1)[-1] for method, path, *_ in served
               if method == "GET" and "/blobs/" in path}
    assert fetched == {*images.layers["v2s2"], a.config_digest}
    assert any(m == "GET" and "/manifests/" in p for m, p, *_ in served)
    # B's own re-pull is a HEAD, as for any cached pull.
    before = registry.requests()
    session.run(svc.pull(images.v2s2, tenant=B))
    assert [r[0] for r in registry.requests()[len(before):]] == ["HEAD"]


def test_a_head_digest_alone_gives_no_image(session: Session, svc: ImageService,
                                            images: Any, registry: Any) -> None:
    """A registry answering HEAD with another tenant's digest (a lie, or a tag that moved)
    does not make the name point at that image: the manifest is fetched and verified."""
    a = session.run(svc.pull(images.oci, tenant=A))
    layer, raw = _layer_tgz({"x": b"mine"})
    other = session.run(_push_image(registry, "tenancy/lie:1", layer, digests.of_bytes(raw)))
    real_head = svc.client.head_manifest

    async def lying_head(ref: Any) -> Any:
        head = await real_head(ref)
        return type(head)(media_type=head.media_type, digest=a.digest, size=head.size)

    svc.client.head_manifest = lying_head  # type: ignore[method-assign]
    got = session.run(svc.pull(f"{images.host}/tenancy/lie:1", tenant=B))
    assert got.digest == other != a.digest


def test_a_config_naming_another_tenants_layer_does_not_get_its_files(
        session: Session, svc: ImageService, images: Any, registry: Any,
        tmp_path: Path) -> None:
    """B knows the diff_id of A's private layer and pushes an image whose config claims it
    for a blob of B's own: the pull fails, and B never runs A's files."""
    private = _layer({"secret": b"A's private data"})
    private_diff = digests.of_bytes(gzip.decompress(private))
    tar = tmp_path / "a.tar.gz"
    tar.write_bytes(private)
    session.run(svc.import_tar(tar, "a/private:1", tenant=A))
    assert svc.layers.has(private_diff)
    decoy = _layer({"secret": b"nothing"})
    session.run(_push_image(registry, "tenancy/thief:1", decoy, private_diff))
    with pytest.raises(DigestMismatch, match="decompresses to"):
        session.run(svc.pull(f"{images.host}/tenancy/thief:1", tenant=B))
    with pytest.raises(NotFound):
        session.run(svc.resolve(f"{images.host}/tenancy/thief:1", tenant=B))
    # The honest pull of the same layer by B (its own copy of the blob) is fine.
    session.run(_push_image(registry, "tenancy/honest:1", private, private_diff))
    got = session.run(svc.pull(f"{images.host}/tenancy/honest:1", tenant=B))
    assert got.layers == (svc.layers.path(private_diff),)


def test_public_names_are_shared_and_read_only(session: Session, tmp_path: Path,
                                               images: Any) -> None:
    svc = make_service(tmp_path / "state",
                       public=PublicNames.parse([f"{images.host}/test/busybox:*"]))
    try:
        image = session.run(svc.pull(images.oci, tenant=A))
        assert session.run(svc.resolve(images.oci, tenant=B)).digest == image.digest
        assert [s.digest for s in svc.list(tenant=B)] == [image.digest]
        with pytest.raises(Forbidden):
            svc.remove(images.oci, tenant=B)
        with pytest.raises(Forbidden):
            svc.tag(images.oci, images.v2s2, tenant=B)
        tar = tmp_path / "b.tar"
        tar.write_bytes(_layer({"marker": b"b"}))
        with pytest.raises(Forbidden):
            session.run(svc.import_tar(tar, images.oci, tenant=B))
    finally:
        session.run(svc.close())


def test_a_tenant_over_its_byte_quota_is_refused_before_downloading(
        session: Session, svc: ImageService, images: Any, registry: Any,
        tmp_path: Path) -> None:
    small = Tenant("small", max_image_bytes=1000)
    before = registry.requests()
    with pytest.raises(QuotaExceeded, match="max_image_bytes"):
        session.run(svc.pull(images.oci, tenant=small))
    assert not [r for r in registry.requests()[len(before):]
                if "/blobs/" in r[1] and "sha256:" + r[1].rsplit(":", 1)[-1]
                in images.layers["oci"]]
    with pytest.raises(NotFound):
        session.run(svc.resolve(images.oci, tenant=small))
    tar = tmp_path / "big.tar.gz"
    tar.write_bytes(_layer({"big": orjson.dumps(list(range(2000)))}))
    with pytest.raises(QuotaExceeded):
        session.run(svc.import_tar(tar, "small/big:1", tenant=small))
    assert svc.list(tenant=small) == []
    roomy = Tenant("roomy", max_image_bytes=1 << 30)
    session.run(svc.pull(images.oci, tenant=roomy))
    assert 0 < svc.catalog.usage(roomy.id) <= 1 << 30
