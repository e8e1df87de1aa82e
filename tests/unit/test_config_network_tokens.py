"""The service config's [network] section, [server] log_format, per-token proxy_hosts and
the tokens_file a systemd unit keeps its tokens in."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from service.config import ConfigError, from_dict, load

STATE = '[server]\nstate_dir = "/srv/sandboxd"\n'
TOKEN_A = "a" * 20
TOKEN_B = "b" * 20


def _load(toml: str, base: Path | None = None) -> Any:
    return from_dict(tomllib.loads(toml + STATE), env={}, base=base)


def test_network_defaults_block_private_loopback_link_local_and_cgnat() -> None:
    net = _load("").network
    assert (net.full, net.proxy_hosts) == (False, ())
    blocked = [ipaddress.ip_network(n) for n in net.blocked]
    for address in ("10.1.2.3", "172.31.0.1", "192.168.1.1", "127.0.0.1", "169.254.169.254",
                    "100.64.0.1", "::1", "fd00::1", "fe80::1"):
        ip = ipaddress.ip_address(address)
        assert any(ip in n for n in blocked if n.version == ip.version), address
    for address in ("8.8.8.8", "2001:4860:4860::8888"):
        ip = ipaddress.ip_address(address)
        assert not any(ip in n for n in blocked if n.version == ip.version), address


def test_network_keys_are_read_and_hosts_normalised() -> None:
    net = _load('[network]\nfull = true\nproxy_hosts = ["PyPI.org.", "*.pythonhosted.org", '
                '"example.com:8443", "[2001:DB8::1]:8080", "192.0.2.7"]\n'
                'blocked = ["198.18.0.0/15"]\n').network
    assert net.full is True
    assert net.proxy_hosts == ("pypi.org", "*.pythonhosted.org", "example.com:8443",
                               "[2001:db8::1]:8080", "192.0.2.7")
    assert net.blocked == ("198.18.0.0/15",)
    assert _load("[network]\nblocked = []\n").network.blocked == ()


@pytest.mark.parametrize("table, where", [
    ('full = "yes"', "network.full"),
    ('blocked = ["10.0.0.0/33"]', "network.blocked[0]"),
    ('blocked = ["10.0.0.1/8"]', "network.blocked[0]"),   # host bits set: a typo
    ('blocked = "10.0.0.0/8"', "network.blocked"),
    ('proxy_hosts = ["http://pypi.org"]', "network.proxy_hosts[0]"),
    ('proxy_hosts = ["pypi.org/simple"]', "network.proxy_hosts[0]"),
    ('proxy_hosts = ["*"]', "network.proxy_hosts[0]"),
    ('proxy_hosts = ["a.*.org"]', "network.proxy_hosts[0]"),
    ('proxy_hosts = ["pypi.org:0"]', "network.proxy_hosts[0]"),
    ('proxy_hosts = [""]', "network.proxy_hosts[0]"),
    ('proxy_hosts = ["[fe80::1"]', "network.proxy_hosts[0]"),
    ("mode = 1", "network.mode"),
])
def test_bad_network_keys_are_refused_by_name(table: str, where: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(where)}: "):
        _load(f"[network]\n{table}\n")


def test_a_token_adds_its_own_proxy_hosts() -> None:
    c = _load(f'[[tokens]]\ntoken = "{TOKEN_A}"\nproxy_hosts = ["*.example.org:443"]\n'
              f'[[tokens]]\ntoken = "{TOKEN_B}"\n')
    assert [t.proxy_hosts for t in c.tokens] == [("*.example.org:443",), ()]
    with pytest.raises(ConfigError, match=r"^tokens\[0\]\.proxy_hosts\[0\]"):
        _load(f'[[tokens]]\ntoken = "{TOKEN_A}"\nproxy_hosts = ["bad host"]\n')


def test_log_format() -> None:
    assert _load("").log_format == "text"
    assert from_dict({"server": {"state_dir": "/s", "log_format": "json"}}, {}).log_format \
        == "json"
    with pytest.raises(ConfigError, match=r"^server\.log_format: 'xml' is not one of json, "
                                          r"text$"):
        from_dict({"server": {"state_dir": "/s", "log_format": "xml"}}, {})


def _tokens_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_tokens_file_is_read_as_if_inline(tmp_path: Path) -> None:
    path = _tokens_file(tmp_path, f'[[tokens]]\ntoken = "{TOKEN_B}"\nname = "bob"\n'
                                  'max_sessions = 2\n')
    c = _load(f'tokens_file = "{path}"\n[[tokens]]\ntoken = "{TOKEN_A}"\nname = "alice"\n')
    assert [(t.name, t.max_sessions) for t in c.tokens] == [("alice", None), ("bob", 2)]
    assert c.tokens_file == path
    # relative to the config file's directory
    assert _load('tokens_file = "tokens.toml"\n', base=tmp_path).tokens[0].name == "bob"


def test_load_finds_a_relative_tokens_file_next_to_the_config(tmp_path: Path) -> None:
    _tokens_file(tmp_path, f'[[tokens]]\ntoken = "{TOKEN_B}"\n')
    config = tmp_path / "sandboxd.toml"
    config.write_text('tokens_file = "tokens.toml"\n' + STATE)
    assert [t.token for t in load(config, env={}).tokens] == [TOKEN_B]
    config.write_text('tokens_file = "tokens.toml"\n[server]\nport = "80"\n')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: server\.port: expected "
                                          "an integer, got a string$"):
        load(config, env={})


def test_a_token_twice_names_both_places(tmp_path: Path) -> None:
    path = _tokens_file(tmp_path, f'[[tokens]]\ntoken = "{TOKEN_B}"\n'
                                  f'[[tokens]]\ntoken = "{TOKEN_A}"\n')
    with pytest.raises(ConfigError) as e:
        _load(f'tokens_file = "{path}"\n[[tokens]]\ntoken = "{TOKEN_A}"\n')
    assert str(e.value).startswith(f"{path} tokens[1].token: the same token as tokens[0]")
    with pytest.raises(ConfigError, match=r"SANDBOXD_TOKENS\[0\]\.token: the same token as "
                                          r"tokens\[0\]"):
        from_dict(tomllib.loads(f'[[tokens]]\ntoken = "{TOKEN_A}"\n' + STATE),
                  env={"SANDBOXD_TOKENS": TOKEN_A})


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_a_tokens_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = _tokens_file(tmp_path, f'[[tokens]]\ntoken = "{TOKEN_A}"\n', mode)
    with pytest.raises(ConfigError, match=rf"tokens_file: {path} has mode 0{mode:o}.*"
                                          rf"chmod 600 {path}"):
        _load(f'tokens_file = "{path}"\n')
    os.chmod(path, 0o400)
    assert _load(f'tokens_file = "{path}"\n').tokens[0].token == TOKEN_A


@pytest.mark.parametrize("text, message", [
    ('[server]\nport = 1\n', "server: unknown setting; known: tokens"),
    ('tokens = 3\n', "tokens: expected a list"),
    ('[[tokens]]\ntoken = "short"\n', r"tokens\[0\]\.token: expected a secret of at least 16"),
    ('[[tokens\n', "not valid TOML"),
])
def test_a_bad_tokens_file_is_refused_naming_it(tmp_path: Path, text: str,
                                                message: str) -> None:
    path = _tokens_file(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as e:
        _load(f'tokens_file = "{path}"\n')
    assert str(path) in str(e.value)


def test_a_missing_tokens_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^tokens_file: cannot read .*missing\.toml"):
        _load(f'tokens_file = "{tmp_path / "missing.toml"}"\n')
