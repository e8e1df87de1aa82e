"""A running container as the host sees it (Container): the control channel to its init,
its runs (each a Run), the cgroups made ahead for them, reset, destroy, open_path and bind."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import secrets
import select
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sandbox.errors import ContainerGoneError, RuntimeSetupError, SandboxError
from sandbox.runtime import protocol
from sandbox.runtime.cgroups import Cgroup, CgroupLimits, Lease
from sandbox.runtime.housekeeping import Pending
from sandbox.runtime.network import Attachment
from sandbox.runtime.output import OutputCallback
from sandbox.runtime.policy import Policy
from sandbox.runtime.profiles import Profile
from sandbox.runtime.protocol import Base, Entry, Opened
from sandbox.runtime.requests import ExecRequest, validate
from sandbox.runtime.results import RunResult
from sandbox.runtime.rootfs import RootfsSpec
from sandbox.runtime.rootfs import message as mount_plan
from sandbox.runtime.run import Run, run_cgroup_limits
from sandbox.runtime.runcontrol import RunControl

if TYPE_CHECKING:
    from sandbox.runtime.spawnerclient import Runtime

_SPARES = 2
# An ended run's cgroup waits this long at most for the next exec to recycle it (_release).
_RECYCLE_LATER_S = 0.005
# At most this many of init's messages are taken at one wake-up of the event loop, so that
# a burst of them does not hold up everything else waiting on it.
_MESSAGES_PER_WAKEUP = 64
_EXIT_WAIT_S = 2.0  # for init to end after SIGKILL; a task stuck in the kernel may take long

# What a container's cgroup holds besides its runs: init (~2 MiB charged, measured), the
# kernel's objects for its namespaces and mounts, and headroom; the vfork child of each exec
# counts in init's cgroup until it joins its run's.
CONTAINER_OVERHEAD_BYTES = 32 << 20
CONTAINER_OVERHEAD_PIDS = 8


def container_limits(profile: Profile, spec: RootfsSpec, has: frozenset[str]) -> CgroupLimits:
    """The container's own cgroup limits, so that what is charged to it outside its runs'
    cgroups is bounded too: what a run wrote to a tmpfs, and the inodes of its files (even
    empty ones, which no size limit counts), stay charged to the container once the run's
    memory cgroup is renewed or removed, and a session's /tmp keeps them from run to run.
    Room for one run at the profile's maximum, every tmpfs of the container full, and
    init: a session's runs at once share it. Where the profile sets no maximum for runs,
    the container has none either."""
    run_memory, run_pids = profile.maxima.memory_bytes, profile.maxima.pids
    mounts = mount_plan(spec)["tmpfs_bytes"]
    return CgroupLimits(
        memory_bytes=(run_memory + mounts + CONTAINER_OVERHEAD_BYTES
                      if run_memory and "memory" in has else None),
        pids=run_pids + CONTAINER_OVERHEAD_PIDS if run_pids and "pids" in has else None)


@dataclass(frozen=True)
class NextRun:
    """The next run's cgroup and its limits as applied, given to init ahead with an exec
    (its "prepare"); None for a container without cgroups. Init makes that run's child in
    it as soon as the container is reset (see native/init.c, prepare), and the next exec
    runs in it ("prepared")."""

    cgroup: tuple[Cgroup, CgroupLimits] | None


@dataclass(frozen=True)
class CachedBind:
    """A file of the file cache to bind at `path` (inside the container): `blob` is its
    name in the blob directory (the hex digits of its sha256)."""

    path: str
    blob: str
    executable: bool


class BindError(SandboxError):
    """Init could not bind `index`'s file: its blob (`blob_failed`: ENOENT when gone from
    the cache) or its path (`error`, as an open of the path would fail)."""

    def __init__(self, index: int, blob_failed: bool, error: OSError) -> None:
        super().__init__(str(error))
        self.index, self.blob_failed, self.error = index, blob_failed, error


@dataclass(frozen=True)
class PendingBind:
    """A bind request sent to init (Container.send_bind), its answer still to come; with
    `exec_follows`, init answers only a failure, before the exec's end."""

    container: Container
    op_id: int
    future: asyncio.Future[dict[str, Any]]
    binds: tuple[CachedBind, ...]
    exec_follows: bool

    async def answer(self) -> None:
        """Raises BindError (which one failed, and init's OSError) when one could not be
        made; those before it stay until the reset. With `exec_follows`, call it once the
        exec behind the request has ended: no failure told by then is none."""
        if self.exec_follows and not self.future.done():
            self.container._waiters.pop(("bound", self.op_id), None)
            self.future.cancel()
            return
        msg = await self.future
        if msg.get("errno"):
            index = int(msg.get("index") or 0)
            code = int(msg["errno"])
            path = self.binds[index].path if index < len(self.binds) else None
            raise BindError(index, bool(msg.get("blob")),
                            OSError(code, str(msg.get("error") or os.strerror(code)), path))


