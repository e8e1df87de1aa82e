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
import re
import typing
from typing import Any, TypeVar

import msgspec
from msgspec import UNSET

from sandbox.validation import Invalid, explain

T = TypeVar("T")

_AT = re.compile(r" - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]*)`")
_TYPE = re.compile(r"^Expected `(?P<want>[a-z |]+)`, got `(?P<got>[a-z]+)`$")
_SEGMENT = re.compile(r"\[(?P<index>[^\]]*)\]|\.?(?P<name>[^.\[]+)")
# The words for JSON's types: TOML has tables and lists.
_JSON = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
         "array": "an array", "object": "an object", "null": "null"}
_TOML = {**_JSON, "array": "a list", "object": "a table", "null": "nothing"}


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
        raise _explain(e, into, data, where, _JSON if json else _TOML) from None
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


def _explain(error: msgspec.ValidationError, into: type, data: Any, where: str,
             nouns: dict[str, str]) -> Invalid:
    """sandbox.validation.explain's words, in a file's terms: a key's path with the names of
    tables' keys (msgspec's own leaves them out), unknown keys with the known ones, types
    as TOML names them, and a key's description as what to give."""
    text = str(error)
    at = _AT.search(text)
    what = text[:at.start()] if at else text
    raw = "" if at is None else at["path"] + ("[...]" if at["key"] else "")
    path, kind, description, value = _locate(into, data, raw, bool(at and at["key"]))
    field = _join(where, path)
    if u := _UNKNOWN.match(what):
        known = ", ".join(sorted(f.encode_name for f in msgspec.structs.fields(kind))) \
            if isinstance(kind, type) and issubclass(kind, msgspec.Struct) else ""
        field = _join(field, u["name"])
        word = getattr(kind, "config_word", "setting")
        return Invalid(field, f"{field}: unknown {word}" + (f"; known: {known}" if known
                                                             else "; remove it"))
    if r := _MISSING.match(what):
        field = _join(field, r["name"])
        return Invalid(field, f"{field}: required")
    t = _TYPE.match(what)
    got = "" if t is None else ", got a boolean" if t["got"] == "bool" else \
        f", got {nouns.get(t['got'], t['got'])}"
    if description:
        shown = "" if got or value is UNSET else f", got {_shown(value)}"
        detail = f"expected {description}{got}{shown}"
    elif t:
        wants = [nouns.get(w, w) for w in t["want"].split(" | ") if w != "null"]
        detail = f"expected {' or '.join(wants)}{got}"
    else:   # a range, a pattern, a choice, a type's own check: explain's words
        known = "[...]" not in raw
        plain = explain(error, whole="-", data=data if known else UNSET,
                        into=into if known else None)
        detail = plain.message.split(": ", 1)[-1]
    return Invalid(field, f"{field or 'the file'}: {detail}")


def _join(prefix: str, path: str) -> str:
    if not prefix or not path:
        return prefix or path
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


def _locate(into: Any, data: Any, raw: str, key: bool) -> tuple[str, Any, str, Any]:
    """msgspec's path, with a table's key in place of its `[...]`; the type found there (the
    table's key type when `key`), its description, and the value given (UNSET for a key).
    The key is found by converting the table's entries one by one: msgspec's own path
    leaves it out."""
    path, kind = "", into
    for m in _SEGMENT.finditer(raw):
        kind, _ = _unwrap(kind)
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if m["name"] is not None and isinstance(kind, type) \
                and issubclass(kind, msgspec.Struct):
            types = {f.encode_name: f.type for f in msgspec.structs.fields(kind)}
            kind = types.get(m["name"], Any)
            data = data.get(m["name"], UNSET) if isinstance(data, dict) else UNSET
            path = _join(path, m["name"])
        elif origin is dict:
            found = _failing_key(data, args) if m["index"] == "..." else None
            last = m.end() == len(raw)
            kind = args[0] if key and last else args[1]
            data = data.get(found, UNSET) if isinstance(data, dict) and found is not None \
                else UNSET
            path = _join(path, "<key>" if found is None else found)
        elif m["index"] is not None:
            kind = args[0] if args else Any
            index = int(m["index"]) if m["index"].isdigit() else -1
            data = data[index] if isinstance(data, list) and 0 <= index < len(data) else UNSET
            path = f"{path}[{m['index']}]"
    kind, description = _unwrap(kind)
    return path, kind, description, UNSET if key else data


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    return repr(value[:64] if isinstance(value, str) else value)


def _unwrap(kind: Any) -> tuple[Any, str]:
    """The type under Annotated and Optional, and the last description on the way."""
    description = ""
    while True:
        if typing.get_origin(kind) is typing.Annotated:
            kind, *metas = typing.get_args(kind)
            description = next((m.description for m in metas
                                if isinstance(m, msgspec.Meta) and m.description),
                               description)
        elif isinstance(kind, type) and issubclass(kind, msgspec.Struct):
            return kind, description
        elif typing.get_args(kind) and type(None) in typing.get_args(kind):
            rest = [a for a in typing.get_args(kind) if a is not type(None)]
            kind = rest[0] if len(rest) == 1 else kind
            if len(rest) != 1:
                return kind, description
        else:
            return kind, description


def _failing_key(table: Any, kinds: tuple[Any, Any]) -> str | None:
    if not isinstance(table, dict):
        return None
    for key, value in table.items():
        try:
            msgspec.convert(key, kinds[0], strict=True, dec_hook=_from_config)
            msgspec.convert(value, kinds[1], strict=True, dec_hook=_from_config)
        except msgspec.ValidationError:
            return str(key)
    return None
