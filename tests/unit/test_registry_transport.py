"""Pieces of the transport: Retry-After, error bodies, Content-Range, manifest typing, and the
resolver that keeps untrusted names off local addresses (with a fake DNS: DNS is outside the
unit; the connections are real)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from datetime import UTC, datetime

import aiohttp
import orjson
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from sandbox.errors import ManifestError, RegistryError
from sandbox.images.registry.client import MANIFEST_ACCEPT, OCI_INDEX, OCI_MANIFEST, check_manifest
from sandbox.images.registry.download import range_matches
from sandbox.images.registry.transport import GuardedResolver, describe_error, parse_retry_after

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(("value", "seconds"), [
    ("7", 7.0), (" 0 ", 0.0), ("Thu, 01 Jan 2026 12:00:09 GMT", 9.0),
    ("Thu, 01 Jan 2026 11:00:00 GMT", 0.0), ("soon", None), ("", None), (None, None),
    ("-5", None), ("\u00b3", None), ("\u0663", None),  # digits to isdigit(), not to float()
])
def test_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, NOW) == seconds


def test_error_bodies_give_codes_and_short_printable_messages() -> None:
    body = orjson.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown",
                                     "detail": {"Tag": "x"}},
                                    {"code": "DENIED", "message": "no\nnewlines\x1b[31m"}]})
    assert describe_error(404, body) == (
        "404 MANIFEST_UNKNOWN: manifest unknown; DENIED: no newlines [31m", "MANIFEST_UNKNOWN")
    long = orjson.dumps({"errors": [{"code": "UNKNOWN", "message": "m" * 5000}] * 50})
    message, code = describe_error(500, long)
    assert code == "UNKNOWN" and message.count("UNKNOWN") == 3 and len(message) < 420


@pytest.mark.parametrize("body", [
    b"<html><body>internal.corp admin page</body></html>",
    b"upstream 10.1.2.3:5000 internal.corp refused",
    b'{"errors": [{"code": "<b>internal.corp</b>", "message": "x"}]}',
    b'{"errors": [{"message": "internal.corp"}]}',
    b'{"detail": "internal.corp"}',
    b"\x00internal.corp",
])
def test_anything_but_oci_error_codes_is_left_out(body: bytes) -> None:
    message, code = describe_error(502, body)
    assert (message, code) == ("502 Bad Gateway", None)
    assert describe_error(599, body) == ("599 (no standard meaning)", None)


@pytest.mark.parametrize(("header", "offset", "size", "ok"), [
    ("bytes 100-999/1000", 100, 1000, True),
    ("bytes 100-999/*", 100, 1000, True),
    ("bytes 0-999/1000", 100, 1000, False),
    ("bytes 100-998/1000", 100, 1000, False),
    ("bytes 100-999/1001", 100, 1000, False),
    ("bytes 100-99/1000", 100, 1000, False),
    ("bytes */1000", 100, 1000, False),
    (None, 100, 1000, False),
])
def test_content_range(header: str | None, offset: int, size: int, ok: bool) -> None:
    assert range_matches(header, offset, size) is ok


def manifest(media_type: str | None) -> bytes:
    data: dict = {"schemaVersion": 2, "layers": []}
    if media_type:
        data["mediaType"] = media_type
    return orjson.dumps(data)


def test_manifest_media_type_rules() -> None:
    ok = check_manifest(f"{OCI_MANIFEST}; charset=utf-8", manifest(OCI_MANIFEST),
                        MANIFEST_ACCEPT, "m")
    assert ok == OCI_MANIFEST
    assert check_manifest(OCI_MANIFEST, manifest(None), MANIFEST_ACCEPT, "m") == OCI_MANIFEST
    assert check_manifest("application/json", manifest(OCI_INDEX), MANIFEST_ACCEPT,
                          "m") == OCI_INDEX
    with pytest.raises(ManifestError, match="ambiguous"):  # CVE-2021-41190
        check_manifest(OCI_MANIFEST, manifest(OCI_INDEX), MANIFEST_ACCEPT, "m")
    with pytest.raises(ManifestError, match="schema 1"):
        check_manifest("application/vnd.docker.distribution.manifest.v1+prettyjws",
                       manifest(None), MANIFEST_ACCEPT, "m")
    with pytest.raises(ManifestError, match="not one of"):
        check_manifest(OCI_INDEX, manifest(None), [OCI_MANIFEST], "m")
    with pytest.raises(ManifestError, match="no media type"):
        check_manifest(None, manifest(None), MANIFEST_ACCEPT, "m")
    with pytest.raises(ManifestError, match="not JSON"):
        check_manifest(OCI_MANIFEST, b"\xff{", MANIFEST_ACCEPT, "m")
    with pytest.raises(ManifestError, match="not a JSON object"):
        check_manifest(OCI_MANIFEST, b"[1]", MANIFEST_ACCEPT, "m")


class FakeDNS(AbstractResolver):
    """Answers from a table; each name's answers are used in turn (a rebinding DNS)."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.asked.append(host)
        answers = self.table[host]
        addresses = answers.pop(0) if len(answers) > 1 else answers[0]
        return [ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET,
                              proto=0, flags=0) for a in addresses]

    async def close(self) -> None:
        pass


def resolve(resolver: GuardedResolver, host: str) -> list[str]:
    return [r["host"] for r in asyncio.run(resolver.resolve(host, 443))]


def test_local_answers_are_dropped_for_untrusted_names() -> None:
    dns = FakeDNS({"mixed.test": [["10.0.0.5", "93.184.216.34", "127.0.0.1"]],
                   "inside.test": [["10.0.0.5", "::1"]],
                   "trusted.test": [["10.0.0.5"]]})
    guard = GuardedResolver(lambda host: host == "trusted.test", dns)
    assert resolve(guard, "mixed.test") == ["93.184.216.34"]
    assert resolve(guard, "trusted.test") == ["10.0.0.5"]
    with pytest.raises(RegistryError, match=r"inside\.test resolves to a local") as info:
        resolve(guard, "inside.test")
    assert "10.0.0.5" not in str(info.value)  # the network's layout is the operator's


def test_rebinding_gains_nothing() -> None:
    dns = FakeDNS({"rebind.test": [["93.184.216.34"], ["127.0.0.1"]]})
    guard = GuardedResolver(lambda host: False, dns)
    assert resolve(guard, "rebind.test") == ["93.184.216.34"]
    with pytest.raises(RegistryError, match=r"rebind\.test"):
        resolve(guard, "rebind.test")


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, int]]:
    """A socket listening on 127.0.0.1 that nobody accepts from: a connection to it shows in
    its backlog."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        s.setblocking(False)
        yield s, s.getsockname()[1]


def test_aiohttp_connects_only_where_the_guard_allows(
        listener: tuple[socket.socket, int]) -> None:
    sock, port = listener

    async def get(trusted: bool) -> None:
        guard = GuardedResolver(lambda host: trusted,
                                FakeDNS({"inside.test": [["127.0.0.1"]]}))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=guard),
                                         timeout=aiohttp.ClientTimeout(total=0.5)) as session:
            await session.get(f"http://inside.test:{port}/")

    with pytest.raises(RegistryError, match=r"inside\.test resolves to a local"):
        asyncio.run(get(trusted=False))
    with pytest.raises(BlockingIOError):
        sock.accept()  # nothing came
    with pytest.raises(TimeoutError):
        asyncio.run(get(trusted=True))  # connected; the listener never answers
    conn, _ = sock.accept()
    conn.close()
