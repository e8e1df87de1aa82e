"""The control channel of a container's native init: a malformed request is answered or
dropped, never the end of init, and the descriptors that came with it are closed."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from sandbox.runtime.container import Container
from sandbox.runtime.results import Status
from tests.conftest import Session

EXEC = {"op": "exec", "id": 900, "argv": ["true"], "env": {"PATH": "/bin"}, "cwd": "/",
        "uid": 65534, "gid": 65534, "rlimits": []}
MALFORMED = {
    "truncated": msgpack.packb(EXEC)[:-3],
    "not a map": msgpack.packb([1, 2, 3]),
    "no op": msgpack.packb({"id": 1}),
    "unknown op": msgpack.packb({"op": "format-disk"}),
    "trailing bytes": msgpack.packb({"op": "reset"}) + b"\x00",
    "nested too deep": b"\x91" * 100 + b"\xc0",
    "a length past the end": b"\x81\xa2op\xdb\xff\xff\xff\xf0exec",
    "memfd marker, no memfd": msgpack.packb({"memfd": True}),
    "a reserved byte": b"\xc1",
    "signal without a signal": msgpack.packb({"op": "signal", "id": 1}),
    "open without a path": msgpack.packb({"op": "open", "id": 5, "flags": 0}),
}


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe whose write end the test closes once it is sent: the read end sees EOF once
    no one else holds a copy of it."""
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    yield r, w
    os.close(r)


def _all_write_ends_closed(r: int) -> bool:
    try:
        return os.read(r, 1) == b""
    except BlockingIOError:
        return False


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_request_leaves_init_serving_and_no_descriptor_open(
        session: Session, container: Container, pipe: tuple[int, int], name: str) -> None:
    r, w = pipe
    try:
        socket.send_fds(container._ctl, [MALFORMED[name]], [w, w])
    finally:
        os.close(w)
    # Requests are served in order: once this run is over, the bad one has been read.
    after = session.exec(container, ["echo", "alive"])
    assert (after.status, after.stdout) == (Status.OK, b"alive\n")
    assert container.alive
    assert _all_write_ends_closed(r), f"init kept a descriptor of a {name!r} request"


def test_a_request_too_big_for_a_datagram_comes_through_a_memfd(session: Session,
                                                               container: Container) -> None:
    arg = "x" * 100_000  # over protocol.INLINE_MAX, under the kernel's limit for one string
    r = session.exec(container, ["sh", "-c", 'echo ${#1} ${#2}', "sh", arg, arg])
    assert (r.status, r.stdout) == (Status.OK, b"100000 100000\n"), r


def _ask(session: Session, c: Container, ev: str, request_id: int, data: bytes,
         fds: list[int]) -> dict[str, Any]:
    async def ask() -> dict[str, Any]:
        answer = c._expect(ev, request_id)
        socket.send_fds(c._ctl, [data], fds)
        return await answer
    return session.run(ask())


@pytest.mark.parametrize("fields", [{"argv": []}, {"cwd": None}, {"uid": -1},
                                    {"rlimits": [[99, 1, 1]]}, {"argv": ["a\0b"]}])
def test_an_exec_request_it_cannot_run_is_answered(session: Session, container: Container,
                                                   pipe: tuple[int, int],
                                                   fields: dict[str, object]) -> None:
    r, w = pipe
    try:
        msg = _ask(session, container, "exited", 900, msgpack.packb({**EXEC, **fields}),
                   [w, w, w])
    finally:
        os.close(w)
    assert msg["status"] is None and msg["error"].startswith("125:spawn: "), msg
    assert _all_write_ends_closed(r)
    assert session.exec(container, ["true"]).status == Status.OK


def test_an_exec_without_its_stdio_is_answered(session: Session, container: Container) -> None:
    msg = _ask(session, container, "exited", 900, msgpack.packb(EXEC), [])
    assert msg["error"] == "125:spawn: an exec needs stdin, stdout and stderr descriptors"
    assert session.exec(container, ["true"]).status == Status.OK


def test_open_answers_a_bad_request_with_einval(session: Session,
                                                container: Container) -> None:
    msg = _ask(session, container, "opened", 5, MALFORMED["open without a path"], [])
    assert msg["errno"] == errno.EINVAL and "path" in msg["error"], msg
