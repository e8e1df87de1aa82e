"""Forwarding a request to the node that owns its session or job: HTTP (bodies and streamed
answers relayed as they come) and the exec WebSocket (messages relayed both ways)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from service.api import STATE
from service.cluster.routing import Owner, owner_of
from service.config import ServiceConfig
from service.errors import ApiError, Handler
from service.logs import HEADER as REQUEST_ID_HEADER
from service.logs import current_request_id
from service.metrics import Gauge, Labels
from service.streaming import NDJSON, SSE, ClientGone, unless_gone

log = logging.getLogger("sandboxd.service")

# Set by the node that forwards a request (its name): the owner serves it and never sends
# it on. A client setting it only gets its own node's answer.
FORWARDED_BY = "Sandboxd-Forwarded-By"
# On every answer of a node with a name: the node that served it (the owner, through a
# forward).
NODE_HEADER = "Sandboxd-Node"
# Headers of one connection, not of the request (RFC 9110 7.6.1; Expect: this node already
# answered it), and what aiohttp sets itself for the connection it makes or the response
# it sends.
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate",
                         "proxy-authorization", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "expect", "host", "date", "server"))
_CHUNK = 1 << 16
_HEARTBEAT_S = 30.0
# What a peer's refusal of a WebSocket becomes here (its JSON body is not given to a
# WebSocket client).
_REFUSED = {401: "unauthorized", 403: "forbidden", 404: "not_found", 429: "over_capacity",
            503: "unavailable"}

# A peer machine that vanishes (powered off, cut off) sends no reset: without probes a
# request it was answering would wait for ever. Probed after this long silent, every
# interval, given up after that many unanswered (or data unacknowledged as long): about
# 25 s. A peer that is alive answers probes from its kernel, so a quiet run is never cut.
_PROBE_IDLE_S, _PROBE_INTERVAL_S, _PROBES = 10, 5, 3


def _probed_socket(addr: tuple[int, int, int, str, tuple[Any, ...]]) -> socket.socket:
    """A socket for `addr` (getaddrinfo's family, type, protocol...), probed when silent."""
    family, type_, proto, _, _ = addr
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, _PROBE_IDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, _PROBE_INTERVAL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                    1000 * (_PROBE_IDLE_S + _PROBE_INTERVAL_S * _PROBES))
    return sock


# Close codes that only report what happened to a connection, never sent (RFC 6455 7.4.1).
_NOT_SENT = frozenset((1005, 1006, 1015))

Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


class _OwnerLost(Exception):
    """The owner's answer broke off (its cause: aiohttp's error)."""


def node_gone(owner: Owner) -> ApiError:
    return ApiError(410, "node_gone", f"id: {owner.id[:128]!r} lives on node {owner.node}, "
                    "which cannot be reached: its sessions ended with it (create a new one); "
                    "its jobs are back if it comes back with its state, else submit them "
                    "again", "id")


def _lost_event(content_type: str, tail: bytes, owner: Owner) -> bytes | None:
    """The `error` event that ends a stream of events whose owner went away mid-stream, as
    the owner itself ends a stream on an error; None when the answer is not a stream of
    events, or was cut within an event (then only cutting the connection says so)."""
    body = node_gone(owner).body()
    if content_type == NDJSON and tail[-1:] in (b"", b"\n"):
        return orjson.dumps({"event": "error", **body}) + b"\n"
    if content_type == SSE and tail in (b"", b"\n\n"):
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"
    return None


