"""Config files read through msgspec types: a table's Struct is the one declaration of its
keys, their ranges (Meta) and defaults; `read` turns a decoded file (TOML or JSON) into it,
and its errors name the key's path (`pool.max_idle`, `tokens[2].name`), list the known keys
of a table that has an unknown one, and add the key's description (what to give).

A value with a format of its own (a host, a URL) is declared as a str subclass with a
`from_config(value)` classmethod that returns it or raises ValueError saying what is wrong;
msgspec calls it with the key's path at hand. `read` hands such values on as plain str:
the class is the key's format, not a type the rest of the code meets (msgspec, which
encodes the API's bodies, refuses str subclasses).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

import msgspec

from sandbox.validation import JSON_FILE, TOML_FILE, explain

T = TypeVar("T")

class Table(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A table of a config file: its fields are its keys; unknown keys are refused."""

    config_word = "setting"     # what an unknown key is called: "unknown setting"


def table_of(cls: type, word: str = "setting") -> type[Table]:
    """A Table of the dataclass `cls`'s fields (their types, Meta and defaults), for a
    dataclass the rest of the code builds, replaces and compares as one: the dataclass
    stays the one declaration, and the Table refuses keys it does not have."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return msgspec.defstruct(cls.__name__, [
        (f.name, hints[f.name], f.default if f.default is not dataclasses.MISSING
         else msgspec.field(default_factory=f.default_factory))
        for f in dataclasses.fields(cls)], bases=(Table,), namespace={"config_word": word})


def read(data: Any, into: type[T], where: str = "", *, json: bool = False) -> T:
    """`data` as an `into`, or Invalid whose path begins with `where` (a file's table).
    `json`: a JSON file's (or body's) words for types, not TOML's."""
    try:
        value = msgspec.convert(data, into, strict=True, dec_hook=_from_config)
    except msgspec.ValidationError as e:
        raise explain(e, into, data, prefix=where, whole="the file",
                      words=JSON_FILE if json else TOML_FILE, dec_hook=_from_config) from None
    return _plain(value)


def _plain(value: Any) -> Any:
    """`value` with every str subclass in it a str (Structs changed in place)."""
    if isinstance(value, str):
        return value if type(value) is str else str(value)
    if isinstance(value, tuple | list):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            msgspec.structs.force_setattr(value, name, _plain(getattr(value, name)))
    return value


def _from_config(kind: type, value: Any) -> Any:
    parse = getattr(kind, "from_config", None)
    if parse is None:
        raise NotImplementedError(kind)
    return parse(value)
