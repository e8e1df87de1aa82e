"""The filtering forward proxy of `proxy` containers, served by the host's event loop.

Each proxy container has a listener on 127.0.0.1:PROXY_PORT of its own network namespace,
made by the spawner's helper and handed to the host (`Gate`): nothing is routed between the
container and the host, no veth, no host port. A run reaches the proxy as HTTP_PROXY /
HTTPS_PROXY; the proxy takes `CONNECT host:port` (HTTPS and anything tunnelled) and
absolute-form `GET http://host[:port]/...` (plain HTTP, one request per connection), checks
the host against the run's allowlist, resolves it itself and connects only to an address
outside the blocked ranges and not the host's own (so a name that resolves, or is rebound,
into a private range or the host's loopback is refused: the address checked is the address
connected to). A refusal is a 403 naming the host and what the operator sets.

Connections belong to the run that was current when they were accepted (`Gate.begin`); its
end (`Gate.end`) closes them all and drops what waits in the listener's backlog, so nothing
of one run's traffic reaches the next run of a warm container. Between runs, a connection is
closed as soon as it is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from sandbox.runtime.network import PROXY, Traffic
from sandbox.runtime.network.rules import Address, Allowlist, Blocked, host_addresses

log = logging.getLogger(__name__)

MAX_HEAD = 16 << 10             # a request's line and headers
HEAD_TIMEOUT_S = 30.0           # to send them
CONNECT_TIMEOUT_S = 10.0        # to reach the upstream
MAX_CONNECTIONS = 64            # open at once per run
OWN_ADDRESSES_TTL_S = 1.0
_HOP_HEADERS = (b"proxy-connection", b"proxy-authorization", b"connection", b"keep-alive")


class Refused(Exception):
    """A request the proxy answers itself: `status` and a message for the sandbox."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


_REASONS = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}


@dataclass
class Proxy:
    """What every proxy container shares: the blocked ranges, and this host's own
    addresses (read again when a second has passed: they change, and reading them for
    every connection cost ~0.3 ms)."""

    blocked: Blocked = field(default_factory=Blocked)
    _own: frozenset[Address] = field(default=frozenset(), init=False)
    _own_at: float = field(default=-OWN_ADDRESSES_TTL_S, init=False)

    def own(self) -> frozenset[Address]:
        now = time.monotonic()
        if now - self._own_at >= OWN_ADDRESSES_TTL_S:
            self._own, self._own_at = host_addresses(), now
        return self._own

    async def resolve(self, host: str, port: int) -> list[Address]:
        """The addresses of `host` a sandbox may reach; Refused (403) when it resolves only
        into blocked ones, (502) when it does not resolve."""
        try:
            found = [ipaddress.ip_address(host)]
        except ValueError:  # a name: the resolver's (in a thread)
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM)
            except socket.gaierror:
                raise Refused(502, f"{host} does not resolve") from None
            found = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        own = self.own()
        allowed = list(dict.fromkeys(a for a in found if not self.blocked.refuses(a, own)))
        if not allowed:
            log.info("proxy: %s resolves only to blocked addresses %s", host, found)
            raise Refused(403, f"{host} resolves to an address sandboxes may not reach "
                               "(a private, loopback or link-local range, or this host's "
                               "own): the operator sets [network] blocked")
        return allowed


class _Run:
    """One run's use of a container's proxy: its allowlist, figures and connections."""

    def __init__(self, allow: Allowlist) -> None:
        self.allow = allow
        self.traffic = Traffic(PROXY)
        self.tasks: set[asyncio.Task[None]] = set()


