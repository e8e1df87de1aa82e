"""CPU slots for trusted timing: the CPUs the operator reserves ([timing] cpus), each
running one run of the timing policies at a time, the other runs waiting: each tenant's in
the order they came (FIFO), the tenants in turn (round robin, as the service's admission
takes them), so one tenant's burst delays another's run by one run per waiting tenant, not
by the whole burst. The wait ends before the run's container is taken, so neither its wall
time nor its wall limit counts it.

A slot's CPU reaches the run as its cpuset (Limits.cpuset), which the run's cgroup enforces:
the run cannot widen it with sched_setaffinity. Every other run (other policies' runs,
sessions' execs) gets the CPUs left over (Engine._placed); when the reservation takes every
CPU they share it, and a slotted run that overlapped one of the other policies' runs is not
reported as having had its CPU to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from sandbox.errors import PolicyError
from sandbox.runtime.profiles import format_cpuset, host_cpus, parse_cpuset
from sandbox.tenants import Turns

# How a slot's CPU is kept: by the run cgroup's cpuset, or (no cpuset controller here) by
# the affinity init's child sets itself, which the run may widen.
CPUSET = "cpuset"
AFFINITY = "affinity"


@dataclass(frozen=True)
class TimingConfig:
    cpus: str | None = None                  # the reserved CPUs, e.g. "1"; None: no slots
    policies: tuple[str, ...] = ("judge",)   # the policies whose runs take a slot
    max_repeat: int = 50                     # the most a run's `repeat` may ask for

    def __post_init__(self) -> None:
        if self.cpus is not None:
            cpus = parse_cpuset(self.cpus, "timing.cpus")
            if not cpus <= host_cpus():
                raise PolicyError(f"timing.cpus: {self.cpus} names CPUs sandboxd may not run "
                                  f"on; reserve a subset of {format_cpuset(host_cpus())}")
        if not self.policies:
            raise PolicyError('timing.policies: name at least one policy, e.g. ["judge"]')
        if self.max_repeat < 1:
            raise PolicyError("timing.max_repeat: expected at least 1")


@dataclass
class Slot:
    """One run's hold on a reserved CPU."""

    cpu: int
    tenant: str
    shared_mark: int | None   # general runs started on reserved CPUs so far; None: one ran


class CpuSlots:
    def __init__(self, reserved: frozenset[int], host: frozenset[int], enforced_by: str,
                 policies: tuple[str, ...]) -> None:
        self.reserved = reserved
        self.enforced_by = enforced_by
        self.policies = frozenset(policies)
        # General runs stay off the reserved CPUs while any other is left.
        self.shared_cpus = format_cpuset(host - reserved or host)
        self._overlap = not host - reserved
        # A stack: the CPU freed last is taken first, so runs one after another stay on one
        # CPU (its caches warm, and the run cgroup's cpuset already written: ~0.1 ms a write).
        self._free: list[int] = sorted(reserved, reverse=True)
        self._turns: Turns[asyncio.Future[int]] = Turns()   # runs waiting, by tenant
        self._held: Counter[str] = Counter()      # by tenant
        self._shared_active = 0
        self._shared_started = 0

    def takes_slot(self, policy: str) -> bool:
        return policy in self.policies

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[Slot]:
        """A reserved CPU of its own for one run, once its turn comes."""
        cpu = await self._take(tenant)
        self._held[tenant] += 1
        try:
            yield Slot(cpu, tenant, None if self._shared_active else self._shared_started)
        finally:
            self._held[tenant] -= 1
            if not self._held[tenant]:
                del self._held[tenant]
            self._give(cpu)

    def dedicated(self, slot: Slot) -> bool:
        """Whether the slot's run had its CPU to itself among sandboxd's runs: the cpuset
        kept it there and no general run was given its CPU meanwhile."""
        alone = not self._overlap or (slot.shared_mark == self._shared_started
                                      and not self._shared_active)
        return self.enforced_by == CPUSET and alone

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """While a general run runs: counted when its CPUs are the reserved ones too."""
        if not self._overlap:
            yield
            return
        self._shared_active += 1
        self._shared_started += 1
        try:
            yield
        finally:
            self._shared_active -= 1

    async def _take(self, tenant: str) -> int:
        if self._free and not self._turns:
            return self._free.pop()
        turn: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._turns.push(tenant, turn)
        try:
            return await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._give(turn.result())  # handed a CPU as the caller gave up: pass it on
            else:
                self._turns.remove(tenant, turn)
            raise

    def _give(self, cpu: int) -> None:
        while (turn := self._turns.pop()) is not None:
            if not turn.done():  # cancelled, its task not yet told: the next one
                turn.set_result(cpu)
                return
        self._free.append(cpu)

    def info(self, tenant: str) -> dict[str, Any]:
        """What a tenant may know: the reservation, and its own runs in slots or waiting
        (never another tenant's)."""
        return {"cpus": format_cpuset(self.reserved), "policies": sorted(self.policies),
                "enforced_by": self.enforced_by, "shared_cpus": self.shared_cpus,
                "yours": {"running": self._held.get(tenant, 0),
                          "waiting": self._turns.waiting(tenant)}}
