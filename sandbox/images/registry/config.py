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

Each host's table is a `RegistryConfig` (a msgspec Struct: its fields are the keys, with
their ranges and defaults), the two settings beside them a `RegistriesTable`;
sandbox.configfile reads both.

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
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from sandbox.configfile import Table, read
from sandbox.errors import SandboxError
from sandbox.images.manifest import MAX_BLOB_BYTES
from sandbox.images.registry.hosts import DOCKER_HUB_ALIASES, hub_key, is_loopback, split_host
from sandbox.validation import Invalid

MAX_CONCURRENCY_LIMIT = 64
_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|[0-9a-fA-F:.]+")
Text = Annotated[str, Meta(min_length=1)]


class ConfigError(SandboxError, ValueError):
    """The registries configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class Mirror:
    """Where a mirror is: `host[:port]`, and the scheme when the configuration named one."""

    host: str
    scheme: str | None


class MirrorText(str):
    """A mirror as configured: `host[:port]` or `http(s)://host[:port][/]`."""

    @classmethod
    def from_config(cls, value: Any) -> MirrorText:
        _mirror(value)
        return cls(value)


class RegistryConfig(Table, kw_only=False):
    """Settings for one naming domain ("docker.io", "127.0.0.1:5000"): its table's keys,
    and `host`, the table's name."""

    host: str
    mirrors: tuple[MirrorText, ...] = ()  # pulls only; tried in order, then the origin
    insecure: bool | None = None  # plain HTTP / unverified TLS allowed; None: loopback only
    username: Text | None = None
    password: Text | None = None
    ca_file: Text | None = None
    max_concurrency: Annotated[int, Meta(ge=1, le=MAX_CONCURRENCY_LIMIT)] = 6  # at once

    def __repr__(self) -> str:
        shown = (f"{f}={getattr(self, f)!r}" for f in self.__struct_fields__ if f != "password")
        return f"RegistryConfig({', '.join(shown)})"

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
        """The [registries] table: its own settings (RegistriesTable), and a table for each
        host (RegistryConfig)."""
        if not isinstance(data, Mapping):
            raise ConfigError("registries must be a table of registry hosts")
        own = {k: v for k, v in data.items() if k in RegistriesTable.__struct_fields__}
        try:
            table = read(own, RegistriesTable, "registries")
        except Invalid as e:
            raise ConfigError(str(e)) from None
        registries = {host: _registry(host, value) for host, value in data.items()
                      if host not in own}
        return cls(registries=MappingProxyType(registries),
                   docker_config=None if table.docker_config is None
                   else Path(table.docker_config).expanduser(),
                   max_blob_bytes=table.max_blob_bytes)


class RegistriesTable(Table):
    docker_config: Text | None = None       # a path; None: Docker's own places
    max_blob_bytes: Annotated[int, Meta(ge=1)] = MAX_BLOB_BYTES


def _name_of(hostport: str) -> str:
    try:
        return split_host(hostport)[0].lower().rstrip(".")
    except ValueError:
        return ""


def parse_mirror(text: str, where: str) -> Mirror:
    """`host[:port]` or `http(s)://host[:port][/]` (a mirror serves /v2/ at its root)."""
    try:
        return _mirror(text)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _mirror(text: Any) -> Mirror:
    if not isinstance(text, str) or not text:
        raise ValueError("each mirror must be a non-empty string")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    elif scheme not in ("http", "https"):
        raise ValueError(f"mirror {text!r} must use http:// or https://")
    host = rest.removesuffix("/")
    if "/" in host or "?" in host or "#" in host or "@" in host:
        raise ValueError(f"mirror {text!r} must be host[:port] or a URL with no path")
    _check_host(host)
    return Mirror(host=host, scheme=scheme or None)


def _check_host(host: str) -> None:
    name, _ = split_host(host)      # its ValueError says what is wrong
    if not _HOST_NAME.fullmatch(name):
        raise ValueError(f"{host!r} is not a host name or IP address")


def _registry(host: str, table: Any) -> RegistryConfig:
    """A host's table. What one key alone cannot say (the host, the two credentials
    together, a CA file that exists) is checked here, once the keys are read."""
    where = f'registries."{host}"'
    try:
        _check_host(host)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if isinstance(table, Mapping) and "host" in table:
        raise ConfigError(f"{where}.host: unknown setting; the table's name is the host")
    try:
        config = read({**table, "host": host} if isinstance(table, Mapping) else table,
                      RegistryConfig, where)
    except Invalid as e:
        raise ConfigError(str(e)) from None
    if (config.username is None) != (config.password is None):
        raise ConfigError(f"{where}: give both username and password, or neither")
    if config.ca_file is not None:
        ca_file = str(Path(config.ca_file).expanduser())
        if not Path(ca_file).is_file():
            raise ConfigError(f"{where}.ca_file: {ca_file} is not a readable file")
        config = msgspec.structs.replace(config, ca_file=ca_file)
    return config
