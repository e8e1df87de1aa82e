"""Events as they happen: NDJSON lines, Server-Sent Events, or WebSocket messages.

Output arrives through synchronous callbacks on the event loop; events are queued and a
pump writes them. A stream's HTTP response is prepared with its first event, so an error
before anything was sent is still an ordinary JSON error response."""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

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

    async def send(self, event: str, payload: dict[str, Any]) -> None:
        if not self.started:
            self.started = True
            await self.response.prepare(self.request)
        if self.kind == NDJSON:
            line = orjson.dumps({"event": event, **payload}) + b"\n"
        else:
            line = b"event: " + event.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
        await self.response.write(line)

    async def close(self) -> web.StreamResponse:
        if not self.started:
            self.started = True
            await self.response.prepare(self.request)
        with contextlib.suppress(ConnectionError):
            await self.response.write_eof()
        return self.response


Send = Callable[[str, dict[str, Any]], Awaitable[None]]


class Pump:
    """Queues events from synchronous callbacks and sends them in order from one task. If
    sending fails (the client went away), `on_broken` is called once and the rest dropped."""

    def __init__(self, send: Send, on_broken: Callable[[], None]) -> None:
        self._send = send
        self._on_broken = on_broken
        self._queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = asyncio.Queue()
        self.broken = False
        self._task = asyncio.ensure_future(self._run())

    def put(self, event: str, payload: dict[str, Any]) -> None:
        if not self.broken:
            self._queue.put_nowait((event, payload))

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            if self.broken:
                continue
            try:
                await self._send(*item)
            except (ConnectionError, RuntimeError):
                # RuntimeError: aiohttp refuses writes to a closing transport or WebSocket.
                self.broken = True
                self._on_broken()

    async def drain(self) -> None:
        """Send everything queued so far, then stop."""
        self._queue.put_nowait(None)
        await self._task

    async def cancel(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