class Gate:
    """A proxy container's listener, served while the container lives."""

    def __init__(self, proxy: Proxy, listener: socket.socket) -> None:
        self.proxy = proxy
        self.listener = listener
        listener.setblocking(False)
        self.run: _Run | None = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(listener.fileno(), self._accept)

    def begin(self, allow: Allowlist) -> None:
        """Connections accepted from now on are this run's, under `allow`."""
        self._drop_backlog()
        self.run = _Run(allow)

    def figures(self) -> Traffic:
        """The run's figures so far."""
        return Traffic(PROXY) if self.run is None else replace(self.run.traffic)

    def end(self) -> Traffic:
        """The run's figures; its connections closed, any not yet accepted dropped."""
        run, self.run = self.run, None
        self._drop_backlog()
        if run is None:
            return Traffic(PROXY)
        for task in run.tasks:
            task.cancel()
        return run.traffic

    def close(self) -> None:
        self.end()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.listener.fileno())
        self.listener.close()

    def _drop_backlog(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, OSError):
                return
            conn.close()

    def _accept(self) -> None:
        run = self.run
        if run is None:
            self._drop_backlog()
            return
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, OSError):
                return
            if len(run.tasks) >= MAX_CONNECTIONS:  # closed unanswered, counted as denied
                run.traffic.denied += 1
                conn.close()
                continue
            task = self._loop.create_task(self._serve(run, conn))
            run.tasks.add(task)
            task.add_done_callback(run.tasks.discard)
            # A task cancelled before it ran never reaches its own `finally`.
            task.add_done_callback(lambda _, conn=conn: conn.close())

    async def _serve(self, run: _Run, conn: socket.socket) -> None:
        loop = self._loop
        client: _Half | None = None
        upstream: _Half | None = None
        try:
            conn.setblocking(False)
            try:
                async with asyncio.timeout(HEAD_TIMEOUT_S):
                    head, rest = await _read_head(loop, conn)
                upstream, first = await self._open(run, head)
            except Refused as e:
                if e.status == 403:
                    run.traffic.denied += 1
                await _refuse(loop, conn, e.status, str(e))
                return
            except TimeoutError:
                await _refuse(loop, conn, 400, f"no request head within {HEAD_TIMEOUT_S:g} s")
                return
            run.traffic.connections += 1
            client = _Half(run.traffic, sent=True, done=upstream.done)
            client.peer, upstream.peer = upstream, client
            await loop.connect_accepted_socket(lambda: client, conn)
            assert client.transport is not None and upstream.transport is not None
            if first is None:  # CONNECT
                client.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                client.forward(first)
            if rest:  # what the client sent past the head
                client.forward(rest)
            upstream.flush()
            await upstream.done
        except (ConnectionError, OSError):
            pass
        finally:
            for half in (client, upstream):
                if half is not None and half.transport is not None:
                    half.transport.abort()

    async def _open(self, run: _Run, head: bytes) -> tuple[_Half, bytes | None]:
        """The upstream connection for `head` (a checked, resolved, allowed host), and the
        head to send it (None for CONNECT, whose tunnel starts empty)."""
        line, _, rest = head.partition(b"\r\n")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise Refused(400, "not an HTTP/1 request")
        method, target, version = parts
        first: bytes | None = None
        try:
            if method == b"CONNECT":
                url = urlsplit("//" + target.decode("ascii"))
                host, port = url.hostname, url.port
            else:
                url = urlsplit(target.decode("ascii"))
                if url.scheme != "http":
                    raise Refused(400, "give an absolute http:// URL (HTTPS goes through "
                                       "CONNECT: set HTTPS_PROXY)")
                host, port = url.hostname, url.port or 80
                path = url.path or "/"
                if url.query:
                    path += "?" + url.query
                first = b" ".join((method, path.encode("ascii"), version)) + b"\r\n" + \
                    _headers(rest) + b"Connection: close\r\n\r\n"
        except (UnicodeDecodeError, ValueError):
            raise Refused(400, "the request's target is not a valid host:port or URL") \
                from None
        if not host or port is None:
            raise Refused(400, "the request names no host and port")
        if not run.allow.allows(host, port):
            raise Refused(403, f"{host}:{port} is not on this sandbox's allowlist: the "
                               "operator lists hosts in [network] proxy_hosts, or in the "
                               "token's proxy_hosts")
        addresses = await self.proxy.resolve(host, port)
        last: OSError | None = None
        done = self._loop.create_future()
        for address in addresses:
            upstream = _Half(run.traffic, sent=False, done=done)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    await self._loop.create_connection(lambda up=upstream: up, str(address),
                                                       port)
                return upstream, first
            except (OSError, TimeoutError) as e:
                last = e if isinstance(e, OSError) else OSError(f"no answer in "
                                                                f"{CONNECT_TIMEOUT_S:g} s")
        raise Refused(502, f"{host}:{port} could not be reached: {last}")


def _headers(block: bytes) -> bytes:
    """The request's headers without the hop-by-hop ones (the proxy's own and Connection:
    one request per connection, so the upstream closes after its answer)."""
    kept = [h for h in block.split(b"\r\n")
            if h and h.split(b":", 1)[0].strip().lower() not in _HOP_HEADERS]
    return b"".join(h + b"\r\n" for h in kept)


async def _read_head(loop: asyncio.AbstractEventLoop,
                     conn: socket.socket) -> tuple[bytes, bytes]:
    """The request's head (through its blank line) and what came after it; Refused (400)
    when the client stops first or sends more than MAX_HEAD without one."""
    got = b""
    while (end := got.find(b"\r\n\r\n")) < 0:
        if len(got) > MAX_HEAD:
            raise Refused(400, f"the request's head is over {MAX_HEAD} bytes")
        chunk = await loop.sock_recv(conn, MAX_HEAD)
        if not chunk:
            raise Refused(400, "the connection ended before the request's head did")
        got += chunk
    return got[:end + 4], got[end + 4:]


async def _refuse(loop: asyncio.AbstractEventLoop, conn: socket.socket, status: int,
                  message: str) -> None:
    """Answer the proxy's own error and end the connection with a FIN (a reset could
    reach the client before the answer)."""
    body = f"sandboxd proxy: {message}\n".encode()
    await loop.sock_sendall(conn, (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}"
        "\r\nConnection: close\r\n\r\n").encode() + body)
    conn.shutdown(socket.SHUT_WR)


class _Half(asyncio.Protocol):
    """One side of a relayed connection (the sandbox's or the upstream's): what arrives on
    its transport goes out on its peer's, counted; a full peer pauses reading here (the
    kernel's buffers hold the rest), an EOF is passed on as a half-close, and the end of
    either side ends both (`done`)."""

    def __init__(self, traffic: Traffic, *, sent: bool, done: asyncio.Future[None]) -> None:
        self.traffic, self.sent, self.done = traffic, sent, done
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.pending: list[bytes] = []   # arrived before the peer's transport existed
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def forward(self, data: bytes) -> None:
        """`data`, from this side, out on the peer's."""
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)
        if self.sent:
            self.traffic.bytes_sent += len(data)
        else:
            self.traffic.bytes_received += len(data)

    def flush(self) -> None:
        for data in self.pending:
            self.forward(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.pending.append(data)
        else:
            self.forward(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer is None or peer.eof:
            self._end()
        return True  # the other direction may still be going

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
