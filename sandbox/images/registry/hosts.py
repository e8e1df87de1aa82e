"""Host names as registries use them (`host[:port]`, IPv6 in brackets), and which of them are
local: loopback ones may speak plain HTTP by default, and only a local or configured registry
may lead us to a local address (SSRF)."""

from __future__ import annotations

import ipaddress

DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")


def split_host(hostport: str) -> tuple[str, int | None]:
    """`host[:port]` -> (host without brackets, port or None). The port must be a number."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise ValueError(f"{hostport!r}: an IPv6 address must be closed with ']'")
        host, rest = hostport[1:end], hostport[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{hostport!r}: only ':port' may follow ']'")
        port = rest[1:] if rest else None
    elif hostport.count(":") == 1:
        host, port = hostport.split(":")
    else:
        host, port = hostport, None
    if not host:
        raise ValueError(f"{hostport!r}: the host name is empty")
    if port is None:
        return host, None
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"{hostport!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address `host` spells (no brackets), or None for a name."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_loopback(hostport: str) -> bool:
    """127.0.0.0/8, ::1, `localhost` and `*.localhost` (RFC 6761: never leaves the machine)."""
    try:
        host, _ = split_host(hostport)
    except ValueError:
        return False
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    ip = parse_ip(host)
    return ip is not None and ip.is_loopback


def is_local_ip(address: str) -> bool:
    """An IP address (as a resolver gives it) that is not a public unicast one: loopback,
    private, link-local, shared (100.64/10), unspecified, reserved, documentation, multicast;
    IPv4 inside IPv6 (mapped, NAT64) is judged as IPv4. What does not parse counts as local:
    the check fails closed."""
    ip = parse_ip(address)
    if ip is None:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.is_site_local:
            return True
    return not ip.is_global or ip.is_multicast


def is_local_address(host: str) -> bool:
    """A host as written (no port) that names this machine or a private network by its
    spelling alone: `localhost` names, and IP literals that `is_local_ip` calls local. A
    name that only resolves to such an address is caught when it is resolved (transport)."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    return parse_ip(host) is not None and is_local_ip(host)


def hub_key(hostport: str) -> str:
    """Docker Hub's names all mean one registry; every other host stays as given (lowercase)."""
    lowered = hostport.lower()
    return "docker.io" if lowered in DOCKER_HUB_ALIASES else lowered
