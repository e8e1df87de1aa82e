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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgspec
from msgspec import UNSET

T = TypeVar("T")

_AT = re.compile(r" - at (?:`key` in )?`\$(?P<path>[^`]*)`$")
_KEY = re.compile(r" - at `key` in `\$(?P<path>[^`]*)`$")
_TYPES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "a boolean",
          "array": "an array", "object": "an object", "null": "null"}
_EXPECTED = re.compile(r"^Expected `(?P<want>[a-z]+)`, got `(?P<got>[a-z]+)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]*)`$")
_PATTERN = re.compile(r"^Expected `str` matching regex (?P<pattern>'.*'|\".*\")$", re.S)
_BOUND = re.compile(r"^Expected `(?P<what>int|float|str|array|object)`(?: of length)? "
                    r"(?P<op>[<>]=) (?P<n>-?[0-9.e+]+)$")
_ENUM = re.compile(r"^Invalid enum value (?P<value>.*)$", re.S)
# What a Grouped check says: the field to blame, then the words (see _culprit).
_CULPRIT = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_]*)\x1f(?P<text>.*)$", re.S)

Why = str | Callable[[str], str]
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


def _join(prefix: str, path: str) -> str:
    path = path.lstrip(".")
    if not prefix:
        return path
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}" if path else prefix


_STEP = re.compile(r"\.([^.\[]+)|\[(-?\d+)\]|\[([^\]]*)\]")


def _value_at(data: Any, path: str) -> Any:
    """The value at a msgspec path (`.files[2].path`) in `data`, or UNSET."""
    for name, index, key in _STEP.findall(path):
        try:
            data = data[int(index)] if index else data[name or key]
        except (KeyError, IndexError, TypeError, ValueError):
            return UNSET
    return data


def _literals(into: Any, path: str) -> tuple[Any, ...]:
    """The values a Literal at `path` in the type `into` allows (errors only: not fast)."""
    info = msgspec.inspect.type_info(into)
    for name, index, key in [*_STEP.findall(path), ("", "", "")]:
        while True:
            if isinstance(info, msgspec.inspect.Metadata):
                info = info.type
            elif isinstance(info, msgspec.inspect.UnionType):
                kinds = [t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)]
                if len(kinds) != 1:
                    return ()
                info = kinds[0]
            else:
                break
        if not (name or index or key):
            break
        if isinstance(info, msgspec.inspect.StructType) and name:
            info = next((f.type for f in info.fields if f.encode_name == name), None)
        elif isinstance(info, msgspec.inspect.ListType) and index:
            info = info.item_type
        elif isinstance(info, msgspec.inspect.TupleType) and index:
            info = info.item_types[int(index)]
        elif isinstance(info, msgspec.inspect.DictType):
            info = info.value_type
        else:
            return ()
    return tuple(info.values) if isinstance(info, msgspec.inspect.LiteralType) else ()


def _key_of(data: Any, into: Any, raw: str) -> str:
    """`raw` with its first `[...]` (msgspec's word for "some value of this dict") made the
    key whose value is wrong: each entry is tried alone (errors only: not fast)."""
    head, _, tail = raw.partition("[...]")
    table = _value_at(data, head)
    if not isinstance(table, dict):
        return raw
    items = dict(table)
    try:
        for key, value in items.items():
            table.clear()
            table[key] = value
            try:
                msgspec.convert(data, into, strict=True)
            except msgspec.ValidationError as e:
                m = _AT.search(str(e))
                if m and m["path"].startswith(f"{head}[...]"):
                    return f"{head}.{key}{tail}"
    finally:
        table.clear()
        table.update(items)
    return raw


def _shown(value: Any) -> str:
    return repr(value[:64] if isinstance(value, str) else value)


def explain(error: msgspec.ValidationError, prefix: str = "", whole: str = "body",
            data: Any = UNSET, into: Any = None) -> Invalid:
    """Our error for msgspec's: the field's path under `prefix`, and a plain message (with
    the value that was given, when `data` holds it, and the values allowed, when `into`,
    the type, lists them)."""
    text = str(error)
    m = _AT.search(text)
    raw = m["path"] if m else ""
    if "[...]" in raw and into is not None and data is not UNSET:
        raw = _key_of(data, into, raw)
    path = _join(prefix, raw)
    what = text[:m.start()] if m else text
    at = path or whole
    value = _value_at(data, raw) if data is not UNSET else UNSET
    if _KEY.search(text):
        value = UNSET  # the key is what is wrong, not the value under it
    if u := _UNKNOWN.match(what):
        field = _join(path, u["name"])
        return Invalid(field, f"{at}: unknown field {u['name'][:64]!r}; remove it or check "
                              "its spelling")
    if r := _MISSING.match(what):
        field = _join(path, r["name"])
        return Invalid(field, f"{field}: required")
    if e := _EXPECTED.match(what):
        want, got = (_TYPES.get(e[k], e[k]) for k in ("want", "got"))
        return Invalid(path, f"{at}: expected {want}, got {got}")
    if c := _CULPRIT.match(what):
        return Invalid(_join(path, c["field"]), f"{at}: {c['text']}")
    if p := _PATTERN.match(what):
        why = _HINTS.get(p["pattern"], "is not in the form the schema gives")
        if callable(why):
            why = why(value if isinstance(value, str) else "")
        if _KEY.search(text):
            return Invalid(path, f"{at}: a key {why}")
        shown = f" {_shown(value)}" if value is not UNSET else ""
        return Invalid(path, f"{at}:{shown} {why}")
    if b := _BOUND.match(what):
        return Invalid(path, _bound(at, value, b["what"], b["op"], b["n"]))
    if n := _ENUM.match(what):
        values = _literals(into, raw) if into is not None else ()
        return Invalid(path, f"{at}: {n['value'][:80]} is not one of "
                             f"{', '.join(map(str, values)) or 'the values the schema lists'}")
    return Invalid(path, f"{at}: {what[0].lower()}{what[1:]}" if what else f"{at}: invalid")


def _bound(at: str, value: Any, what: str, op: str, n: str) -> str:
    if what in ("int", "float"):
        shown = f"{value} " if value is not UNSET else ""
        return (f"{at}: {shown}is out of range; give "
                f"{'at least' if op == '>=' else 'at most'} {n}")
    unit = {"str": "characters", "array": "item(s)", "object": "entries"}[what]
    if op == ">=":
        if what == "str" and n == "1":
            return f"{at}: must not be empty"
        return f"{at}: give at least {n} {unit}"
    return f"{at}: more than {n} {unit}" if what != "str" else f"{at}: longer than {n} {unit}"


def convert(data: Any, into: type[T], prefix: str = "", whole: str = "body",
            whole_floats: bool = False) -> T:
    """`data` (decoded JSON or TOML) as an `into`, or Invalid naming the field. With
    `whole_floats`, a number with no fraction (2.0) is an integer, as JSON Schema has it
    since draft 6 (JSON itself has one kind of number): tried only after a failure, so the
    common case costs nothing."""
    try:
        return msgspec.convert(data, into, strict=True)
    except msgspec.ValidationError as e:
        if whole_floats and _FLOAT_FOR_INT in str(e):
            return convert(_whole(data), into, prefix, whole)
        raise explain(e, prefix, whole, data, into) from None


_FLOAT_FOR_INT = "Expected `int`, got `float`"


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
