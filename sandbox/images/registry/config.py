"""Per-registry settings: mirrors, plain HTTP, credentials, CA file, concurrency.

`RegistriesConfig.from_dict` reads the `[registries]` table of the service's TOML config:

    [registries]
    docker_config = "/home/me/.docker/config.json"   # optional
    max_blob_bytes = 17179869184   # optional: the largest blob a manifest may name (16 GiB)
    [registries."docker.io"]
    mirrors = ["mirror.gcr.io", "https://hub-cache.internal:5000"]
    [registries."registry.internal:5000"]
    insecure = true
    username = "ci"
    password = "..."
    ca_file = "/etc/ssl/internal-ca.pem"
    max_concurrency = 4
    [registries."auth.internal"]   # a token server or storage host: trusted, nothing to set

Naming a host here declares it one of yours: it (and only it) may live on a local or private
network. Any other name that resolves to such an address is refused when it is connected to,
whether it is a registry, a redirect target or a token realm (SSRF).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sandbox.errors import SandboxError
from sandbox.images.manifest import MAX_BLOB_BYTES
from sandbox.images.registry.hosts import DOCKER_HUB_ALIASES, hub_key, is_loopback, split_host

MAX_CONCURRENCY_LIMIT = 64
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|[0-9a-fA-F:.]+")
_FIELDS = ("mirrors", "insecure", "username", "password", "ca_file", "max_concurrency")


class ConfigError(SandboxError, ValueError):
    """The registries configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class Mirror:
    """Where a mirror is: `host[:port]`, and the scheme when the configuration named one."""

    host: str
    scheme: str | None


@dataclass(frozen=True)
class RegistryConfig:
    """Settings for one naming domain ("docker.io", "127.0.0.1:5000")."""

    host: str
    mirrors: tuple[str, ...] = ()  # host[:port] or URL; pulls only; tried in order, then origin
    insecure: bool | None = None  # plain HTTP / unverified TLS allowed; None: loopback only
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    max_concurrency: int = 6  # concurrent requests to this registry

    @property
    def allows_plain_http(self) -> bool:
        return self.insecure if self.insecure is not None else is_loopback(self.host)

    def mirror_list(self) -> tuple[Mirror, ...]:
        return tuple(parse_mirror(m, f"{self.host}.mirrors") for m in self.mirrors)


@dataclass(frozen=True)
class RegistriesConfig:
    registries: Mapping[str, RegistryConfig] = field(
        default_factory=lambda: MappingProxyType({}))
    docker_config: Path | None = None  # None: $DOCKER_CONFIG/config.json or ~/.docker/...
    max_blob_bytes: int = MAX_BLOB_BYTES  # a larger descriptor is refused before fetching

    @cached_property
    def _trusted_names(self) -> frozenset[str]:
        names = {_name_of(h) for cfg in self.registries.values()
                 for h in (cfg.host, *(m.host for m in cfg.mirror_list()))}
        if any(hub_key(n) == "docker.io" for n in names):
            names.update(DOCKER_HUB_ALIASES)
        return frozenset(names)

    def trusts(self, host: str) -> bool:
        """Is `host` (a name, no port) a configured registry or mirror, and so allowed to
        be on a local or private network? Docker Hub's names count as one."""
        return _name_of(host) in self._trusted_names

    def for_host(self, host: str) -> RegistryConfig:
        """The settings for `host`; Docker Hub's aliases share one entry."""
        found = self.registries.get(host)
        if found is not None:
            return found
        key = hub_key(host)
        for name, cfg in self.registries.items():
            if hub_key(name) == key:
                return cfg
        return RegistryConfig(host=host)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegistriesConfig:
        if not isinstance(data, Mapping):
            raise ConfigError("registries must be a table of registry hosts")
        docker_config = None
        max_blob_bytes = MAX_BLOB_BYTES
        registries: dict[str, RegistryConfig] = {}
        for host, table in data.items():
            if host == "docker_config":
                if not isinstance(table, str) or not table:
                    raise ConfigError("registries.docker_config must be a path (a string)")
                docker_config = Path(table).expanduser()
            elif host == "max_blob_bytes":
                if isinstance(table, bool) or not isinstance(table, int) or table < 1:
                    raise ConfigError("registries.max_blob_bytes must be a whole number of "
                                      f"bytes, at least 1 (default {MAX_BLOB_BYTES})")
                max_blob_bytes = table
            else:
                registries[host] = _registry_from_dict(host, table)
        return cls(registries=MappingProxyType(registries), docker_config=docker_config,
                   max_blob_bytes=max_blob_bytes)


def _name_of(hostport: str) -> str:
    try:
        return split_host(hostport)[0].lower().rstrip(".")
    except ValueError:
        return ""


def parse_mirror(text: str, where: str) -> Mirror:
    """`host[:port]` or `http(s)://host[:port][/]` (a mirror serves /v2/ at its root)."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{where}: each mirror must be a non-empty string")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    elif scheme not in ("http", "https"):
        raise ConfigError(f"{where}: mirror {text!r} must use http:// or https://")
    host = rest.removesuffix("/")
    if "/" in host or "?" in host or "#" in host or "@" in host:
        raise ConfigError(f"{where}: mirror {text!r} must be host[:port] or a URL with no path")
    _check_host(host, where)
    return Mirror(host=host, scheme=scheme or None)


def _check_host(host: str, where: str) -> None:
    try:
        name, _ = split_host(host)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not _HOST_NAME.fullmatch(name):
        raise ConfigError(f"{where}: {host!r} is not a host name or IP address")


def _registry_from_dict(host: object, table: object) -> RegistryConfig:
    if not isinstance(host, str):
        raise ConfigError("registries: each key must be a registry host such as 'docker.io'")
    where = f"registries.{host!r}"
    _check_host(host, where)
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(str(k) for k in table if k not in _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: "
                          + ", ".join(_FIELDS))
    mirrors = table.get("mirrors", [])
    if not isinstance(mirrors, list | tuple):
        raise ConfigError(f"{where}.mirrors must be a list of hosts or URLs")
    for m in mirrors:
        parse_mirror(m, f"{where}.mirrors")
    insecure = table.get("insecure")
    if insecure is not None and not isinstance(insecure, bool):
        raise ConfigError(f"{where}.insecure must be true or false")
    username, password = table.get("username"), table.get("password")
    for key, value in (("username", username), ("password", password)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{where}.{key} must be a non-empty string")
    if (username is None) != (password is None):
        raise ConfigError(f"{where}: give both username and password, or neither")
    ca_file = table.get("ca_file")
    if ca_file is not None:
        if not isinstance(ca_file, str) or not ca_file:
            raise ConfigError(f"{where}.ca_file must be a path (a string)")
        ca_file = str(Path(ca_file).expanduser())
        if not Path(ca_file).is_file():
            raise ConfigError(f"{where}.ca_file: {ca_file} is not a readable file")
    limit = table.get("max_concurrency", 6)
    if isinstance(limit, bool) or not isinstance(limit, int) \
            or not 1 <= limit <= MAX_CONCURRENCY_LIMIT:
        raise ConfigError(f"{where}.max_concurrency must be a whole number from 1 to "
                          f"{MAX_CONCURRENCY_LIMIT}")
    return RegistryConfig(host=host, mirrors=tuple(mirrors), insecure=insecure,
                          username=username, password=password, ca_file=ca_file,
                          max_concurrency=limit)
