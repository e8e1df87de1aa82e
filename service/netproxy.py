"""A request's `network` as the operator allows it (issue #15 pt2): `none` for everyone;
`proxy` for a tenant with hosts to reach (`[network] proxy_hosts` and its token's
`proxy_hosts` together); `full` when the operator turned it on (`[network] full = true`).
Anything else is 403 `network_disabled`, saying what the operator sets. The networks
themselves are sandbox/runtime/network's."""

from __future__ import annotations

from typing import Any

from sandbox import Allowlist, NetworkRequest
from service.auth import Principal
from service.config import ServiceConfig
from service.errors import ApiError


def allowlist(config: ServiceConfig, who: Principal) -> Allowlist:
    """The hosts `who`'s proxy runs may reach: the service's and its token's."""
    own = next((t.proxy_hosts for t in config.tokens if t.name == who.tenant.id), ())
    return Allowlist.parse((*config.network.proxy_hosts, *own))


def network_of(config: ServiceConfig, who: Principal,
               body: dict[str, Any]) -> NetworkRequest | str | None:
    """The body's `network` for the engine: `proxy` and `full` as NetworkRequests once
    allowed (403 `network_disabled` otherwise); anything else as given, for the engine to
    judge against the policy."""
    mode = body.get("network")
    if mode == "full":
        if not config.network.full:
            raise ApiError(403, "network_disabled", "network: 'full' is not enabled on this "
                           "service; its operator turns it on with [network] full = true, or "
                           "ask for 'proxy' or 'none'", "network")
        return NetworkRequest("full")
    if mode == "proxy":
        allow = allowlist(config, who)
        if not allow:
            raise ApiError(403, "network_disabled", "network: 'proxy' reaches only the hosts "
                           "the operator lists, and none is listed for you; the operator sets "
                           "[network] proxy_hosts, or proxy_hosts on your token", "network")
        return NetworkRequest("proxy", allow)
    return mode
