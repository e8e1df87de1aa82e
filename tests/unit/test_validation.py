"""sandbox.validation's convert: a whole float is an integer (JSON Schema's view) wherever
an int is declared, alone or in a union, and a fraction still is not."""

from __future__ import annotations

import msgspec
import pytest

from sandbox.validation import Invalid, convert


class Body(msgspec.Struct, forbid_unknown_fields=True):
    count: int = 0
    limit: int | None = None


def test_a_whole_float_is_an_integer_alone_and_in_a_union() -> None:
    assert convert({"count": 2.0}, Body, whole_floats=True) == Body(2)
    assert convert({"limit": 3.0}, Body, whole_floats=True) == Body(limit=3)


def test_a_fraction_is_not() -> None:
    with pytest.raises(Invalid) as e:
        convert({"limit": 2.5}, Body, whole_floats=True)
    assert e.value.field == "limit" and "got a number" in e.value.message


def test_without_whole_floats_a_float_is_refused() -> None:
    with pytest.raises(Invalid, match="limit"):
        convert({"limit": 3.0}, Body)
