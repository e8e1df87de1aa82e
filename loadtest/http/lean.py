"""A lean HTTP/1.1 client for latency figures: one keep-alive connection, blocking calls,
no event loop.

On 2 cores the client shares the CPUs with the service, and every microsecond it spends
on a request lies on that request's path: aiohttp's client costs ~0.37 ms of CPU a
request and http.client's header parser ~0.15 ms, this one ~0.03 ms. Its figures are the
service's latency as a client in C would see it; the benchmarks print aiohttp's beside
them.

It speaks what sandboxd answers a run with (a status line, headers, a Content-Length body)
and refuses anything else rather than guess.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

import orjson

_MAX_HEAD = 64 << 10


class LeanError(Exception):
    pass


class LeanClient:
    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise LeanError(f"{url}: an http://host:port URL is needed")
        self._host = f"{parts.hostname}:{parts.port}"
        self._sock = socket.create_connection((parts.hostname, parts.port), timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> LeanClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, body: bytes = b"",
                content_type: str = "application/json") -> bytes:
        """The request's bytes, made once: send them with `send` as often as needed."""
        return (f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode() + body

    def send(self, request: bytes) -> tuple[int, bytes]:
        """One request and its answer: (status, body)."""
        self._sock.sendall(request)
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > _MAX_HEAD:
                raise LeanError("an answer's head is over 64 KiB")
            self._more()
        head, self._buf = self._buf[:end].decode("latin-1"), self._buf[end + 4:]
        status_line, *lines = head.split("\r\n")
        try:
            status = int(status_line.split(" ", 2)[1])
        except (IndexError, ValueError):
            raise LeanError(f"not an HTTP status line: {status_line[:100]!r}") from None
        length = None
        for line in lines:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                raise LeanError(f"a {value.strip()} answer: this client reads only "
                                "Content-Length bodies")
        if length is None:
            raise LeanError("an answer without Content-Length")
        while len(self._buf) < length:
            self._more()
        body, self._buf = self._buf[:length], self._buf[length:]
        return status, body

    def _more(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise LeanError("the service closed the connection")
        self._buf += data


def run_ok(client: LeanClient, request: bytes) -> dict[str, Any]:
    """One POST /v1/runs (`request`, made by client.request) whose run must end `ok`: its
    result, or LeanError quoting the answer."""
    status, body = client.send(request)
    result = orjson.loads(body) if status == 200 else {}
    if not isinstance(result, dict) or result.get("status") != "ok":
        raise LeanError(f"a warm run answered {status}: {body[:300]!r}")
    return result
