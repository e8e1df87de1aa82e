"""A container's network beyond `lo` (issue #15): `proxy` (a listener inside the
container's network namespace, served by the host's filtering forward proxy, proxy.py) and
`full` (user-mode networking through slirp4netns, slirp.py, with the blocked ranges and the
host's own addresses unreachable, routes.py). `none` is the namespace with `lo` only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from sandbox.runtime.network.rules import Allowlist, Blocked

NONE, PROXY, FULL = "none", "proxy", "full"
MODES = (NONE, PROXY, FULL)

# Where a proxy-mode container finds the proxy: a listener on its own loopback, which the
# service accepts on (nothing is routed; no port of the host is involved).
PROXY_PORT = 3128


@dataclass(frozen=True)
class NetworkRequest:
    """What a run's or session's network is: `mode`, and for `proxy` the hosts it may
    reach (the tenant's allowlist, decided by the service)."""

    mode: str = NONE
    allow: Allowlist = field(default_factory=Allowlist)


@dataclass
class Traffic:
    """One run's network figures: bytes as the sandbox sent and received them; for `proxy`
    the connections the proxy made for it and those it refused."""

    mode: str
    bytes_sent: int = 0
    bytes_received: int = 0
    connections: int = 0
    denied: int = 0

    def since(self, before: Traffic) -> Traffic:
        """What happened between `before` and these figures (one exec of a session)."""
        return Traffic(self.mode, self.bytes_sent - before.bytes_sent,
                       self.bytes_received - before.bytes_received,
                       self.connections - before.connections, self.denied - before.denied)


NO_NETWORK = NetworkRequest()


class Attachment(Protocol):
    """The host's side of a container's network (proxy.Gate, slirp.Link): figures and
    connections per run, released with the container."""

    def begin(self, allow: Allowlist) -> None: ...

    def figures(self) -> Traffic: ...

    def end(self) -> Traffic: ...

    def close(self) -> None: ...


def proxy_env() -> dict[str, str]:
    """The environment that sends HTTP clients of a proxy-mode run to the proxy."""
    url = f"http://127.0.0.1:{PROXY_PORT}"
    return {"HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
            "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1"}


__all__ = [
    "FULL",
    "MODES",
    "NONE",
    "PROXY",
    "PROXY_PORT",
    "Allowlist",
    "Attachment",
    "Blocked",
    "NetworkRequest",
    "Traffic",
    "proxy_env",
]
