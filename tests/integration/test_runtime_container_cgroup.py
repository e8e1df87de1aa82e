"""A container's own cgroup is limited too (memory with swap off, pids), against this host's
real cgroups: what stays charged to it outside its runs' cgroups cannot grow without bound.

A run's memory cgroup is renewed or removed when the run ends, but what the run left in the
container's filesystems stays charged, now to the container: the pages of its tmpfs files
and, which no tmpfs size counts, the inodes of its files, even empty ones. A session keeps
them from run to run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from sandbox.errors import ContainerGoneError
from sandbox.runtime.cgroups import V1Driver, V2Driver
from sandbox.runtime.container import Container
from sandbox.runtime.profiles import Limits, RootfsShape
from sandbox.runtime.results import Status
from sandbox.runtime.rootfs import TmpfsMount
from tests.conftest import Session

MiB = 1 << 20
RUN_MAX = 16 * MiB
PROFILE = "tiny-container"
# /dev/shm as the built-in profiles have it: a size, no inode limit.
TMPFS = (TmpfsMount("/tmp", 1 * MiB, 64), TmpfsMount("/dev/shm", 1 * MiB, noexec=True))
# One maximal run, every tmpfs of the container full, and room for init and the kernel's
# objects: a container charged for more holds what none of its runs is limited by.
BOUND = RUN_MAX + 4 * MiB + 64 * MiB
# Empty files a run leaves: ~7 MiB of inodes and dentries, within the run's own limit.
FILES_PER_RUN = 8000
RUNS = 2 * BOUND // (7 * MiB)


def _memory_dir(session: Session, c: Container) -> str:
    driver = session.runtime.cgroups.driver
    assert c.cgroup is not None
    if isinstance(driver, V1Driver) and "memory" in driver.controllers:
        return f"{driver.bases['memory']}/{c.cgroup.path}"
    if isinstance(driver, V2Driver) and "memory" in driver.controllers:
        return f"{driver.base}/{c.cgroup.path}"
    pytest.skip("no memory cgroup controller for sandboxd here")


def _read(path: str) -> int:
    text = Path(path).read_text().strip()
    return 2**63 - 1 if text == "max" else int(text)


@pytest.fixture
def tiny(session: Session, busybox_root: Path) -> Iterator[Container]:
    """A container of a judge-like profile whose runs may use 16 MiB at most."""
    judge = session.runtime.policies.profile("judge")
    session.runtime.policies.register(replace(
        judge, name=PROFILE, rootfs=RootfsShape(tmpfs=TMPFS),
        defaults=Limits(memory_bytes=RUN_MAX, pids=16, wall_ms=20_000),
        maxima=Limits(memory_bytes=RUN_MAX, pids=16, wall_ms=20_000)))
    c = session.container(busybox_root, profile=PROFILE)
    yield c
    session.run(c.destroy())


def test_the_container_cgroup_has_memory_without_swap_and_pids_limits(
        session: Session, tiny: Container) -> None:
    mem = _memory_dir(session, tiny)
    driver = session.runtime.cgroups.driver
    assert tiny.cgroup is not None
    if isinstance(driver, V1Driver):
        limit = _read(f"{mem}/memory.limit_in_bytes")
        if driver.memsw:
            assert _read(f"{mem}/memory.memsw.limit_in_bytes") == limit  # no swap on top
        assert _read(f"{mem}/memory.swappiness") == 0
        pids = _read(f"{driver.bases['pids']}/{tiny.cgroup.path}/pids.max") \
            if "pids" in driver.controllers else None
    else:
        assert driver is not None
        limit = _read(f"{mem}/memory.max")
        swap = Path(f"{mem}/memory.swap.max")
        if swap.exists():
            assert _read(str(swap)) == 0
        pids = _read(f"{mem}/pids.max") if "pids" in driver.controllers else None
    assert RUN_MAX < limit <= BOUND
    # Room for one run at its maximum and init: a fork bomb's run stays within its own.
    assert pids is None or 16 < pids <= 32


def test_runs_cannot_push_their_container_past_its_limit(session: Session,
                                                         tiny: Container) -> None:
    mem = _memory_dir(session, tiny)
    peak = "memory.max_usage_in_bytes" if Path(f"{mem}/memory.max_usage_in_bytes").exists() \
        else "memory.peak"
    outcomes: list[str] = []
    for i in range(RUNS):
        try:
            r = session.exec(tiny, ["sh", "-c", f"mkdir /dev/shm/{i} && cd /dev/shm/{i} && "
                                                f"touch $(seq {FILES_PER_RUN})"])
        except ContainerGoneError:
            # The kernel's OOM killer may pick init, the largest process: the container
            # ends with everything charged to it.
            outcomes.append("container gone")
            break
        outcomes.append(r.status)
        if r.status != Status.OK:
            break
    charged = _read(f"{mem}/{peak}") if tiny.alive else None
    assert outcomes[-1] in (Status.MEMORY_LIMIT, "container gone"), (
        f"{len(outcomes)} runs each left {FILES_PER_RUN} files behind, every one within its "
        f"own limit: the container is charged {(charged or 0) / MiB:.0f} MiB, more than "
        f"{BOUND / MiB:.0f} MiB (one maximal run, its tmpfs mounts and init)")
    assert len(outcomes) > 1 and set(outcomes[:-1]) == {Status.OK}
    assert charged is None or charged <= BOUND
