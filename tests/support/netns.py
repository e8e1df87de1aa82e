"""Hosts for a multi-node test on one machine.

As root, `netns_lab` makes a small private LAN: a bridge in the caller's network namespace
(the "front" host, where the test client, HAProxy and the registries live) and one network
namespace per node host, each joined to the bridge by a veth pair. The node hosts have no
default route, so nothing they send leaves the machine. Each host's programs run through
`nsenter --net` (only the network namespace changes: `ip netns exec` would also remount
/sys in a new mount namespace, hiding the cgroup mounts sandboxd needs).

As an ordinary user a network namespace cannot be joined without entering a user namespace
of its own, where sandboxd would no longer be the user its cgroups were delegated to; so
`loopback_lab` gives the same hosts as processes on 127.0.0.1, each on its own port. Every
claim the multi-node tests make holds for both; only the wire differs.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from testbed.ports import free_port

NODE_PORT = 8080
NETNS_DIR = "/run/netns"
_NETWORK_ATTEMPTS = 50


class NetnsError(RuntimeError):
    """The lab's network could not be made; the message names the failing command."""


@dataclass(frozen=True)
class Host:
    """A machine of the lab: the address and port its node binds, and how to start a
    program there (`launcher`)."""

    name: str
    address: str
    port: int = 0
    netns: str | None = None

    @property
    def launcher(self) -> list[str]:
        """What starts a program on this host (nothing: it is the caller's)."""
        return ["nsenter", f"--net={NETNS_DIR}/{self.netns}", "--"] if self.netns else []


@dataclass(frozen=True)
class Lab:
    """`front`: the caller's own host (client, balancer, registries); `nodes`: the others."""

    front: Host
    nodes: tuple[Host, ...]


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _mounted(path: str) -> bool:
    """Whether `path` is a mount point: from mountinfo, as os.path.ismount misses a
    directory bound onto itself (what iproute2 makes of /run/netns)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _free_network() -> ipaddress.IPv4Network:
    """A /24 under 10.213.0.0/16 that no route of this host covers."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                            text=True, timeout=30).stdout
    used = []
    for line in routes.splitlines():
        first = line.split()[0] if line.split() else ""
        if first.startswith(("local", "broadcast")):
            first = line.split()[1]
        try:
            used.append(ipaddress.ip_network(first, strict=False))
        except ValueError:
            continue
    start = os.getpid() % 250
    for i in range(_NETWORK_ATTEMPTS):
        net = ipaddress.ip_network(f"10.213.{(start + i) % 250}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise NetnsError("no free /24 under 10.213.0.0/16 for the lab; remove stale "
                     "`sbxb*` bridges (ip link del NAME)")


@contextmanager
def network_namespace(name: str) -> Iterator[str]:
    """A named network namespace (`ip netns add`; root only), deleted at the end with the
    veth ends it holds. The first `ip netns add` since boot also makes /run/netns a mount
    point of its own, which `ip netns del` keeps: that mount goes too, unless another's
    namespaces are there by then."""
    mounted = _mounted(NETNS_DIR)
    _ip("netns", "add", name)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        if not mounted and _mounted(NETNS_DIR) and not os.listdir(NETNS_DIR):
            subprocess.run(["umount", NETNS_DIR], capture_output=True, timeout=30)


@contextmanager
def netns_lab(count: int) -> Iterator[Lab]:
    """`count` node hosts in network namespaces on a bridge with the caller (root only).
    Everything made is removed at the end, whatever happened."""
    if os.geteuid() != 0:
        raise NetnsError("network namespaces and veth pairs need root; use loopback_lab")
    tag = f"{os.getpid() % 100000}"
    bridge = f"sbxb{tag}"
    net = _free_network()
    hosts = [net.network_address + i for i in range(1, count + 1)]
    front = str(net.network_address + 254)
    with ExitStack() as made:
        _ip("link", "add", bridge, "type", "bridge")
        made.callback(subprocess.run, ["ip", "link", "del", bridge], capture_output=True,
                      timeout=30)
        _ip("addr", "add", f"{front}/{net.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        nodes = []
        for i, address in enumerate(hosts, start=1):
            ns = made.enter_context(network_namespace(f"sbx-{tag}-n{i}"))
            outside = f"sbxv{tag}n{i}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", outside, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{address}/{net.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            nodes.append(Host(f"n{i}", str(address), NODE_PORT, ns))
        yield Lab(Host("front", front), tuple(nodes))


@contextmanager
def loopback_lab(count: int) -> Iterator[Lab]:
    """`count` node hosts that are processes on 127.0.0.1, each on a port of its own (any
    user). The ports are chosen now, as each node's peers must know them before it starts;
    should another program take one first, its node fails to start, saying so."""
    yield Lab(Host("front", "127.0.0.1"), tuple(Host(f"n{i}", "127.0.0.1", free_port())
                                                for i in range(1, count + 1)))
