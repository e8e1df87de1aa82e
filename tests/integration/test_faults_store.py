"""A full store (issue #14, faults): a pull, an upload or a run's copy_out_cached that runs out
of space is StoreFull (HTTP 507 `store_full`) naming the store and what to free; the failed
work leaves nothing behind (no temp file, no blob or layer nothing needs) so the next pull
fits; the store reclaims what nothing uses before it gives up. Every test ends with the
store checked by its own verify.

The small filesystem: the library-level tests run the store in a process of its own with a
tmpfs in its own mount namespace (tests/support/smallfs.py), as root and as an ordinary user
(who gets the right to mount from a user namespace of its own). The service-level test
needs the tmpfs where `sandboxd serve` sees it: root mounts one; as an ordinary user it
skips.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sandbox.engine.filecache import FileCache, FileCacheConfig
from sandbox.errors import StoreFull
from sandbox.images import ImageService
from sandbox.images.registry.client import RegistryClient, RetryPolicy
from sandbox.images.registry.config import RegistriesConfig
from sandbox.tenants import Tenant
from testbed.registry import LocalRegistry
from tests.service.conftest import Service as RunningService
from tests.service.conftest import start_service, stop_service, wait_ready
from tests.support.fillers import MiB, layer_tar, push_fillers
from tests.support.images import PushedImages
from tests.support.smallfs import run_small
from tests.support.stores import state_problems

HERE = "tests.integration.test_faults_store"
T = Tenant("test")
FAST_RETRY = RetryPolicy(attempts=3, first_delay=0.05, max_delay=0.5)
SMALL_MIB = 8


@pytest.fixture(scope="module")
def fillers(registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, str]:
    # 10m: its blob does not fit in SMALL_MIB; 5m: its blob does, not its unpacked layer
    # too; 3a and 3b: each fits alone (blob + layer ~6 MiB), not both.
    return push_fillers(registry, tmp_path_factory.mktemp("fillers"),
                        {"10m": 10, "5m": 5, "3a": 3, "3b": 3})


def _service(state: Path) -> ImageService:
    return ImageService(state, client=RegistryClient(RegistriesConfig(), retry=FAST_RETRY))


def _left_in(state: Path) -> list[str]:
    """Temporary entries of the image store (verify reports them too: this names them)."""
    return sorted(p.name for d in ("images/blobs/tmp", "images/layers/tmp")
                  for p in (state / d).iterdir())


# What runs in the small filesystem's process (tests/support/smallfs.py): JSON in and out.

async def pull_until_full(state: Path, big: list[str], small: str) -> dict[str, Any]:
    async with _service(state) as svc:
        out: dict[str, Any] = {"big": [], "problems": []}
        for ref in big:
            try:
                await svc.pull(ref, tenant=T)
                out["big"].append("pulled")
            except StoreFull as e:
                out["big"].append({"message": str(e), "path": e.path})
            out["problems"] += await asyncio.to_thread(svc.verify)
            out["problems"] += _left_in(state)
        out["small"] = (await svc.pull(small, tenant=T)).digest
        out["problems"] += await asyncio.to_thread(svc.verify)
        out["images"] = [list(i.names) for i in svc.list(tenant=T)]
        return out


async def reclaim_then_pull(state: Path, first: str, second: str) -> dict[str, Any]:
    async with _service(state) as svc:
        image = await svc.pull(first, tenant=T)
        first_blobs = svc.blobs.digests()
        # Unnamed but not collected: forced out while a container held it, then released.
        svc.lease(image.digest, "holder")
        svc.remove(first, tenant=T, force=True)
        svc.release("holder")
        pulled = await svc.pull(second, tenant=T)
        return {"second": pulled.digest,
                "first_left": sorted(set(first_blobs) & set(svc.blobs.digests())),
                "problems": await asyncio.to_thread(svc.verify)}


async def import_until_full(state: Path) -> dict[str, Any]:
    async with _service(state) as svc:
        try:
            await svc.import_tar(io.BytesIO(layer_tar(SMALL_MIB * MiB)), "local/fill:big",
                                 tenant=T)
            outcome = "imported"
        except StoreFull as e:
            outcome = str(e)
        return {"outcome": outcome, "problems": await asyncio.to_thread(svc.verify)}


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for at in range(0, len(data), MiB):
        yield data[at:at + MiB]


async def file_cache_full(state: Path) -> dict[str, Any]:
    # Every entry expires at once: room for a put is made only by the full store's reclaim.
    cache = FileCache(state / "files", FileCacheConfig(ttl_s=1e-6))
    out: dict[str, Any] = {}
    try:
        try:
            await cache.put(T, _chunks(os.urandom(SMALL_MIB * MiB)))
            out["too_big"] = "stored"
        except StoreFull as e:
            out["too_big"] = {"message": str(e), "path": e.path}
        out["after_too_big"] = cache.verify()
        first = os.urandom(SMALL_MIB * MiB // 2)
        await cache.put(T, _chunks(first))
        second = os.urandom(SMALL_MIB * MiB // 2)
        try:
            await cache.put(T, _chunks(second))
            out["second"] = "stored"
        except StoreFull:
            out["second"] = "full"
        entry = await cache.put(T, _chunks(second))  # the retry, after expired ones went
        out["retried"] = entry.id == "sha256:" + hashlib.sha256(second).hexdigest()
        out["problems"] = cache.verify()
        return out
    finally:
        cache.close()


# The tests


def test_a_pull_that_fills_the_store_is_store_full_and_leaves_nothing(
        fillers: dict[str, str], images: PushedImages, tmp_path: Path) -> None:
    """The issue's case: a pull out of space was a 500, and the next pull of a small image
    failed (502) while the failed pull's blobs held the space. Out of space downloading
    (10m) and unpacking (5m): StoreFull naming the store, nothing left, the next pull in."""
    state = tmp_path / "state"
    out = run_small(SMALL_MIB, state, f"{HERE}:pull_until_full",
                    [fillers["10m"], fillers["5m"]], images.oci)
    for failed in out["big"]:
        assert failed != "pulled", out
        assert failed["path"] == str(state / "images"), failed
        message = failed["message"]
        assert "the image store is full" in message, message
        assert "sbx rmi" in message and "POST /v1/images/gc" in message, message
    assert out["problems"] == [], out["problems"]
    assert out["images"] == [[images.oci]], out


def test_a_full_store_reclaims_unused_content_and_retries(fillers: dict[str, str],
                                                          tmp_path: Path) -> None:
    """Content nothing names (an image forced out while in use) holds the space a pull
    needs: the store collects it and the pull goes through, without a gc asked for."""
    out = run_small(SMALL_MIB, tmp_path / "state", f"{HERE}:reclaim_then_pull",
                    fillers["3a"], fillers["3b"])
    assert out["second"].startswith("sha256:"), out
    assert out["first_left"] == [] and out["problems"] == [], out


def test_an_import_that_fills_the_store_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    out = run_small(SMALL_MIB, state, f"{HERE}:import_until_full")
    assert "the image store is full" in out["outcome"], out
    assert out["problems"] == [], out


def test_a_full_file_cache_is_store_full_and_reclaims_expired_files(tmp_path: Path) -> None:
    state = tmp_path / "state"
    out = run_small(SMALL_MIB, state, f"{HERE}:file_cache_full")
    assert out["too_big"] != "stored", out
    assert out["too_big"]["path"] == str(state / "files"), out
    assert "the file cache is full" in out["too_big"]["message"], out
    assert out["after_too_big"] == [], out
    assert out["second"] == "full" and out["retried"] is True, out
    assert out["problems"] == [], out


# Through the service: a state directory on a tmpfs the service sees (root only).

STATE_MIB = 16


@pytest.fixture
def small_service(registry: LocalRegistry, images: PushedImages,
                  tmp_path: Path) -> Iterator[tuple[RunningService, Path]]:
    if os.geteuid() != 0:
        pytest.skip("the service must see the small state directory: only root can mount a "
                    "tmpfs in the host's mount namespace (the library-level tests of this "
                    "module cover an ordinary user, in a namespace of their own)")
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STATE_MIB}m,mode=0700", "tmpfs",
                    str(state)], check=True)
    try:
        proc, log = start_service(tmp_path, """
