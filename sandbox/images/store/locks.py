"""One piece of work per key, however many callers want it: within this process (an
asyncio future per key) and across processes (an flock on a lock file per key)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from sandbox import pids

T = TypeVar("T")


class SingleFlight:
    """Callers asking for the same key while it is in flight share one task and its result.

    The task is not tied to the caller that started it: a caller that gives up (a cancelled
    request) leaves the work running for the others, and its result lands in the store.
    """

    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Task[object]] = {}

    async def do(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(work())  # type: ignore[arg-type]
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        return await asyncio.shield(task)  # type: ignore[return-value]

    def _forget(self, key: str, task: asyncio.Task[object]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter has seen it, or none is left


@contextlib.asynccontextmanager
async def file_lock(path: Path) -> AsyncIterator[None]:
    """An exclusive flock held for the block; waiting happens in a worker thread.

    The kernel drops the lock when the holder dies, so a pull killed midway never leaves a
    key locked for the next one.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def temp_name(key: str) -> str:
    """A temporary name that says which process owns it (see remove_stale)."""
    return f"{key}.{os.getpid()}.{secrets.token_hex(4)}"


def _owner_alive(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 3 and parts[-2].isdigit() and pids.alive(int(parts[-2]))


def remove_stale(tmp: Path, remove: Callable[[Path], object]) -> int:
    """Remove the entries of `tmp` whose owning process is gone (a pull killed midway)."""
    removed = 0
    for entry in tmp.iterdir():
        if not _owner_alive(entry.name):
            remove(entry)
            removed += 1
    return removed
