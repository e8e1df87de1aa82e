"""Control messages: small ones inline, big ones through a memfd, descriptors alongside."""

from __future__ import annotations

import os

import msgpack
import pytest

from sandbox.runtime import protocol


def roundtrip(message: dict, fds: list[int]) -> tuple[dict, list[int]]:
    a, b = protocol.socketpair()
    with a, b:
        protocol.send(a, message, fds)
        got = protocol.recv(b)
    assert got is not None
    return got


@pytest.mark.parametrize("size", [10, protocol.INLINE_MAX + 1, 3 << 20])
def test_messages_of_any_size_arrive_whole_with_their_fds(size: int) -> None:
    r, w = os.pipe()
    try:
        msg = {"op": "exec", "argv": ["x" * size]}
        got, fds = roundtrip(msg, [w])
        assert got == msg
        assert len(fds) == 1  # the memfd, when there was one, is not handed on
        os.write(fds[0], b"!")
        assert os.read(r, 1) == b"!"
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_bytes_travel_as_bytes() -> None:
    msg = {"entry": {"dir": b"\xff/d", "name": b"caf\xe9"}, "n": -1, "big": 1 << 63}
    assert roundtrip(msg, []) == (msg, [])


def test_peer_gone_and_bad_messages() -> None:
    a, b = protocol.socketpair()
    a.send(msgpack.packb([1, 2]))
    with pytest.raises(protocol.ProtocolError, match="MessagePack map"):
        protocol.recv(b)
    a.send(msgpack.packb({"op": "exec", "argv": ["x"]})[:-2])  # truncated
    with pytest.raises(protocol.ProtocolError, match="malformed"):
        protocol.recv(b)
    a.close()
    assert protocol.recv(b) is None
    b.close()
