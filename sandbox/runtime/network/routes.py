"""Unreachable routes in a `full` container's network namespace: rtnetlink requests built
here, on the host, and sent by the spawner's helper (native/helper.c) while it holds
CAP_NET_ADMIN in the container's user namespace (runs hold no capabilities, so they cannot
take them away). One request per route; no program is started for it."""

from __future__ import annotations

import ipaddress
import socket
import struct

_RTM_NEWROUTE = 24
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
_RTA_DST = 1
_RT_TABLE_MAIN, _RTPROT_STATIC, _RT_SCOPE_UNIVERSE, _RTN_UNREACHABLE = 254, 4, 0, 7


def _request(seq: int, cidr: str) -> bytes:
    net = ipaddress.ip_network(cidr, strict=False)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    dst = net.network_address.packed
    rta = struct.pack("HH", 4 + len(dst), _RTA_DST) + dst
    rtm = struct.pack("BBBBBBBBI", family, net.prefixlen, 0, 0, _RT_TABLE_MAIN,
                      _RTPROT_STATIC, _RT_SCOPE_UNIVERSE, _RTN_UNREACHABLE, 0)
    body = rtm + rta
    # Replace, not fail on, a route of the same destination: slirp4netns configures tap0
    # while these are added (EEXIST was seen for 10.0.0.0/8), and what must hold at the end
    # is that the destination is unreachable.
    flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_REPLACE
    return struct.pack("IHHII", 16 + len(body), _RTM_NEWROUTE, flags, seq, 0) + body


def unreachable(cidrs: list[str]) -> list[tuple[str, bytes]]:
    """[range, request] for each destination in `cidrs`: once sent, connects there fail at
    once with EHOSTUNREACH. The helper names the range when the kernel refuses one."""
    return [(cidr, _request(seq, cidr)) for seq, cidr in enumerate(cidrs, 1)]
