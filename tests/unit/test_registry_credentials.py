"""Credential lookup: our config, then Docker's config.json (credHelpers, credsStore through a
fake docker-credential-test program on PATH, auths with normalised keys)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
from pathlib import Path

import pytest

from sandbox.errors import AuthError
from sandbox.images.registry import credentials
from sandbox.images.registry.config import ConfigError, RegistriesConfig, RegistryConfig
from sandbox.images.registry.credentials import CredentialStore, lookup, normalise_key


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write_config(tmp_path: Path, data: dict) -> RegistriesConfig:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return RegistriesConfig(docker_config=path)


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A docker-credential-test on PATH: answers from its table, logs what it was asked."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "helper.log"
    script = bindir / "docker-credential-test"
    script.write_text(f"""#!/bin/sh
read -r host || true
echo "$1 $host" >> {log}
case "$host" in
  helped.io) echo '{{"ServerURL":"helped.io","Username":"hu","Secret":"hs"}}' ;;
  https://index.docker.io/v1/) echo '{{"ServerURL":"x","Username":"hubu","Secret":"hubs"}}' ;;
  token.io) echo '{{"ServerURL":"token.io","Username":"<token>","Secret":"refresh-1"}}' ;;
  broken.io) echo 'keychain locked' >&2; exit 3 ;;
  slow.io) sleep 30 ;;
  *) echo 'credentials not found in native keychain'; exit 1 ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_our_config_comes_first(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"auths": {"r.io": {"auth": b64("docker:pw")}}})
    cfg = RegistriesConfig(registries={"r.io": RegistryConfig("r.io", username="me",
                                                              password="mine")},
                           docker_config=cfg.docker_config)
    cred = asyncio.run(lookup("r.io", cfg))
    assert cred is not None and cred.basic == ("me", "mine")
    assert "mine" not in repr(cred)


@pytest.mark.parametrize("key", ["https://index.docker.io/v1/", "docker.io", "index.docker.io",
                                 "registry-1.docker.io", "http://docker.io/v2/"])
def test_hub_keys_normalise(tmp_path: Path, key: str) -> None:
    cfg = write_config(tmp_path, {"auths": {key: {"auth": b64("hub:pw:with:colons")}}})
    for host in ("docker.io", "registry-1.docker.io"):
        cred = asyncio.run(lookup(host, cfg))
        assert cred is not None and cred.basic == ("hub", "pw:with:colons")


def test_auths_fields_identity_token_and_empty_entries(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"auths": {
        "a.io": {"username": "u", "password": "p"},
        "https://b.io:5000/v1/": {"auth": b64("bu:bp")},
        "c.io": {"auth": "", "identitytoken": "idt"},
        "d.io": {"auth": ""},
    }})
    assert asyncio.run(lookup("a.io", cfg)).basic == ("u", "p")
    assert asyncio.run(lookup("b.io:5000", cfg)).basic == ("bu", "bp")
    c = asyncio.run(lookup("c.io", cfg))
    assert c.identity_token == "idt" and c.basic is None
    assert asyncio.run(lookup("d.io", cfg)) is None
    assert asyncio.run(lookup("b.io", cfg)) is None  # another port is another registry


def test_bad_auth_value_is_reported_without_the_secret(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"auths": {"a.io": {"auth": "!!not-base64-secret!!"}}})
    with pytest.raises(ConfigError, match="base64") as info:
        asyncio.run(lookup("a.io", cfg))
    assert "secret" not in str(info.value)


def test_missing_and_malformed_config_files(tmp_path: Path) -> None:
    assert asyncio.run(lookup("a.io", RegistriesConfig(docker_config=tmp_path / "no"))) is None
    bad = tmp_path / "config.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        asyncio.run(lookup("a.io", RegistriesConfig(docker_config=bad)))


def test_docker_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"e.io": {"auth": b64("e:f")}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert asyncio.run(lookup("e.io", RegistriesConfig())).basic == ("e", "f")


def test_cred_helpers_then_store_then_auths(tmp_path: Path, helper: Path) -> None:
    cfg = write_config(tmp_path, {
        "credHelpers": {"helped.io": "test", "token.io": "test"},
        "credsStore": "test",
        "auths": {"plain.io": {"auth": b64("pu:pp")}, "helped.io": {"auth": b64("no:no")}},
    })
    assert asyncio.run(lookup("helped.io", cfg)).basic == ("hu", "hs")
    token = asyncio.run(lookup("token.io", cfg))
    assert token.identity_token == "refresh-1" and token.username is None
    hub = asyncio.run(lookup("docker.io", cfg))
    assert hub.basic == ("hubu", "hubs")
    # The store has nothing for plain.io: the auths entry is used.
    assert asyncio.run(lookup("plain.io", cfg)).basic == ("pu", "pp")
    assert helper.read_text().splitlines() == [
        "get helped.io", "get token.io", "get https://index.docker.io/v1/", "get plain.io"]


def test_helper_failures_are_clear(tmp_path: Path, helper: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path, {"credHelpers": {"broken.io": "test", "gone.io": "absent",
                                                  "slow.io": "test", "evil.io": "../x"}})
    with pytest.raises(AuthError, match=r"docker-credential-test failed.*keychain locked"):
        asyncio.run(lookup("broken.io", cfg))
    with pytest.raises(AuthError, match=r"docker-credential-absent.*not installed"):
        asyncio.run(lookup("gone.io", cfg))
    with pytest.raises(ConfigError, match="not a credential helper name"):
        asyncio.run(lookup("evil.io", cfg))
    monkeypatch.setattr(credentials, "HELPER_TIMEOUT", 0.3)
    with pytest.raises(AuthError, match="did not answer"):
        asyncio.run(lookup("slow.io", cfg))


def test_store_asks_a_helper_once_per_host(tmp_path: Path, helper: Path) -> None:
    cfg = write_config(tmp_path, {"credHelpers": {"helped.io": "test"}})
    store = CredentialStore(cfg)

    async def twice() -> None:
        await asyncio.gather(*(store.get("helped.io") for _ in range(5)))
    asyncio.run(twice())
    assert helper.read_text().splitlines() == ["get helped.io"]


def test_normalise_key() -> None:
    assert normalise_key("https://Quay.io/v2/") == "quay.io"
    assert normalise_key("localhost:5000") == "localhost:5000"
