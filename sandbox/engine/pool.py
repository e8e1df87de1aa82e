"""Warm containers per (tenant, image digest, policy, network mode): a run borrows one (a
hit) or starts one (a miss) through `async with pools.lend(...) as container`; afterwards it
goes back at once, read-only root or writable (its init resets it as the run ends, before
it reads the next request: see Container.exec's reset_after; a writable root is made anew
when the run changed it), unless its run failed, which destroys it. Refills happen off the
request's path, in background tasks; each key keeps at least `min_idle` idle containers
once used, and grows with demand up to `max_idle`. A warm container serves one tenant only:
nothing a run leaves can reach another tenant even if a reset missed it. A proxy or full
container's network (sandbox/runtime/network) is made with it, so the mode is part of the
key; a loan starts the run's use of it (its allowlist, its figures) and ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Annotated, Any

from msgspec import Meta

from sandbox.configfile import Table
from sandbox.engine.records import ContainerRecords
from sandbox.errors import CapacityError, ContainerGoneError, SandboxError
from sandbox.images import Image, ImageService
from sandbox.runtime.container import Container
from sandbox.runtime.network import NO_NETWORK, NONE, NetworkRequest, Traffic
from sandbox.runtime.policy import Policy
from sandbox.runtime.requests import ContainerSpec
from sandbox.runtime.spawnerclient import Runtime
from sandbox.tenants import Tenant

log = logging.getLogger(__name__)


class PoolConfig(Table):
    """The [pools] table of the service's config (sandbox.configfile reads it)."""

    min_idle: Annotated[int, Meta(ge=0)] = 1   # idle containers kept per key once it ran
    max_idle: Annotated[int, Meta(ge=0)] = 4   # never more idle than this per key
    max_live: Annotated[int, Meta(ge=0)] = 256  # every container: pools, runs and sessions

    def __post_init__(self) -> None:
        # msgspec reports this ValueError with the table's path, as it does a key's
        if self.min_idle > self.max_idle:
            raise ValueError(f"min_idle ({self.min_idle}) is above max_idle "
                             f"({self.max_idle}): lower min_idle or raise max_idle")


@dataclass
class _Pool:
    tenant: str
    image: Image
    policy: Policy
    network: str = NONE
    idle: deque[Container] = field(default_factory=deque)
    busy: int = 0
    hits: int = 0
    misses: int = 0
    created: int = 0             # containers started for this key, misses and refills
    peak: int = 0                # the most runs at once lately: how many to keep warm
    refilling: bool = False
    draining: bool = False       # its image is being removed: no refills

    @property
    def expected(self) -> int:
        """Idle now or soon: a refill that ignored those running would start a container
        per run and destroy one when the used one came back."""
        return len(self.idle) + self.busy


