"""The proxy's rules (allowlist entries, blocked addresses) and its run boundary: a Gate on a
real listener (here on the host's loopback, where a container's would be in its own
namespace) closes a run's connections when the run ends."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from sandbox.errors import PolicyError
from sandbox.runtime.network import Allowlist
from sandbox.runtime.network.proxy import Gate, Proxy
from sandbox.runtime.network.rules import Blocked


def test_allowlist_entries() -> None:
    allow = Allowlist.parse(["pypi.org", "*.pythonhosted.org", "example.com:8443",
                             "[2001:db8::1]:8080", "10.1.2.3"])
    assert allow.allows("PyPI.org.", 443) and allow.allows("pypi.org", 80)
    assert not allow.allows("pypi.org", 8080)            # no port: HTTP and HTTPS only
    assert allow.allows("files.pythonhosted.org", 443)
    assert not allow.allows("pythonhosted.org", 443)     # *.domain: its subdomains
    assert not allow.allows("evilpythonhosted.org", 443)
    assert allow.allows("example.com", 8443) and not allow.allows("example.com", 443)
    assert allow.allows("2001:db8::1", 8080) and allow.allows("10.1.2.3", 80)
    assert not Allowlist() and not allow.allows("pypi.org.evil.com", 443)
    for bad in ("http://pypi.org", "pypi.org:http", "*", "a b", "pypi.org:70000"):
        with pytest.raises(PolicyError, match=r"proxy_hosts\[0\]"):
            Allowlist.parse([bad])


def test_blocked_addresses() -> None:
    blocked, own = Blocked(), frozenset({ipaddress.ip_address("203.0.113.9")})
    for refused in ("127.0.0.1", "10.0.0.1", "169.254.169.254", "100.64.0.1", "::1",
                    "::ffff:127.0.0.1", "0.0.0.0", "203.0.113.9", "fd00::1"):
        assert blocked.refuses(ipaddress.ip_address(refused), own), refused
    assert not blocked.refuses(ipaddress.ip_address("93.184.216.34"), own)
    # The unspecified address is the host's own whatever the operator lists.
    assert Blocked.parse([]).refuses(ipaddress.ip_address("0.0.0.0"), frozenset())
    assert Blocked.parse(["10.0.0.0/8"]).unreachable(own) == ["10.0.0.0/8", "203.0.113.9/32"]
    with pytest.raises(PolicyError, match=r"network.blocked\[0\]"):
        Blocked.parse(["10.0.0.0/33"])


async def _upstream() -> tuple[asyncio.Server, int, asyncio.Event]:
    """A server (on a loopback address that is not 127.0.0.1, which is the host's own and
    always refused) that keeps every connection open, and sets the event when one closes."""
    closed = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the proxy closes its side
        closed.set()
        writer.close()

    server = await asyncio.start_server(hold, "127.7.0.1", 0)
    return server, server.sockets[0].getsockname()[1], closed


def test_a_runs_connections_end_with_the_run() -> None:
    async def main() -> None:
        server, port, closed = await _upstream()
        listener = socket.create_server(("127.0.0.1", 0))
        gate = Gate(Proxy(Blocked.parse([])), listener)
        gate.begin(Allowlist.parse([f"127.7.0.1:{port}"]))
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        writer.write(f"CONNECT 127.7.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        assert await reader.readline() == b"HTTP/1.1 200 Connection established\r\n"
        await reader.readline()
        traffic = gate.end()
        assert traffic.connections == 1
        # Both ends see the tunnel closed: the client's read ends, the upstream's too.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        await asyncio.wait_for(closed.wait(), 5)
        # Between runs a connection is closed unanswered.
        reader, writer2 = await asyncio.open_connection(*listener.getsockname())
        writer2.write(f"CONNECT 127.7.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        assert await asyncio.wait_for(reader.read(), 5) == b""
        for w in (writer, writer2):
            w.close()
        gate.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
