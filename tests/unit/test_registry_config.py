"""Registry settings: the TOML table, its errors, which hosts may speak plain HTTP, and which
may be on a local or private network."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox.images.registry.config import (
    ConfigError,
    RegistriesConfig,
    RegistryConfig,
    parse_mirror,
)
from sandbox.images.registry.hosts import is_local_address, is_local_ip, split_host


def test_from_dict_reads_every_field(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cfg = RegistriesConfig.from_dict({
        "docker_config": str(tmp_path / "config.json"),
        "docker.io": {"mirrors": ["mirror.gcr.io", "https://cache.internal:5000/"]},
        "registry.internal:5000": {"insecure": True, "username": "ci", "password": "pw",
                                   "ca_file": str(ca), "max_concurrency": 3},
    })
    assert cfg.docker_config == tmp_path / "config.json"
    hub = cfg.for_host("docker.io")
    assert [(m.host, m.scheme) for m in hub.mirror_list()] == [
        ("mirror.gcr.io", None), ("cache.internal:5000", "https")]
    internal = cfg.for_host("registry.internal:5000")
    assert (internal.insecure, internal.username, internal.password, internal.ca_file,
            internal.max_concurrency) == (True, "ci", "pw", str(ca), 3)
    assert "pw" not in repr(internal)


def test_hub_aliases_share_one_entry_and_unknown_hosts_get_defaults() -> None:
    cfg = RegistriesConfig.from_dict({"index.docker.io": {"max_concurrency": 2}})
    assert cfg.for_host("docker.io").max_concurrency == 2
    assert cfg.for_host("registry-1.docker.io").max_concurrency == 2
    other = cfg.for_host("ghcr.io")
    assert other == RegistryConfig(host="ghcr.io")


@pytest.mark.parametrize(("data", "named"), [
    ({"h.io": {"colour": 1}}, r"\.colour: unknown setting"),
    ({"h.io": {"insecure": "yes"}}, "insecure"),
    ({"h.io": {"mirrors": "m.io"}}, "mirrors"),
    ({"h.io": {"mirrors": ["ftp://m.io"]}}, "mirrors"),
    ({"h.io": {"mirrors": ["https://m.io/path"]}}, "mirrors"),
    ({"h.io": {"username": "u"}}, "both username and password"),
    ({"h.io": {"password": ""}}, "password"),
    ({"h.io": {"ca_file": "/nonexistent/ca.pem"}}, "ca_file"),
    ({"h.io": {"max_concurrency": 0}}, "max_concurrency"),
    ({"h.io": {"max_concurrency": True}}, "max_concurrency"),
    ({"h.io": []}, "expected a table"),
    ({"h.io:99999": {}}, "port"),
    ({"bad host": {}}, "not a host name"),
    ({"docker_config": 5}, "docker_config"),
])
def test_bad_fields_are_named(data: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named) as info:
        RegistriesConfig.from_dict(data)
    assert isinstance(info.value, ValueError)


def test_a_bad_password_type_is_named_without_its_value() -> None:
    with pytest.raises(ConfigError) as info:
        RegistriesConfig.from_dict({"h.io": {"username": "u", "password": ["s3cret-value"]}})
    assert "password" in str(info.value) and "s3cret-value" not in str(info.value)


@pytest.mark.parametrize(("host", "plain"), [
    ("127.0.0.1:5000", True), ("127.8.9.10", True), ("[::1]:5000", True),
    ("localhost:5000", True), ("registry.localhost", True),
    ("10.0.0.1:5000", False), ("docker.io", False), ("localhost.example.com", False),
])
def test_plain_http_by_default_only_for_loopback(host: str, plain: bool) -> None:
    assert RegistryConfig(host=host).allows_plain_http is plain
    assert RegistryConfig(host=host, insecure=True).allows_plain_http is True
    assert RegistryConfig(host=host, insecure=False).allows_plain_http is False


def test_mirror_forms() -> None:
    assert parse_mirror("[::1]:5001", "x").host == "[::1]:5001"
    assert parse_mirror("http://m:80", "x").scheme == "http"
    with pytest.raises(ConfigError, match="x"):
        parse_mirror("https://user@m.io", "x")


@pytest.mark.parametrize(("text", "parts"), [
    ("h.io", ("h.io", None)), ("h.io:5000", ("h.io", 5000)), ("[::1]:5000", ("::1", 5000)),
    ("[fd00::1]", ("fd00::1", None)), ("::1", ("::1", None)),
])
def test_split_host(text: str, parts: tuple[str, int | None]) -> None:
    assert split_host(text) == parts


@pytest.mark.parametrize("text", ["", "[::1", "[::1]x", "h:0", "h:port", ":5000", "h:\u00b3"])
def test_split_host_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        split_host(text)


@pytest.mark.parametrize(("host", "local"), [
    ("10.1.2.3", True), ("192.168.0.1", True), ("169.254.169.254", True), ("::ffff:127.0.0.1",
                                                                          True),
    ("0.0.0.0", True), ("fe80::1", True), ("a.localhost", True), ("100.64.0.1", True),
    ("8.8.8.8", False), ("registry.example.com", False), ("2001:4860::8888", False),
    ("intranet", False),  # a name: only resolving it can tell
])
def test_local_addresses(host: str, local: bool) -> None:
    assert is_local_address(host) is local


@pytest.mark.parametrize(("address", "local"), [
    ("127.0.1.1", True), ("10.9.8.7", True), ("172.31.0.1", True), ("192.168.1.1", True),
    ("169.254.169.254", True), ("100.100.100.200", True), ("0.0.0.0", True),
    ("192.0.2.1", True), ("224.0.0.251", True), ("239.255.255.250", True),
    ("255.255.255.255", True), ("::1", True), ("::", True), ("fe80::1%eth0", True),
    ("fd12:3456::1", True), ("fec0::1", True), ("::ffff:127.0.0.1", True),
    ("64:ff9b::a00:1", True), ("ff02::1", True), ("not an address", True),
    ("93.184.216.34", False), ("::ffff:93.184.216.34", False), ("64:ff9b::5db8:d822", False),
    ("2606:4700::1111", False),
])
def test_local_ips(address: str, local: bool) -> None:
    assert is_local_ip(address) is local


def test_configured_hosts_and_their_mirrors_are_trusted() -> None:
    cfg = RegistriesConfig.from_dict({
        "docker.io": {"mirrors": ["http://hub-cache.internal:5000"]},
        "Registry.Internal:5000": {}, "auth.internal": {}})
    for host in ("registry.internal", "REGISTRY.internal.", "auth.internal",
                 "hub-cache.internal", "registry-1.docker.io", "index.docker.io"):
        assert cfg.trusts(host), host
    for host in ("registry.internal.evil", "internal", "quay.io", "", "[::1"):
        assert not cfg.trusts(host), host
    assert not RegistriesConfig().trusts("registry-1.docker.io")


def test_max_blob_bytes() -> None:
    assert RegistriesConfig().max_blob_bytes == 16 << 30
    assert RegistriesConfig.from_dict({"max_blob_bytes": 1 << 40}).max_blob_bytes == 1 << 40
    for bad in (0, -1, True, 1.5, "16G"):
        with pytest.raises(ConfigError, match=r"registries\.max_blob_bytes"):
            RegistriesConfig.from_dict({"max_blob_bytes": bad})
