"""The two load loops, over any `send(seq) -> Outcome` coroutine; both end by themselves.

Closed loop: `concurrency` workers, each sending its next request when the last one
answered, until `requests` were sent or `duration_s` passed (requests in flight then
finish). Latency runs from the send to the answer.

Open loop: request i is due at start + i / rate, whatever happened to the others; at most
`max_inflight` are in flight (the rest wait their turn on this side). Latency runs from
the *scheduled* send time, so a slow service is charged for every request it delayed
(no coordinated omission); the time from the actual send is kept beside it as `service`,
the figure a client that waits for a free connection would report.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from loadtest.http.stats import Outcome, Recorder

Send = Callable[[int], Awaitable[Outcome]]
Tick = Callable[[Recorder, float], None]
TICK_S = 0.5


@dataclass(frozen=True)
class Sample:
    seq: int
    scheduled: float    # seconds since the phase began (closed loop: the actual send)
    sent: float
    done: float


@dataclass
class Phase:
    recorder: Recorder
    elapsed_s: float
    samples: list[Sample] = field(default_factory=list)


async def _guarded(send: Send, seq: int) -> Outcome:
    try:
        return await send(seq)
    except Exception as e:  # a broken request is a result to count, not a crash
        return Outcome(False, "transport", type(e).__name__, f"{type(e).__name__}: {e}")


@contextlib.asynccontextmanager
async def _ticker(rec: Recorder, start: float, tick: Tick | None) -> AsyncIterator[None]:
    async def loop(tick: Tick) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            tick(rec, time.monotonic() - start)

    task = asyncio.create_task(loop(tick)) if tick is not None else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _bounds(requests: int | None, duration_s: float | None) -> None:
    if (requests is None) == (duration_s is None):
        raise ValueError("give exactly one of requests and duration_s")
    if (requests is not None and requests < 1) or (duration_s is not None and duration_s <= 0):
        raise ValueError("requests and duration_s must be positive")


async def closed_loop(send: Send, concurrency: int, *, requests: int | None = None,
                      duration_s: float | None = None, tick: Tick | None = None,
                      keep_samples: bool = False) -> Phase:
    _bounds(requests, duration_s)
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    rec = Recorder()
    samples: list[Sample] = []
    start = time.monotonic()
    deadline = start + duration_s if duration_s is not None else None
    next_seq = 0

    async def worker() -> None:
        nonlocal next_seq
        while True:
            if requests is not None and next_seq >= requests:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            seq = next_seq
            next_seq += 1
            sent = time.monotonic()
            outcome = await _guarded(send, seq)
            done = time.monotonic()
            rec.add(outcome, done - sent, done - sent, done - start)
            if keep_samples:
                samples.append(Sample(seq, sent - start, sent - start, done - start))

    async with _ticker(rec, start, tick):
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Phase(rec, time.monotonic() - start, samples)


async def open_loop(send: Send, rate: float, *, requests: int | None = None,
                    duration_s: float | None = None, max_inflight: int = 256,
                    tick: Tick | None = None, keep_samples: bool = False) -> Phase:
    _bounds(requests, duration_s)
    if rate <= 0 or max_inflight < 1:
        raise ValueError("rate and max_inflight must be positive")
    total = requests if requests is not None else max(1, round(rate * (duration_s or 0.0)))
    rec = Recorder()
    samples: list[Sample] = []
    slots = asyncio.Semaphore(max_inflight)
    start = time.monotonic()

    async def one(seq: int, scheduled: float) -> None:
        async with slots:
            sent = time.monotonic()
            outcome = await _guarded(send, seq)
            done = time.monotonic()
        rec.add(outcome, done - scheduled, done - sent, done - start)
        if keep_samples:
            samples.append(Sample(seq, scheduled - start, sent - start, done - start))

    tasks: list[asyncio.Task[None]] = []
    async with _ticker(rec, start, tick):
        for seq in range(total):
            scheduled = start + seq / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(seq, scheduled)))
        await asyncio.gather(*tasks)
    samples.sort(key=lambda s: s.seq)
    return Phase(rec, time.monotonic() - start, samples)
