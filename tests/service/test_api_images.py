"""/v1/images end to end against the test registry: pull (JSON and NDJSON progress), list,
inspect, tag, remove, push, import, gc, and registry failures."""

from __future__ import annotations

import gzip
import io
import socket
import tarfile
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import pytest

from testbed import busybox
from tests.service.conftest import LIMITED_TOKEN, Service


@pytest.fixture(scope="module")
def rootfs_tar(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = busybox.build_rootfs(tmp_path_factory.mktemp("rootfs") / "root")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(root, arcname=".")
    return gzip.compress(buf.getvalue(), compresslevel=1)


def test_pull_list_inspect_tag_remove(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/images/pull", json={"reference": images.v2s2}) as r:
            assert r.status == 200, await r.text()
            pulled = await r.json()
        assert pulled["digest"] == images.digests["v2s2"] and images.v2s2 in pulled["names"]
        assert set(pulled) == {"digest", "names", "config_digest", "platform", "size"}
        async with s.get("/v1/images") as r:
            listed = {i["digest"]: i for i in (await r.json())["images"]}
        assert images.v2s2 in listed[pulled["digest"]]["names"]
        for ref in (pulled["digest"], quote(images.v2s2, safe=""), images.v2s2):
            async with s.get(f"/v1/images/{ref}") as r:
                assert r.status == 200, (ref, await r.text())
                inspected = await r.json()
            assert inspected["digest"] == pulled["digest"] and inspected["layers"]
            assert inspected["config"]["rootfs"]["type"] == "layers"
        target = f"{service.registry_host}/test/renamed:api"
        async with s.post("/v1/images/tag", json={"source": pulled["digest"],
                                                  "target": target}) as r:
            assert r.status == 201 and (await r.json())["name"] == target
        async with s.delete(f"/v1/images/{quote(target, safe='')}") as r:
            assert r.status == 200 and (await r.json())["removed"] == [target]
        async with s.get(f"/v1/images/{quote(target, safe='')}") as r:
            assert r.status == 404 and "renamed" in (await r.json())["error"]["message"]
    service.call(go)


def test_pull_streams_progress_as_ndjson(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with s.post("/v1/images/pull", json={"reference": images.zstd},
                          headers={"Accept": "application/x-ndjson"}) as r:
            assert r.status == 200 and r.content_type == "application/x-ndjson"
            return [orjson.loads(line) for line in (await r.read()).splitlines()]
    events = service.call(go)
    assert events[-1]["event"] == "done" and events[-1]["digest"] == images.digests["zstd"]
    progress = events[:-1]
    assert progress and all(e["event"] == "progress" for e in progress)
    assert all({"layer", "status", "done", "total"} <= set(e) for e in progress)


def test_import_a_tar_then_run_it(service: Service, rootfs_tar: bytes) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/images/import", params={"reference": "imported/bb:1"},
                          data=rootfs_tar,
                          headers={"Content-Type": "application/x-tar"}) as r:
            assert r.status == 201, await r.text()
            image = await r.json()
        assert "docker.io/imported/bb:1" in image["names"]
        async with s.post("/v1/runs", json={"image": "imported/bb:1",
                                            "cmd": ["/bin/busybox", "echo", "imported"]}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["stdout"] == "imported\n"
        async with s.post("/v1/images/import", params={"reference": "imported/bad:1"},
                          data=b"this is not a tar" * 100) as r:
            assert r.status == 400, await r.text()
    service.call(go)


def test_push_then_pull_back(service: Service, images: Any) -> None:
    target = f"{service.registry_host}/test/pushed-by-api:1"

    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/images/pull", json={"reference": images.oci}) as r:
            digest = (await r.json())["digest"]
        async with s.post("/v1/images/push", json={"source": images.oci,
                                                   "target": target}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["digest"] == digest
        async with s.post("/v1/images/pull", json={"reference": target}) as r:
            assert (await r.json())["digest"] == digest
    service.call(go)


def test_gc_reports(service: Service) -> None:
    async def go(s: aiohttp.ClientSession) -> dict[str, Any]:
        async with s.post("/v1/images/gc", json={"budget_bytes": 1 << 40}) as r:
            assert r.status == 200
            return await r.json()
    report = service.call(go)
    assert set(report) == {"images", "blobs", "layers", "freed_bytes", "kept_bytes"}
    assert report["images"] == [] and report["kept_bytes"] > 0


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_registry_failures(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for ref, headers in (
                (f"{service.registry_host}/test/never-pushed:1", {}),
                ("docker.io/library/busybox:1", service.headers(LIMITED_TOKEN)),
                (f"127.0.0.1:{_closed_port()}/test/busybox:1", {})):
            async with s.post("/v1/images/pull", json={"reference": ref},
                              headers=headers) as r:
                out.append((r.status, (await r.json())["error"]))
        return out
    (missing, status_missing), (forbidden, status_forbidden), (down, status_down) = \
        service.call(go)
    assert missing == 404 and "never-pushed" in status_missing["message"]
    assert forbidden == 403 and status_forbidden["field"] == "reference"
    assert service.registry_host in status_forbidden["message"]
    # A registry on a local address that the operator did not list: not for tokens (SSRF).
    assert down == 403 and status_down["field"] == "reference"
    assert "local address" in status_down["message"] and "[registries." in status_down["message"]
