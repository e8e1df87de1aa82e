"""sandbox.configfile: a config file read through its msgspec types; each error names the
key's path (a table's key included, which msgspec's own path leaves out), lists the known
keys beside an unknown one, and says what to give."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import pytest
from msgspec import Meta

from sandbox.configfile import Table, read, table_of
from sandbox.engine.pool import PoolConfig
from sandbox.validation import Invalid

Seconds = Annotated[float, Meta(gt=0, description="a positive number of seconds")]


class Host(str):
    @classmethod
    def from_config(cls, value: Any) -> Host:
        if not isinstance(value, str) or " " in value:
            raise ValueError(f"{value!r} is not a host name")
        return cls(value.lower())


class Peer(Table):
    url: Host
    timeout_s: Seconds = 1.0


class File(Table):
    count: Annotated[int, Meta(ge=1)] = 1
    hosts: tuple[Host, ...] = ()
    peers: dict[Annotated[str, Meta(pattern="^[a-z]+$")], Peer] = \
        msgspec.field(default_factory=dict)
    items: tuple[Peer, ...] = ()


def _error(data: Any, into: type = File, **kw: Any) -> str:
    with pytest.raises(Invalid) as e:
        read(data, into, "top", **kw)
    assert str(e.value).startswith(f"{e.value.field}: ")
    return str(e.value)


def test_values_are_read_with_their_own_types() -> None:
    f = read({"hosts": ["A.example"], "peers": {"n": {"url": "H"}}}, File)
    # a plain str: msgspec, which encodes the API's bodies, refuses str subclasses
    assert f.hosts == ("a.example",) and type(f.hosts[0]) is str
    assert msgspec.json.encode(f)
    assert f.peers["n"] == Peer(url=Host("h"), timeout_s=1.0)
    assert read({}, File) == File()


@pytest.mark.parametrize(("data", "message"), [
    ({"colour": 1}, "top.colour: unknown setting; known: count, hosts, items, peers"),
    ({"items": [{"url": "h"}, {"url": "h", "x": 1}]},
     "top.items[1].x: unknown setting; known: timeout_s, url"),
    ({"items": [{}]}, "top.items[0].url: required"),
    ({"count": 0}, "top.count: 0 is out of range; give at least 1"),
    ({"count": "2"}, "top.count: expected an integer, got a string"),
    ({"hosts": "h"}, "top.hosts: expected a list, got a string"),
    ({"hosts": ["a b"]}, "top.hosts[0]: 'a b' is not a host name"),
    ({"peers": []}, "top.peers: expected a table, got a list"),
    # a table's key: msgspec says only `[...]`
    ({"peers": {"a": {"url": "h"}, "b": {"url": "h", "timeout_s": 0}}},
     "top.peers.b.timeout_s: expected a positive number of seconds, got 0"),
    ({"peers": {"a": {"url": "h"}, "b": {"url": "a b"}}},
     "top.peers.b.url: 'a b' is not a host name"),
    ({"peers": {"a": {"url": "h"}, "B": {"url": "h"}}}, "top.peers: key 'B' "),
])
def test_errors_name_the_key_and_say_what_to_give(data: Any, message: str) -> None:
    assert _error(data).startswith(message)


def test_json_files_get_jsons_words() -> None:
    assert _error({"peers": []}, json=True) == "top.peers: expected an object, got an array"


def test_a_dataclass_is_read_through_a_table_of_its_fields() -> None:
    @dataclass(frozen=True)
    class Limits:
        wall_ms: Annotated[int, Meta(gt=0)] | None = None
        name: str = "x"

    table = table_of(Limits, "limit")
    assert read({"wall_ms": 5}, table) == table(wall_ms=5, name="x")
    assert _error({"cpu": 1}, table) == "top.cpu: unknown limit; known: name, wall_ms"


def test_pools_cross_field_rule() -> None:
    assert read({"min_idle": 0, "max_idle": 0}, PoolConfig) == PoolConfig(min_idle=0,
                                                                          max_idle=0)
    assert _error({"min_idle": 5}, PoolConfig) == \
        "top: min_idle (5) is above max_idle (4): lower min_idle or raise max_idle"
    assert _error({"max_live": -1}, PoolConfig).startswith("top.max_live: -1 is out of range")
