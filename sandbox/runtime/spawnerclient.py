"""The spawner client (Runtime): starts the spawner process, asks it for containers, and
closes it; one per service, holding what every container shares (the id map, cgroups, the
registry of policies)."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sandbox.errors import RuntimeSetupError
from sandbox.runtime import idmap, protocol
from sandbox.runtime.cgroups import Cgroup, Detection, detect
from sandbox.runtime.container import Container, container_limits
from sandbox.runtime.housekeeping import Housekeeper
from sandbox.runtime.policy import PolicyRegistry
from sandbox.runtime.profiles import HOST_NETWORK
from sandbox.runtime.requests import ContainerSpec
from sandbox.runtime.rootfs import RootfsSpec


class Runtime:
    """One per service: the spawner process, the id map, cgroups, the policies."""

    def __init__(self, spawner: subprocess.Popen[bytes], sock: socket.socket,
                 mapping: idmap.IdMapping, cgroups: Detection) -> None:
        self._spawner, self._sock = spawner, sock
        self.mapping, self.cgroups = mapping, cgroups
        self._lock = asyncio.Lock()
        self.policies = PolicyRegistry(own_process_only=mapping.shares_init_id)
        self.containers: dict[str, Container] = {}
        self._undoing: set[asyncio.Task[None]] = set()  # creations cancelled by callers
        # The stdin of every run without one: init receives its own copy with each run.
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.housekeeper = Housekeeper()
        # The file cache's blob directory (its owner sets it): bound read-only into every
        # container made from then on, out of runs' sight, for Container.bind.
        self.files: str | None = None

    _end_spawner: weakref.finalize  # set by start(): see _end_spawner()

    @classmethod
    async def start(cls, *, mapping: idmap.IdMapping | None = None,
                    cgroups: Detection | None = None) -> Runtime:
        mapping = mapping or idmap.plan()
        cgroups = cgroups if cgroups is not None else detect()
        ours, theirs = protocol.socketpair()
        # The spawner is exec'd fresh (not forked from this threaded process).
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox.runtime.spawner", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            cwd=str(Path(__file__).resolve().parents[2]))
        theirs.close()
        runtime = cls(proc, ours, mapping, cgroups)
        # close() ends and reaps the spawner; so does this if the owner never calls it (an
        # engine that failed to start), when the runtime is collected or at exit. A spawner
        # outliving this process dies of PDEATHSIG, a zombie for pid 1 with its inits.
        runtime._end_spawner = weakref.finalize(runtime, _end_spawner, proc, ours)
        return runtime

    @property
    def warnings(self) -> list[str]:
        return list(self.cgroups.warnings)

    async def _ask_spawner(self, req: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any],
                                                                               list[int]]:
        loop = asyncio.get_running_loop()
        async with self._lock:
            try:
                protocol.send(self._sock, req, fds)
            except OSError as e:
                raise RuntimeSetupError(f"the spawner process died ({e.strerror}); "
                                        "restart the runtime") from e
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self._sock, lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(self._sock)
            got = protocol.recv(self._sock)
        if got is None:
            raise RuntimeSetupError("the spawner process died; restart the runtime")
        return got

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
            upper_size=shape.upper_size, tmpfs=shape.tmpfs, sys=shape.sys, files=self.files)
        cid = secrets.token_hex(6)
        cgroup: Cgroup | None = None
        fds: list[int] = []
        n_container = 0
        try:
            if self.cgroups.driver is not None:
                cgroup = self.cgroups.driver.create(f"c-{cid}")
                cgroup.apply(container_limits(profile, rootfs, self.cgroups.driver.controllers))
                fds = cgroup.open_procs_fds()
                n_container = len(fds)
                # The helper joins the container's cgroup (rooting the cgroup namespace
                # there) and init moves on to this leaf; on v2 the container's cgroup hands
                # controllers down only later, to runs, once no process is left in it.
                fds += cgroup.child("init", limitable=False).open_procs_fds()
            reply, got = await self._ask_spawner(
                {"op": "create", "id": cid, "rootfs": asdict(rootfs),
                 "mapping": self.mapping.describe(), "seccomp_bpf": policy.program.bpf,
                 "caps": profile.capability_mask,
                 "host_network": profile.network == HOST_NETWORK,
                 "hostname": spec.hostname, "container_cgroup_fds": n_container}, fds)
        except BaseException:
            if cgroup is not None:
                cgroup.destroy()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        if not reply.get("ok") or len(got) != 1:
            for fd in got:
                os.close(fd)
            if cgroup is not None:
                cgroup.destroy()
            raise RuntimeSetupError(f"container setup failed: {reply.get('error')}")
        container = Container(self, cid, int(reply["pid"]), socket.socket(fileno=got[0]),
                              policy, rootfs, cgroup)
        try:
            await container._wait_ready()
        except BaseException:
            await container.destroy()
            raise
        container.setup_ms = (time.monotonic() - started) * 1000
        self.containers[cid] = container
        if cgroup is not None:  # the first run's cgroup, made while the container waits
            container._housekeep(lambda: container._make_spares(1))
        return container

    async def close(self) -> None:
        try:
            while self._undoing:
                await asyncio.gather(*self._undoing, return_exceptions=True)
            for c in list(self.containers.values()):
                await c.destroy()
        finally:
            # Whatever failed above: the spawner kills what is left and exits, reaped here.
            await asyncio.to_thread(self._end_spawner)
            await asyncio.to_thread(self.housekeeper.close)
        if self.cgroups.driver is not None:
            self.cgroups.driver.close()
        os.close(self.devnull)


_SPAWNER_EXIT_S = 10.0


def _end_spawner(proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
    """Close the spawner's socket (it then kills its containers' inits, reaps them and
    exits) and reap it; killed if it takes longer than _SPAWNER_EXIT_S."""
    sock.close()
    try:
        proc.wait(_SPAWNER_EXIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
