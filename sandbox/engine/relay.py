"""A pipe of a pipeline that the host relays (`capture_bytes`): what one process writes is
read by this process's event loop, its first bytes kept, and written on to the other
process's stdin pipe.

The relay holds at most one chunk: it reads again only once what it read is written, so a
reader that does not read holds its writer back as a direct pipe would (a flood costs the
service one chunk, never its memory). Closing the read side makes the writer's next write
fail with SIGPIPE; closing the write side gives the reader EOF: the same ends a direct
pipe has when one side's processes are gone.
"""

from __future__ import annotations

import asyncio
import os

_CHUNK = 1 << 16


class Relay:
    """Copies the pipe `src` (a read end) into `dst` (a write end), both the relay's to
    close, keeping the first `keep` bytes that pass."""

    def __init__(self, src: int, dst: int, keep: int) -> None:
        self.src, self.dst, self.keep = src, dst, keep
        self.captured = bytearray()
        self.truncated = False        # more passed than `keep`
        self._pending = memoryview(b"")
        self._open = True
        self._loop = asyncio.get_running_loop()
        os.set_blocking(src, False)
        os.set_blocking(dst, False)
        self._loop.add_reader(src, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self.src, _CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close()  # every writer is gone: the reader gets EOF
            return
        room = max(0, self.keep - len(self.captured))
        self.captured += chunk[:room]
        if len(chunk) > room:
            self.truncated = True
        self._pending = memoryview(chunk)
        self._write()
        if self._open and self._pending:
            self._loop.remove_reader(self.src)
            self._loop.add_writer(self.dst, self._flush)

    def _flush(self) -> None:
        self._write()
        if self._open and not self._pending:
            self._loop.remove_writer(self.dst)
            self._loop.add_reader(self.src, self._read)

    def _write(self) -> None:
        while self._pending:
            try:
                self._pending = self._pending[os.write(self.dst, self._pending):]
            except BlockingIOError:
                return
            except OSError:
                # The reader is gone (EPIPE): the writer learns it at its next write.
                self.close()
                return

    def close(self) -> None:
        """Stop relaying: the writer's next write gets SIGPIPE, the reader EOF."""
        if self._open:
            self._open = False
            self._loop.remove_reader(self.src)
            self._loop.remove_writer(self.dst)
            os.close(self.src)
            os.close(self.dst)
