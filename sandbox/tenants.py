"""Tenants: whose names, sessions, warm containers and quotas a request sees and makes.

Every API token is a tenant; a service without tokens has one, LOCAL. Content (blobs and
unpacked layers, addressed by their digests) is stored once and shared; what names it, what
runs it and what it costs is the tenant's own. A tenant uses stored content only after it
has shown it holds that content itself (fetched from a registry and verified, or uploaded),
so knowing another tenant's digests gives nothing. The operator may share names with every
tenant (`[images] public`, sandbox/images/public.py). Cached files (engine/filecache.py) go
the same way: one blob per content, reached only through the entry a tenant made by storing
that content itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sandbox.errors import PolicyError

T = TypeVar("T")


@dataclass(frozen=True)
class Tenant:
    id: str
    max_sessions: int | None = None        # sessions kept at once; None: no cap
    max_image_bytes: int | None = None     # blobs + unpacked layers its names use
    max_file_bytes: int | None = None      # what its cached files hold (engine/filecache.py)
    max_files: int | None = None           # how many cached files it keeps

    def __post_init__(self) -> None:
        if not self.id:
            raise PolicyError("a tenant needs a non-empty id")

    def __str__(self) -> str:
        return self.id


LOCAL = Tenant("local")


class Turns(Generic[T]):
    """What tenants wait with, served in turn: each tenant's items in the order they came,
    the tenants round robin (one served goes to the back while it has more waiting), so
    one tenant's burst delays another's item by at most one item per waiting tenant. The
    admission of runs, the CPU slots and the job runner each keep one."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[T]] = {}
        self._order: deque[str] = deque()   # tenants with items waiting, the next first
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def waiting(self, tenant: str) -> int:
        return len(self._queues.get(tenant, ()))

    def push(self, tenant: str, item: T) -> None:
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = deque()
            self._order.append(tenant)
        queue.append(item)
        self._count += 1

    def pop(self, eligible: Callable[[str], bool] | None = None) -> T | None:
        """The first item of the first tenant in turn (that is `eligible`), or None."""
        tenant = next((t for t in self._order if eligible is None or eligible(t)), None)
        if tenant is None:
            return None
        if tenant == self._order[0]:
            self._order.popleft()
        else:
            self._order.remove(tenant)
        queue = self._queues[tenant]
        item = queue.popleft()
        if queue:
            self._order.append(tenant)
        else:
            del self._queues[tenant]
        self._count -= 1
        return item

    def remove(self, tenant: str, item: T) -> bool:
        """Take `item` out of `tenant`'s queue (given up while waiting); False if absent."""
        queue = self._queues.get(tenant)
        if queue is None or item not in queue:
            return False
        queue.remove(item)
        if not queue:
            del self._queues[tenant]
            self._order.remove(tenant)
        self._count -= 1
        return True
