"""Events as they happen: NDJSON lines, Server-Sent Events, or WebSocket messages.

Output arrives through synchronous callbacks on the event loop; events are queued and a
pump writes them at the client's pace: while too much waits, the run's pipes are not read
(backpressure down to the run). A stream's HTTP response is prepared with its first event,
so an error before anything was sent is still an ordinary JSON error response."""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import orjson
from aiohttp import web

from sandbox import Streamed

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


def stream_kind(request: web.Request) -> str | None:
    """NDJSON or SSE when the Accept header asks for it (first match wins), else None."""
    for part in request.headers.get("Accept", "").split(","):
        kind = part.split(";")[0].strip().lower()
        if kind in (NDJSON, SSE):
            return kind
    return None


class OutputEncoder:
    """stdout/stderr chunks as JSON strings: UTF-8 decoded incrementally (a character split
    between chunks is kept whole; invalid bytes become U+FFFD), or base64 of exact bytes."""

    def __init__(self, encoding: str) -> None:
        self.base64 = encoding == "base64"
        self._decoders = {name: codecs.getincrementaldecoder("utf-8")(errors="replace")
                          for name in ("stdout", "stderr")}

    def chunk(self, stream: str, data: bytes) -> str:
        if self.base64:
            return base64.b64encode(data).decode()
        return self._decoders[stream].decode(data)

    def tail(self, stream: str) -> str:
        return "" if self.base64 else self._decoders[stream].decode(b"", final=True)

    def whole(self, data: bytes) -> str:
        return base64.b64encode(data).decode() if self.base64 else data.decode(errors="replace")


class EventStream:
    """NDJSON or SSE over one HTTP response, prepared when the first event is sent."""

    def __init__(self, request: web.Request, kind: str) -> None:
        self.request = request
        self.kind = kind
        self.response = web.StreamResponse(status=200, headers={
            "Content-Type": kind + ("; charset=utf-8" if kind == SSE else ""),
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.started = False

    async def send(self, event: str, payload: dict[str, Any], seq: int | None = None) -> None:
        """`seq`: the event's number, SSE's `id:` (a client reconnecting sends the last one
        it saw as Last-Event-ID)."""
        if not self.started:
            self.started = True
            await self.response.prepare(self.request)
        if self.kind == NDJSON:
            line = orjson.dumps({"event": event, **payload}) + b"\n"
        else:
            line = (b"" if seq is None else b"id: %d\n" % seq) + b"event: " + event.encode() \
                + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
        await self.response.write(line)

    async def close(self) -> web.StreamResponse:
        if not self.started:
            self.started = True
            await self.response.prepare(self.request)
        with contextlib.suppress(ConnectionError):
            await self.response.write_eof()
        return self.response


Send = Callable[[str, dict[str, Any]], Awaitable[None]]

# Output queued for a client, in characters as sent: over HIGH_WATER the run's pipes are no
# longer read (the run blocks writing to them) until the client has taken all but LOW_WATER.
# A client that stops reading then holds about this much of the service's memory, and its
# run waits (its wall limit keeps running).
HIGH_WATER = 1 << 20
LOW_WATER = 256 << 10


class Pump:
    """Queues events from synchronous callbacks and sends them in order from one task. If
    sending fails (the client went away), `on_broken` is called once and the rest dropped.

    `put` answers a future while more than `high_water` characters of output wait, resolved
    once they are down to `low_water`: the output callback hands it to the run's pipe
    readers, which stop reading until then."""

    def __init__(self, send: Send, on_broken: Callable[[], None], *,
                 high_water: int = HIGH_WATER, low_water: int = LOW_WATER) -> None:
        self._send = send
        self._on_broken = on_broken
        self._high, self._low = high_water, low_water
        self._queue: asyncio.Queue[tuple[str, dict[str, Any], int] | None] = asyncio.Queue()
        self._queued = 0
        self._below: asyncio.Future[None] | None = None
        self.broken = False
        self._task = asyncio.ensure_future(self._run())

    def put(self, event: str, payload: dict[str, Any],
            size: int = 0) -> asyncio.Future[None] | None:
        """Queue an event of `size` characters of output; while the queue is over its
        high-water mark, a future resolved when it is down to the low one."""
        if self.broken:
            return None
        self._queue.put_nowait((event, payload, size))
        self._queued += size
        if self._queued <= self._high:
            return None
        if self._below is None:
            self._below = asyncio.get_running_loop().create_future()
        return self._below

    def output(self, enc: OutputEncoder) -> Streamed:
        """The output callback of a run whose events this pump sends: the output goes to
        the client only (the run's result keeps none of it)."""
        def on_output(name: str, data: bytes) -> asyncio.Future[None] | None:
            text = enc.chunk(name, data)
            return self.put(name, {"data": text}, len(text))
        return Streamed(on_output)

    def _sent(self, size: int) -> None:
        self._queued -= size
        if self._below is not None and (self._queued <= self._low or self.broken):
            self._below.set_result(None)
            self._below = None

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            event, payload, size = item
            if not self.broken:
                try:
                    await self._send(event, payload)
                except (ConnectionError, RuntimeError):
                    # RuntimeError: aiohttp refuses writes to a closing transport or
                    # WebSocket.
                    self.broken = True
                    self._on_broken()
            self._sent(size)

    async def drain(self) -> None:
        """Send everything queued so far, then stop."""
        self._queue.put_nowait(None)
        await self._task

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._below is not None:
            self._below.set_result(None)
            self._below = None


# How often a stream that may stay silent for long (a build's step, a batch's cases) looks
# whether its client is still there.
GONE_POLL_S = 0.5
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection: nobody is left to tell."""


async def unless_gone(request: web.Request, work: Coroutine[Any, Any, T]) -> T:
    """`work`, cancelled when the client's connection closes: a build's steps or a batch's
    cases may say nothing for minutes, and work nobody waits for must not hold its slots
    and containers until its limits end it."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=GONE_POLL_S)
            transport = request.transport
            if not task.done() and (transport is None or transport.is_closing()):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise ClientGone
        return task.result()
    finally:
        if not task.done():  # we were cancelled: so is the work
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
