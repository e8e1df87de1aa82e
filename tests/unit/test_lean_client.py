"""The benchmarks' lean HTTP client (loadtest/http/lean.py) against a loopback server that
answers in pieces: it reads exactly one answer per request, keeps what follows for the
next, and refuses what it cannot delimit."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from loadtest.http.lean import LeanClient, LeanError, run_ok


@contextlib.contextmanager
def serving(answers: list[bytes]) -> Iterator[tuple[str, list[bytes]]]:
    """(url, requests received): each request gets the next answer, sent in 7-byte pieces
    as TCP may deliver it; the connection closes after the last."""
    listener = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        # A client that refused an answer may close before the last piece is sent.
        with conn, contextlib.suppress(OSError):
            for answer in answers:
                received.append(conn.recv(65536))
                for i in range(0, len(answer), 7):
                    conn.sendall(answer[i:i + 7])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", received
    finally:
        listener.close()
        t.join(timeout=5)


def answer(status: str, body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body


def test_each_answer_is_read_whole_and_no_further() -> None:
    answers = [answer("200 OK", b'{"status":"ok"}', "Content-Length: 15"),
               answer("429 Too Many Requests", b"slow down", "content-length:9", "X-A: b: c")]
    with serving(answers) as (url, received), LeanClient(url) as client:
        req = client.request("POST", "/v1/runs", b"{}")
        assert client.send(req) == (200, b'{"status":"ok"}')
        assert client.send(req) == (429, b"slow down")
    assert received[0].startswith(b"POST /v1/runs HTTP/1.1\r\n")
    assert received[0].endswith(b"Content-Length: 2\r\n\r\n{}")


@pytest.mark.parametrize(("given", "says"), [
    (answer("200 OK", b"2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: chunked"), "chunked"),
    (answer("200 OK", b"{}"), "without Content-Length"),
    (b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n", "not an HTTP status line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "closed the connection"),
])
def test_what_it_cannot_read_is_refused(given: bytes, says: str) -> None:
    with serving([given]) as (url, _), LeanClient(url) as client, \
            pytest.raises(LeanError, match=says):
        client.send(client.request("GET", "/v1/info"))


def test_a_run_must_answer_ok_to_count() -> None:
    answers = [answer("200 OK", b'{"status":"ok","cpu_ms":0.4}', "Content-Length: 28"),
               answer("200 OK", b'{"status":"time_limit"}', "Content-Length: 23"),
               answer("500 Internal Server Error", b"[]", "Content-Length: 2")]
    with serving(answers) as (url, _), LeanClient(url) as client:
        req = client.request("POST", "/v1/runs", b"{}")
        assert run_ok(client, req) == {"status": "ok", "cpu_ms": 0.4}
        with pytest.raises(LeanError, match="answered 200"):
            run_ok(client, req)
        with pytest.raises(LeanError, match="answered 500"):
            run_ok(client, req)
