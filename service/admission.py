"""How many runs at once, and whose next: at most `running` execute, up to `queued` more
wait, the rest get 429. Waiting runs queue per tenant, and a freed slot goes to the tenants
in turn (round robin), each tenant's own runs in the order they came: one tenant's burst
delays another's run by at most one run per waiting tenant, not by the whole burst."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from sandbox import Turns
from service.auth import Principal
from service.errors import ApiError

RETRY_AFTER_S = 1


def over_capacity(message: str) -> ApiError:
    return ApiError(429, "over_capacity", message,
                    headers={"Retry-After": str(RETRY_AFTER_S)})


class Admission:
    def __init__(self, running: int, queued: int) -> None:
        self.limit_running = running
        self.limit_queued = queued
        self.running = 0
        self.waiting = 0
        self.closed = False
        self._turns: Turns[asyncio.Future[None]] = Turns()

    @contextlib.asynccontextmanager
    async def slot(self, who: Principal) -> AsyncIterator[None]:
        if self.closed:
            raise ApiError(503, "unavailable", "sandboxd is shutting down; retry on another "
                           "instance or after it restarts", headers={"Retry-After": "5"})
        if who.max_concurrent_runs is not None and who.active >= who.max_concurrent_runs:
            raise over_capacity(f"this token may have {who.max_concurrent_runs} run(s) at "
                                "once; wait for one to finish")
        busy = self.running >= self.limit_running or self.waiting > 0
        if busy and self.waiting >= self.limit_queued:
            raise over_capacity(f"{self.running} runs are executing and {self.waiting} "
                                "waiting, the configured maximum; retry shortly")
        who.active += 1
        try:
            if busy:
                await self._wait(who.tenant.id)
            else:
                self.running += 1
            try:
                yield
            finally:
                self._release()
        finally:
            who.active -= 1

    async def _wait(self, tenant: str) -> None:
        """Until a freed slot is handed to this run (`running` already counts it then)."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._turns.push(tenant, turn)
        self.waiting += 1
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release()  # handed a slot as the caller gave up: pass it on
            else:
                self.waiting -= 1
                self._turns.remove(tenant, turn)
            raise

    def _release(self) -> None:
        self.running -= 1
        turn = self._turns.pop()
        if turn is None:
            return
        self.waiting -= 1
        self.running += 1
        turn.set_result(None)
