"""The runtime's housekeeping thread: work runs in order, off the caller's thread; a failure
of one piece of work stops neither the thread nor the count a container waits on."""

from __future__ import annotations

import threading

from sandbox.errors import SandboxError
from sandbox.runtime.housekeeping import Housekeeper, Pending


def test_work_runs_in_order_and_a_waiter_sees_it_all_done() -> None:
    keeper, pending = Housekeeper(), Pending()
    gate, seen = threading.Event(), []
    keeper.submit(pending, gate.wait)
    for i in range(3):
        keeper.submit(pending, lambda i=i: seen.append((i, threading.current_thread().name)))
    assert pending.busy and seen == []     # held behind the first piece
    gate.set()
    pending.wait()
    assert not pending.busy
    assert seen == [(i, "sandboxd-housekeeping") for i in range(3)]
    keeper.close()


def test_a_failing_piece_of_work_is_counted_done_and_the_thread_goes_on() -> None:
    keeper, pending = Housekeeper(), Pending()
    after: list[int] = []

    def fails() -> None:
        raise SandboxError("a cgroup that could not be removed")

    keeper.submit(pending, fails)
    keeper.submit(pending, lambda: after.append(1))
    pending.wait()
    assert after == [1]
    keeper.close()


def test_close_finishes_what_was_queued() -> None:
    keeper, pending = Housekeeper(), Pending()
    done: list[int] = []
    for i in range(5):
        keeper.submit(pending, lambda i=i: done.append(i))
    keeper.close()
    assert done == [0, 1, 2, 3, 4] and not pending.busy
