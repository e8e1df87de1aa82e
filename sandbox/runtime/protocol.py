"""Messages between the host side, the spawner and a container's init.

Each message is one SOCK_SEQPACKET datagram holding a MessagePack map, with file
descriptors attached by SCM_RIGHTS. MessagePack rather than JSON because init is C
(native/init.c): its grammar is a few length-prefixed types, parsed in a page of code
without allocation, and bytes travel as bytes (names of files as they are). Datagrams keep
message boundaries, so no framing is needed, and a peer that dies shows up as an empty
read. A message too big for a datagram (a large argv, say: a socket's buffer, and so its
largest datagram, is capped by net.core.wmem_max, 208 KiB on a stock kernel) travels in a
memfd sent along as the last descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from dataclasses import dataclass
from typing import Any, Literal

import msgpack

MAX_MESSAGE = 16 << 20
MAX_FDS = 32
INLINE_MAX = 64 << 10
SOCKET_BUFFER = 1 << 20
_IN_MEMFD = msgpack.packb({"memfd": True})


class ProtocolError(Exception):
    """A peer sent something that is not a well-formed message."""


@dataclass(frozen=True)
class Entry:
    """The `entry` of an open request to init: entry `name` of the directory at `dir_path`
    (relative to the container's root, b"" for the root) whose identity is (dev, ino)."""

    dir_path: bytes
    dev: int
    ino: int
    name: bytes

    def message(self) -> dict[str, Any]:
        return {"dir": self.dir_path, "dev": self.dev, "ino": self.ino, "name": self.name}


# What an open request's path is resolved in: the container's root as its processes see it,
# or the upper directory of its writable root (what runs changed; read only).
Base = Literal["root", "upper"]


@dataclass(frozen=True)
class Opened:
    """Init's answer to an open request: the descriptor (the receiver's to close) and, for a
    directory of the upper directory, whether it is opaque (it hides what the image's
    layers hold there: overlayfs's user.overlay.opaque)."""

    fd: int
    opaque: bool = False


def socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    return a, b


def send(sock: socket.socket, message: dict[str, Any],
         fds: list[int] | tuple[int, ...] = ()) -> None:
    data = msgpack.packb(message)
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes is over the {MAX_MESSAGE} byte cap")
    fds = list(fds)
    if len(data) <= INLINE_MAX:
        if fds:
            socket.send_fds(sock, [data], fds)
        else:
            sock.send(data)
        return
    body = os.memfd_create("message", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(body, view):]
        os.lseek(body, 0, os.SEEK_SET)
        socket.send_fds(sock, [_IN_MEMFD], [*fds, body])
    finally:
        os.close(body)


def decode(data: bytes, fds: list[int]) -> tuple[dict[str, Any], list[int]] | None:
    """Parse one datagram; None when the peer closed. Closes the fds of a malformed message."""
    if not data:
        _close_all(fds)
        return None
    if data == _IN_MEMFD:
        if not fds:
            raise ProtocolError("a memfd message came without its memfd")
        body = fds.pop()
        try:
            data = _read_body(body)
        finally:
            os.close(body)
    try:
        message = msgpack.unpackb(data)
    except (ValueError, msgpack.UnpackException) as e:
        _close_all(fds)
        raise ProtocolError(f"malformed message: {e}") from e
    if not isinstance(message, dict):
        _close_all(fds)
        raise ProtocolError("a message must be a MessagePack map")
    return message, fds


def _read_body(fd: int) -> bytes:
    chunks = []
    total = 0
    while chunk := os.read(fd, 1 << 20):
        total += len(chunk)
        if total > MAX_MESSAGE:
            raise ProtocolError(f"message over the {MAX_MESSAGE} byte cap")
        chunks.append(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    # Close-on-exec, as Python's own descriptors are: the spawner posix_spawns helpers,
    # which would otherwise inherit whatever it received.
    data, fds, flags, _ = socket.recv_fds(sock, INLINE_MAX, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close_all(fds)
        if not flags & socket.MSG_TRUNC:
            # Room was made for MAX_FDS: the kernel could not install them in this process,
            # which has no descriptor free (its want, not the peer's fault).
            raise ProtocolError("a message's file descriptors were lost: this process has "
                                "none free") from OSError(errno.EMFILE,
                                                          os.strerror(errno.EMFILE))
        raise ProtocolError("message or its file descriptors were truncated")
    return decode(data, fds)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
