"""Validation through msgspec, for request bodies and config files alike: a msgspec type is
the one declaration of a body's or a file's fields, and this module turns msgspec's errors
into ours, which name the field as a path (`files[2].path`, `pool.size`) and say what to
give instead.

Two additions to what msgspec declares, so that its messages can be plain:
- `hinted(pattern, why)`: a regex constraint with the words for a value that fails it
  (msgspec's own message would quote the regex);
- `Grouped`: a Struct base whose class names fields given together or not at all
  (`__not_both__`, `__one_of__`, `__only_with__`), checked after the fields; the same
  rules go into the JSON Schema through `group_rules`."""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

import msgspec
from msgspec import UNSET

T = TypeVar("T")

Why = str | Callable[[str], str]
DecHook = Callable[[type, Any], Any]
_HINTS: dict[str, Why] = {}


def hinted(pattern: str, why: Why) -> str:
    """`pattern`, registered with what a value that does not match it gets told: words, or a
    function of the value giving them (it may say which part is wrong)."""
    _HINTS[repr(pattern)] = why   # msgspec's message quotes it so
    return pattern


def mismatch(pattern: str, value: str) -> str:
    """What a value that does not match a `hinted` pattern is told."""
    why = _HINTS.get(repr(pattern), "is not in the form the schema gives")
    return why(value) if callable(why) else why


@dataclass(frozen=True)
class Invalid(Exception):
    """A value that does not fit its declaration: `field` is its path ("" for the whole
    value), `message` says what is wrong and starts with the path."""

    field: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Words:
    """How an error names what is wrong, for its reader: a JSON body's or a config file's."""

    nouns: dict[str, str]       # msgspec's type names in the reader's terms
    unknown: str                # an unknown key is an unknown <this> (a Table says its own)
    describe: bool              # a key's description (its Meta) says what to give


_JSON_NOUNS = {"int": "an integer", "float": "a number", "str": "a string",
               "bool": "a boolean", "array": "an array", "object": "an object", "null": "null"}
BODY = Words(_JSON_NOUNS, "field", describe=False)
_FILE_NOUNS = {**_JSON_NOUNS, "bool": "true or false"}
JSON_FILE = Words(_FILE_NOUNS, "setting", describe=True)
# TOML has tables and lists, and no null.
TOML_FILE = Words({**_FILE_NOUNS, "array": "a list", "object": "a table", "null": "nothing"},
                  "setting", describe=True)

_AT = re.compile(r" - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`$")
_TYPE = re.compile(r"^Expected `(?P<want>[a-z |]+)`, got `(?P<got>[a-z]+)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]*)`")
_PATTERN = re.compile(r"^Expected `str` matching regex (?P<pattern>'.*'|\".*\")$", re.S)
_BOUND = re.compile(r"^Expected `(?P<what>int|float|str|array|object)`(?: of length)? "
                    r"(?P<op>[<>]=) (?P<n>-?[0-9.e+]+)$")
_ENUM = re.compile(r"^Invalid enum value (?P<value>.*)$", re.S)
_SEGMENT = re.compile(r"\[(?P<index>[^\]]*)\]|\.?(?P<name>[^.\[]+)")
# What a Grouped check says: the field to blame, then the words (see _culprit).
_CULPRIT = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_]*)\x1f(?P<text>.*)$", re.S)


def _join(prefix: str, path: str) -> str:
    if not prefix or not path:
        return prefix or path
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


@dataclass(frozen=True)
class _Spot:
    """Where in a value msgspec's error points: the path with a table's key in place of
    msgspec's `[...]`, the type declared there, its description, and the value given (the
    key, when a key itself is wrong; UNSET when it is not at hand)."""

    path: str
    kind: Any
    description: str
    value: Any


