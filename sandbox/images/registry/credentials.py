"""Registry credentials: our own configuration first, then Docker's config.json (`credHelpers`,
`credsStore` through `docker-credential-*` programs, `auths`). Secrets never reach a log line
or an exception message."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sandbox.errors import AuthError
from sandbox.images.registry.config import ConfigError, RegistriesConfig
from sandbox.images.registry.hosts import hub_key

HELPER_TIMEOUT = 20.0  # seconds a credential helper may take (a keychain may prompt)
_HELPER_OUTPUT_MAX = 1 << 16
_CONFIG_MAX = 4 << 20
_HUB_SERVER_URL = "https://index.docker.io/v1/"  # the key Docker stores Hub credentials under
_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
IDENTITY_TOKEN_USER = "<token>"  # a helper's way to say "the secret is an identity token"


@dataclass(frozen=True)
class Credential:
    """Username and password, or an identity (OAuth2 refresh) token."""

    username: str | None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)
    source: str = ""  # where it came from, for messages

    @property
    def basic(self) -> tuple[str, str] | None:
        if self.username is not None and self.password is not None:
            return self.username, self.password
        return None


def docker_config_path(config: RegistriesConfig) -> Path:
    if config.docker_config is not None:
        return config.docker_config
    env = os.environ.get("DOCKER_CONFIG")
    if env:
        return Path(env) / "config.json"
    return Path.home() / ".docker" / "config.json"


def normalise_key(key: str) -> str:
    """An `auths`/`credHelpers` key as a host: scheme and path dropped, Hub's names merged."""
    rest = key.split("://", 1)[1] if "://" in key else key
    return hub_key(rest.split("/", 1)[0])


class CredentialStore:
    """Looks credentials up once per host and remembers the answer (helpers are slow)."""

    def __init__(self, config: RegistriesConfig) -> None:
        self._config = config
        self._cache: dict[str, Credential | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, host: str) -> Credential | None:
        lock = self._locks.setdefault(host, asyncio.Lock())
        async with lock:
            if host not in self._cache:
                self._cache[host] = await lookup(host, self._config)
            return self._cache[host]

    def forget(self, host: str) -> None:
        self._cache.pop(host, None)


async def lookup(host: str, config: RegistriesConfig) -> Credential | None:
    ours = config.for_host(host)
    if ours.username is not None and ours.password is not None:
        return _credential(ours.username, ours.password, "the sandboxd registries config")
    path = docker_config_path(config)
    data = _read_docker_config(path)
    key = hub_key(host)
    server_url = _HUB_SERVER_URL if key == "docker.io" else host

    helpers = data.get("credHelpers")
    if isinstance(helpers, dict):
        for name, helper in helpers.items():
            if isinstance(name, str) and normalise_key(name) == key:
                return await run_helper(_helper_name(helper, path, "credHelpers"), server_url)
    store = data.get("credsStore")
    if store:
        found = await run_helper(_helper_name(store, path, "credsStore"), server_url)
        if found is not None:
            return found
    auths = data.get("auths")
    if isinstance(auths, dict):
        entries = [(k, v) for k, v in auths.items() if isinstance(k, str)]
        # An exact key wins over one that only normalises to the host.
        entries.sort(key=lambda kv: kv[0] != host)
        for name, entry in entries:
            if normalise_key(name) == key and isinstance(entry, dict):
                found = _from_auth_entry(entry, path, name)
                if found is not None:
                    return found
    return None


def _credential(username: str, secret: str, source: str) -> Credential:
    if username == IDENTITY_TOKEN_USER:
        return Credential(username=None, identity_token=secret, source=source)
    return Credential(username=username, password=secret, source=source)


def _read_docker_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = f.read(_CONFIG_MAX + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read Docker's config {path}: {e.strerror}; fix its "
                          "permissions or point registries.docker_config elsewhere") from None
    if len(raw) > _CONFIG_MAX:
        raise ConfigError(f"Docker's config {path} is larger than {_CONFIG_MAX >> 20} MiB")
    try:
        data = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError:
        raise ConfigError(f"Docker's config {path} is not valid JSON; fix or remove it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Docker's config {path} must hold a JSON object")
    return data


def _helper_name(value: object, path: Path, key: str) -> str:
    if not isinstance(value, str) or not _HELPER_NAME.fullmatch(value):
        raise ConfigError(f"Docker's config {path}: {key} names {str(value)[:80]!r}, which is "
                          "not a credential helper name (letters, digits, '.', '_', '-')")
    return value


def _from_auth_entry(entry: dict[str, Any], path: Path, name: str) -> Credential | None:
    source = f"Docker's config {path} (auths {name!r})"
    username, password = entry.get("username"), entry.get("password")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4),
                                       validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError(f"{source}: 'auth' is not base64 of 'user:password'; run "
                              "docker login again") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise ConfigError(f"{source}: 'auth' does not decode to 'user:password'; run "
                              "docker login again")
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credential(username=username if isinstance(username, str) else None,
                          identity_token=token, source=source)
    if isinstance(username, str) and username and isinstance(password, str):
        return _credential(username, password, source)
    return None  # an empty entry: Docker keeps the secret in a helper


async def run_helper(name: str, server_url: str) -> Credential | None:
    """`docker-credential-<name> get` with the server URL on stdin; None when it has none."""
    program = f"docker-credential-{name}"
    path = shutil.which(program)
    if path is None:
        raise AuthError(f"credential helper {program} (named in Docker's config) is not "
                        "installed or not on PATH; install it or remove it from the config")
    try:
        proc = await asyncio.create_subprocess_exec(
            path, "get", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
    except OSError as e:
        raise AuthError(f"credential helper {path} cannot be run: {e.strerror}; check it "
                        "and its permissions") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(server_url.encode()), HELPER_TIMEOUT)
    except TimeoutError:
        # Its own session: the whole group goes, children that hold the pipes included.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise AuthError(f"credential helper {program} did not answer within "
                        f"{HELPER_TIMEOUT:.0f} s for {server_url}; check that its keychain "
                        "is unlocked") from None
    out, err = out[:_HELPER_OUTPUT_MAX], err[:_HELPER_OUTPUT_MAX]
    if proc.returncode != 0:
        said = (out or err).decode(errors="replace").strip()
        if "credentials not found" in said.lower():
            return None
        # A helper's error text is its own (never the secret, which it did not print).
        shown = "".join(c if c.isprintable() else "?" for c in said[:200])
        raise AuthError(f"credential helper {program} failed for {server_url} (exit "
                        f"{proc.returncode}): {shown or 'no message'}")
    try:
        data = orjson.loads(out)
        username, secret = data["Username"], data["Secret"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise AuthError(f"credential helper {program} printed something other than "
                        "{\"Username\", \"Secret\"} JSON for " + server_url) from None
    if not isinstance(username, str) or not isinstance(secret, str) or not secret:
        return None
    return _credential(username, secret, f"credential helper {program}")
