"""This terminal as the terminal of a run (`sbx run -it`, `sbx exec -it`), as `docker run
-it` has it: raw mode while the run lasts, so every key (Ctrl-C as byte 0x03 among them)
goes to the program, which decides what it means; its output written here as it comes; this
terminal's size given to the run, and again on every SIGWINCH. The terminal's settings are
restored on every way out: the run's end, a network error, an exception, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import termios
import tty
from collections.abc import Iterator
from typing import Any

from sbx.client import Interactive, Output, RunResult

_READ_BYTES = 1 << 12
# Signals that would otherwise end sbx with the terminal left raw: they end the session
# (the run goes with its WebSocket) and sbx exits as a process killed by them would.
_ENDING = (signal.SIGTERM, signal.SIGHUP)


class Ended(Exception):
    """sbx was told to stop (SIGTERM, SIGHUP) while attached; the terminal is restored."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def size(fds: tuple[int, ...] = (1, 0, 2)) -> tuple[int, int]:
    """(rows, cols) of the first of `fds` that is a terminal; 24 x 80 if none is."""
    for fd in fds:
        with contextlib.suppress(OSError):
            cols, rows = os.get_terminal_size(fd)
            if rows > 0 and cols > 0:
                return min(rows, 1000), min(cols, 1000)
    return 24, 80


@contextlib.contextmanager
def raw(fd: int) -> Iterator[None]:
    """`fd`'s terminal in raw mode (no echo, no line editing, no signals from keys, no
    output processing: the run's terminal does all that) until the block ends, however it
    ends."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        # TCSADRAIN: what was written to the terminal is shown before the settings change.
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def attach(session: contextlib.AbstractAsyncContextManager[Interactive], *,
                 stdin: int = 0, stdout: int = 1) -> RunResult:
    """Run `session` (Client.interactive with tty) on this terminal until its exit event;
    the run's result. Ended when SIGTERM or SIGHUP stopped it."""
    loop = asyncio.get_running_loop()
    outgoing: asyncio.Queue[bytes | tuple[int, int]] = asyncio.Queue()
    stopped: list[int] = []
    main = asyncio.current_task()
    assert main is not None

    def keys() -> None:
        try:
            data = os.read(stdin, _READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            outgoing.put_nowait(data)
        else:  # the terminal is gone (hung up): nothing more to type
            loop.remove_reader(stdin)

    def stop(signum: int) -> None:
        stopped.append(signum)
        main.cancel()

    with raw(stdin):
        async with session as run:
            async def send() -> None:
                # One sender keeps keystrokes and sizes in the order they happened.
                with contextlib.suppress(ConnectionError):
                    while True:
                        item = await outgoing.get()
                        if isinstance(item, bytes):
                            await run.send_bytes(item)
                        else:
                            await run.resize(*item)

            sender = asyncio.create_task(send())
            loop.add_reader(stdin, keys)
            loop.add_signal_handler(signal.SIGWINCH, lambda: outgoing.put_nowait(size()))
            for signum in _ENDING:
                loop.add_signal_handler(signum, stop, signum)
            try:
                async for event in run:  # to the exit event, or ApiError
                    if isinstance(event, Output):
                        data: Any = event.data
                        _write_all(stdout, data if isinstance(data, bytes) else data.encode())
            except asyncio.CancelledError:
                if stopped:
                    raise Ended(stopped[0]) from None
                raise
            finally:
                loop.remove_reader(stdin)
                for signum in (signal.SIGWINCH, *_ENDING):
                    loop.remove_signal_handler(signum)
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sender
    assert run.result is not None
    return run.result
