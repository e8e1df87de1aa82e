"""Backpressure from a slow client to a run, in its two halves: the Pump answers a future
while it holds more than its high-water mark (resolved at the low one), and a run's pipe
reader stops reading while such a future is pending (a real pipe: the writer finds it full),
except for what the pipe still holds once the run is over."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from sandbox.runtime.output import PipeReader, Streamed, drain, read_output
from service.streaming import Pump


def test_the_pump_answers_a_future_above_high_water_until_low_water() -> None:
    async def go() -> None:
        sent: list[str] = []
        permits = asyncio.Semaphore(0)   # one send per permit: the client's pace

        async def send(event: str, payload: dict[str, Any]) -> None:
            await permits.acquire()
            sent.append(payload["data"])

        async def let_one_through() -> None:
            permits.release()
            for _ in range(3):
                await asyncio.sleep(0)

        pump = Pump(send, lambda: None, high_water=100, low_water=40)
        assert pump.put("stdout", {"data": "a" * 60}, 60) is None
        assert pump.put("stdout", {"data": "b" * 30}, 30) is None
        full = pump.put("stdout", {"data": "c" * 30}, 30)
        assert full is not None and not full.done()
        assert pump.put("stdout", {"data": "d" * 10}, 10) is full
        assert pump.put("exit", {"data": ""}) is full   # still over: the same wait
        await let_one_through()
        assert sent == ["a" * 60] and not full.done()   # 70 left: above low water
        await let_one_through()
        assert sent[-1] == "b" * 30 and full.done()     # 40 left: low water
        assert pump.put("stdout", {"data": "e"}, 1) is None
        for _ in range(4):
            permits.release()
        await pump.drain()
        assert "".join(sent) == "a" * 60 + "b" * 30 + "c" * 30 + "d" * 10 + "e"
    asyncio.run(go())


def test_a_broken_pump_never_holds_a_reader() -> None:
    async def go() -> None:
        async def send(event: str, payload: dict[str, Any]) -> None:
            raise ConnectionResetError

        broken: list[bool] = []
        pump = Pump(send, lambda: broken.append(True), high_water=10, low_water=5)
        full = pump.put("stdout", {"data": "x" * 50}, 50)
        assert full is not None
        await asyncio.wait_for(full, 5)
        assert broken == [True] and pump.put("stdout", {"data": "y"}, 1) is None
        await pump.drain()
    asyncio.run(go())


def _fill(fd: int) -> int:
    """Write to a non-blocking pipe until it is full; the bytes written."""
    n = 0
    while True:
        try:
            n += os.write(fd, b"x" * 65536)
        except BlockingIOError:
            return n


def test_the_reader_stops_reading_while_asked_then_resumes() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        gate: asyncio.Future[None] = loop.create_future()
        chunks: list[int] = []

        def on_data(name: str, data: bytes) -> asyncio.Future[None]:
            chunks.append(len(data))
            return gate

        reader = PipeReader("stdout", r, None, on_data, lambda: None, loop.create_future())
        loop.add_reader(r, reader.readable)
        try:
            _fill(w)
            for _ in range(5):
                await asyncio.sleep(0.01)
            assert len(chunks) == 1 and _fill(w) > 0   # one read, then it waits
            for _ in range(5):
                await asyncio.sleep(0.01)
            assert len(chunks) == 1 and _fill(w) == 0  # nobody reads: the pipe stays full
            gate.set_result(None)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if len(chunks) > 1:
                    break
            assert len(chunks) > 1 and len(reader.buf) == sum(chunks)
        finally:
            reader.finish()
            os.close(w)
    asyncio.run(go())


def test_once_the_writers_are_gone_the_pipe_is_read_to_its_end() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        never: asyncio.Future[None] = loop.create_future()
        reader = PipeReader("stdout", r, None, lambda name, data: never, lambda: None,
                         loop.create_future())
        loop.add_reader(r, reader.readable)
        written = _fill(w)
        await asyncio.sleep(0.01)
        written += _fill(w)
        os.close(w)
        assert len(reader.buf) < written   # held back by the consumer
        reader.writers_gone()
        await asyncio.wait_for(reader.done, 5)
        assert len(reader.buf) == written and not never.done()
    asyncio.run(go())


@pytest.mark.parametrize("streamed", [False, True])
def test_the_output_cap_stays_exact_under_backpressure(streamed: bool) -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        gate: asyncio.Future[None] = loop.create_future()
        loop.call_later(0.05, gate.set_result, None)
        over: list[bool] = []
        given: list[bytes] = []

        def on_data(name: str, data: bytes) -> asyncio.Future[None]:
            given.append(data)
            return gate
        reader = PipeReader("stdout", r, 100_000, Streamed(on_data) if streamed else on_data,
                         lambda: over.append(True), loop.create_future())
        loop.add_reader(r, reader.readable)
        while not reader.done.done():   # a writer that never stops
            _fill(w)
            await asyncio.sleep(0.005)
        os.close(w)
        assert reader.size == sum(map(len, given)) == 100_000
        assert reader.truncated and over == [True]
        # A streamed run's output went to its consumer only.
        assert len(reader.buf) == (0 if streamed else 100_000)
    asyncio.run(go())


def test_an_unwatched_pipe_is_read_at_once_when_its_writers_are_gone() -> None:
    """A pipe nobody streams is read at the run's end in one go, with no turn of the loop,
    whatever its consumer says; one whose writer is still there is watched from then on."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        never: asyncio.Future[None] = loop.create_future()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        reader = PipeReader("stdout", r, None, lambda name, data: never, lambda: None,
                            loop.create_future())
        written = _fill(w)
        os.close(w)
        reader.writers_gone()
        assert reader.done.done() and len(reader.buf) == written and not never.done()

        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        reader = PipeReader("stdout", r, None, None, lambda: None, loop.create_future())
        os.write(w, b"before ")
        reader.writers_gone()   # a writer left behind holds the pipe: watched now
        assert not reader.done.done() and reader.buf == b"before "
        os.write(w, b"after")
        os.close(w)
        await asyncio.wait_for(reader.done, 5)
        assert reader.buf == b"before after"
    asyncio.run(go())


def test_draining_pipes_already_at_their_end_takes_no_turn_of_the_loop() -> None:
    """The usual end of a run: its writers gone, both pipes are read to EOF at once and
    drain returns without suspending (each turn of the loop delays the result); a pipe
    still held by a writer is waited for."""
    async def go() -> None:
        readers: list[PipeReader] = []
        for name in ("stdout", "stderr"):
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            os.write(w, name.encode())
            os.close(w)
            read_output(readers, name, r, None, None, lambda: None, watch=False)
        steps = drain(readers, [])
        with pytest.raises(StopIteration):
            steps.send(None)   # finished in its first step: nothing awaited
        assert [bytes(r.buf) for r in readers] == [b"stdout", b"stderr"]

        held: list[PipeReader] = []
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        read_output(held, "stdout", r, None, None, lambda: None, watch=False)
        waiting = asyncio.ensure_future(drain(held, []))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        os.write(w, b"late")
        os.close(w)
        await asyncio.wait_for(waiting, 5)
        assert held[0].buf == b"late"
    asyncio.run(go())
