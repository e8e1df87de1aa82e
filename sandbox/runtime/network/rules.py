"""Who a sandbox may reach: the tenant's allowlist of hosts (the proxy's) and the blocked
address ranges (what neither the proxy nor `full` ever connects to), with the host's own
addresses, which are blocked whatever the operator lists."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.errors import PolicyError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The contract's default for `[network] blocked`: private, loopback, link-local, CGNAT and
# the unspecified ranges (a connect to 0.0.0.0 reaches the host's loopback).
DEFAULT_BLOCKED = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8",
                   "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16", "::/128", "::1/128",
                   "fc00::/7", "fe80::/10")
# What an entry without a port allows: HTTP and HTTPS.
DEFAULT_PORTS = (80, 443)


@dataclass(frozen=True)
class HostRule:
    host: str                 # lower case; for "*.example.com" the suffix ".example.com"
    wildcard: bool
    port: int | None

    def allows(self, host: str, port: int) -> bool:
        if port not in ((self.port,) if self.port is not None else DEFAULT_PORTS):
            return False
        return host.endswith(self.host) if self.wildcard else host == self.host


def parse_rule(entry: str, where: str) -> HostRule:
    """`host`, `*.domain`, `[v6]`, each with an optional `:port`; PolicyError naming
    `where` for anything else."""
    text = entry.strip().lower()
    port: int | None = None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise PolicyError(f"{where}: {entry!r}: write [address]:port")
            port = int(rest[1:])
    else:
        host, sep, tail = text.rpartition(":")
        if not sep:
            host = text
        elif tail.isdigit():
            port = int(tail)
        else:
            raise PolicyError(f"{where}: {entry!r}: the part after ':' must be a port")
    if port is not None and not 0 < port < 65536:
        raise PolicyError(f"{where}: {entry!r}: the port must be 1-65535")
    wildcard = host.startswith("*.")
    name = host[1:] if wildcard else host
    if not name.strip(".") or any(c.isspace() or c in "/*@" for c in name):
        raise PolicyError(f"{where}: {entry!r} is not a host: write host, *.domain or "
                          "an address, each with an optional :port")
    return HostRule(name, wildcard, port)


@dataclass(frozen=True)
class Allowlist:
    """The hosts a proxy-mode sandbox may reach: the operator's `proxy_hosts` and the
    token's together."""

    rules: tuple[HostRule, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str], where: str = "proxy_hosts") -> Allowlist:
        return cls(tuple(parse_rule(e, f"{where}[{i}]") for i, e in enumerate(entries)))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __add__(self, other: Allowlist) -> Allowlist:
        return Allowlist(self.rules + other.rules)

    def allows(self, host: str, port: int) -> bool:
        host = host.lower().rstrip(".")
        return any(r.allows(host, port) for r in self.rules)


def host_addresses() -> frozenset[Address]:
    """This machine's own addresses (its network namespace's): a sandbox must not reach the
    host's services through them, whatever the blocked ranges say."""
    found: set[Address] = set()
    try:  # IPv4: the local table's /32 host entries
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        lines = []
    for before, line in itertools.pairwise(lines):
        if "/32 host LOCAL" in line:
            found.add(ipaddress.ip_address(before.split()[-1]))
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.add(ipaddress.ip_address(":".join(
                line.split()[0][i:i + 4] for i in range(0, 32, 4))))
    except OSError:
        pass
    return frozenset(found)


@dataclass(frozen=True)
class Blocked:
    """Addresses no sandbox connection may reach: the operator's ranges and the host's own
    addresses. IPv4 inside IPv6 is judged as IPv4."""

    networks: tuple[Network, ...] = field(
        default_factory=lambda: tuple(ipaddress.ip_network(n) for n in DEFAULT_BLOCKED))

    @classmethod
    def parse(cls, cidrs: Iterable[str], where: str = "network.blocked") -> Blocked:
        nets = []
        for i, c in enumerate(cidrs):
            try:
                nets.append(ipaddress.ip_network(c, strict=False))
            except ValueError as e:
                raise PolicyError(f"{where}[{i}]: {e}; write a CIDR such as 10.0.0.0/8") \
                    from None
        return cls(tuple(nets))

    def refuses(self, address: Address, own: frozenset[Address]) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        # The unspecified address is the host's own whatever the list says (a connect to
        # 0.0.0.0 reaches its loopback).
        return (address.is_unspecified or address in own
                or any(address in n for n in self.networks))

    def unreachable(self, own: frozenset[Address]) -> list[str]:
        """The IPv4 routes a `full` container gets as unreachable: the ranges and the host's
        own addresses (slirp4netns gives it IPv4 only)."""
        return sorted({str(n) for n in self.networks if n.version == 4}
                      | {f"{a}/32" for a in own if a.version == 4})
