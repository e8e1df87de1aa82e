"""A container's destroy, once begun, removes its cgroups even when its caller is cancelled.

The runtime forgets a container as its destroy begins, so a destroy cut short (the engine
closing cancels its session reaper while it deletes a session) left the container's cgroup
behind, with its init's child and no process: found once after a CI run, swept only at
the next start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from pathlib import Path

import pytest

from sandbox.errors import SandboxError
from sandbox.runtime.requests import ContainerSpec
from sandbox.runtime.spawnerclient import Runtime


def test_a_cancelled_destroy_still_removes_the_cgroups(busybox_root: Path) -> None:
    async def cut_short() -> tuple[list[str] | None, str]:
        runtime = await Runtime.start()
        driver = runtime.cgroups.driver
        try:
            c = await runtime.create_container(
                ContainerSpec(layers=(str(busybox_root),), policy="default"))
            destroying = asyncio.ensure_future(c.destroy())
            await asyncio.sleep(0)  # under way: init killed, its exit awaited
            destroying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await destroying
        finally:
            await runtime.close()
        return (driver.list() if driver is not None else None), f"c-{c.id}"

    names, name = asyncio.run(cut_short())
    if names is None:
        pytest.skip("no cgroups for sandboxd here: nothing to leave behind")
    assert name not in names, f"the cancelled destroy left cgroup {name} behind"


def test_a_create_that_runs_out_of_descriptors_leaves_no_cgroup(busybox_root: Path) -> None:
    """Found after a CI run: a container cgroup with only its `init` child, left by a
    create that failed with EMFILE opening init's cgroup.procs, whose clean-up then found
    no descriptor free either. Every point of the create path is tried: the soft limit on
    open files goes up one at a time from the lowest free descriptor, until a create
    works."""
    async def sweep() -> tuple[list[str], list[str]]:
        runtime = await Runtime.start()
        driver = runtime.cgroups.driver
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        failed: list[str] = []
        left: list[str] = []
        try:
            before = set(driver.list()) if driver is not None else set()
            # From the lowest free descriptor: the create's first open fails there.
            used = {int(fd) for fd in os.listdir("/proc/self/fd")}
            limit = min(set(range(len(used) + 1)) - used)
            while True:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
                try:
                    c = await runtime.create_container(
                        ContainerSpec(layers=(str(busybox_root),), policy="default"))
                except (SandboxError, OSError) as e:
                    failed.append(str(e))
                else:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                    await c.destroy()
                    break
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                if driver is not None:
                    left += sorted(set(driver.list()) - before)
                limit += 1
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await runtime.close()
        return failed, left

    failed, left = asyncio.run(sweep())
    assert failed, "no create failed: the sweep tried nothing"
    assert left == [], f"cgroups left by failed creates: {left} (errors: {failed})"
