"""CPU slots (FIFO, one run per CPU, cancellation), the repeats' summary and near_limit."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from sandbox.engine.cpuslots import AFFINITY, CPUSET, CpuSlots, TimingConfig
from sandbox.engine.repeats import summarize
from sandbox.errors import PolicyError
from sandbox.runtime.results import RunResult, Status, near_limit


def slots(reserved: set[int], host: set[int], by: str = CPUSET) -> CpuSlots:
    return CpuSlots(frozenset(reserved), frozenset(host), by, ("judge",))


def test_runs_get_a_cpu_each_and_the_rest_wait_in_order() -> None:
    s = slots({0, 1}, {0, 1, 2})
    started: list[tuple[str, int]] = []
    release: dict[str, asyncio.Event] = {}

    async def run(name: str, tenant: str) -> None:
        release[name] = asyncio.Event()
        async with s.slot(tenant) as slot:
            started.append((name, slot.cpu))
            await release[name].wait()

    async def go() -> None:
        tasks = []
        for i, tenant in enumerate("abab"):
            tasks.append(asyncio.ensure_future(run(f"r{i}", tenant)))
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert [c for _, c in started] == [0, 1]
        assert s.info("a")["yours"] == {"running": 1, "waiting": 1}
        assert s.info("c")["yours"] == {"running": 0, "waiting": 0}
        release["r1"].set()
        await asyncio.sleep(0.01)
        assert started[2] == ("r2", 1)   # the first waiting, on the CPU just freed
        for e in release.values():
            e.set()
        await asyncio.gather(*tasks)

    asyncio.run(go())
    assert [n for n, _ in started] == ["r0", "r1", "r2", "r3"]


def test_a_waiter_that_gives_up_leaves_no_hole() -> None:
    s = slots({0}, {0, 1})

    async def go() -> list[int]:
        got: list[int] = []
        async with s.slot("a"):
            gone = asyncio.ensure_future(s.slot("a").__aenter__())
            nxt = asyncio.ensure_future(s.slot("b").__aenter__())
            await asyncio.sleep(0)
            gone.cancel()
            await asyncio.sleep(0)
        got.append((await nxt).cpu)
        return got

    assert asyncio.run(go()) == [0]


def test_tenants_take_turns_each_in_its_own_order() -> None:
    s = slots({0}, {0, 1})
    order: list[str] = []

    async def run(name: str, tenant: str) -> None:
        async with s.slot(tenant):
            order.append(name)
            await asyncio.sleep(0)

    async def go() -> None:
        async with s.slot("a"):
            tasks = [asyncio.ensure_future(run(n, n[0])) for n in ("a1", "a2", "a3", "b1")]
            await asyncio.sleep(0)
            assert s.info("a")["yours"] == {"running": 1, "waiting": 3}
        await asyncio.gather(*tasks)

    asyncio.run(go())
    assert order == ["a1", "b1", "a2", "a3"]


def test_a_waiter_cancelled_as_the_cpu_is_freed_passes_it_on() -> None:
    s = slots({0}, {0, 1})

    async def go() -> int:
        holder = s.slot("a")
        await holder.__aenter__()
        gone = asyncio.ensure_future(s.slot("a").__aenter__())
        nxt = asyncio.ensure_future(s.slot("b").__aenter__())
        await asyncio.sleep(0)
        gone.cancel()                               # its task is told only later
        await holder.__aexit__(None, None, None)    # frees the CPU meanwhile
        with contextlib.suppress(asyncio.CancelledError):
            await gone
        return (await nxt).cpu

    assert asyncio.run(go()) == 0


def test_dedicated_only_with_a_cpuset_and_no_general_run_beside() -> None:
    apart = slots({1}, {0, 1})
    assert apart.shared_cpus == "0"

    async def alone(s: CpuSlots, general: bool) -> bool:
        async with s.slot("a") as slot:
            if general:
                with s.shared():
                    assert s.shared_cpus == "0-1"
            return s.dedicated(slot)

    assert asyncio.run(alone(apart, False))
    every = slots({0, 1}, {0, 1})
    assert asyncio.run(alone(every, False)) and not asyncio.run(alone(every, True))
    assert not asyncio.run(alone(slots({1}, {0, 1}, AFFINITY), False))


def test_a_timing_config_names_cpus_of_this_host() -> None:
    with pytest.raises(PolicyError, match=r"timing\.cpus"):
        TimingConfig(cpus="65000")
    with pytest.raises(PolicyError, match=r"timing\.max_repeat"):
        TimingConfig(max_repeat=0)


def result(status: Status, cpu_ms: float | None, wall_ms: float) -> RunResult:
    return RunResult(id="x", status=status, exit_code=0, signal=None, stdout=b"",
                     stderr=b"", stdout_truncated=False, stderr_truncated=False,
                     cpu_ms=cpu_ms, user_ms=None, sys_ms=None, wall_ms=wall_ms,
                     memory_peak_bytes=None, setup_ms=0.0, measured_by={})


def test_repeats_pick_the_median_run() -> None:
    runs = [result(Status.OK, c, w) for c, w in ((30, 31), (10, 12), (20, 40), (40, 41))]
    rep = summarize(runs)
    assert rep.main == 2 and rep.n == 4 and rep.statuses == {"ok": 4}
    assert rep.cpu_ms is not None and (rep.cpu_ms.min, rep.cpu_ms.max) == (10, 40)
    assert rep.cpu_ms.median == 25 and rep.cpu_ms.spread == pytest.approx(30 / 25)
    assert summarize([result(Status.OK, None, 5)]).cpu_ms is None


@pytest.mark.parametrize(("cpu", "wall", "near"), [
    (89, 10, False), (90, 10, True), (130, 10, True), (None, 10, False), (1, 900, True)])
def test_near_limit_is_the_last_tenth(cpu: float | None, wall: float, near: bool) -> None:
    assert near_limit(cpu, 100, wall, 1000) is near
