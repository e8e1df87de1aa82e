"""Faults that kill processes under the engine: the spawner (idle and mid-run) and a
container's init (mid-run). Real spawner, real containers, real registry; each fault is a
SIGKILL from outside, as the OOM killer or an operator would send it.

Waits are bounded by WAIT_S only so that a hung engine fails instead of hanging the suite:
they are not figures."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from sandbox.engine import PoolConfig
from sandbox.errors import ContainerGoneError, NotFound, RuntimeRestarting
from sandbox.runtime.container import Container
from sandbox.runtime.results import Status
from sandbox.runtime.supervisor import SPAWNER, Supervisor
from tests.integration.test_engine import Running, T, sh

WAIT_S = 60


@pytest.fixture
def eng(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path / "state", pools=PoolConfig(min_idle=1, max_idle=2))
    yield r
    r.close()


def _until(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {WAIT_S} s"
        time.sleep(0.01)


def _dead_or_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill_spawner(eng: Running) -> None:
    """SIGKILL the spawner and wait until it has died (the engine's loop is not running
    meanwhile, so it has noticed nothing yet)."""
    pid = eng.engine.runtime.spawner.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _until("the spawner dies of SIGKILL", lambda: _dead_or_zombie(pid))


def _recover(eng: Running) -> None:
    """Run the engine's loop until it is healthy again, then until its refills are done."""
    async def wait() -> None:
        deadline = time.monotonic() + WAIT_S
        while not eng.engine.health()[0]:
            assert time.monotonic() < deadline, f"not healthy after {WAIT_S} s"
            await asyncio.sleep(0.01)
    eng.run(wait())
    eng.settle()


def _left_of(eng: Running, containers: list[Container]) -> list[str]:
    """What each of these (destroyed) containers could have left: its record and cgroup."""
    driver = eng.engine.runtime.cgroups.driver
    left = [f"record {c.id}" for c in containers
            if (eng.engine.records.dir / c.id).exists()]
    if driver is not None:
        left += [f"cgroup c-{c.id}" for c in containers if driver.open(f"c-{c.id}") is not None]
    return left


def _warm(eng: Running, images: Any) -> list[Container]:
    """A judge pool with its warm container(s), idle: what the pools hold."""
    done = eng.run(eng.engine.run(images.oci, sh("true"), policy="judge", tenant=T))
    assert done.result.status == Status.OK, done.result
    eng.settle()
    idle = [c for p in eng.engine.pools._pools.values() for c in p.idle]
    assert idle, eng.engine.pools.stats()
    return idle


def test_a_killed_spawner_is_restarted_and_its_warm_containers_replaced(
        eng: Running, images: Any) -> None:
    session = eng.run(eng.engine.create_session(images.oci, tenant=T, policy="judge"))
    old = [*_warm(eng, images), session.container]
    inits = [psutil.Process(c.pid) for c in old]
    _kill_spawner(eng)
    # Seen at once, before the event loop has read the spawner's pidfd.
    ready, reason = eng.engine.health()
    assert not ready and "killed by SIGKILL" in reason, reason
    # The warm containers died with it (their inits' PDEATHSIG).
    _, alive = psutil.wait_procs(inits, timeout=WAIT_S)
    assert not alive, f"inits outlived their spawner: {alive}"
    # While it is down, a run can have no container: a clear, retryable error. (A new
    # spawner answers only once a new Python has started: ~0.1 s, where the run finds the
    # old spawner dead within its first few steps.)
    with pytest.raises(RuntimeRestarting, match=r"restarting.*retry in") as e:
        eng.run(eng.engine.run(images.oci, sh("true"), policy="judge", tenant=T))
    assert e.value.retry_after_s >= 1

    _recover(eng)
    assert eng.engine.health() == (True, "")
    new = [c for p in eng.engine.pools._pools.values() for c in p.idle]
    assert new and all(c.alive for c in new), eng.engine.pools.stats()
    assert not {c.id for c in new} & {c.id for c in old}
    assert _left_of(eng, old[:-1]) == []
    out = eng.run(eng.engine.run(images.oci, sh("echo again"), policy="judge", tenant=T))
    assert (out.result.status, out.result.stdout, out.pool_hit) == (Status.OK, b"again\n", True)
    # A session's container died too: said so, not a runtime failure; deleting it is clean.
    with pytest.raises(NotFound, match="has ended"):
        eng.run(eng.engine.sessions.exec(session.id, sh("true"), owner=T.id))
    eng.run(eng.engine.sessions.delete(session.id))
    assert _left_of(eng, old) == []


def _running(eng: Running, images: Any, script: str) -> tuple[asyncio.Task[Any], Container]:
    """A judge run of `script` (which prints "up" first), started and seen running; its
    task (on the engine's loop) and the container it runs in."""
    up = asyncio.Event()

    def seen(_name: str, data: bytes) -> None:
        if b"up" in data:
            up.set()

    async def start() -> asyncio.Task[Any]:
        task = asyncio.ensure_future(eng.engine.run(
            images.oci, sh(script), policy="judge", tenant=T, on_output=seen))
        async with asyncio.timeout(WAIT_S):
            await up.wait()
        return task
    task = eng.run(start())
    (container,) = [c for c in eng.engine.runtime.containers.values() if c._active]
    return task, container


