"""The next container's cgroups, made ahead in the housekeeping thread after a create
(spawnerclient._CgroupsAhead): the container that takes them gets its own profile's limits,
not those of the container made before it; they are recorded while they wait, used only
while young, and a closed runtime leaves none behind."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sandbox.engine.records import ContainerRecords
from sandbox.runtime.cgroups import V1Driver
from sandbox.runtime.container import container_limits
from sandbox.runtime.profiles import Limits
from sandbox.runtime.requests import ContainerSpec, ExecRequest
from sandbox.runtime.results import Status
from sandbox.runtime.spawnerclient import AHEAD_MAX_AGE_S, Runtime

MiB = 1 << 20
WAIT_S = 60  # only so that a stuck housekeeping thread fails the test: not a figure


async def _ahead(runtime: Runtime) -> str:
    """The id of the cgroups made ahead, once they are."""
    deadline = time.monotonic() + WAIT_S
    while runtime._cgroups_ahead is None:
        assert time.monotonic() < deadline, "no cgroups made ahead after a create"
        await asyncio.sleep(0.01)
    return runtime._cgroups_ahead.cid


async def _runtime_with_cgroups() -> Runtime:
    runtime = await Runtime.start()
    if runtime.cgroups.driver is None:
        await runtime.close()
        pytest.skip("no cgroups for sandboxd here: nothing made ahead")
    return runtime


async def _after_a_container(runtime: Runtime, root: Path) -> str:
    """One container made and destroyed: the id of the cgroups made ahead after it."""
    await (await runtime.create_container(ContainerSpec(layers=(str(root),)))).destroy()
    return await _ahead(runtime)


def _memory_limit(driver: V1Driver, path: str) -> int:
    return int(Path(f"{driver.bases['memory']}/{path}/memory.limit_in_bytes").read_text())


def test_a_container_from_cgroups_made_ahead_has_its_own_limits(busybox_root: Path) -> None:
    async def two() -> tuple[int, int, int, str, str]:
        runtime = await Runtime.start()
        driver = runtime.cgroups.driver
        if not isinstance(driver, V1Driver) or "memory" not in driver.controllers:
            await runtime.close()
            pytest.skip("no v1 memory controller for sandboxd here")
        judge = runtime.policies.profile("judge")
        runtime.policies.register(replace(
            judge, name="small", defaults=Limits(memory_bytes=16 * MiB, wall_ms=20_000),
            maxima=Limits(memory_bytes=16 * MiB, wall_ms=20_000)))
        try:
            first = await runtime.create_container(
                ContainerSpec(layers=(str(busybox_root),), policy="judge"))
            ahead = await _ahead(runtime)
            second = await runtime.create_container(
                ContainerSpec(layers=(str(busybox_root),), policy="small"))
            assert first.cgroup is not None and second.cgroup is not None
            limits = (_memory_limit(driver, first.cgroup.path),
                      _memory_limit(driver, second.cgroup.path),
                      container_limits(second.policy.profile, second.rootfs,
                                       driver.controllers).memory_bytes or 0)
            await first.destroy()
            await second.destroy()
        finally:
            await runtime.close()
        return *limits, ahead, second.id

    first, second, wanted, ahead, made = asyncio.run(two())
    assert made == ahead, "the second container did not take the cgroups made ahead"
    assert second == wanted < first, (first, second, wanted)


def test_a_closed_runtime_leaves_no_cgroups_made_ahead(busybox_root: Path) -> None:
    async def made_and_closed() -> tuple[str, list[str], list[str]]:
        runtime = await _runtime_with_cgroups()
        driver = runtime.cgroups.driver
        assert driver is not None
        try:
            ahead = await _after_a_container(runtime, busybox_root)
            while_open = driver.list()
        finally:
            await runtime.close()
        return f"c-{ahead}", while_open, driver.list()

    ahead, while_open, after = asyncio.run(made_and_closed())
    assert ahead in while_open
    assert ahead not in after, f"the closed runtime left {ahead} behind"


def test_cgroups_made_ahead_too_long_ago_are_not_used(busybox_root: Path) -> None:
    """Empty and old, they look like an orphan to another instance's start, which may have
    removed them meanwhile (engine/records.py): a create then makes its own."""
    async def stale() -> tuple[str, str, list[str]]:
        runtime = await _runtime_with_cgroups()
        driver = runtime.cgroups.driver
        assert driver is not None
        try:
            ahead = await _after_a_container(runtime, busybox_root)
            assert runtime._cgroups_ahead is not None
            runtime._cgroups_ahead.made -= 2 * AHEAD_MAX_AGE_S
            orphan = driver.open(f"c-{ahead}")
            assert orphan is not None
            orphan.destroy(empty=True)  # as another instance's sweep of orphans would
            c = await runtime.create_container(ContainerSpec(layers=(str(busybox_root),)))
            r = await c.exec(ExecRequest(argv=["true"], env={"PATH": "/bin"}))
            assert r.status == Status.OK, r
            await c.destroy()
        finally:
            await runtime.close()
        return ahead, c.id, driver.list()

    ahead, made, after = asyncio.run(stale())
    assert made != ahead
    assert f"c-{ahead}" not in after


def test_cgroups_made_ahead_are_recorded_while_they_wait(busybox_root: Path,
                                                         tmp_path: Path) -> None:
    """In the engine's records, with this process as their owner: another instance's sweep
    leaves them be, and a restart after a crash removes them."""
    async def recorded() -> tuple[str, str, bool]:
        runtime = await _runtime_with_cgroups()
        runtime.claims = ContainerRecords(tmp_path)
        try:
            ahead = await _after_a_container(runtime, busybox_root)
            owner = (tmp_path / "containers" / ahead).read_text()
        finally:
            await runtime.close()
        return ahead, owner, (tmp_path / "containers" / ahead).exists()

    ahead, owner, still = asyncio.run(recorded())
    assert owner == str(os.getpid()), (ahead, owner)
    assert not still, "the record of cgroups made ahead outlived them"
