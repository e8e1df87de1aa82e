"""A fault-injecting HTTP proxy in front of a registry, for tests of retries and checks.

It listens on 127.0.0.1 and forwards each request to the upstream registry, one request per
connection (every answer says `Connection: close`, which keeps a reset or a short body
unambiguous). `inject(method, path_regex, faults)` queues faults: each request that matches
takes the next fault of the earliest rule with faults left; requests pass through untouched
once the queue is empty. The proxy runs on its own event loop in a background thread, so
sync and async tests can both use it.
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

from sandbox.localregistry import LocalRegistry

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
    """Answer with this status, headers and body instead of asking the upstream."""

    code: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


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
class Corrupt:
    """Pass the upstream's answer with one byte of its body flipped (the middle one)."""


@dataclass(frozen=True)
class NoRange:
    """Drop the request's Range header: the upstream answers 200 with the whole body."""


Fault = Status | ResetAfter | Truncate | Corrupt | NoRange


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
    answered, path without its query string; faulted ones included."""

    def __init__(self, upstream: LocalRegistry | str, *, ca_file: str | None = None) -> None:
        if isinstance(upstream, LocalRegistry):
            ca_file = str(upstream.ca_file) if upstream.ca_file else ca_file
            upstream = upstream.url
        self.upstream = upstream.rstrip("/")
        self.requests: list[tuple[str, str, int]] = []
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
        self.host = f"127.0.0.1:{port}"
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

    async def _start(self) -> int:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=IO_TIMEOUT_S,
                                          sock_read=IO_TIMEOUT_S),
            connector=aiohttp.TCPConnector(force_close=True))
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0,
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
        if isinstance(fault, Status):
            self._record(request.method, request.path, fault.code)
            headers = [(k, v) for k, v in fault.headers.items()
                       if k.lower() not in HOP_HEADERS]
            await _send_head(writer, fault.code, headers, len(fault.body))
            if request.method != "HEAD":
                writer.write(fault.body)
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
            await _send_head(writer, resp.status, out_headers,
                             length if length is not None else 0)
            if request.method == "HEAD":
                return
            await self._relay(resp, body, length or 0, fault, writer)

    async def _relay(self, resp: aiohttp.ClientResponse, body: bytes | None, length: int,
                     fault: Fault | None, writer: asyncio.StreamWriter) -> None:
        limit = fault.nbytes if isinstance(fault, ResetAfter | Truncate) else length
        flip_at = length // 2 if isinstance(fault, Corrupt) else -1
        sent = 0
        chunks = [body] if body is not None else None
        while sent < limit:
            if chunks is not None:
                chunk = chunks.pop() if chunks else b""
            else:
                chunk = await resp.content.read(CHUNK)
            if not chunk:
                break
            chunk = chunk[:limit - sent]
            if sent <= flip_at < sent + len(chunk):
                i = flip_at - sent
                chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1:]
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
        if isinstance(fault, ResetAfter):
            # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


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
                     headers: list[tuple[str, str]], length: int) -> None:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Status"
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {length}", "Connection: close", "", ""]
    writer.write("\r\n".join(lines).encode("latin-1"))
    await writer.drain()