def test_a_run_when_its_spawner_dies_gets_runtime_restarting(
        eng: Running, images: Any) -> None:
    _warm(eng, images)
    task, container = _running(eng, images, "echo up; sleep 30")
    _kill_spawner(eng)
    with pytest.raises(RuntimeRestarting, match="the run did not finish") as e:
        eng.run(task)
    assert "killed by SIGKILL" in str(e.value) and e.value.retry_after_s >= 1
    _recover(eng)
    assert not container.alive and _left_of(eng, [container]) == []
    out = eng.run(eng.engine.run(images.oci, sh("echo again"), policy="judge", tenant=T))
    assert (out.result.status, out.result.stdout) == (Status.OK, b"again\n")


def test_a_run_whose_init_is_killed_fails_clearly_and_its_container_is_replaced(
        eng: Running, images: Any) -> None:
    _warm(eng, images)
    task, container = _running(eng, images, "echo up; sleep 30")
    os.kill(container.pid, signal.SIGKILL)
    with pytest.raises(ContainerGoneError, match=f"did not finish: container {container.id}: "
                       ".*init exited.*retry the run"):
        eng.run(task)
    eng.settle()
    # The pool warmed another in its place; the killed one left nothing.
    (stats,) = eng.engine.pools.stats()
    assert stats["idle"] >= 1, stats
    assert _left_of(eng, [container]) == []
    assert eng.engine.health() == (True, "")
    out = eng.run(eng.engine.run(images.oci, sh("echo again"), policy="judge", tenant=T))
    assert (out.result.status, out.result.stdout, out.pool_hit) == (Status.OK, b"again\n", True)


def test_a_container_being_made_when_the_spawner_dies_fails_as_restarting(
        eng: Running, images: Any) -> None:
    runtime = eng.engine.runtime
    driver = runtime.cgroups.driver
    before = set(driver.list()) if driver is not None else set()
    pid = runtime.spawner.pid
    assert pid is not None
    # Stopped, the spawner takes the request into its socket and never answers it.
    os.kill(pid, signal.SIGSTOP)
    try:
        async def asked() -> tuple[asyncio.Task[Any], set[str]]:
            task = asyncio.ensure_future(eng.engine.run(images.oci, sh("true"),
                                                        policy="judge", tenant=T))
            # Its lock is held from the request's send to the answer.
            while not runtime.spawner._lock.locked():
                assert not task.done(), task
                await asyncio.sleep(0.01)
            return task, set(driver.list()) - before if driver is not None else set()
        task, made = eng.run(asked())
        os.kill(pid, signal.SIGKILL)
    finally:
        os.kill(pid, signal.SIGCONT)
    with pytest.raises(RuntimeRestarting, match="died while it made a container"):
        eng.run(task)
    _recover(eng)
    # The cgroup made for it went with the failure. (The base is shared with whatever
    # else runs on the host: of the container cgroups new while it was asked for, one
    # that stays empty would be it; another's is soon removed or holds its init.)
    if driver is not None:
        def empty() -> list[str]:
            return [name for name in made
                    if (cg := driver.open(name)) is not None and not cg.pids(recursive=True)]
        _until("the cgroup of the failed container removed (or another's filled)",
               lambda: not empty())
    out = eng.run(eng.engine.run(images.oci, sh("echo again"), policy="judge", tenant=T))
    assert (out.result.status, out.result.stdout) == (Status.OK, b"again\n")


def test_a_spawner_that_cannot_start_is_tried_again_with_backoff() -> None:
    """A start that fails (here: a program that exits at once in place of the spawner, as
    a broken install would) leaves the runtime down, saying so, and is tried again on the
    backoff's curve until one serves."""
    async def go() -> tuple[str, int, dict[str, Any]]:
        supervisor = await Supervisor.start()
        try:
            pid = supervisor.pid
            assert pid is not None
            supervisor.program = ("-c", "raise SystemExit(3)")
            os.kill(pid, signal.SIGKILL)
            async with asyncio.timeout(WAIT_S):
                while "failed to start" not in (supervisor.check() or ""):
                    await asyncio.sleep(0.01)
            reason = supervisor.check() or ""
            with pytest.raises(RuntimeRestarting) as e:
                await supervisor.ask({"op": "ping"}, [])
            supervisor.program = SPAWNER
            async with asyncio.timeout(WAIT_S):
                while supervisor.check() is not None:
                    await asyncio.sleep(0.01)
            answer, _ = await supervisor.ask({"op": "ping"}, [])
            return reason, e.value.retry_after_s, answer
        finally:
            await supervisor.close()

    reason, retry_after_s, answer = asyncio.run(go())
    assert reason.startswith("the spawner process was killed by SIGKILL, and a new one "
                             "failed to start; trying again in"), reason
    assert retry_after_s >= 1 and answer == {"ok": True}
