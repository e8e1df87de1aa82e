"""Two tenants (two tokens) on one service: image names, digests, listings, pushes, gc,
warm containers, /v1/info and quotas are each tenant's own; what the operator marks public
is every tenant's, and read-only. Sessions: see test_api_containers.py."""

from __future__ import annotations

import gzip
import io
import socket
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from testbed import busybox
from tests.service.conftest import (
    LIMITED_TOKEN,
    MAIN_TOKEN,
    Service,
    start_service,
    stop_service,
    wait_ready,
)


def _tar_with_marker(root: Path, marker: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(root, arcname=".")
        info = tarfile.TarInfo("marker")
        info.size = len(marker)
        tar.addfile(info, io.BytesIO(marker))
    return gzip.compress(buf.getvalue(), compresslevel=1)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox.build_rootfs(tmp_path_factory.mktemp("tenant-rootfs") / "root")


async def _json(r: aiohttp.ClientResponse) -> Any:
    return await r.json(content_type=None)


async def _import(s: aiohttp.ClientSession, token: str, ref: str, body: bytes) -> dict[str, Any]:
    async with s.post("/v1/images/import", params={"reference": ref}, data=body,
                      headers={"Authorization": f"Bearer {token}",
                               "Content-Type": "application/x-tar"}) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def _run(s: aiohttp.ClientSession, token: str, image: str, cmd: list[str],
               **extra: Any) -> tuple[int, dict[str, Any]]:
    async with s.post("/v1/runs", json={"image": image, "cmd": cmd, **extra},
                      headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, await _json(r)


def test_a_name_another_tenant_gave_an_image_never_runs_for_you(
        service: Service, images: Any, rootfs: Path) -> None:
    """B imports an image of its own under the name A's image has: A's runs of that name
    still run A's image, and B's run B's."""
    name = f"{service.registry_host}/tenancy/app:1"

    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/images/pull", json={"reference": images.oci}) as r:
            assert r.status == 200, await r.text()
        async with s.post("/v1/images/push", json={"source": images.oci,
                                                   "target": name}) as r:
            assert r.status == 200, await r.text()
        await _import(s, LIMITED_TOKEN, name, _tar_with_marker(rootfs, b"B's code\n"))
        status, a = await _run(s, MAIN_TOKEN, name, ["/bin/busybox", "cat", "/marker"])
        assert status == 200 and a["status"] == "nonzero_exit", a
        status, b = await _run(s, LIMITED_TOKEN, name, ["/bin/busybox", "cat", "/marker"])
        assert status == 200 and b["stdout"] == "B's code\n", b
        async with s.delete(f"/v1/images/{quote(name, safe='')}",
                            headers={"Authorization": f"Bearer {LIMITED_TOKEN}"}) as r:
            assert r.status == 200 and (await r.json())["removed"] == [name]
        status, a = await _run(s, MAIN_TOKEN, name, ["/bin/busybox", "true"])
        assert status == 200 and a["status"] == "ok", a
    service.call(go)


def test_your_images_are_invisible_to_another_tenant(service: Service, rootfs: Path) -> None:
    """A's private image (imported, in no registry): to B its digest, config digest and name
    are unknown everywhere, and B's gc leaves it alone."""
    limited = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
    main = {"Authorization": f"Bearer {MAIN_TOKEN}"}

    async def go(s: aiohttp.ClientSession) -> None:
        image = await _import(s, MAIN_TOKEN, "tenancy/private-a:1",
                              _tar_with_marker(rootfs, b"A's secret\n"))
        digest, config = image["digest"], image["config_digest"]
        name = "docker.io/tenancy/private-a:1"
        async with s.get("/v1/images", headers=limited) as r:
            listed = (await r.json())["images"]
        assert digest not in {i["digest"] for i in listed}
        assert not [n for i in listed for n in i["names"] if "private-a" in n]
        for ref in (digest, config, quote(name, safe="")):
            async with s.get(f"/v1/images/{ref}", headers=limited) as r:
                assert r.status == 404, (ref, await r.text())
            async with s.delete(f"/v1/images/{ref}", headers=limited) as r:
                assert r.status == 404, (ref, await r.text())
        for ref in (digest, config):
            status, body = await _run(s, LIMITED_TOKEN, ref,
                                      ["/bin/busybox", "cat", "/marker"])
            assert status == 404 and body["error"]["field"] == "image", body
        status, body = await _run(s, LIMITED_TOKEN, name, ["/bin/busybox", "cat", "/marker"])
        assert status != 200 and "secret" not in str(body), body
        async with s.post("/v1/images/tag", json={"source": digest, "target": "b/stolen:1"},
                          headers=limited) as r:
            assert r.status == 404, await r.text()
        async with s.post("/v1/images/push", json={
                "source": digest, "target": f"{service.registry_host}/b/stolen:1"},
                headers=limited) as r:
            assert r.status == 404, await r.text()
        async with s.post("/v1/images/gc", json={"budget_bytes": 0}, headers=limited) as r:
            assert r.status == 200
            assert digest not in (await r.json())["images"]
        status, mine = await _run(s, MAIN_TOKEN, "tenancy/private-a:1",
                                  ["/bin/busybox", "cat", "/marker"])
        assert status == 200 and mine["stdout"] == "A's secret\n", mine
        async with s.delete(f"/v1/images/{digest}", headers=main) as r:
            assert r.status == 200, await r.text()
    service.call(go)


def test_warm_containers_serve_one_tenant(service: Service, images: Any) -> None:
    """Runs of the same image and policy by two tenants never share a container, and each
    tenant's /v1/info shows its own pools only."""
    async def go(s: aiohttp.ClientSession) -> None:
        ids: dict[str, set[str]] = {MAIN_TOKEN: set(), LIMITED_TOKEN: set()}
        for _ in range(3):
            for token in ids:
                status, res = await _run(s, token, images.oci, ["/bin/busybox", "true"],
                                         policy="judge")
                assert status == 200 and res["status"] == "ok", res
                ids[token].add(res["id"].rsplit("-", 1)[0])  # the container's part
        assert not ids[MAIN_TOKEN] & ids[LIMITED_TOKEN], ids
        async with s.get("/v1/info", headers={"Authorization": f"Bearer {LIMITED_TOKEN}"}
                         ) as r:
            pools = (await r.json())["pools"]
        assert pools and all(p["image"] != "" for p in pools)
        async with s.post("/v1/images/pull", json={"reference": images.zstd}) as r:
            zstd = (await r.json())["digest"]
        await _run(s, MAIN_TOKEN, images.zstd, ["/bin/busybox", "true"], policy="judge")
        async with s.get("/v1/info", headers={"Authorization": f"Bearer {LIMITED_TOKEN}"}
                         ) as r:
            assert zstd not in {p["image"] for p in (await r.json())["pools"]}
    service.call(go)


# A service of its own: quotas and public names are settings.

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


DOWN_REGISTRY = f"127.0.0.1:{_closed_port()}"
QUOTA_TOKEN = "quota-token-0123456789abcdef"
OTHER_TOKEN = "other-token-0123456789abcdef"


@pytest.fixture(scope="module")
def quota_service(registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("tenants")
    config = f"""
[registries."{registry.host}"]
[registries."{DOWN_REGISTRY}"]

[[tokens]]
token = "{QUOTA_TOKEN}"
name = "quota"
max_sessions = 1
max_image_bytes = 1000

[[tokens]]
token = "{OTHER_TOKEN}"
name = "other"

[images]
public = ["{registry.host}/test/busybox:oci"]
"""
    proc, log = start_service(workdir, config)
    svc = Service(wait_ready(proc, log), proc, log, workdir / "state", registry.host)
    yield svc
    stop_service(svc, workdir)


def test_quotas_are_per_tenant(quota_service: Service, images: Any) -> None:
    quota = {"Authorization": f"Bearer {QUOTA_TOKEN}"}
    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}

    async def go(s: aiohttp.ClientSession) -> None:
        # Bytes: the image is over the tenant's 1000 bytes; another tenant pulls it.
        async with s.post("/v1/images/pull", json={"reference": images.v2s2},
                          headers=quota) as r:
            assert r.status == 413, await r.text()
            err = (await r.json())["error"]
        assert err["code"] == "quota_exceeded" and "max_image_bytes" in err["message"]
        async with s.post("/v1/images/pull", json={"reference": images.v2s2},
                          headers=other) as r:
            assert r.status == 200, await r.text()
        # Sessions: one at a time (of a public image, which costs the tenant no bytes).
        async with s.post("/v1/containers", json={"image": images.oci}, headers=quota) as r:
            assert r.status == 201, await r.text()
            first = (await r.json())["id"]
        async with s.post("/v1/containers", json={"image": images.oci}, headers=quota) as r:
            assert r.status == 429, await r.text()
            err = (await r.json())["error"]
            assert err["code"] == "quota_exceeded" and "max_sessions" in err["message"]
            assert "Retry-After" not in r.headers
        async with s.post("/v1/containers", json={"image": images.oci}, headers=other) as r:
            assert r.status == 201, await r.text()
            others = (await r.json())["id"]
        for sid, headers in ((first, quota), (others, other)):
            async with s.delete(f"/v1/containers/{sid}", headers=headers) as r:
                assert r.status == 204
        async with s.post("/v1/containers", json={"image": images.oci}, headers=quota) as r:
            assert r.status == 201, await r.text()
            again = (await r.json())["id"]
        async with s.delete(f"/v1/containers/{again}", headers=quota) as r:
            assert r.status == 204
    quota_service.call(go)


def test_public_names_are_every_tenants_and_read_only(quota_service: Service,
                                                      images: Any, rootfs: Path) -> None:
    quota = {"Authorization": f"Bearer {QUOTA_TOKEN}"}
    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    ref = quote(images.oci, safe="")

    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/images/pull", json={"reference": images.oci},
                          headers=other) as r:
            assert r.status == 200, await r.text()
            digest = (await r.json())["digest"]
        async with s.get("/v1/images", headers=quota) as r:
            assert digest in {i["digest"] for i in (await r.json())["images"]}
        async with s.delete(f"/v1/images/{ref}", headers=quota) as r:
            assert r.status == 403, await r.text()
            assert (await r.json())["error"]["code"] == "forbidden"
        async with s.post("/v1/images/import", params={"reference": images.oci},
                          data=_tar_with_marker(rootfs, b"mine"),
                          headers={**quota, "Content-Type": "application/x-tar"}) as r:
            assert r.status == 403, await r.text()
        status, res = await _run(s, QUOTA_TOKEN, images.oci, ["/bin/busybox", "true"])
        assert status == 200 and res["status"] == "ok", res
    quota_service.call(go)


def test_a_token_names_a_local_registry_only_when_the_operator_listed_it(
        quota_service: Service) -> None:
    """A registry on this machine or its network is reachable for a token only when it is
    configured: else a tenant could make the service probe local ports (SSRF)."""
    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}

    async def go(s: aiohttp.ClientSession) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for ref in (f"127.0.0.1:{_closed_port()}/x:1", "[::1]:22/x:1", "localhost:6379/x:1",
                    "10.1.2.3:5000/x:1", f"{DOWN_REGISTRY}/x:1"):
            async with s.post("/v1/images/pull", json={"reference": ref}, headers=other) as r:
                out.append((r.status, (await r.json())["error"]))
        return out
    *refused, (down, down_error) = quota_service.call(go)
    for status, error in refused:
        assert status == 403 and "local address" in error["message"], error
    # Listed: asked, and its failure reported as the registry's.
    assert down == 502 and down_error["code"] == "registry_error", down_error