@dataclass(eq=False)
class PendingOpen:
    """An open request sent to init (Container.send_open), its answer still to come. Each
    is either awaited (`answer`) or dropped (`drop`): a dropped request's descriptor is
    closed whenever it comes, so that none is left open."""

    container: Container
    op_id: int
    future: asyncio.Future[dict[str, Any]]
    path: str
    taken: bool = False

    async def answer(self) -> Opened:
        """The descriptor (the caller's to close), or init's OSError. Cancelled, the request
        is dropped."""
        try:
            msg = await self.future
        except BaseException:
            self.drop()
            raise
        self.taken = True
        fds: list[int] = msg.get("fds", [])
        if msg.get("errno") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            code = int(msg.get("errno") or errno.EIO)
            raise OSError(code, str(msg.get("error") or os.strerror(code)), self.path)
        return Opened(fds[0], msg.get("opaque") is True)

    def drop(self) -> None:
        """Give the request up: its descriptor is closed, now if it came, else when it
        comes (no waiter left: Container._on_message closes it). No-op once answered."""
        if self.taken:
            return
        self.taken = True
        self.container._waiters.pop(("opened", self.op_id), None)
        fut = self.future
        if not fut.done():
            fut.cancel()
        elif not fut.cancelled() and fut.exception() is None:
            for fd in fut.result().get("fds", ()):
                os.close(fd)


