"""Kept: at most `size` answers, the oldest forgotten first."""

from __future__ import annotations

from sandbox.kept import Kept


def test_the_oldest_answer_goes_first_and_a_known_key_evicts_nothing() -> None:
    kept: Kept[str, int] = Kept(2)
    assert kept.keep("a", 1) == 1
    kept.keep("b", 2)
    kept.keep("a", 3)            # a key already kept: its answer replaced, nothing forgotten
    assert kept == {"a": 3, "b": 2}
    kept.keep("c", 4)            # full: "a", kept first, goes
    assert kept == {"b": 2, "c": 4}
