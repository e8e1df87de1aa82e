"""Admission: per-tenant queues served in turn, each tenant's runs in order, the caps (429),
a cancelled waiter that leaves no trace, a slot handed to one who gave up passed on."""

from __future__ import annotations

import asyncio

import pytest

from sandbox.tenants import Tenant
from service.admission import Admission
from service.auth import Principal
from service.errors import ApiError


class Held:
    """Runs that take a slot and keep it until released, in the order they got it."""

    def __init__(self, adm: Admission) -> None:
        self.adm = adm
        self.order: list[str] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, who: Principal, label: str) -> asyncio.Task[None]:
        gate = self.gates[label] = asyncio.Event()

        async def run() -> None:
            async with self.adm.slot(who):
                self.order.append(label)
                await gate.wait()
        task = self.tasks[label] = asyncio.ensure_future(run())
        return task

    async def finish(self, label: str) -> None:
        self.gates[label].set()
        await self.tasks[label]
        await asyncio.sleep(0)  # let the run handed the slot note it


def test_tenants_take_turns_and_keep_their_own_order() -> None:
    async def go() -> None:
        adm = Admission(running=1, queued=100)
        held = Held(adm)
        a, b, c = Principal("a", tenant=Tenant("A")), Principal("b", tenant=Tenant("B")), Principal(
            "c", tenant=Tenant("C"))
        held.start(a, "a0")
        await asyncio.sleep(0)
        for i in range(1, 6):
            held.start(a, f"a{i}")
        await asyncio.sleep(0)
        held.start(b, "b0")
        held.start(b, "b1")
        await asyncio.sleep(0)
        held.start(c, "c0")
        await asyncio.sleep(0)
        assert (adm.running, adm.waiting) == (1, 8)
        for label in ("a0", "a1", "b0", "c0", "a2", "b1", "a3", "a4"):
            await held.finish(label)
        await held.finish("a5")
        # Round robin: A was waiting first, then B joined, then C; each in its own order.
        assert held.order == ["a0", "a1", "b0", "c0", "a2", "b1", "a3", "a4", "a5"]
        assert (adm.running, adm.waiting, a.active, b.active, c.active) == (0, 0, 0, 0, 0)
    asyncio.run(go())


def test_the_caps_answer_429_and_closing_503() -> None:
    async def go() -> None:
        adm = Admission(running=1, queued=2)
        held = Held(adm)
        capped = Principal("capped", max_concurrent_runs=1, tenant=Tenant("B"))
        free = Principal("free", tenant=Tenant("A"))
        held.start(free, "a0")
        held.start(capped, "b0")
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as per_token:
            async with adm.slot(capped):
                pass
        assert per_token.value.status == 429 and "this token" in per_token.value.message
        held.start(free, "a1")
        await asyncio.sleep(0)
        assert adm.waiting == 2
        with pytest.raises(ApiError) as service_wide:
            async with adm.slot(Principal("other", tenant=Tenant("C"))):
                pass
        assert service_wide.value.status == 429
        assert service_wide.value.headers["Retry-After"]
        adm.closed = True
        with pytest.raises(ApiError) as closing:
            async with adm.slot(free):
                pass
        assert closing.value.status == 503
        for label in ("a0", "b0", "a1"):
            await held.finish(label)
        assert (adm.running, adm.waiting, free.active, capped.active) == (0, 0, 0, 0)
    asyncio.run(go())


def test_a_waiter_that_gives_up_leaves_its_place_and_passes_a_slot_on() -> None:
    async def go() -> None:
        adm = Admission(running=1, queued=10)
        held = Held(adm)
        a, b = Principal("a", tenant=Tenant("A")), Principal("b", tenant=Tenant("B"))
        held.start(a, "a0")
        await asyncio.sleep(0)
        gone = held.start(b, "b-gone")
        held.start(a, "a1")
        await asyncio.sleep(0)
        gone.cancel()  # still waiting: its place goes, and B with it
        await asyncio.sleep(0)
        assert (adm.waiting, b.active) == (1, 0)
        await held.finish("a0")
        assert held.order == ["a0", "a1"]
        await held.finish("a1")
        # Handed the slot in the same tick as it gives up: the slot goes to the next.
        mine = adm.slot(a)
        await mine.__aenter__()
        late = held.start(b, "b-late")
        held.start(a, "a2")
        await asyncio.sleep(0)
        await mine.__aexit__(None, None, None)  # hands the slot to b-late, not yet woken
        late.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert held.order == ["a0", "a1", "a2"] and late.cancelled()
        await held.finish("a2")
        assert (adm.running, adm.waiting, a.active, b.active) == (0, 0, 0, 0)
    asyncio.run(go())
