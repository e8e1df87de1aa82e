"""The idle trim (service/idletrim.py): glibc's malloc_trim once the service has served
requests and none is in flight, never while one is, at most once per gap."""

from __future__ import annotations

import asyncio

import pytest

from service.idletrim import IdleTrim, malloc_trim

TICK_S = 0.01


def test_glibc_trim_is_found_and_runs() -> None:
    trim = malloc_trim()
    assert trim is not None, "Debian's glibc has malloc_trim"
    assert trim() in (0, 1)  # 1: memory was given back


def counted(idle: IdleTrim) -> list[int]:
    """Counts the trims of `idle`, each still the real one."""
    done: list[int] = []
    real = idle.trim
    assert real is not None

    def trim() -> object:
        done.append(1)
        return real()
    idle.trim = trim
    return done


async def watch(idle: IdleTrim, ticks: int) -> None:
    await idle.start(None)  # type: ignore[arg-type]
    await asyncio.sleep(TICK_S * ticks)
    await idle.close(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("served", "busy", "trims"), [
    (True, False, 1),    # served, then idle: once, not again until more is served
    (True, True, 0),     # a request in flight: never
    (False, False, 0),   # nothing served since the last: nothing to give back
])
def test_trims_once_when_idle_after_serving(served: bool, busy: bool, trims: int) -> None:
    idle = IdleTrim(lambda: busy, tick_s=TICK_S, gap_s=0)
    done = counted(idle)
    idle.served = served
    asyncio.run(watch(idle, 10))
    assert len(done) == trims


def test_trims_at_most_once_per_gap() -> None:
    idle = IdleTrim(lambda: False, tick_s=TICK_S, gap_s=3600)
    done = counted(idle)

    async def serve_while_watching() -> None:
        await idle.start(None)  # type: ignore[arg-type]
        for _ in range(10):
            idle.served = True
            await asyncio.sleep(TICK_S)
        await idle.close(None)  # type: ignore[arg-type]
    asyncio.run(serve_while_watching())
    assert len(done) == 1
