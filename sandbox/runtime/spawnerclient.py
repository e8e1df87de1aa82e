"""The spawner client (Runtime): asks the spawner process (kept running by supervisor.py)
for containers, and closes it; one per service, holding what every container shares (the
id map, cgroups, the registry of policies)."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sandbox.errors import ContainerGoneError, RuntimeSetupError
from sandbox.runtime import idmap
from sandbox.runtime.cgroups import Cgroup, Detection, detect
from sandbox.runtime.cgroups.base import ORPHAN_AGE_S, CgroupDriver
from sandbox.runtime.container import Container, container_limits
from sandbox.runtime.housekeeping import Housekeeper, Pending
from sandbox.runtime.network import FULL, NONE, PROXY, PROXY_PORT, names, proxy, routes, slirp
from sandbox.runtime.network.rules import host_addresses
from sandbox.runtime.policy import PolicyRegistry
from sandbox.runtime.profiles import HOST_NETWORK
from sandbox.runtime.requests import ContainerSpec
from sandbox.runtime.rootfs import RootfsSpec
from sandbox.runtime.rootfs import message as rootfs_message
from sandbox.runtime.supervisor import Supervisor
from sandbox.runtime.syscalls import cap_last_cap

# The highest capability this kernel knows: init drops every one above a profile's.
_LAST_CAP = cap_last_cap()
# Cgroups made ahead are used this young at most: empty, they look like an orphan to
# another instance's start once ORPHAN_AGE_S old (engine/records.py).
AHEAD_MAX_AGE_S = ORPHAN_AGE_S / 2


class Claims(Protocol):
    """Who keeps a record of the container ids whose cgroups exist (engine/records.py)."""

    def add(self, cid: str) -> None: ...

    def remove(self, cid: str) -> None: ...


@dataclass
class _CgroupsAhead:
    """A container's cgroup and its init's leaf, made before the container is asked for:
    empty, without limits (the create writes its profile's), holding nothing of a tenant.
    The helper joins the container's cgroup (rooting the cgroup namespace there) and init
    starts in the leaf; on v2 the container's cgroup hands controllers down only later, to
    runs, once no process is left in it."""

    cid: str                       # the container's id: its cgroup is c-<cid>
    cgroup: Cgroup
    fds: list[int]                 # cgroup.procs of the container's, then of init's leaf
    n_container: int
    made: float = field(default_factory=time.monotonic)

    @classmethod
    def make(cls, driver: CgroupDriver, cid: str) -> _CgroupsAhead:
        cgroup = driver.create(f"c-{cid}")
        fds: list[int] = []
        try:
            fds = cgroup.open_procs_fds()
            n_container = len(fds)
            fds += cgroup.child("init", limitable=False).open_procs_fds()
        except BaseException:
            # Its descriptors first: one that ran out of them (EMFILE) must still be able
            # to remove what it made; no process can be in it, so no kill is needed.
            for fd in fds:
                os.close(fd)
            cgroup.destroy(empty=True)
            raise
        return cls(cid, cgroup, fds, n_container)

    def destroy(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.cgroup.destroy(empty=True)


class Runtime:
    """One per service: the spawner process, the id map, cgroups, the policies."""

    def __init__(self, spawner: Supervisor, mapping: idmap.IdMapping,
                 cgroups: Detection) -> None:
        self.spawner = spawner
        self.mapping, self.cgroups = mapping, cgroups
        # Which spawner made each container (Supervisor.generation): one made by a spawner
        # that has died since died with it.
        self._made_by: weakref.WeakKeyDictionary[Container, int] = \
            weakref.WeakKeyDictionary()
        self.policies = PolicyRegistry(own_process_only=mapping.shares_init_id)
        self.containers: dict[str, Container] = {}
        self._undoing: set[asyncio.Task[None]] = set()  # creations cancelled by callers
        # The stdin of every run without one: init receives its own copy with each run.
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.housekeeper = Housekeeper()
        # The file cache's blob directory (its owner sets it): bound read-only into every
        # container made from then on, out of runs' sight, for Container.bind.
        self.files: str | None = None
        # The forward proxy of `proxy` containers; its blocked ranges are `full`'s too
        # (the engine sets them from its configuration).
        self.proxy = proxy.Proxy()
        # The next container's cgroups, made in the housekeeping thread after a create:
        # ~1 ms of mkdir and open in every hierarchy off the next create's path.
        self._cgroups_ahead: _CgroupsAhead | None = None
        # Told of each container id before its cgroups are made ahead, and when they go
        # without a container (the engine's records: so that another instance's sweep of
        # orphaned cgroups leaves them be, and a restart after a crash removes them).
        self.claims: Claims | None = None
        self._ahead_work = Pending()
        self._closing = False

    @classmethod
    async def start(cls, *, mapping: idmap.IdMapping | None = None,
                    cgroups: Detection | None = None) -> Runtime:
        mapping = mapping or idmap.plan()
        cgroups = cgroups if cgroups is not None else detect()
        return cls(await Supervisor.start(), mapping, cgroups)

    @property
    def warnings(self) -> list[str]:
        return list(self.cgroups.warnings)

    def down(self) -> str | None:
        """Why no container can be made now (the spawner is being restarted), or None."""
        return self.spawner.check()

    def on_restart(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time a new spawner has replaced one that died: the
        containers made before are gone (`lost`)."""
        self.spawner.on_restart(callback)

    def lost(self, container: Container) -> bool:
        """Whether `container` died with its spawner (made by one that has died since)."""
        self.spawner.check()
        return self._made_by.get(container, self.spawner.generation) \
            < self.spawner.generation

    async def create_container(self, spec: ContainerSpec) -> Container:
        """A new container, ready for execs. Cancelling the caller does not cut the
        exchange with the spawner short (its reply would be read by the next request):
        the creation completes in the background and the container is destroyed."""
        task = asyncio.ensure_future(self._create(spec))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            undo = asyncio.ensure_future(self._undo_create(task))
            self._undoing.add(undo)
            undo.add_done_callback(self._undoing.discard)
            raise

    @staticmethod
    async def _undo_create(task: asyncio.Task[Container]) -> None:
        try:
            container = await task
        except Exception:
            return  # it failed on its own; nobody is left to tell
        await container.destroy()

    async def _create(self, spec: ContainerSpec) -> Container:
        started = time.monotonic()
        policy = (self.policies.get(spec.policy) if isinstance(spec.policy, str)
                  else spec.policy)
        profile = policy.profile
        for layer in spec.layers:
            if not Path(layer).is_dir():
                raise RuntimeSetupError(f"layer {layer!r} is not a directory")
        shape = profile.rootfs
        rootfs = RootfsSpec(
            layers=tuple(str(Path(p).resolve()) for p in spec.layers),
            writable=shape.writable if spec.writable is None else spec.writable,
            upper_size=shape.upper_size, tmpfs=shape.tmpfs, sys=shape.sys, files=self.files,
            provided=names.etc_files(spec.hostname, spec.network))
        if spec.network != NONE and profile.network == HOST_NETWORK:
            raise RuntimeSetupError(f"network {spec.network!r} needs a network namespace of "
                                    f"the container's own; policy {policy.name!r} keeps the "
                                    "host's")
        net: dict[str, Any] = {"network": spec.network}
        if spec.network == PROXY:
            net["proxy_port"] = PROXY_PORT
        elif spec.network == FULL:
            slirp.program()  # its absence said before anything is made
            net["unreachable"] = routes.unreachable(
                self.proxy.blocked.unreachable(host_addresses()))
        planned = rootfs_message(rootfs)
        mapping = self.mapping
        cid = secrets.token_hex(6)
        cgroup: Cgroup | None = None
        fds: list[int] = []
        n_container = 0
        asked = claimed = False
        try:
            if self.cgroups.driver is not None:
                ahead, self._cgroups_ahead = self._cgroups_ahead, None
                if ahead is not None and time.monotonic() - ahead.made > AHEAD_MAX_AGE_S:
                    # Another instance may have taken them for an orphan meanwhile.
                    self.housekeeper.submit(self._ahead_work,
                                            lambda old=ahead: self._discard(old))
                    ahead = None
                if ahead is None:
                    ahead = _CgroupsAhead.make(self.cgroups.driver, cid)
                else:
                    claimed = True
                cid, cgroup, fds, n_container = (ahead.cid, ahead.cgroup, ahead.fds,
                                                 ahead.n_container)
                cgroup.apply(container_limits(profile, rootfs, self.cgroups.driver.controllers))
            generation = self.spawner.generation
            asked = True
            reply, got = await self.spawner.ask(
                {"op": "create", "id": cid, "mounts": planned["mounts"],
                 "mapping": mapping.describe(),
                 "host_network": profile.network == HOST_NETWORK,
                 "hostname": spec.hostname or "sandbox", "container_cgroup_fds": n_container,
                 **net,
                 # The configuration init starts with (native/init.h), as the helper hands
                 # it over.
                 "init": {**planned["init"], "seccomp_bpf": policy.program.bpf,
                          "last_cap": _LAST_CAP, "caps": profile.capability_mask,
                          "set_groups": mapping.method != "single",
                          "init_id": (None if mapping.shares_init_id
                                      else [mapping.init_uid, mapping.init_gid])}},
                fds)
        except BaseException:
            # Its descriptors first: a create that ran out of them (EMFILE) must still be
            # able to remove what it made. Before the spawner was asked, no process can be
            # in the cgroup: removing it then needs no kill, and no descriptor at all.
            for fd in fds:
                os.close(fd)
            fds = []
            if cgroup is not None:
                cgroup.destroy(empty=not asked)
            if claimed and self.claims is not None:
                self.claims.remove(cid)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        wanted = 1 if spec.network == NONE else 2
        if not reply.get("ok") or len(got) != wanted:
            for fd in got:
                os.close(fd)
            if cgroup is not None:
                cgroup.destroy()
            raise RuntimeSetupError(f"container setup failed: {reply.get('error')}")
        container = Container(self, cid, int(reply["pid"]), socket.socket(fileno=got[0]),
                              policy, rootfs, cgroup)
        if spec.network == PROXY:
            container.network = proxy.Gate(self.proxy, socket.socket(fileno=got[1]))
        elif spec.network == FULL:
            container.network = slirp.Link(got[1], container.pid)
        self._made_by[container] = generation
        try:
            await container._wait_ready()
        except ContainerGoneError as e:
            await container.destroy()
            if self.lost(container):
                raise self.spawner.error("a new container died with the runtime's spawner "
                                         "before it was ready") from e
            raise
        except BaseException:
            await container.destroy()
            raise
        container.setup_ms = (time.monotonic() - started) * 1000
        self.containers[cid] = container
        if cgroup is not None:  # the first run's cgroup, made while the container waits
            container._housekeep(lambda: container._make_spares(1))
            if self._cgroups_ahead is None:  # and the next container's
                self.housekeeper.submit(self._ahead_work, self._make_cgroups_ahead)
        return container

    def _discard(self, ahead: _CgroupsAhead) -> None:
        ahead.destroy()
        if self.claims is not None:
            self.claims.remove(ahead.cid)

    def _make_cgroups_ahead(self) -> None:
        """In the housekeeping thread: the next container's cgroups, unless some wait."""
        if self._cgroups_ahead is None and not self._closing:
            driver, cid, claims = self.cgroups.driver, secrets.token_hex(6), self.claims
            assert driver is not None
            if claims is not None:
                claims.add(cid)
            try:
                self._cgroups_ahead = _CgroupsAhead.make(driver, cid)
            except BaseException:
                if claims is not None:
                    claims.remove(cid)
                raise

    async def close(self) -> None:
        try:
            while self._undoing:
                await asyncio.gather(*self._undoing, return_exceptions=True)
            for c in list(self.containers.values()):
                await c.destroy()
        finally:
            # Whatever failed above: the spawner kills what is left and exits, reaped here.
            self._closing = True
            await self.spawner.close()
            await asyncio.to_thread(self.housekeeper.close)
            ahead, self._cgroups_ahead = self._cgroups_ahead, None
            if ahead is not None:
                self._discard(ahead)
        if self.cgroups.driver is not None:
            self.cgroups.driver.close()
        os.close(self.devnull)

