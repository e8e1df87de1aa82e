"""Giving the C allocator's free memory back to the system while the service is idle.

glibc's malloc keeps what a burst of requests freed, in its brk heap and per-thread arenas,
for the next burst; by itself it returns only a free stretch at the top of the heap. Free
pages below a live allocation stay resident, so the service's RSS crept over the soak
(docs/reliability.md) while Python's live heap stayed flat. malloc_trim(0) returns every
whole free page of every arena. It runs only when no request is in flight and some were
served since the last trim, at most every TRIM_GAP_S: a busy service never trims, and a
request arriving during a trim waits for at most one.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import time
from collections.abc import Callable

from aiohttp import web

TICK_S = 1.0
TRIM_GAP_S = 10.0


def malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0), or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except AttributeError:
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class IdleTrim:
    """malloc_trim(0) once the service is idle after serving requests. `busy`: whether
    any request is in flight; looked at every `tick_s`, a trim at most every `gap_s`."""

    def __init__(self, busy: Callable[[], bool], *, tick_s: float = TICK_S,
                 gap_s: float = TRIM_GAP_S) -> None:
        self.busy = busy
        self.tick_s = tick_s
        self.gap_s = gap_s
        self.trim = malloc_trim()
        self.served = False
        self.last = -gap_s
        self.task: asyncio.Task[None] | None = None

    async def note(self, _request: web.Request, _response: web.StreamResponse) -> None:
        """An on_response_prepare hook: a request was served."""
        self.served = True

    async def start(self, _app: web.Application) -> None:
        if self.trim is not None:
            self.task = asyncio.ensure_future(self._watch())

    async def close(self, _app: web.Application) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _watch(self) -> None:
        assert self.trim is not None
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            if self.served and now - self.last >= self.gap_s and not self.busy():
                self.served = False
                self.last = now
                self.trim()