[server]
shutdown_deadline_s = 5

[pools]
min_idle = 0
""")
        url = wait_ready(proc, log)
        svc = RunningService(url, proc, log, state, registry.host)
        try:
            yield svc, state
        finally:
            stop_service(svc, tmp_path)
    finally:
        subprocess.run(["umount", str(state)], check=True)


def test_the_service_answers_507_and_keeps_serving(small_service: tuple[RunningService, Path],
                                                  fillers: dict[str, str],
                                                  images: PushedImages) -> None:
    svc, state = small_service
    big = os.urandom(STATE_MIB * MiB)

    async def go(s: aiohttp.ClientSession) -> None:
        # The sequence: a pull out of space (10m: its blob fits in STATE_MIB, not
        # its unpacked layer too) was a 500, and the small pull after it a 502.
        async with s.post("/v1/images/pull", json={"reference": fillers["10m"]}) as r:
            body = await r.json()
            assert r.status == 507 and body["error"]["code"] == "store_full", body
            # The store's path and what fills it (every tenant's) are for the operator's log.
            assert str(state) not in body["error"]["message"], body
        async with s.post("/v1/images/pull", json={"reference": images.oci}) as r:
            assert r.status == 200, await r.text()
        async with s.post("/v1/files", data=big,
                          headers={"Content-Type": "application/octet-stream"}) as r:
            body = await r.json()
            assert r.status == 507 and body["error"]["code"] == "store_full", body
            assert str(state) not in body["error"]["message"], body
        # A run whose copy_out_cached does not fit: its result stands, the file is an error.
        async with s.post("/v1/runs", json={
                "image": images.oci, "env": {"PATH": "/bin"},
                "cmd": ["sh", "-c", f"head -c {STATE_MIB * MiB} /dev/urandom > /tmp/big"],
                "copy_out_cached": ["/tmp/big"]}) as r:
            run = await r.json()
            assert r.status == 200 and run["status"] == "ok", run
            assert "is full" in run["file_errors"]["/tmp/big"], run
        async with s.post("/v1/runs", json={"image": images.oci, "env": {"PATH": "/bin"},
                                            "cmd": ["echo", "still serving"]}) as r:
            run = await r.json()
            assert r.status == 200 and run["stdout"] == "still serving\n", run

    svc.call(go)

    assert state_problems(state) == []
