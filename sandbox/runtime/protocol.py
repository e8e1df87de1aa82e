"""Messages between the host side, the spawner and a container's init.

Each message is one SOCK_SEQPACKET datagram holding a JSON object, with file descriptors
attached by SCM_RIGHTS. Datagrams keep message boundaries, so no framing is needed, and a
peer that dies shows up as an empty read.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Any

import orjson

MAX_MESSAGE = 1 << 20
MAX_FDS = 32
SOCKET_BUFFER = 4 << 20


class ProtocolError(Exception):
    """A peer sent something that is not a well-formed message."""


def socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    return a, b


def send(sock: socket.socket, message: dict[str, Any],
         fds: list[int] | tuple[int, ...] = ()) -> None:
    data = orjson.dumps(message)
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes is over the {MAX_MESSAGE} byte cap")
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def decode(data: bytes, fds: list[int]) -> tuple[dict[str, Any], list[int]] | None:
    """Parse one datagram; None when the peer closed. Closes the fds of a malformed message."""
    if not data:
        for fd in fds:
            _close(fd)
        return None
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        for fd in fds:
            _close(fd)
        raise ProtocolError(f"malformed message: {e}") from e
    if not isinstance(message, dict):
        for fd in fds:
            _close(fd)
        raise ProtocolError("a message must be a JSON object")
    return message, fds


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            _close(fd)
        raise ProtocolError("message or its file descriptors were truncated")
    return decode(data, fds)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
