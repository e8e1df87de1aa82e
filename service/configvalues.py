"""The kinds of value the service's config holds (service/config.py's tables): numbers with
their ranges, and values with a format of their own, each a str subclass whose
`from_config` checks and normalises a value (sandbox.configfile calls it; the value leaves
as a plain str)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from msgspec import Meta

from sandbox import split_host

Seconds = Annotated[float, Meta(gt=0, description="a positive number of seconds, e.g. 60")]
Count = Annotated[int, Meta(ge=1)]
Quota = Annotated[int, Meta(ge=0)]
Text = Annotated[str, Meta(min_length=1, pattern=r"^[^\x00]*$",
                           description="a non-empty string without NUL")]
# A node's name: a DNS label (a pod's name fits), so that it can name the node's host in
# cluster.peer_url, and has no '.', which ends it in the ids it begins.
NODE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
NodeName = Annotated[str, Meta(pattern=f"^{NODE_NAME.pattern}$", description=(
    "a node name: 1 to 63 lower-case letters, digits and '-', beginning and ending with a "
    "letter or digit (a pod's name fits), e.g. \"sandboxd-0\""))]
# A proxy host: a DNS name, or "*." and a domain (its subdomains, not itself).
_PROXY_NAME = re.compile(r"(\*\.)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
                         r"(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")


class HostName(str):
    """A host name clients or peers use: lower case, without the root's trailing '.'."""

    @classmethod
    def from_config(cls, value: Any) -> HostName:
        if not isinstance(value, str) or not value:
            raise ValueError('expected a host name, e.g. "sandbox.internal"')
        return cls(value.lower().rstrip("."))


class CallbackHost(str):
    """host, host:port, an IP address or [IPv6]:port, in lower case. A name must resolve to
    public addresses: a receiver on a local or private address is listed by its address."""

    @classmethod
    def from_config(cls, value: Any) -> CallbackHost:
        if not isinstance(value, str) or not value:
            raise ValueError('expected a host, e.g. "hooks.example.com" or "10.0.0.5:8080"')
        split_host(value)       # its ValueError says what is wrong
        return cls(value.lower().rstrip("."))


class ProxyHost(str):
    """`host`, `*.domain` (its subdomains) or an address, then an optional `:port`; in lower
    case, an IPv6 address in brackets."""

    @classmethod
    def from_config(cls, value: Any) -> ProxyHost:
        example = '"pypi.org", "*.pythonhosted.org" or "example.com:8443"'
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a host, e.g. {example}")
        host, port = split_host(value.lower())
        host = host.rstrip(".")
        try:
            host = f"[{ipaddress.IPv6Address(host)}]"
        except ValueError:
            if not _PROXY_NAME.fullmatch(host) or len(host) > 253:
                raise ValueError(f"{value!r} is not a host name, *.domain or address with an "
                                 f"optional :port, e.g. {example}") from None
        return cls(host if port is None else f"{host}:{port}")


class Cidr(str):
    """An address range, e.g. "10.0.0.0/8" or "fc00::/7", written as ipaddress does."""

    @classmethod
    def from_config(cls, value: Any) -> Cidr:
        if not isinstance(value, str):
            raise ValueError('expected an address range such as "10.0.0.0/8"')
        try:
            return cls(ipaddress.ip_network(value))
        except ValueError as e:
            raise ValueError(f"{e}; give an address range such as \"10.0.0.0/8\" or "
                             "\"fc00::/7\"") from None


class Workdir(str):
    """An absolute path without '..', without a trailing '/'."""

    @classmethod
    def from_config(cls, value: Any) -> Workdir:
        if not isinstance(value, str) or not value.startswith("/") \
                or ".." in value.split("/") or "\0" in value:
            raise ValueError(f"{value!r} must be an absolute path without '..', e.g. \"/tmp\"")
        return cls(value.rstrip("/") or "/")


class BaseUrl(str):
    """http(s)://host:port and nothing more, without a trailing '/'."""

    @classmethod
    def from_config(cls, value: Any) -> BaseUrl:
        if not isinstance(value, str) or url_host(value) is None:
            raise ValueError(f"{value!r} is not a base URL: http(s)://host:port and nothing "
                             "more, e.g. \"http://10.0.0.2:8643\"")
        return cls(value.rstrip("/"))


class PeerUrl(str):
    """A base URL with {node} in its host."""

    @classmethod
    def from_config(cls, value: Any) -> PeerUrl:
        if not isinstance(value, str) or "{node}" not in value \
                or url_host(value.replace("{node}", "n1")) is None:
            raise ValueError(f"{value!r} is not a base URL with {{node}} in its host, e.g. "
                             "\"http://{node}.sandboxd-nodes:8643\"")
        return cls(value.rstrip("/"))


def url_host(url: str) -> str | None:
    """The host name of an http(s) URL that has nothing but a scheme, host and port."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest.rstrip("/") \
            or "@" in rest or "?" in rest or "#" in rest:
        return None
    try:
        return split_host(rest.rstrip("/").lower())[0].rstrip(".")
    except ValueError:
        return None
