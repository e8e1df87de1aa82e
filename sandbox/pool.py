"""Warm containers per (image digest, policy): a run takes one (a hit) or starts one (a
miss); afterwards a read-only-root container goes back at once (its init resets it as the
run ends, before it reads the next request: see Container.exec's reset_after), a writable
one is destroyed (what a run wrote must never reach the next). Refills happen off the
request's path, in background tasks; each key keeps at least `min_idle` idle containers
once used, and grows with demand up to `max_idle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sandbox.errors import CapacityError, PolicyError, SandboxError
from sandbox.images import Image, ImageService
from sandbox.records import ContainerRecords
from sandbox.runtime.container import Container, ContainerSpec, Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolConfig:
    min_idle: int = 1            # idle containers kept per (image, policy) once it ran
    max_idle: int = 4            # never more idle than this per key
    max_live: int = 256          # every container of the engine: pools, runs and sessions

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "pools") -> PoolConfig:
        if not isinstance(data, dict):
            raise PolicyError(f"{where}: expected a table")
        values: dict[str, int] = {}
        for key, value in data.items():
            if key not in ("min_idle", "max_idle", "max_live"):
                raise PolicyError(f"{where}.{key}: unknown setting; known: min_idle, "
                                  "max_idle, max_live")
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PolicyError(f"{where}.{key}: expected a non-negative integer")
            values[key] = value
        config = cls(**values)
        if config.min_idle > config.max_idle:
            raise PolicyError(f"{where}.min_idle ({config.min_idle}) is above max_idle "
                              f"({config.max_idle})")
        return config


@dataclass
class _Pool:
    image: Image
    profile: str
    idle: deque[Container] = field(default_factory=deque)
    busy: int = 0
    hits: int = 0
    misses: int = 0
    created: int = 0             # containers started for this key, misses and refills
    peak: int = 0                # the most runs at once lately: how many to keep warm
    refilling: bool = False
    reusable: bool = False       # the policy's root is read-only: busy ones come back

    @property
    def expected(self) -> int:
        """Idle now or soon: a refill that ignored, for a read-only root, those running
        would start a container per run and destroy one when the used one came back."""
        return len(self.idle) + (self.busy if self.reusable else 0)


class Pools:
    def __init__(self, runtime: Runtime, config: PoolConfig,
                 images: ImageService | None = None,
                 records: ContainerRecords | None = None) -> None:
        self.runtime = runtime
        self.config = config
        self.images = images
        self.records = records
        self._pools: dict[tuple[str, str], _Pool] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._live = 0

    @property
    def live(self) -> int:
        return self._live

    def _pool(self, image: Image, profile: str) -> _Pool:
        key = (image.digest, profile)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(image, profile)
        return pool

    async def _create(self, image: Image, profile: str) -> Container:
        if self._live >= self.config.max_live:
            raise CapacityError(f"{self._live} containers are live, the configured maximum "
                                "(pools.max_live); wait for runs to finish or raise it")
        self._live += 1
        try:
            container = await self.runtime.create_container(ContainerSpec(
                layers=tuple(str(p) for p in image.layers), profile=profile))
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
        try:
            await container.destroy()
        finally:
            self._live -= 1
            if self.images is not None:
                self.images.release(f"container-{container.id}")
            if self.records is not None:
                self.records.remove(container.id)

    async def take(self, image: Image, profile: str) -> tuple[Container, bool]:
        """A container for one run: (container, whether it was warm)."""
        pool = self._pool(image, profile)
        pool.busy += 1
        pool.peak = max(pool.peak, pool.busy)
        while pool.idle:
            # The one used last: its init's pages and the kernel's caches are still warm
            # (round robin over 100 idle containers made a sequential run ~0.6 ms slower).
            container = pool.idle.pop()
            if container.alive:  # false too when the reset after its last run failed
                pool.hits += 1
                self._refill(pool)
                return container, True
            self._spawn(self.destroy(container))
        pool.misses += 1
        try:
            container = await self._create(image, profile)
        except BaseException:
            pool.busy -= 1
            raise
        pool.created += 1
        pool.reusable = container.reusable
        self._refill(pool)
        return container, False

    async def fresh(self, image: Image, profile: str) -> Container:
        """A container the caller keeps (a session); a warm one if there is one."""
        container, _ = await self.take(image, profile)
        self._pool(image, profile).busy -= 1
        return container

    def give_back(self, image: Image, profile: str, container: Container) -> None:
        """After a run (exec'd with reset_after=container.reusable): keep it when its root
        is read-only, else destroy it."""
        pool = self._pool(image, profile)
        pool.busy -= 1
        if container.reusable and container.alive and len(pool.idle) < self.config.max_idle:
            pool.idle.append(container)
        else:
            self._spawn(self.destroy(container))

    def discard(self, container: Container, image: Image, profile: str) -> None:
        """A run failed in a way that leaves the container suspect: never reuse it."""
        self._pool(image, profile).busy -= 1
        self._spawn(self.destroy(container))

    def _target(self, pool: _Pool) -> int:
        return min(self.config.max_idle, max(self.config.min_idle, pool.peak))

    def _refill(self, pool: _Pool) -> None:
        if not pool.refilling and pool.expected < self._target(pool):
            pool.refilling = True
            self._spawn(self._fill(pool))

    async def _fill(self, pool: _Pool) -> None:
        try:
            while pool.expected < self._target(pool) and self._live < self.config.max_live:
                container = await self._create(pool.image, pool.profile)
                pool.created += 1
                pool.reusable = container.reusable
                pool.idle.append(container)
        except SandboxError as e:
            log.warning("could not warm a container for %s (%s): %s", pool.image.digest,
                        pool.profile, e)
        finally:
            pool.refilling = False
            # Demand decays: the next refill aims at what runs need now, not at a past peak.
            pool.peak = pool.busy

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> list[dict[str, Any]]:
        return [{"image": p.image.digest, "names": list(p.image.names), "policy": p.profile,
                 "idle": len(p.idle), "busy": p.busy, "hits": p.hits, "misses": p.misses,
                 "created": p.created}
                for p in self._pools.values()]

    async def close(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for pool in self._pools.values():
            while pool.idle:
                with contextlib.suppress(SandboxError):
                    await self.destroy(pool.idle.popleft())
