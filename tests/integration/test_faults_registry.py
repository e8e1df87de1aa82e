"""Registry faults during a pull (issue #14, faults): the registry stopped mid-download and
brought back, slow and reset connections through the fault proxy (tests/support/proxy.py).
A pull that fails leaves nothing in the store (no temp file, no blob or layer nothing
needs, not even the layers that did arrive); the next one succeeds; every test ends with the
store checked by its own verify. In-process stores on ordinary disk: root and ordinary user
alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from sandbox.errors import RegistryError
from sandbox.images import ImageService
from sandbox.images.registry.client import RegistryClient, RetryPolicy
from sandbox.images.registry.config import RegistriesConfig
from sandbox.tenants import Tenant
from testbed.registry import LocalRegistry, start_registry
from tests.support.fillers import push_fillers
from tests.support.fixtures import ProxyFactory
from tests.support.images import PushedImages
from tests.support.proxy import ResetAfter, Slow

T = Tenant("test")
FAST_RETRY = RetryPolicy(attempts=3, first_delay=0.05, max_delay=0.5)
STARTED_WAIT_S = 30.0
BEGUN_BYTES = 64 << 10  # more than the config: the layer's download is under way


def _service(state: Path) -> ImageService:
    return ImageService(state, client=RegistryClient(RegistriesConfig(), retry=FAST_RETRY))


def _blobs_in_progress(state: Path) -> int:
    """Bytes written so far by downloads under way (their temp files)."""
    tmp = state / "images" / "blobs" / "tmp"
    total = 0
    for p in tmp.iterdir():
        with contextlib.suppress(FileNotFoundError):  # finished meanwhile
            total += p.stat().st_size
    return total


def test_registry_stopped_mid_pull_then_back(tmp_path: Path,
                                             fault_proxy: ProxyFactory) -> None:
    """The registry dies while a blob is half downloaded: the pull fails as the registry's
    (RegistryError, not the store's), leaves nothing, and once the registry is back on the
    same storage the same pull succeeds."""
    own_registry = tmp_path / "registry"  # a registry of its own: the test stops it
    first = start_registry(own_registry, die_with_parent=True)
    registries: list[LocalRegistry] = [first]
    try:
        push_fillers(first, tmp_path / "fillers", {"16m": 16})
        proxy = fault_proxy(first)
        ref = f"{proxy.host}/test/fill:16m"
        # The config, then the layer at 256 KiB every 20 ms: over a second, time to stop the
        # registry with more of the blob to come than the sockets between can hold.
        proxy.inject("GET", r"/blobs/", [Slow(256 << 10, 0.02)] * 2)
        state = tmp_path / "state"

        async def go() -> None:
            async with _service(state) as svc:
                pull = asyncio.ensure_future(svc.pull(ref, tenant=T))
                deadline = asyncio.get_running_loop().time() + STARTED_WAIT_S
                while _blobs_in_progress(state) < BEGUN_BYTES:
                    assert not pull.done(), pull.result()
                    assert asyncio.get_running_loop().time() < deadline, "no download began"
                    await asyncio.sleep(0.01)
                first.stop()
                with pytest.raises(RegistryError):
                    await pull
                assert await asyncio.to_thread(svc.verify) == []
                assert svc.list(tenant=T) == []
                back = start_registry(own_registry, die_with_parent=True)
                registries.append(back)
                proxy.upstream = back.url
                image = await svc.pull(ref, tenant=T)
                assert image.names == (ref,)
                assert await asyncio.to_thread(svc.verify) == []

        asyncio.run(go())
    finally:
        for reg in registries:
            reg.stop()


def test_slow_and_reset_connections_still_pull(registry: LocalRegistry, images: PushedImages,
                                               tmp_path: Path,
                                               fault_proxy: ProxyFactory) -> None:
    """A manifest request reset before its answer, a blob reset midway (resumed), a slow
    blob: the pull gets through, and the store holds exactly the image."""
    proxy = fault_proxy(registry)
    proxy.inject("GET", r"/manifests/", [ResetAfter(0)])
    bottom = images.layers["shared_a"][0]  # busybox: ~1 MB
    proxy.inject("GET", f"/blobs/{bottom}$", [ResetAfter(100_000), Slow(16 << 10, 0.001)])
    ref = images.shared_a.replace(registry.host, proxy.host)

    async def go() -> None:
        async with _service(tmp_path / "state") as svc:
            image = await svc.pull(ref, tenant=T)
            assert image.digest == images.digests["shared_a"]
            assert await asyncio.to_thread(svc.verify) == []

    asyncio.run(go())
    assert proxy.pending() == 0
    resumed = [path for method, path, status in proxy.requests if status == 206]
    assert resumed, proxy.requests


def test_a_pull_that_fails_midway_leaves_nothing(registry: LocalRegistry,
                                                 images: PushedImages, tmp_path: Path,
                                                 fault_proxy: ProxyFactory) -> None:
    """One layer's download keeps breaking until the client gives up; the other layer,
    the config and the manifest arrived: all of it goes with the failed pull, and the pull
    after it succeeds."""
    proxy = fault_proxy(registry)
    top = images.layers["shared_a"][-1]
    proxy.inject("GET", f"/blobs/{top}$", [ResetAfter(10)] * (FAST_RETRY.attempts * 4))
    ref = images.shared_a.replace(registry.host, proxy.host)

    async def go() -> None:
        async with _service(tmp_path / "state") as svc:
            with pytest.raises(RegistryError):
                await svc.pull(ref, tenant=T)
            assert await asyncio.to_thread(svc.verify) == []
            assert svc.blobs.digests() == [] and svc.layers.diff_ids() == []
            # shared_b shares the bottom layer, not the top one the faults are for.
            image = await svc.pull(images.shared_b.replace(registry.host, proxy.host),
                                   tenant=T)
            assert image.digest == images.digests["shared_b"]
            assert await asyncio.to_thread(svc.verify) == []

    asyncio.run(go())