class Container:
    """A running container: an init waiting on its control socket."""

    def __init__(self, runtime: Runtime, cid: str, pid: int, ctl: socket.socket,
                 policy: Policy, rootfs: RootfsSpec, cgroup: Cgroup | None) -> None:
        self.runtime, self.id, self.pid, self.policy = runtime, cid, pid, policy
        self.rootfs, self.cgroup = rootfs, cgroup
        self.setup_ms = 0.0
        self.alive = True
        self._destroying: asyncio.Task[None] | None = None
        # A proxy or full network's host side (set by the runtime when it makes one).
        self.network: Attachment | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            # Init failed during setup and the spawner reaped it already: its reason is
            # waiting on the control socket, and _wait_ready reports it.
            self._pidfd = -1
        self._ctl = ctl
        self._ids = itertools.count(1)
        self._waiters: dict[tuple[str, int], asyncio.Future[dict[str, Any]]] = {}
        self._active = 0
        self._runs = 0
        # The next runs' cgroups are ready (the profile's default limits applied) before
        # anyone waits, two ahead so that back-to-back runs always find one: a finished
        # run's is reset and kept when it can be, else removed and a new one made, by the
        # runtime's housekeeping thread after the run.
        self._spares: list[tuple[Cgroup, CgroupLimits]] = []
        self._ended: list[tuple[Cgroup, CgroupLimits]] = []   # to recycle (_release)
        self._recycle_timer: asyncio.TimerHandle | None = None
        self._next: NextRun | None = None
        self._prepares = False     # an exec gave init the next run's cgroup (_give_next)
        # Runs exec'd through the child init made ahead, and runs that asked for it but
        # took the vfork path (it died, or the request was too big for it).
        self.prepared_runs = 0
        self.prepare_fallbacks = 0
        # Whether init loads the policy's filter in that child before the request (it lets
        # through every call the child makes after it).
        self.filter_ahead = False
        self._housework = Pending()
        self._kills: set[asyncio.Future[None]] = set()   # under way
        self._spares_lock = threading.Lock()  # one chore at a time makes new ones
        self._loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._waiting = select.poll()
        self._waiting.register(ctl, select.POLLIN)
        asyncio.get_running_loop().add_reader(ctl, self._on_message)

    def _on_message(self) -> None:
        # After an open's answer, what else waits is taken in the same wake-up of the event
        # loop (a bounded number): the answers to a walk's open requests come back to back
        # (files.TreeTar), and a wake-up costs more than a message. A run's messages come
        # one at a time: they are not worth a poll each.
        for _ in range(_MESSAGES_PER_WAKEUP):
            if self._take_message() != "opened" or not self._waiting.poll(0):
                return

    def _take_message(self) -> object:
        """Takes one message; returns its event (None once init is gone)."""
        try:
            got = protocol.recv(self._ctl)
        except (protocol.ProtocolError, OSError):
            got = None
        if got is None:
            self._gone("the container's init exited")
            return None
        msg, fds = got
        ev = msg.get("ev")
        if ev in ("opened", "pty"):
            msg["fds"] = fds
        else:
            for fd in fds:  # only these carry a descriptor (a run's pty: its master)
                os.close(fd)
        if ev in ("ready", "error"):
            if not self._ready.done():
                self._ready.set_result(msg)
            return ev
        key = (str(ev), msg.get("id", 0) if ev != "reset" else 0)
        waiter = self._waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(msg)
        elif ev == "reset" and msg.get("error"):
            # The reset init does by itself after a run (exec's reset_after) failed.
            self._gone(f"its reset after a run failed ({msg['error']})")
        else:
            for fd in msg.get("fds", ()):
                os.close(fd)
        return ev

    def _gone(self, why: str) -> None:
        if not self.alive:
            return
        self.alive = False
        asyncio.get_running_loop().remove_reader(self._ctl)
        err = ContainerGoneError(f"container {self.id}: {why}")
        if not self._ready.done():
            self._ready.set_exception(err)
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(err)
        self._waiters.clear()

    async def _wait_ready(self) -> None:
        msg = await self._ready
        if msg.get("ev") != "ready":
            raise RuntimeSetupError(str(msg.get("message")))
        self.filter_ahead = msg.get("filter_ahead") is True

    def _expect(self, ev: str, run_id: int = 0) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[(ev, run_id)] = fut
        return fut

    def _send(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        if self.alive:
            try:
                protocol.send(self._ctl, msg, fds or [])
                return
            except (BrokenPipeError, ConnectionResetError) as e:
                # init died before its end of the socket was seen
                self._gone(f"its init is gone ({e.strerror})")
        raise ContainerGoneError(f"container {self.id} is gone; create a new one")

    async def exec(self, req: ExecRequest, *, on_output: OutputCallback | None = None,
                   control: RunControl | None = None, reset_after: bool = False) -> RunResult:
        """Run one command to its end and return its result; many may run at once. With
        `control`, the caller may signal the run meanwhile (see RunControl). With
        `reset_after` (the only run at the time), init resets the container as the run
        ends, before it reads another request: the container can be given its next run at
        once. If that reset fails, the container is gone (`alive` false)."""
        if control is not None:
            control._claim()
        validate(req, self.runtime.mapping)
        run = Run(self, next(self._ids), req, self.policy.limits(req.limits),
                  on_output=on_output, reset_after=reset_after)
        self._active += 1
        self._runs += 1
        try:
            return await run.execute(control)
        finally:
            self._active -= 1

    def _take_run_cgroup(self, run_id: int, limits: CgroupLimits) -> tuple[Lease, list[int]]:
        """The run's use of a cgroup, limits applied, and the cgroup.procs fds its child
        joins by (the cgroup's own: not the run's to close). A spare is past its recycling,
        so the lease names this run's use only."""
        assert self.cgroup is not None
        if (spare := self._pop_spare()) is None:
            cg = self.cgroup.child(f"r-{run_id}")
            cg.apply(limits)
            return cg.lease(), cg.join_fds(limits)
        cg, applied = spare
        if applied != limits:
            cg.apply(limits)
        return cg.lease(), cg.join_fds(limits)

    def _pop_spare(self) -> tuple[Cgroup, CgroupLimits] | None:
        """A spare, the ended runs' cgroups recycled first when there is none (_release)."""
        if not self._spares:
            self._recycle_ended()
        return self._spares.pop() if self._spares else None

    def _take_next(self) -> NextRun | None:
        """What the last exec gave init for this one; whatever this exec is, it is the next
        one (init kills the child it made for it otherwise)."""
        nxt, self._next = self._next, None
        return nxt

    def _give_next(self) -> tuple[NextRun, list[int]] | None:
        """A cgroup set aside for the run after this one and its cgroup.procs fds, to go
        with this run's exec; None when no spare is ready (that run then takes today's
        path)."""
        if self.cgroup is None:
            return NextRun(None), []
        self._prepares = True
        if (spare := self._pop_spare()) is None:
            return None
        return NextRun(spare), spare[0].procs_fds()

    def _forget_next(self, nxt: NextRun, *, sent: bool) -> None:
        """A NextRun init does not hold (its exec was refused, or never sent): its cgroup,
        never joined, is a spare again."""
        if self._next is nxt:
            self._next = None
        if nxt.cgroup is not None:
            if sent:
                cg, applied = nxt.cgroup
                self._housekeep(lambda: self._retire(cg, applied, True))
            else:
                self._spares.append(nxt.cgroup)

    def _counted(self, prepared: object) -> None:
        if prepared is True:
            self.prepared_runs += 1
        elif prepared is False:
            self.prepare_fallbacks += 1

    def _make_spares(self, target: int = _SPARES) -> None:
        assert self.cgroup is not None and self.runtime.cgroups.driver is not None
        if not self._spares_lock.acquire(blocking=False):
            return  # another chore is at it
        limits = run_cgroup_limits(self.policy.profile.defaults,
                                   self.runtime.cgroups.driver.controllers)
        try:
            # The cgroups of runs under way come back when they end: counted, so that a
            # run starting before the last one's cgroup is back makes no new one (to be
            # removed again when both are back).
            while self.alive and len(self._spares) + self._active < target:
                cg = self.cgroup.child(f"s-{secrets.token_hex(4)}")
                cg.apply(limits)
                cg.procs_fds()  # opened here, off the path of the run that takes it
                self._spares.append((cg, limits))
        finally:
            self._spares_lock.release()

    def _release(self, cg: Cgroup, applied: CgroupLimits, reusable: bool) -> None:
        """A run's cgroup once the run is over. The usual case, a cleanly ended run's
        cgroup recycled as a spare (a few reads and writes; the memory cgroup made anew
        when the run left more than a little charged to it), is done on the event loop,
        after the next exec of this container is sent to init (_recycle_ended): its child
        then starts in init while the loop would only wait.
        Done as the run ended, it lay on the path of the next request of a client that
        sends one as soon as it has its answer (~0.1 ms of its median). A spare is always
        at hand meanwhile (two are kept), and when no exec comes the cgroup is recycled
        _RECYCLE_LATER_S later. Handed to the housekeeping thread, it cost more CPU than
        the work itself: a wake-up per run, and the thread's turns at the GIL took it from
        the loop at each of the loop's system calls (measured: 0.10-0.13 ms of the
        service's CPU per run of `true`). The rest (removing a cgroup, which may kill and
        wait for a freezer, making spares) stays with the housekeeping thread, off the loop
        (_retire)."""
        if not reusable:
            self._housekeep(lambda: self._retire(cg, applied, False))
            return
        self._ended.append((cg, applied))
        if self._recycle_timer is None:
            self._recycle_timer = self._loop.call_later(_RECYCLE_LATER_S, self._recycle_ended)

    def _recycle_ended(self) -> None:
        """Recycle the cgroups of the runs that ended since the last call (_release)."""
        if self._recycle_timer is not None:
            self._recycle_timer.cancel()
            self._recycle_timer = None
        ended, self._ended = self._ended, []
        for cg, applied in ended:
            self._recycle_here(cg, applied)

    def _recycle_here(self, cg: Cgroup, applied: CgroupLimits) -> None:
        """_release's part on the event loop: the cgroup kept as a spare, or handed to
        _retire when it cannot be here (not wanted as a spare, not recyclable, or a kill
        of its last use still under way, which must not be waited for on the loop)."""
        kept: bool | None = False
        if self.alive and len(self._spares) < self._spares_wanted():
            try:
                kept = cg.recycle(applied, wait=False)
                if kept:
                    cg.procs_fds()
                    self._spares.append((cg, applied))
            except (SandboxError, OSError):
                kept = False  # removed by _retire, as one that cannot be recycled
        if not kept:
            self._housekeep(lambda: self._retire(cg, applied, kept is None))
        elif len(self._spares) + self._active < self._spares_target():
            self._housekeep(lambda: self._make_spares(self._spares_target()))

    def _retire(self, cg: Cgroup, applied: CgroupLimits, reusable: bool) -> None:
        """A run's cgroup once the run is over: a spare again when the run ended cleanly and
        the cgroup can be reset exactly, else removed; then the spares are topped up."""
        kept = False
        try:
            if reusable and self.alive and len(self._spares) < self._spares_wanted() \
                    and cg.recycle(applied):
                cg.procs_fds()
                self._spares.append((cg, applied))
                kept = True
        except (SandboxError, OSError):
            pass  # removed below, as one that cannot be recycled
        if not kept:
            cg.destroy()
        self._make_spares(self._spares_target())

    def _spares_target(self) -> int:
        """The spares to make after a run: a container that runs again keeps two (three
        once its runs prepare the next); after its first run one is enough (a container
        used once, destroyed after it, would only remove what it made)."""
        return self._spares_wanted() if self._runs > 1 else 1

    def _spares_wanted(self) -> int:
        """Two ahead, and one more once runs give init the next run's cgroup (_next, which
        is not a spare): each run then finds one to give, whatever the housekeeping still
        has to recycle of the last run's."""
        return _SPARES + self._prepares

    def _drop_spares(self) -> None:
        spares, self._spares = self._spares, []
        nxt, self._next = self._next, None
        if nxt is not None and nxt.cgroup is not None:
            spares.append(nxt.cgroup)
        for cg, _limits in spares:
            cg.close_procs_fds()

    def _housekeep(self, work: Callable[[], None]) -> None:
        """Cgroup housekeeping in the runtime's housekeeping thread, off the path of any
        run (see housekeeping.py)."""
        self.runtime.housekeeper.submit(self._housework, work)

    async def _settle(self) -> None:
        """Wait for this container's kills and housekeeping under way."""
        # The recycles _release left for later first: they hand what they cannot do to the
        # housekeeping waited for.
        self._recycle_ended()
        while self._kills:
            await asyncio.gather(*self._kills)
        if self._housework.busy:
            await asyncio.to_thread(self._housework.wait)

    def _in_thread(self, work: Callable[[], None]) -> None:
        """A kill in a worker thread, off the event loop."""
        async def run() -> None:
            with contextlib.suppress(SandboxError, OSError):
                await asyncio.to_thread(work)

        task = asyncio.ensure_future(run())
        self._kills.add(task)
        task.add_done_callback(self._kills.discard)

    def _kill_run(self, run_cg: Lease | None, run_id: int) -> None:
        """Kill every process of a run without blocking the event loop (a v1 kill freezes
        the cgroup and waits for it, which must not stall every other run meanwhile). Both
        ways name the run, so however late they act they reach its processes or none: its
        lease kills what is in its cgroup while the run still uses it, and init signals
        the run's process group by the run's id. Init reads this after the exec, so the
        latter also reaches a run that a loaded init starts only after the former found
        its cgroup still empty; once the first process is dead, the run's end kills the
        rest of the cgroup."""
        self._signal_run(run_id, signal.SIGKILL)
        if run_cg is not None:
            self._in_thread(run_cg.kill)

    def _signal_run(self, run_id: int, signum: int) -> None:
        """A caller's signal: init sends it to the run's process group (never to itself).
        A container that is gone has no run left to signal; its exec reports why."""
        with contextlib.suppress(ContainerGoneError):
            self._send({"op": "signal", "id": run_id, "signal": signum})

    async def open_path(self, path: str, flags: int, *, owner: tuple[int, int] | None = None,
                        mode: int = 0o644, entry: Entry | None = None,
                        base: Base = "root") -> int:
        """A descriptor of `path` as this container's processes see it, opened by its init as
        container root (see native/hostopen.c): /proc/<pid>/root of a non-dumpable init is
        closed to a service that is not host root. With `entry`, that entry of a directory
        the host holds open (`path` only names it in errors). With `base="upper"`, `path`
        is in the upper directory of the writable root instead (what runs changed there),
        opened for reading only; a read-only root has none (EROFS). Raises OSError with
        init's errno."""
        opened = await self.open_for_host(path, flags, owner=owner, mode=mode, entry=entry,
                                          base=base)
        return opened.fd

    async def open_for_host(self, path: str, flags: int, *,
                            owner: tuple[int, int] | None = None, mode: int = 0o644,
                            entry: Entry | None = None, base: Base = "root") -> Opened:
        """open_path's request with init's whole answer: under `base="upper"`, whether a
        directory is opaque, which only init may read (the host may lack the permission on
        another container user's directory)."""
        return await self.send_open(path, flags, owner=owner, mode=mode, entry=entry,
                                    base=base).answer()

    def send_open(self, path: str, flags: int, *, owner: tuple[int, int] | None = None,
                  mode: int = 0o644, entry: Entry | None = None,
                  base: Base = "root") -> PendingOpen:
        """open_for_host's request, sent now; its answer to be awaited later, or dropped.
        Init serves its requests in order, so a caller may have several under way and
        take their descriptors one after the other, with no round trip between them."""
        op_id = next(self._ids)
        fut = self._expect("opened", op_id)
        try:
            self._send({"op": "open", "id": op_id, "path": None if entry else path,
                        "flags": flags, "owner": list(owner) if owner is not None else None,
                        "mode": mode, "entry": entry.message() if entry is not None else None,
                        "base": base})
        except BaseException:
            self._waiters.pop(("opened", op_id), None)
            raise
        return PendingOpen(self, op_id, fut, path)

    def send_bind(self, binds: Sequence[CachedBind], owner: tuple[int, int], *,
                  exec_follows: bool = False) -> PendingBind:
        """Bind cached files into the container's root, in one request to init (see
        native/scratch.c): each read-only, nosuid, nodev, and noexec unless it says
        `executable`, at its path (missing parents and the mount point made as a put makes
        them, owned by `owner`; never through a symbolic link). No copy: the blob itself is
        mounted. The next reset undoes every bind. Sent now, its answer awaited later:
        with `exec_follows`, the caller sends the run's exec right after, without a
        suspension between (so no other request comes between them), init refuses that
        exec if a bind failed and tells only a failure, and the caller awaits the answer
        once the exec has ended."""
        if not self.rootfs.files:
            raise SandboxError(f"container {self.id} was made without the file cache; "
                               "copy the files in instead")
        op_id = next(self._ids)
        fut = self._expect("bound", op_id)
        # Its answer may never be awaited (the exec behind it raised first): not an error to log.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            self._send({"op": "bind", "id": op_id, "owner": list(owner),
                        "exec_follows": exec_follows,
                        "binds": [{"path": b.path, "blob": b.blob, "exec": b.executable}
                                  for b in binds]})
        except BaseException:
            self._waiters.pop(("bound", op_id), None)
            raise
        return PendingBind(self, op_id, fut, tuple(binds), exec_follows)

    async def reset(self, *, remount: bool = True) -> None:
        """Kill every process but init, give /tmp and /dev/shm back empty and undo the
        binds of cached files (not with `remount` false: a kill only)."""
        if self._active > (0 if remount else 1):
            raise SandboxError(f"container {self.id} has runs in progress; wait for them first")
        fut = self._expect("reset")
        self._send({"op": "reset", "remount": remount})
        msg = await fut
        if msg.get("error"):
            raise SandboxError(f"container {self.id} reset failed: {msg['error']}")

    async def destroy(self) -> None:
        """Kill init (and so every process of the container), then remove its cgroups.
        Once begun it runs to its end even when the caller is cancelled, and the runtime
        forgets the container only then (its close waits for it): a destroy cut short (an
        engine closing cancels its session reaper mid-delete) left the cgroups behind."""
        if self._destroying is None:
            self._destroying = asyncio.ensure_future(self._destroy())
            self._destroying.add_done_callback(
                lambda _: self.runtime.containers.pop(self.id, None))
        await asyncio.shield(self._destroying)

    async def _destroy(self) -> None:
        if self.alive:
            self._gone("destroyed")
        if self.network is not None:
            self.network.close()
            self.network = None
        with contextlib.suppress(OSError):
            self._ctl.close()
        ended = False
        if self._pidfd >= 0:
            # Through a pidfd: a pid the spawner has already reaped may name another process.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            try:
                ended = await self._init_exited()
            finally:
                os.close(self._pidfd)
                self._pidfd = -1
        await self._settle()
        self._drop_spares()
        if self.cgroup is not None:
            # An init that has exited took every process of its pid namespace with it (the
            # kernel kills them and waits for them first): its cgroups only need removing,
            # without freezing and killing, which took ~10 ms per container.
            await asyncio.to_thread(self.cgroup.destroy, empty=ended)

    async def _init_exited(self) -> bool:
        """Whether init exited within _EXIT_WAIT_S of its SIGKILL (its pidfd reads ready)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self._pidfd, lambda: done.done() or done.set_result(None))
        try:
            async with asyncio.timeout(_EXIT_WAIT_S):
                await done
            return True
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self._pidfd)