def _locate(into: Any, data: Any, raw: str, key: bool, dec_hook: DecHook | None) -> _Spot:
    """Walk msgspec's path (`.files[2].path`, `.env[...]`) through the type and the data
    together. A table's key is found by converting its entries one by one (errors only:
    not fast), since msgspec's path leaves it out."""
    path, kind = "", into
    for m in _SEGMENT.finditer(raw):
        kind, _ = _unwrap(kind)
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        if m["name"] is not None:
            struct = isinstance(kind, type) and issubclass(kind, msgspec.Struct)
            types = {f.encode_name: f.type for f in msgspec.structs.fields(kind)} \
                if struct else {}
            kind = types.get(m["name"], Any)
            data = data.get(m["name"], UNSET) if isinstance(data, dict) else UNSET
            path = _join(path, m["name"])
        elif origin is dict or (m["index"] == "..." and isinstance(data, dict)):
            kinds = args if origin is dict else (Any, Any)
            if key and m.end() == len(raw):
                # A key is wrong: the path stays the table's, the value is the key.
                kind = kinds[0]
                found = _failing_key(data, kinds, dec_hook)
                data = UNSET if found is None else found
                continue
            found = _failing_key(data, kinds, dec_hook)
            kind = kinds[1]
            data = data.get(found, UNSET) if isinstance(data, dict) and found is not None \
                else UNSET
            path = _join(path, "<key>" if found is None else found)
        else:
            index = int(m["index"]) if m["index"].isdigit() else -1
            fixed = len(args) > 1 and args[-1] is not Ellipsis
            kind = (args[index] if fixed and 0 <= index < len(args) else
                    args[0] if args and not fixed else Any)
            data = data[index] if isinstance(data, list) and 0 <= index < len(data) else UNSET
            path = f"{path}[{m['index']}]"
    kind, description = _unwrap(kind)
    return _Spot(path, kind, description, data)


_ABSENT = {type(None), msgspec.UnsetType}   # beside a value's type in a union: "not given"


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
        elif set(typing.get_args(kind)) & _ABSENT:
            rest = [a for a in typing.get_args(kind) if a not in _ABSENT]
            if len(rest) != 1:
                return kind, description
            kind = rest[0]
        else:
            return kind, description


def _failing_key(table: Any, kinds: tuple[Any, ...], dec_hook: DecHook | None) -> str | None:
    if not isinstance(table, dict):
        return None
    for key, value in table.items():
        try:
            msgspec.convert(key, kinds[0], strict=True, dec_hook=dec_hook)
            msgspec.convert(value, kinds[1], strict=True, dec_hook=dec_hook)
        except msgspec.ValidationError:
            return str(key)
    return None


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    return repr(value[:64] if isinstance(value, str) else value)


def explain(error: msgspec.ValidationError, into: Any, data: Any = UNSET, *,
            prefix: str = "", whole: str = "body", words: Words = BODY,
            dec_hook: DecHook | None = None) -> Invalid:
    """Our error for msgspec's, in `words`: the field's path under `prefix` (`whole` when
    the whole value is wrong), the value that was given when `data` holds it, the known
    keys of an object with an unknown one, the values a choice allows, and what a pattern
    asks in words (`hinted`)."""
    text = str(error)
    at_m = _AT.search(text)
    what = text[:at_m.start()] if at_m else text
    key = bool(at_m and at_m["key"])
    raw = "" if at_m is None else at_m["path"] + ("[...]" if key else "")
    spot = _locate(into, data, raw, key, dec_hook)
    field = _join(prefix, spot.path)
    at = field or whole
    if u := _UNKNOWN.match(what):
        struct = isinstance(spot.kind, type) and issubclass(spot.kind, msgspec.Struct)
        known = ", ".join(sorted(f.encode_name for f in msgspec.structs.fields(spot.kind))) \
            if struct else ""
        field = _join(field, u["name"])
        word = getattr(spot.kind, "config_word", words.unknown)
        return Invalid(field, f"{field}: unknown {word}" + (f"; known: {known}" if known
                                                             else "; remove it"))
    if r := _MISSING.match(what):
        field = _join(field, r["name"])
        return Invalid(field, f"{field}: required")
    if c := _CULPRIT.match(what):
        return Invalid(_join(field, c["field"]), f"{at}: {c['text']}")
    detail = _detail(what, spot, words, key)
    if key:
        named = f"key {_shown(spot.value)}" if spot.value is not UNSET else "a key"
        return Invalid(field, f"{at}: {named} {detail}")
    return Invalid(field, f"{at}: {detail}")


def _detail(what: str, spot: _Spot, words: Words, key: bool) -> str:
    t = _TYPE.match(what)
    got = "" if t is None else ", got a boolean" if t["got"] == "bool" else \
        f", got {words.nouns.get(t['got'], t['got'])}"
    if words.describe and spot.description:
        shown = "" if got or key or spot.value is UNSET else f", got {_shown(spot.value)}"
        return f"expected {spot.description}{got}{shown}"
    if t:
        wants = [words.nouns.get(w, w) for w in t["want"].split(" | ") if w != "null"]
        return f"expected {' or '.join(wants)}{got}"
    if p := _PATTERN.match(what):
        why = _HINTS.get(p["pattern"], "is not in the form the schema gives")
        if callable(why):
            why = why(spot.value if isinstance(spot.value, str) else "")
        return f"{_shown(spot.value)} {why}" if spot.value is not UNSET and not key else why
    if b := _BOUND.match(what):
        return _bound(spot.value, b["what"], b["op"], b["n"])
    if n := _ENUM.match(what):
        values = typing.get_args(spot.kind) if typing.get_origin(spot.kind) is Literal else ()
        return (f"{n['value'][:80]} is not one of "
                f"{', '.join(sorted(map(str, values))) or 'the values the schema lists'}")
    return f"{what[0].lower()}{what[1:]}" if what else "invalid"


