"""A fault-injecting HTTP proxy in front of a registry, for tests of retries and checks.

It listens on 127.0.0.1 and forwards each request to the upstream registry, one request per
connection (every answer says `Connection: close`, which keeps a reset or a short body
unambiguous). `inject(method, path_regex, faults)` queues faults: each request that matches
takes the next fault of the earliest rule with faults left; requests pass through untouched
once the queue is empty. The proxy runs on its own event loop in a background thread, so
sync and async tests can both use it.

Besides the faults of a flaky network it has a hostile registry's: bodies longer or shorter
than the descriptor says (`Pad`, `Shorten`), redirects anywhere (`Redirect`), any status,
reason phrase and body (`Status`). `connections` counts the connections it accepted and `sent`
the body bytes it wrote per answer, so a test can tell that a client never came, or stopped
reading early.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType

import aiohttp

from testbed.registry import LocalRegistry

HEAD_LIMIT = 64 * 1024
BODY_LIMIT = 256 * 1024 * 1024
IO_TIMEOUT_S = 30.0
THREAD_TIMEOUT_S = 10.0
CHUNK = 64 * 1024
# Never forwarded in either direction: they describe one hop, not the message.
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                         "proxy-authorization", "te", "trailer", "transfer-encoding",
                         "upgrade", "expect", "content-length"})


@dataclass(frozen=True)
class Status:
    """Answer with this status, headers and body instead of asking the upstream; `reason`
    replaces the status line's standard phrase."""

    code: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    reason: str | None = None


@dataclass(frozen=True)
class Redirect:
    """Answer `code` with a Location of `base` (scheme://host:port) followed by the request's
    own path and query: the same request, sent to another server."""

    code: int
    base: str


@dataclass(frozen=True)
class ResetAfter:
    """Send the upstream's headers and `nbytes` of its body, then reset the connection."""

    nbytes: int


@dataclass(frozen=True)
class Truncate:
    """Send the upstream's headers (full Content-Length) and only `nbytes` of its body, then
    close the connection cleanly."""

    nbytes: int


@dataclass(frozen=True)
class Pad:
    """Pass the upstream's answer with `nbytes` spaces after its body. `declared`: the
    Content-Length counts them; else the answer has none and ends when the connection does."""

    nbytes: int
    declared: bool = True


@dataclass(frozen=True)
class Shorten:
    """Pass only the first `nbytes` of the upstream's body, with a Content-Length that says
    so: a complete answer, shorter than the resource."""

    nbytes: int


@dataclass(frozen=True)
class Corrupt:
    """Pass the upstream's answer with one byte of its body flipped (the middle one)."""


@dataclass(frozen=True)
class NoRange:
    """Drop the request's Range header: the upstream answers 200 with the whole body."""


@dataclass(frozen=True)
class Slow:
    """Pass the upstream's answer `nbytes` at a time, pausing `pause_s` before each piece: a
    slow link, or a registry slow to serve (combined with a registry stopped meanwhile, a
    download cut off midway)."""

    nbytes: int
    pause_s: float


Fault = Status | Redirect | ResetAfter | Truncate | Pad | Shorten | Corrupt | NoRange | Slow


@dataclass
class _Rule:
    method: str
    pattern: re.Pattern[str]
    faults: list[Fault]


@dataclass
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


class ProxyError(Exception):
    """A client sent the proxy something it cannot forward."""


