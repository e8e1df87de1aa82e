"""A run's output: the pipes its stdout and stderr write to (or its terminal's master, see
pty.py), read by this process's event loop as bytes arrive (so the output limit is exact and
the partial output is kept), and handed to the caller's callback, whose pace holds back the
run and not this process.

A pipe nobody streams need not be watched from the start: what a short run writes waits in
the pipe (64 KiB) and is read in one go when the run ends (PipeReader.writers_gone), which
spares the event loop a wake-up at each write and at the writers' exit, and spares the run's
own CPU the service's thread woken onto it (a pipe write wakes its reader on the writer's
CPU)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
from collections.abc import Awaitable, Callable

# Called with each chunk of a run's output as it is read. An awaitable answered means "no
# more for now": that pipe is not read again until it completes, so the run blocks writing
# to its full pipe (its wall limit keeps running): a slow consumer slows its own run.
OutputCallback = Callable[[str, bytes], Awaitable[object] | None]

_DRAIN_TIMEOUT_S = 2.0
# What a pty's master may still hold once the run is over (its flip buffers, 64 KiB at most,
# and the line discipline's 4 KiB), read to the end whatever the consumer's pace.
_PTY_HELD = 128 << 10


class Streamed:
    """An output callback that takes the output for good (e.g. to a client's stream): the
    run's result then holds none of it (stdout and stderr empty; the truncation flags still
    tell), so a streamed run's output is not also kept in memory until it ends."""

    def __init__(self, callback: OutputCallback) -> None:
        self.callback = callback

    def __call__(self, name: str, data: bytes) -> Awaitable[object] | None:
        return self.callback(name, data)


class PipeReader:
    """Collects one output pipe (or a terminal's master), up to a cap, as the event loop sees
    data, and pauses while the consumer asks it to (see OutputCallback). EOF, or EIO from a
    master whose slave every process has closed, is the end."""

    def __init__(self, name: str, fd: int, cap: int | None, on_data: OutputCallback | None,
                 on_overflow: Callable[[], None], done: asyncio.Future[None]) -> None:
        self.name, self.fd, self.cap = name, fd, cap
        self.buf = bytearray()
        self.size = 0    # bytes read (the cap counts these; `buf` may keep none)
        self.truncated = False
        self.on_data, self.on_overflow, self.done = on_data, on_overflow, done
        self._keep = not isinstance(on_data, Streamed)
        self._paused = False
        self._watched = False   # the event loop reads it as data comes (watch)
        self._free = 0   # bytes that may be read whatever the consumer says

    def watch(self) -> None:
        """Read it as data comes from now on (a no-op once watched, while paused, or done)."""
        if not (self._watched or self._paused or self.done.done()):
            self._watched = True
            asyncio.get_running_loop().add_reader(self.fd, self.readable)

    def readable(self) -> None:
        self._read()

    def _read(self) -> bool:
        """One read, and what it read handled; False when it found nothing (EAGAIN), ended
        the reader or paused it."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            self.finish()
            return False
        if self.cap is not None and self.size + len(chunk) > self.cap:
            chunk = chunk[: self.cap - self.size]
            self.truncated = True
        if chunk:
            self.size += len(chunk)
            if self._keep:
                self.buf += chunk
            if self.on_data:
                wait = self.on_data(self.name, chunk)
                if wait is not None:
                    self._hold(wait, len(chunk))
        if self.truncated:
            self.on_overflow()
            self.finish()
        return not (self._paused or self.done.done())

    def _hold(self, wait: Awaitable[object], size: int) -> None:
        later = asyncio.ensure_future(wait)
        if later.done() or self.done.done():
            return
        if self._free >= size:
            self._free -= size
            return
        self._paused, self._watched = True, False
        asyncio.get_running_loop().remove_reader(self.fd)
        later.add_done_callback(lambda _: self._resume())

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            self.watch()

    def writers_gone(self) -> None:
        """The run is over: what its pipe still holds (at most the pipe's size) is read to
        EOF whatever the consumer says, so a slow one still gets the end of the output. An
        unwatched pipe is read at once, to its end when no writer is left (no wake-up)."""
        if not (self._watched or self._paused):
            self._free = sys.maxsize   # this much is the pipe's now, as below
            while self._read():
                pass
        if self.done.done():
            return
        try:
            self._free = fcntl.fcntl(self.fd, fcntl.F_GETPIPE_SZ)
        except OSError:  # not a pipe: a terminal's master
            self._free = _PTY_HELD
        self._resume()
        self.watch()

    def finish(self) -> None:
        if not self.done.done():
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.done.set_result(None)


def open_output(readers: list[PipeReader], cap: int | None, on_output: OutputCallback | None,
                on_overflow: Callable[[], None],
                names: tuple[str, ...] = ("stdout", "stderr"), *, watch: bool = True
                ) -> list[int]:
    """Pipes for `names` (stdout and stderr), read by the event loop (from now on with
    `watch`, else once watched or once the writers are gone), their readers added to
    `readers` as they are made; returns the write ends."""
    ends = []
    for name in names:
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(r, False)
        ends.append(w)
        read_output(readers, name, r, cap, on_output, on_overflow, watch=watch)
    return ends


def read_output(readers: list[PipeReader], name: str, fd: int, cap: int | None,
                on_output: OutputCallback | None, on_overflow: Callable[[], None], *,
                watch: bool = True) -> None:
    """Read `fd` (non-blocking; the reader closes it at its end) as the output `name`."""
    reader = PipeReader(name, fd, cap, on_output, on_overflow,
                        asyncio.get_running_loop().create_future())
    readers.append(reader)
    if watch:
        reader.watch()


async def drain(readers: list[PipeReader], warnings: list[str]) -> None:
    """Wait for both pipes to reach EOF; every writer is dead by now, unless one handed its
    descriptor to a process outside the run."""
    for r in readers:
        r.writers_gone()
    # Usually read to their end just now: then nothing is awaited, since gathering futures
    # already done still costs the event loop two turns (their callbacks, then the
    # gather's own) before the run's result can go out.
    if not (pending := [r.done for r in readers if not r.done.done()]):
        return
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the pipes close.
        async with asyncio.timeout(_DRAIN_TIMEOUT_S):
            await asyncio.gather(*pending)
    except TimeoutError:
        warnings.append("output pipes stayed open after the run ended; output cut there")
        for r in readers:
            r.finish()