def _end_to_end(headers: MultiMapping[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        if key.lower() not in _HOP_BY_HOP:
            out.add(key, value)
    return out


class Forwarder:
    """One client session to every peer, for the life of the service."""

    def __init__(self, config: ServiceConfig) -> None:
        self.cluster = config.cluster
        self._max_msg = config.limits.json_body_bytes
        self._session: aiohttp.ClientSession | None = None
        # By outcome only: a caller names any node it likes in an id.
        self._counts = {"forwarded": 0, "node_gone": 0}

    def metric(self) -> Gauge:
        def read() -> list[tuple[Labels, float]]:
            return [((("outcome", k),), float(v)) for k, v in self._counts.items()]
        return Gauge("sandboxd_forwarded_requests_total", "Requests for another node's "
                     "session or job, sent there (forwarded) or not (node_gone: it could "
                     "not be reached).", read, "counter")

    def _gone(self, owner: Owner) -> ApiError:
        self._counts["node_gone"] += 1
        return node_gone(owner)

    async def start(self, app: web.Application) -> None:
        if self.cluster.node is None:
            return
        wait = self.cluster.connect_timeout_s
        self._session = aiohttp.ClientSession(
            # No cap on connections: a request waiting for a pooled one would count that
            # wait against its connect timeout, and a busy peer would pass for a lost one.
            connector=aiohttp.TCPConnector(limit=0, socket_factory=_probed_socket),
            # Only connecting is bounded: once the owner has the request, its own limits
            # (a run's wall time, a stream's events) say how long the answer takes.
            timeout=aiohttp.ClientTimeout(total=None, connect=wait, sock_connect=wait),
            # Bodies pass through as the owner encoded them; no cookie of one caller is
            # kept for the next; no proxy from the environment sees the tokens.
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)

    async def close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, request: web.Request) -> CIMultiDict[str]:
        headers = _end_to_end(request.headers)
        assert self.cluster.node is not None
        headers[FORWARDED_BY] = self.cluster.node
        # One id follows the request: the owner takes this node's (the client's, or made
        # here when the client's was missing or refused).
        if (request_id := current_request_id()) is not None:
            headers[REQUEST_ID_HEADER] = request_id
        return headers

    async def forward(self, request: web.Request, owner: Owner) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, owner)
        assert self._session is not None, "Forwarder.start() first"
        body = request.content.iter_chunked(_CHUNK) if request.body_exists else None
        try:
            upstream = await self._session.request(
                request.method, URL(owner.url + request.raw_path, encoded=True),
                headers=self._headers(request), data=body, allow_redirects=False)
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            log.warning("node %s is gone (%s %s): %s", owner.node, request.method,
                        request.path, e)
            raise self._gone(owner) from None
        self._counts["forwarded"] += 1
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                          headers=_end_to_end(upstream.headers))
            await response.prepare(request)

            tail = b""   # the last two bytes sent: does an event end there?

            async def relay() -> None:
                nonlocal tail
                while True:
                    try:
                        chunk = await upstream.content.readany()
                    except aiohttp.ClientError as e:
                        # Told apart from the client's side: aiohttp's error for a write
                        # to a closed client connection is a ClientError too.
                        raise _OwnerLost(e) from e
                    if not chunk:
                        return
                    await response.write(chunk)
                    tail = (tail + chunk)[-2:]

            try:
                # A stream may be silent for long (a job's events): a client gone
                # meanwhile is noticed, and the owner sees its connection close.
                await unless_gone(request, relay())
            except _OwnerLost as e:
                # The owner went away mid-answer. A stream of events ends with an error
                # event; anything else is cut before the end of its body, so that no client
                # takes what it got for the whole of it.
                log.warning("node %s went away while answering %s %s: %s", owner.node,
                            request.method, request.path, e.__cause__)
                ending = _lost_event(upstream.content_type, tail, owner)
                if ending is None:
                    if request.transport is not None:
                        request.transport.close()
                    return response
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await response.write(ending)
                    await response.write_eof()
                return response
            except (ClientGone, ConnectionError, RuntimeError, aiohttp.ClientError):
                return response  # the client went away (a write to it failed)
            await response.write_eof()
        return response

    async def _websocket(self, request: web.Request, owner: Owner) -> web.StreamResponse:
        assert self._session is not None, "Forwarder.start() first"
        headers = self._headers(request)
        for key in [k for k in headers if k.lower().startswith("sec-websocket-")]:
            del headers[key]   # the connection's own handshake: aiohttp makes its own
        try:
            upstream = await self._session.ws_connect(
                URL(owner.url + request.raw_path, encoded=True), headers=headers,
                heartbeat=_HEARTBEAT_S, max_msg_size=self._max_msg)
        except aiohttp.WSServerHandshakeError as e:
            self._counts["forwarded"] += 1   # the owner answered: with a refusal
            if e.status == 404:
                raise ApiError(404, "not_found", f"no container {owner.id[:128]!r}: it was "
                               "deleted, expired, or never existed") from None
            code = _REFUSED.get(e.status, "internal_error" if e.status >= 500
                                else "invalid_request")
            raise ApiError(e.status, code, f"node {owner.node} refused the WebSocket: "
                           f"{e.status} {e.message}") from None
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            log.warning("node %s is gone (WebSocket %s): %s", owner.node, request.path, e)
            raise self._gone(owner) from None
        self._counts["forwarded"] += 1
        st = request.app[STATE]
        ws = web.WebSocketResponse(heartbeat=_HEARTBEAT_S, max_msg_size=self._max_msg)
        try:
            await ws.prepare(request)
            st.websockets.add(ws)   # closed by the shutdown, as the node's own are
            await _relay(ws, upstream, owner)
        finally:
            st.websockets.discard(ws)
            await upstream.close()
            await ws.close()
        return ws


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pipe(source: WebSocket, sink: WebSocket) -> None:
    """Messages from `source` to `sink` until `source` closes (or fails)."""
    async for msg in source:
        if msg.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type == aiohttp.WSMsgType.ERROR:
            break


def _sendable(code: int | None) -> int | None:
    """`code` to pass on, None when the connection vanished without a close."""
    return None if code is None or code in _NOT_SENT else code


async def _relay(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                 owner: Owner) -> None:
    """Both ways until either side closes; then the other is closed the same way. Closing
    happens once both pipes have stopped: a close waits for its peer's answer, which a
    pipe still reading that socket would take."""
    down = asyncio.ensure_future(_pipe(upstream, client))
    up = asyncio.ensure_future(_pipe(client, upstream))
    try:
        await asyncio.wait({down, up}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (down, up):
            task.cancel()
        for result in await asyncio.gather(down, up, return_exceptions=True):
            if isinstance(result, Exception) and not isinstance(
                    result, ConnectionError | RuntimeError | aiohttp.ClientError):
                raise result
    with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
        if upstream.closed:   # the owner ended it, or vanished
            code = _sendable(upstream.close_code)
            if code is None:   # told as the owner itself reports a failed run
                await client.send_str(orjson.dumps({"event": "error",
                                                    **node_gone(owner).body()}).decode())
            await client.close(code=code or aiohttp.WSCloseCode.INTERNAL_ERROR)
        else:
            await upstream.close(code=_sendable(client.close_code)
                                 or aiohttp.WSCloseCode.GOING_AWAY)


def cluster_middleware(forwarder: Forwarder) -> Middleware:
    """Requests for another node's session or job go there; the rest are served here."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        owner = owner_of(request, forwarder.cluster, FORWARDED_BY in request.headers)
        if owner is None:
            return await handler(request)
        return await forwarder.forward(request, owner)

    return middleware