def _bound(value: Any, what: str, op: str, n: str) -> str:
    if what in ("int", "float"):
        shown = f"{value} " if value is not UNSET else ""
        return f"{shown}is out of range; give {'at least' if op == '>=' else 'at most'} {n}"
    unit = {"str": "characters", "array": "item(s)", "object": "entries"}[what]
    if op == ">=":
        if what == "str" and n == "1":
            return "must not be empty"
        return f"give at least {n} {unit}"
    return f"more than {n} {unit}" if what != "str" else f"longer than {n} {unit}"


def convert(data: Any, into: type[T], prefix: str = "", whole: str = "body",
            whole_floats: bool = False) -> T:
    """`data` (decoded JSON or TOML) as an `into`, or Invalid naming the field. With
    `whole_floats`, a number with no fraction (2.0) is an integer, as JSON Schema has it
    since draft 6 (JSON itself has one kind of number): tried only after a failure, so the
    common case costs nothing."""
    try:
        return msgspec.convert(data, into, strict=True)
    except msgspec.ValidationError as e:
        if whole_floats and _FLOAT_FOR_INT.search(str(e)):
            return convert(_whole(data), into, prefix, whole)
        raise explain(e, into, data, prefix=prefix, whole=whole) from None


# An int, or an int in a union (`int | null`): msgspec names the union whole.
_FLOAT_FOR_INT = re.compile(r"^Expected `int(?: \| [a-z]+)*`, got `float`")


def _whole(data: Any) -> Any:
    """`data` with each float that has no fraction as an int."""
    if isinstance(data, float):
        return int(data) if data.is_integer() else data
    if isinstance(data, dict):
        return {k: _whole(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_whole(v) for v in data]
    return data


def _culprit(field: str, text: str) -> ValueError:
    """What a __post_init__ raises: msgspec adds the object's path, explain the field's."""
    return ValueError(f"{field}\x1f{text}")


def _names(names: tuple[str, ...]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


class Grouped(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A body or table whose absent fields are UNSET (given and absent stay apart), with
    rules between its fields: at most one of each `__not_both__` pair, exactly one of each
    `__one_of__` group, and each `__only_with__` key only when its value is given."""

    __not_both__: ClassVar[tuple[tuple[str, str], ...]] = ()
    __one_of__: ClassVar[tuple[tuple[str, ...], ...]] = ()
    __only_with__: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __post_init__(self) -> None:
        for a, b in self.__not_both__:
            if getattr(self, a) is not UNSET and getattr(self, b) is not UNSET:
                raise _culprit(b, f"give {a} or {b}, not both")
        for group in self.__one_of__:
            given = tuple(n for n in group if getattr(self, n) is not UNSET)
            if len(given) != 1:
                raise _culprit(given[-1] if given else group[0],
                               f"give exactly one of {_names(group)}"
                               + (f"; {_names(given)} were given" if given else ""))
        for field, needs in self.__only_with__:
            if getattr(self, field) is not UNSET and getattr(self, needs) is UNSET:
                raise _culprit(field, f"only with {needs}; give {needs} too, or leave "
                                      f"{field} out")


def group_rules(cls: type[Grouped]) -> tuple[list[dict[str, Any]], list[str]]:
    """A Grouped class's rules in JSON Schema, to put in its object schema's allOf, and the
    same in words, for its description."""
    rules: list[dict[str, Any]] = []
    notes: list[str] = []
    for a, b in cls.__not_both__:
        rules.append({"not": {"required": [a, b]}})
        notes.append(f"at most one of {a} and {b}.")
    for group in cls.__one_of__:
        rules.append({"oneOf": [{"required": [n]} for n in group]})
        notes.append(f"exactly one of {_names(group)}.")
    for field, needs in cls.__only_with__:
        rules.append({"anyOf": [{"required": [needs]}, {"not": {"required": [field]}}]})
        notes.append(f"{field} only with {needs}.")
    return rules, notes