class FaultProxy:
    """See the module docstring. `requests` lists (method, path, status) of every request
    answered, path without its query string; faulted ones included. `sent` lists (method,
    path, body bytes written) of the same answers, `connections` how many were accepted.
    `bind` is the address to listen on (any of 127.0.0.0/8, or one of this machine's);
    `send_buffer` caps each connection's kernel send buffer (SO_SNDBUF), which otherwise
    grows to megabytes and hides how early a client stopped reading."""

    def __init__(self, upstream: LocalRegistry | str, *, ca_file: str | None = None,
                 bind: str = "127.0.0.1", send_buffer: int | None = None) -> None:
        if isinstance(upstream, LocalRegistry):
            ca_file = str(upstream.ca_file) if upstream.ca_file else ca_file
            upstream = upstream.url
        self.upstream = upstream.rstrip("/")
        self.requests: list[tuple[str, str, int]] = []
        self.sent: list[tuple[str, str, int]] = []
        self.connections = 0
        self._bind = bind
        self._send_buffer = send_buffer
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy",
                                        daemon=True)
        self._thread.start()
        try:
            port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(
                timeout=THREAD_TIMEOUT_S)
        except BaseException:
            self._stop_loop()
            raise
        self.port = port
        self.host = f"{bind}:{port}" if ":" not in bind else f"[{bind}]:{port}"
        self.url = f"http://{self.host}"

    def inject(self, method: str, path_regex: str, faults: list[Fault]) -> None:
        """Queue `faults` for requests whose method is `method` ("*" for any) and whose path
        (no query string) matches `path_regex` (re.search)."""
        with self._lock:
            self._rules.append(_Rule(method.upper(), re.compile(path_regex), list(faults)))

    def pending(self) -> int:
        """How many injected faults have not been used yet."""
        with self._lock:
            return sum(len(r.faults) for r in self._rules)

    def settle(self) -> None:
        """Wait until every connection accepted so far is done with (answered, or its client
        gone), so that `requests` and `sent` are complete."""
        async def idle() -> None:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        asyncio.run_coroutine_threadsafe(idle(), self._loop).result(timeout=IO_TIMEOUT_S)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._aclose(), self._loop).result(
                timeout=THREAD_TIMEOUT_S)
        self._stop_loop()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=THREAD_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for rule in self._rules:
                if rule.faults and rule.method in ("*", method) and rule.pattern.search(path):
                    return rule.faults.pop(0)
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def _record_sent(self, request: _Request, nbytes: int) -> None:
        with self._lock:
            self.sent.append((request.method, request.path, nbytes))

    async def _start(self) -> int:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=IO_TIMEOUT_S,
                                          sock_read=IO_TIMEOUT_S),
            connector=aiohttp.TCPConnector(force_close=True))
        self._server = await asyncio.start_server(self._serve, self._bind, 0,
                                                  limit=HEAD_LIMIT)
        return int(self._server.sockets[0].getsockname()[1])

    async def _aclose(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._session.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        with self._lock:
            self.connections += 1
        sock = writer.get_extra_info("socket")
        if self._send_buffer is not None and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_buffer)
        try:
            try:
                request = await asyncio.wait_for(_read_request(reader, writer), IO_TIMEOUT_S)
            except (ProxyError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError) as e:
                message = f"proxy: bad request: {e}".encode()
                await _send_head(writer, 400, [("Content-Type", "text/plain")], len(message))
                writer.write(message)
                return
            await self._answer(request, writer)
        except (OSError, TimeoutError, aiohttp.ClientError, TLSHello):
            # The upstream or the client went away, or the client spoke TLS: drop it.
            writer.transport.abort()
        finally:
            if task is not None:
                self._tasks.discard(task)
            if not writer.transport.is_closing():
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(writer.drain(), IO_TIMEOUT_S)
                writer.close()

    async def _answer(self, request: _Request, writer: asyncio.StreamWriter) -> None:
        fault = self._take_fault(request.method, request.path)
        if isinstance(fault, Redirect):
            fault = Status(fault.code, {"Location": fault.base.rstrip("/") + request.target})
        if isinstance(fault, Status):
            self._record(request.method, request.path, fault.code)
            headers = [(k, v) for k, v in fault.headers.items()
                       if k.lower() not in HOP_HEADERS]
            await _send_head(writer, fault.code, headers, len(fault.body), fault.reason)
            if request.method != "HEAD":
                writer.write(fault.body)
                self._record_sent(request, len(fault.body))
            return
        headers = [(k, v) for k, v in request.headers
                   if k.lower() not in HOP_HEADERS and not k.lower().startswith("x-forwarded-")]
        # The client's Host stays, so the registry's upload Locations point back at us.
        headers.append(("X-Forwarded-Proto", "http"))
        if isinstance(fault, NoRange):
            headers = [(k, v) for k, v in headers if k.lower() != "range"]
        async with self._session.request(
                request.method, self.upstream + request.target, headers=headers,
                data=request.body if request.method not in ("GET", "HEAD") else None,
                allow_redirects=False, ssl=self._ssl,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type")) as resp:
            out_headers = [(k.decode("latin-1"), v.decode("latin-1"))
                           for k, v in resp.raw_headers
                           if k.decode("latin-1").lower() not in HOP_HEADERS]
            length = resp.content_length
            body: bytes | None = None
            if length is None and request.method != "HEAD" and resp.status not in (204, 304):
                body = await resp.content.read(BODY_LIMIT)
                length = len(body)
            self._record(request.method, request.path, resp.status)
            length = length or 0
            declared: int | None = length
            if isinstance(fault, Pad):
                declared = length + fault.nbytes if fault.declared else None
            elif isinstance(fault, Shorten):
                declared = min(length, fault.nbytes)
            await _send_head(writer, resp.status, out_headers, declared)
            if request.method == "HEAD":
                return
            counted = _Counted(writer)
            try:
                await self._relay(resp, body, length, fault, counted)
            finally:
                self._record_sent(request, counted.sent)

    async def _relay(self, resp: aiohttp.ClientResponse, body: bytes | None, length: int,
                     fault: Fault | None, counted: _Counted) -> None:
        limit = fault.nbytes if isinstance(fault, ResetAfter | Truncate | Shorten) else length
        flip_at = length // 2 if isinstance(fault, Corrupt) else -1
        chunks = [body] if body is not None else None
        step = fault.nbytes if isinstance(fault, Slow) else CHUNK
        while counted.sent < limit:
            if chunks is not None:
                chunk = chunks.pop() if chunks else b""
            else:
                chunk = await resp.content.read(step)
            if not chunk:
                break
            if isinstance(fault, Slow):
                await asyncio.sleep(fault.pause_s)
            chunk = chunk[:limit - counted.sent]
            if counted.sent <= flip_at < counted.sent + len(chunk):
                i = flip_at - counted.sent
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
            await counted.write(chunk)
        if isinstance(fault, Pad):
            left = fault.nbytes
            while left > 0:
                await counted.write(b" " * min(CHUNK, left))
                left -= CHUNK
        if isinstance(fault, ResetAfter):
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            sock = counted.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            counted.writer.transport.abort()


class _Counted:
    """Writes to a stream, counting the bytes the connection took (written and drained): what
    the client read plus at most the socket buffers' worth."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.sent = 0

    async def write(self, chunk: bytes) -> None:
        self.writer.write(chunk)
        await self.writer.drain()
        self.sent += len(chunk)


class TLSHello(Exception):
    """A client tried TLS on the proxy's plain-HTTP port."""


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                        ) -> _Request:
    first = await reader.readexactly(1)
    if first == b"\x16":
        # A TLS handshake record: clients of "insecure" registries try HTTPS first and fall
        # back to HTTP at once when the connection drops, but wait out a silent server.
        raise TLSHello
    head = first + await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise ProxyError(f"not an origin-form HTTP/1.x request line: {lines[0][:200]!r}")
    method, target = parts[0].upper(), parts[1]
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ProxyError(f"malformed header line: {line[:200]!r}")
        headers.append((name, value.strip()))
    fields = {k.lower(): v for k, v in headers}
    if fields.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if "chunked" in fields.get("transfer-encoding", "").lower():
        body = await _read_chunked(reader)
    else:
        size = int(fields.get("content-length", "0"))
        if not 0 <= size <= BODY_LIMIT:
            raise ProxyError(f"request body of {size} bytes is over the proxy's limit")
        body = await reader.readexactly(size)
    return _Request(method, target, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
        total += size
        if total > BODY_LIMIT:
            raise ProxyError("chunked request body is over the proxy's limit")
        if size == 0:
            # Trailers end with an empty line.
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


async def _send_head(writer: asyncio.StreamWriter, status: int,
                     headers: list[tuple[str, str]], length: int | None,
                     reason: str | None = None) -> None:
    """The status line and headers; no Content-Length when `length` is None (the body then
    ends with the connection)."""
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Status"
    framing = [f"Content-Length: {length}"] if length is not None else []
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers),
             *framing, "Connection: close", "", ""]
    writer.write("\r\n".join(lines).encode("latin-1"))
    await writer.drain()
