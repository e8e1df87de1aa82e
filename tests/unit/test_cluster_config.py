"""[cluster]: a node's name, its peers, the template for the others; what an id names."""

from __future__ import annotations

import tomllib

import pytest

from service.cluster import node_of
from service.config import ClusterConfig, ConfigError, ServiceConfig, from_dict

STATE = '\n[server]\nstate_dir = "/tmp/unused"\n'


def _load(toml: str, env: dict[str, str] | None = None) -> ServiceConfig:
    return from_dict(tomllib.loads(toml + STATE), env=env or {})


def test_without_a_cluster_nothing_changes() -> None:
    config = _load("")
    assert config.cluster == ClusterConfig()
    assert config.engine_config().node is None and config.cluster.own_hosts() == ()


def test_peers_and_the_template_find_each_node() -> None:
    config = _load("""
[cluster]
node = "sandboxd-0"
peers = { sandboxd-0 = "http://10.0.0.1:8643/", n2 = "https://n2.example:443" }
peer_url = "http://{node}.sandboxd-nodes:8643"
connect_timeout_s = 0.5
""").cluster
    assert config.url_of("n2") == "https://n2.example:443"
    assert config.url_of("sandboxd-7f9c-x2") == "http://sandboxd-7f9c-x2.sandboxd-nodes:8643"
    assert config.url_of("Not.A.Label") is None
    assert config.own_hosts() == ("10.0.0.1",)
    assert config.connect_timeout_s == 0.5


def test_the_environment_names_the_node() -> None:
    config = _load('[cluster]\npeer_url = "http://{node}.sandboxd-nodes:8643"\n',
                   env={"SANDBOXD_NODE": "sandboxd-5d8f-abcde"})
    assert config.cluster.node == "sandboxd-5d8f-abcde"
    assert config.engine_config().node == "sandboxd-5d8f-abcde"
    assert config.cluster.own_hosts() == ("sandboxd-5d8f-abcde.sandboxd-nodes",)


@pytest.mark.parametrize(("toml", "words"), [
    ('node = "N1"', ["cluster.node", "lower-case"]),
    ('node = "n.1"', ["cluster.node"]),
    ('node = "-n1"', ["cluster.node"]),
    (f'node = "{"n" * 64}"', ["cluster.node", "1 to 63"]),
    ('peers = { n2 = "http://h:1" }', ["cluster.node: required"]),
    ('node = "n1"\npeers = { n2 = "ftp://h:1" }', ["cluster.peers.n2", "base URL"]),
    ('node = "n1"\npeers = { n2 = "http://h:1/api" }', ["cluster.peers.n2"]),
    ('node = "n1"\npeers = { n2 = "http://user@h:1" }', ["cluster.peers.n2"]),
    ('node = "n1"\npeers = { N2 = "http://h:1" }', ["cluster.peers"]),
    ('node = "n1"\npeers = ["http://h:1"]', ["cluster.peers", "table"]),
    ('node = "n1"\npeer_url = "http://sandboxd-nodes:8643"', ["cluster.peer_url", "{node}"]),
    ('node = "n1"\npeer_url = "http://h:1/{node}"', ["cluster.peer_url"]),
    ('node = "n1"\nconnect_timeout_s = 0', ["cluster.connect_timeout_s"]),
    ('node = "n1"\npeer = "x"', ["cluster.peer", "unknown setting"]),
])
def test_bad_cluster_settings_name_the_setting(toml: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        _load("[cluster]\n" + toml + "\n")
    for word in words:
        assert word in str(e.value)


def test_an_id_names_its_node() -> None:
    assert node_of("n1.0123456789abcdef") == "n1"
    assert node_of("sandboxd-0.job_" + "0" * 32) == "sandboxd-0"
    assert node_of("0123456789abcdef") is None
    assert node_of("job_" + "0" * 32) is None
    assert node_of("../x") is None and node_of(".x") is None
