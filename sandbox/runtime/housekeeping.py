"""The runtime's cgroup housekeeping, off the event loop and off every run's path.

After a run, its cgroup is removed when it cannot be recycled (Container._release recycles
the others on the event loop), and the container's spares are topped up. Handed to an
executor, that cost the event loop a task, an executor future and a wake-up through the
loop's self-pipe per run: ~0.2 ms of the loop's CPU under load, more than the work itself.
One thread fed by a queue takes the work with a lock-free put and tells nobody when it is
done; only a container being destroyed waits for its own work. Kills stay with the
executor: one waits for a v1 freezer and must not queue behind, or hold up, the
housekeeping of other containers.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable

from sandbox.errors import SandboxError


class Pending:
    """The housekeeping of one container not done yet."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    @property
    def busy(self) -> bool:
        return self._count > 0

    def add(self) -> None:
        with self._idle:
            self._count += 1

    def done(self) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    def wait(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._count == 0)


class Housekeeper:
    """One worker thread, one queue."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], None], Pending] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._serve, name="sandboxd-housekeeping",
                                        daemon=True)
        self._thread.start()

    def submit(self, pending: Pending, work: Callable[[], None]) -> None:
        pending.add()
        self._queue.put((work, pending))

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            work, pending = item
            try:
                with contextlib.suppress(SandboxError, OSError):
                    work()
            finally:
                pending.done()

    def close(self) -> None:
        """Finish what was queued, then end the thread (blocks)."""
        self._queue.put(None)
        self._thread.join()
