"""The spawner process, supervised: started, asked one request at a time, watched through
a pidfd on the event loop so that its death is noticed when it happens (not at the next
request), and started again with backoff.

While it is down every request raises RuntimeRestarting (with a Retry-After), and `down`
says why (for /readyz). A container's init dies with its spawner (PDEATHSIG), so what the
dead one made is gone: `generation` counts the spawners, and the owner of the containers
(spawnerclient.Runtime) tells a lost container by the generation it was made in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from sandbox.errors import RuntimeRestarting, RuntimeSetupError
from sandbox.runtime import protocol

log = logging.getLogger(__name__)

_EXIT_S = 10.0       # for a spawner told to end (its socket closed) to kill its inits and exit
_ANSWER_S = 60.0     # for a new spawner to answer its first request (imports on a busy host)
_STABLE_S = 10.0     # a spawner that died younger than this died soon after a restart
_START_S = 1.0       # about how long a start takes, for the Retry-After of those waiting
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.1, 10.0
# What the interpreter runs, the socket's descriptor appended.
SPAWNER = ("-m", "sandbox.runtime.spawner")


@dataclass
class _Spawner:
    """One spawner process: its socket, its pidfd (readable once it has died), and the
    finalizer that ends it if its owner never does."""

    proc: subprocess.Popen[bytes]
    sock: socket.socket
    pidfd: int
    started: float
    end: weakref.finalize


class Supervisor:
    """The spawner process of one Runtime, kept running."""

    def __init__(self, program: tuple[str, ...] = SPAWNER) -> None:
        self.program = program             # each start runs what it says then
        # Its own loop's: a death may be seen (check) by a caller outside the loop.
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()        # one exchange with the spawner at a time
        self._current: _Spawner | None = None
        self._restarting: asyncio.Task[None] | None = None
        self._restarted: list[Callable[[], None]] = []
        self._closed = False
        self._quick_deaths = 0             # in a row, each soon after its start
        self._retry_at = 0.0               # when the next start is due (monotonic)
        self.generation = 0                # spawners that died so far
        self.down: str | None = None       # why no spawner serves, while none does
        self.last_death = ""               # how the last one died

    @classmethod
    async def start(cls, program: tuple[str, ...] = SPAWNER) -> Supervisor:
        """A supervised spawner that has answered: RuntimeSetupError if it cannot start."""
        supervisor = cls(program)
        supervisor._serve(await supervisor._launch())
        return supervisor

    def on_restart(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time a new spawner serves in place of a dead one."""
        self._restarted.append(callback)

    @property
    def pid(self) -> int | None:
        return None if self._current is None else self._current.proc.pid

    def check(self) -> str | None:
        """Why no spawner serves now (None when one does). Looks at the process itself,
        so a death is seen here even before the event loop has read its pidfd."""
        current = self._current
        if current is not None and self.down is None and current.proc.poll() is not None:
            self._died(current)
        return self.down

    def error(self, what: str) -> RuntimeRestarting:
        """The error of a request that found the spawner down, or of one whose container
        died with it (`what` went wrong): the same request succeeds once it is back."""
        wait = max(1, math.ceil(self._retry_at - time.monotonic()))
        now = (f"is restarting ({self.down})" if self.down is not None
               else f"has restarted ({self.last_death})")
        return RuntimeRestarting(f"{what}: the sandbox runtime {now}; retry in {wait} s",
                                 retry_after_s=wait)

    async def ask(self, req: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any],
                                                                      list[int]]:
        """Send one request (its descriptors are the caller's to close) and read the
        answer. RuntimeRestarting when the spawner is down or dies meanwhile."""
        async with self._lock:
            current = self._current
            if self.check() is not None or current is None:
                raise self.error("no container can be made now")
            try:
                got = await _exchange(current.sock, req, fds)
            except protocol.ProtocolError as e:  # the spawner is well; its answer was lost
                raise RuntimeSetupError(f"the spawner's answer could not be read: {e}") from e
        if got is None:
            # Its socket closes as it exits, a moment before it can be reaped; and a
            # spawner that closed it alive would serve no one either.
            self._died(current, ending=True)
            raise self.error("the spawner process died while it made a container")
        return got

    def _serve(self, spawner: _Spawner) -> None:
        self._current, self.down = spawner, None
        self._loop.add_reader(spawner.pidfd, self._died, spawner)

    async def _launch(self) -> _Spawner:
        """Start a spawner and wait for its answer to a ping: then it has imported what it
        needs and opened sbx-init."""
        ours, theirs = protocol.socketpair()
        # Exec'd fresh, not forked from this threaded process.
        proc = subprocess.Popen(
            [sys.executable, *self.program, str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            cwd=str(Path(__file__).resolve().parents[2]))
        theirs.close()
        pidfd = os.pidfd_open(proc.pid)
        # The owner's close() ends and reaps it; so does this if the owner never calls it
        # (an engine that failed to start), when this is collected or at exit. A spawner
        # outliving this process dies of PDEATHSIG, a zombie for pid 1 with its inits.
        spawner = _Spawner(proc, ours, pidfd, time.monotonic(),
                           weakref.finalize(self, _end, proc, ours, pidfd))
        try:
            async with asyncio.timeout(_ANSWER_S):
                got = await _exchange(ours, {"op": "ping"}, [])
        except TimeoutError:
            got = None
        except BaseException:  # cancelled (the runtime closes): it must not stay behind
            await asyncio.to_thread(spawner.end)
            raise
        if got is None or not got[0].get("ok"):
            await asyncio.to_thread(spawner.end)
            raise RuntimeSetupError(
                f"the spawner process did not start ({_death(proc.returncode)}): its "
                "error is in the service's log above")
        return spawner

    def _died(self, spawner: _Spawner, *, ending: bool = False) -> None:
        """`spawner` has died (or, `ending`, is to be ended now): reap it, say so, and
        start a new one."""
        if spawner is not self._current or self.down is not None or self._closed:
            return
        self._loop.remove_reader(spawner.pidfd)
        if ending and spawner.proc.poll() is None:
            spawner.proc.kill()  # SIGKILL: it is reaped at once below
        self.last_death = f"the spawner process {_death(spawner.proc.wait())}"
        self.down = f"{self.last_death}; a new one is starting"
        self.generation += 1
        young = time.monotonic() - spawner.started < _STABLE_S
        self._quick_deaths = self._quick_deaths + 1 if young else 0
        log.error("%s (pid %d), and every container it made with it; starting a new one",
                  self.last_death, spawner.proc.pid)
        self._restarting = self._loop.create_task(self._restart(spawner))

    async def _restart(self, dead: _Spawner) -> None:
        async with self._lock:  # the exchange under way, if any, has seen the death
            self._current = None
            await asyncio.to_thread(dead.end)
        # Right away after a spawner that lived; one that died soon after its start waits
        # longer each time, and so does each start that fails, so that a spawner that
        # cannot live does not spin.
        delay = _backoff(self._quick_deaths - 1)
        self._retry_at = time.monotonic() + delay + _START_S
        await asyncio.sleep(delay)

        def backoff(state: RetryCallState) -> float:
            return _backoff(self._quick_deaths + state.attempt_number - 1)

        def before_sleep(state: RetryCallState) -> None:
            wait = state.next_action.sleep if state.next_action else 0.0
            self._retry_at = time.monotonic() + wait + _START_S
            # Why, only to the log: `down` goes to anyone who asks /readyz.
            self.down = (f"{self.last_death}, and a new one failed to start; trying again "
                         f"in {wait:.1f} s")
            log.error("%s: %s", self.down,
                      state.outcome.exception() if state.outcome else "no outcome")

        async for attempt in AsyncRetrying(
                wait=backoff, retry=retry_if_exception_type(Exception),
                before_sleep=before_sleep):
            with attempt:
                spawner = await self._launch()
        self._serve(spawner)
        log.warning("a new spawner process (pid %d) serves; it replaced one that died",
                    spawner.proc.pid)
        for callback in self._restarted:
            try:
                callback()
            except Exception:  # the spawner serves all the same; what failed is logged
                log.exception("after the spawner's restart")

    async def close(self) -> None:
        """End the spawner (it kills its containers' inits first) and stop supervising."""
        self._closed = True
        if self._restarting is not None:
            self._restarting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._restarting
        current, self._current = self._current, None
        if current is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(current.pidfd)
            await asyncio.to_thread(current.end)


async def _exchange(sock: socket.socket, req: dict[str, Any],
                    fds: list[int]) -> tuple[dict[str, Any], list[int]] | None:
    """One request and its answer over `sock`; None when the peer is gone."""
    loop = asyncio.get_running_loop()
    try:
        protocol.send(sock, req, fds)
    except OSError:
        return None
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock)
    try:
        return protocol.recv(sock)
    except OSError:
        return None


def _backoff(n: int) -> float:
    """The wait before start `n` (counted from 0) of a spawner that keeps dying."""
    return 0.0 if n <= 0 else min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (n - 1))


def _death(status: int | None) -> str:
    if status is None:
        return "did not answer"
    if status >= 0:
        return f"exited with status {status}"
    try:
        return f"was killed by {signal.Signals(-status).name}"
    except ValueError:  # a real-time signal has no name of its own
        return f"was killed by signal {-status}"


def _end(proc: subprocess.Popen[bytes], sock: socket.socket, pidfd: int) -> None:
    """Close the spawner's socket (it then kills its containers' inits, reaps them and
    exits) and reap it; killed if it takes longer than _EXIT_S."""
    sock.close()
    try:
        proc.wait(_EXIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        os.close(pidfd)
