"""A run's terminal as the host holds it: its size (TtySize) and the pty's master
(Terminal), which init opens in the container's own devpts instance and hands over before
the run starts. The master never enters the container: the run's processes hold only the
slave, as their 0-2 and controlling terminal.

The host reads the master as the run's stdout (output.py: stderr is merged into it, as on
any terminal), writes the run's input to it, and sets its size (the kernel then sends
SIGWINCH to the run's foreground process group)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import termios
from dataclasses import dataclass

from sandbox.errors import PolicyError

TTY_MAX = 1000   # rows and columns (init checks the same bound)
# Input held for the run before its writes wait (as a pipe's transport holds: asyncio's mark).
_HIGH_WATER = 64 << 10
_EOF = b"\x04"   # a new pty's VEOF (^D)


@dataclass(frozen=True)
class TtySize:
    """A terminal's size in characters."""

    rows: int = 24
    cols: int = 80

    def __post_init__(self) -> None:
        for name, value in (("rows", self.rows), ("cols", self.cols)):
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 1 <= value <= TTY_MAX:
                raise PolicyError(f"tty_size.{name}: {value!r} is not a whole number from 1 "
                                  f"to {TTY_MAX}")

    def winsize(self) -> bytes:
        """As TIOCSWINSZ takes it (struct winsize: rows, cols, and pixels left 0)."""
        return struct.pack("HHHH", self.rows, self.cols, 0, 0)


class Terminal:
    """The input side of a run's pty, from the event loop: writes (held while the run does
    not read, `full` telling the writer to wait), the size, and the end of input. It holds a
    descriptor of its own for the master (the run's output reader holds the other), closed
    by `close` when the run ends."""

    def __init__(self, master: int) -> None:
        self.fd = os.dup(master)  # O_CLOEXEC by default
        self._pending = bytearray()
        self._writing = False
        self._full: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def full(self) -> asyncio.Future[None] | None:
        """While set, the run is not taking its input: wait for it before writing more."""
        return self._full

    def write(self, data: bytes) -> None:
        if self._closed or not data:
            return
        if not self._pending:
            try:
                data = data[os.write(self.fd, data):]
            except BlockingIOError:
                pass
            except OSError:   # EIO: the run's processes have all closed the terminal
                self._drop()
                return
            if not data:
                return
        self._pending += data
        if not self._writing:
            self._writing = True
            asyncio.get_running_loop().add_writer(self.fd, self._flush)
        if len(self._pending) > _HIGH_WATER and self._full is None:
            self._full = asyncio.get_running_loop().create_future()

    def _flush(self) -> None:
        try:
            del self._pending[:os.write(self.fd, self._pending)]
        except BlockingIOError:
            return
        except OSError:
            self._drop()
            return
        if not self._pending:
            self._stop_writing()
        if len(self._pending) <= _HIGH_WATER // 4:
            self._release()

    def end_input(self) -> None:
        """The terminal's end-of-file character (^D), after what is pending: the end of the
        input for a program reading lines (canonical mode); a program in raw mode reads it
        as a byte, as from a keyboard."""
        with contextlib.suppress(OSError):
            eof = termios.tcgetattr(self.fd)[6][termios.VEOF]
            self.write(eof if isinstance(eof, bytes) else _EOF)
            return
        self.write(_EOF)

    def resize(self, size: TtySize) -> None:
        """Set the terminal's size; the kernel sends SIGWINCH to the run's foreground
        process group when it changed."""
        if not self._closed:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, termios.TIOCSWINSZ, size.winsize())

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            asyncio.get_running_loop().remove_writer(self.fd)

    def _release(self) -> None:
        if self._full is not None:
            if not self._full.done():
                self._full.set_result(None)
            self._full = None

    def _drop(self) -> None:
        self._pending.clear()
        self._stop_writing()
        self._release()

    def close(self) -> None:
        if not self._closed:
            self._drop()
            self._closed = True
            os.close(self.fd)
