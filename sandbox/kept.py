"""What callers ask again and again, answered once (a judge sends the same limits and image
with every case): a dict of at most `size` answers, the oldest forgotten first."""

from __future__ import annotations

from typing import TypeVar

# Distinct asks kept per table: a judge's problems each send one limits table and one image;
# more than this many at once are asked again, not refused.
KEPT = 256

K = TypeVar("K")
V = TypeVar("V")


class Kept(dict[K, V]):
    """Only answers go in, through `keep`: a refused ask raises before it, and so is asked
    (and refused) again every time."""

    def __init__(self, size: int = KEPT) -> None:
        super().__init__()
        self.size = size

    def keep(self, key: K, value: V) -> V:
        """`value` kept as `key`'s answer, and returned."""
        if key not in self and len(self) >= self.size:
            del self[next(iter(self))]
        self[key] = value
        return value
