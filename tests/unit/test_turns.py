"""Turns: what tenants wait with, served in turn (admission, CPU slots and jobs share it)."""

from __future__ import annotations

from sandbox.tenants import Turns


def test_each_tenants_items_in_order_and_the_tenants_round_robin() -> None:
    turns: Turns[str] = Turns()
    for item in ("a1", "a2", "a3"):
        turns.push("a", item)
    turns.push("b", "b1")
    turns.push("c", "c1")
    turns.push("b", "b2")
    assert len(turns) == 6 and turns.waiting("a") == 3 and turns.waiting("z") == 0
    # A's burst came first, yet B and C each wait one of A's items, not all three.
    assert [turns.pop() for _ in range(7)] == ["a1", "b1", "c1", "a2", "b2", "a3", None]
    assert len(turns) == 0


def test_an_item_given_up_leaves_its_place_and_its_tenant_when_it_was_the_last() -> None:
    turns: Turns[str] = Turns()
    turns.push("a", "a1")
    turns.push("b", "b1")
    turns.push("a", "a2")
    assert turns.remove("a", "a1") and not turns.remove("a", "a1")
    assert turns.remove("b", "b1") and not turns.remove("b", "nothing")
    assert len(turns) == 1 and turns.waiting("b") == 0
    assert [turns.pop(), turns.pop()] == ["a2", None]


def test_pop_skips_tenants_that_may_not_be_served_now_and_keeps_their_turn() -> None:
    turns: Turns[str] = Turns()
    turns.push("a", "a1")
    turns.push("b", "b1")
    turns.push("a", "a2")
    assert turns.pop(lambda t: t != "a") == "b1"
    assert turns.pop(lambda t: t != "a") is None
    assert [turns.pop(), turns.pop()] == ["a1", "a2"]