class Pools:
    def __init__(self, runtime: Runtime, config: PoolConfig,
                 images: ImageService | None = None,
                 records: ContainerRecords | None = None) -> None:
        self.runtime = runtime
        self.config = config
        self.images = images
        self.records = records
        self._pools: dict[tuple[str, str, str, str], _Pool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle_since: dict[str, float] = {}   # container id -> when it was parked
        self._live = 0
        runtime.on_restart(self._replace_lost)

    @property
    def live(self) -> int:
        return self._live

    def _pool(self, tenant: Tenant, image: Image, policy: Policy,
              network: str = NONE) -> _Pool:
        key = (tenant.id, image.digest, policy.name, network)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(tenant.id, image, policy, network)
        return pool

    async def _create(self, image: Image, policy: Policy, *, evict: bool = False,
                      network: str = NONE) -> Container:
        if self._live >= self.config.max_live and evict:
            # A run that finds no warm container of its own takes the place of an idle one of
            # another key (another tenant's, say), the longest idle first: idle containers
            # never keep a run from starting.
            victim = self._idlest()
            if victim is not None:
                await self.destroy(victim)
        if self._live >= self.config.max_live:
            raise CapacityError(f"{self._live} containers are live, the configured maximum "
                                "(pools.max_live); wait for runs to finish or raise it")
        self._live += 1
        try:
            container = await self.runtime.create_container(ContainerSpec(
                layers=tuple(str(p) for p in image.layers), policy=policy, network=network))
        except BaseException:
            self._live -= 1
            raise
        if self.images is not None:
            self.images.lease(image.digest, f"container-{container.id}")
        if self.records is not None:
            self.records.add(container.id)
        return container

    async def destroy(self, container: Container) -> None:
        """Destroy a container this pool made (a session's too) and forget it."""
        self._idle_since.pop(container.id, None)
        try:
            await container.destroy()
        finally:
            self._live -= 1
            if self.images is not None:
                self.images.release(f"container-{container.id}")
            if self.records is not None:
                self.records.remove(container.id)

    def lend(self, image: Image, policy: Policy, tenant: Tenant,
             network: NetworkRequest | None = None) -> Loan:
        """A container for one run of `tenant`, for `async with`: see Loan."""
        net = network or NO_NETWORK
        return Loan(self, self._pool(tenant, image, policy, net.mode), net)

    async def fresh(self, image: Image, policy: Policy, tenant: Tenant,
                    network: NetworkRequest = NO_NETWORK) -> Container:
        """A container `tenant` keeps (a session); a warm one of its own if there is one.
        It is this pool's to destroy (`destroy`), never to take back. Its network, if any,
        is the session's from now on."""
        pool = self._pool(tenant, image, policy, network.mode)
        container, _ = await self._take(pool)
        pool.busy -= 1
        if container.network is not None:
            container.network.begin(network.allow)
        return container

    async def single(self, image: Image, policy: Policy) -> Container:
        """A container for one use that no pool keeps warm (a build step's); `destroy` it.
        Counted against max_live like every other."""
        return await self._create(image, policy, evict=True)

    async def _take(self, pool: _Pool) -> tuple[Container, bool]:
        """A container of `pool`, counted busy: (container, whether it was warm)."""
        pool.busy += 1
        pool.peak = max(pool.peak, pool.busy)
        while pool.idle:
            # The one used last: its init's pages and the kernel's caches are still warm
            # (round robin over 100 idle containers made a sequential run ~0.6 ms slower).
            container = pool.idle.pop()
            self._idle_since.pop(container.id, None)
            if container.alive:  # false too when the reset after its last run failed
                pool.hits += 1
                self._refill(pool)
                return container, True
            self._spawn(self.destroy(container))
        pool.misses += 1
        try:
            container = await self._create(pool.image, pool.policy, evict=True,
                                           network=pool.network)
        except BaseException:
            pool.busy -= 1
            raise
        pool.created += 1
        self._refill(pool)
        return container, False

    def _give_back(self, pool: _Pool, container: Container) -> None:
        """After a run (exec'd with reset_after): keep it, unless its reset failed or enough
        are idle."""
        pool.busy -= 1
        if container.alive and len(pool.idle) < self.config.max_idle:
            self._park(pool, container)
        else:
            self._spawn(self.destroy(container))

    def _discard(self, pool: _Pool, container: Container) -> None:
        """A run failed in a way that leaves the container suspect (or dead: its init
        killed): never reuse it, and warm another in its place."""
        pool.busy -= 1
        self._spawn(self.destroy(container))
        self._refill(pool)

    def _replace_lost(self) -> None:
        """A new spawner serves in place of one that died: the idle containers it had made
        died with it (their inits' PDEATHSIG). Destroy them (their cgroups, records and
        image leases go) and warm new ones; those lent out are discarded as their runs
        fail."""
        for pool in self._pools.values():
            lost = [c for c in pool.idle if not c.alive or self.runtime.lost(c)]
            for container in lost:
                pool.idle.remove(container)
                self._idle_since.pop(container.id, None)
                self._spawn(self.destroy(container))
            self._refill(pool)

    async def drop_idle(self, image: Image, tenant: Tenant) -> None:
        """Destroy the idle containers of `tenant` for `image` (every policy), and those
        being replaced or refilled meanwhile, so that none of them holds it any more."""
        pools = [p for p in self._pools.values()
                 if p.tenant == tenant.id and p.image.digest == image.digest]
        for pool in pools:
            pool.draining = True
        try:
            while self._tasks:  # refills under way, used containers being destroyed
                await asyncio.gather(*self._tasks, return_exceptions=True)
            for pool in pools:
                while pool.idle:
                    await self.destroy(pool.idle.pop())
        finally:
            for pool in pools:
                pool.draining = False

    def _idlest(self) -> Container | None:
        """Take the idle container that has waited longest, of any key."""
        pools = [p for p in self._pools.values() if p.idle]
        if not pools:
            return None
        oldest = min(pools, key=lambda p: self._idle_since.get(p.idle[0].id, 0.0))
        container = oldest.idle.popleft()
        self._idle_since.pop(container.id, None)
        return container

    def _park(self, pool: _Pool, container: Container) -> None:
        pool.idle.append(container)
        self._idle_since[container.id] = time.monotonic()

    def _target(self, pool: _Pool) -> int:
        return min(self.config.max_idle, max(self.config.min_idle, pool.peak))

    def _refill(self, pool: _Pool) -> None:
        if not (pool.refilling or pool.draining) and pool.expected < self._target(pool):
            pool.refilling = True
            self._spawn(self._fill(pool))

    async def _fill(self, pool: _Pool) -> None:
        try:
            while pool.expected < self._target(pool) and self._live < self.config.max_live:
                container = await self._create(pool.image, pool.policy,
                                               network=pool.network)
                pool.created += 1
                self._park(pool, container)
        except SandboxError as e:
            log.warning("could not warm a container for %s (%s): %s", pool.image.digest,
                        pool.policy.name, e)
        finally:
            pool.refilling = False
            # Demand decays: the next refill aims at what runs need now, not at a past peak.
            pool.peak = pool.busy

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self, tenant: Tenant | None = None) -> list[dict[str, Any]]:
        """Per pool: of `tenant` only, or every tenant's (for the operator's metrics)."""
        return [{"image": p.image.digest, "names": list(p.image.names), "policy": p.policy.name,
                 "idle": len(p.idle), "busy": p.busy, "hits": p.hits, "misses": p.misses,
                 "created": p.created}
                for p in self._pools.values() if tenant is None or p.tenant == tenant.id]

    async def close(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for pool in self._pools.values():
            while pool.idle:
                with contextlib.suppress(SandboxError):
                    await self.destroy(pool.idle.popleft())


class Loan:
    """One run's use of a container of the pools: `async with pools.lend(...) as container`.
    Leaving the block gives the container back (parked again when its root is read-only and
    it is alive, else destroyed); leaving it with an exception destroys it, as a container a
    run failed in may be suspect. `warm` tells, once entered, whether it was an idle one;
    `traffic`, once left, a proxy or full run's network figures (its connections closed)."""

    def __init__(self, pools: Pools, pool: _Pool, network: NetworkRequest) -> None:
        self._pools, self._pool, self._network = pools, pool, network
        self._container: Container | None = None
        self.warm = False
        self.traffic: Traffic | None = None

    async def __aenter__(self) -> Container:
        if self._container is not None:
            raise SandboxError("a Loan lends one container once; call lend() again")
        self._container, self.warm = await self._pools._take(self._pool)
        if self._container.network is not None:
            self._container.network.begin(self._network.allow)
        return self._container

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        container = self._container
        assert container is not None
        if container.network is not None:
            self.traffic = container.network.end()
        if exc_type is None:
            self._pools._give_back(self._pool, container)
            return
        self._pools._discard(self._pool, container)
        if not isinstance(exc, ContainerGoneError):
            return
        # Neither the run's fault nor a lasting one: the same request succeeds once its
        # container is replaced (and, for a spawner that died, a new one serves).
        runtime = self._pools.runtime
        if runtime.lost(container):
            raise runtime.spawner.error("the run did not finish: its container died with "
                                        "the runtime's spawner") from exc
        raise ContainerGoneError(f"the run did not finish: {exc} (killed from outside the "
                                 "sandbox, or out of memory); another container takes its "
                                 "place: retry the run") from exc
