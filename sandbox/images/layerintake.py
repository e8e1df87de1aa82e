"""A layer that arrives as an uncompressed tar stream (a committed container's changes) taken
into the store: a gzip blob and the unpacked layer, made at once from the same chunks.

The event loop only hands chunks over (`Feed`); two worker threads consume them side by
side: one hashes the tar (the diff_id) and compresses it into the blob store, the other
unpacks it with the store's own rules (store/unpack.py: hostile paths and links refused).
On a 2-core host that is about 30 % faster than compressing first and unpacking the blob
after (and no second decompression). A failure of either stops both; temporary files go.

Compression is one gzip member, deflate level GZIP_LEVEL, except that stretches which do
not compress (random or already compressed data: a 16 KiB sample of each 256 KiB saves
less than 10 %) are written as stored blocks. Measured on this 2-core host, 10 MiB:

    text (Python sources)   level 1:  98 ms, 28.3 % of the size   level 6: 310 ms, 22.8 %
    random                  level 1: 223 ms, 100 %                level 6: 232 ms, 100 %
    random, stored blocks:   ~23 ms (sample 12 ms + copy 11 ms)

The goal is a commit of 10 MB in 1,000 files in 300 ms end to end, so level 1: level 6
alone would take the whole budget for 5 % less size, and level 1 without stored blocks
most of it on data that does not compress.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import DigestMismatch
from sandbox.images.store.blobs import BlobStore
from sandbox.images.store.layers import LayerStore
from sandbox.images.store.unpack import UnpackReport

GZIP_LEVEL = 1
_BLOCK = 256 << 10        # compressed or stored as a whole
_SAMPLE = 16 << 10        # of each block, compressed to judge it
_STORED_RATIO = 0.9       # a sample that keeps more than this is stored
_HAND_OVER = 256 << 10    # bytes gathered from the stream before the readers get them
_AHEAD = 8                # hand-overs queued for each reader before the stream is read on
# gzip member header: deflate, no name, mtime 0, OS unknown (what Go's gzip writes).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


@dataclass(frozen=True)
class TakenLayer:
    blob: str                 # the gzip blob's digest, in the blob store
    size: int                 # its bytes
    diff_id: str              # the tar's digest; the layer is unpacked under it
    report: UnpackReport


class _Stopped(Exception):
    """Ends a reader whose partner failed (never seen by callers)."""


class Feed:
    """Chunks handed from the event loop to one reader in a worker thread, at most
    `ahead` of them waiting; `read` is the reader's file-like end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ahead: int = _AHEAD) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[bytes | BaseException | None] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(ahead)
        self._rest = b""
        self._ended = False
        self.closed = False   # the reader is done: what is put is dropped

    async def put(self, chunk: bytes) -> bool:
        """Queue `chunk`; False once the reader has stopped reading."""
        await self._room.acquire()
        if self.closed:
            return False
        self._queue.put(chunk)
        return True

    def end(self, error: BaseException | None = None) -> None:
        """No more chunks: the reader sees the end, or `error` raised."""
        self._queue.put(error)

    def close(self) -> None:
        """The reader's side: it reads no more (a put waiting for room returns False)."""
        self.closed = True
        self._loop.call_soon_threadsafe(self._room.release)

    def read(self, n: int = -1) -> bytes:
        if not self._rest:
            if self._ended:
                return b""
            item = self._queue.get()
            self._loop.call_soon_threadsafe(self._room.release)
            if item is None or isinstance(item, BaseException):
                self._ended = True
                if item is not None:
                    raise item
                return b""
            self._rest = item
        out = self._rest if n < 0 else self._rest[:n]
        self._rest = self._rest[len(out):]
        return out


class GzipStream:
    """The gzip form of a tar read from `src`, as a file-like `read` for the blob store;
    `diff_id` (the tar's digest) once it has been read to the end."""

    def __init__(self, src: Feed, level: int = GZIP_LEVEL) -> None:
        self._src = src
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw: we frame it
        self._deflating = False    # output of _deflate not yet flushed to a byte boundary
        self._tar = hashlib.sha256()
        self._crc = 0
        self._size = 0
        self._state = "header"

    @property
    def diff_id(self) -> str:
        return "sha256:" + self._tar.hexdigest()

    def read(self, n: int = -1) -> bytes:
        """The next piece of the gzip stream, of any length; b"" at the end."""
        if self._state == "header":
            self._state = "body"
            return _GZIP_HEADER
        while self._state == "body":
            data = self._next_block()
            if not data:
                self._state = "done"
                return self._deflate.flush(zlib.Z_FINISH) + struct.pack(
                    "<II", self._crc, self._size & 0xFFFFFFFF)
            self._tar.update(data)
            self._crc = zlib.crc32(data, self._crc)
            self._size += len(data)
            out = self._block(data)
            if out:
                return out
        return b""

    def _next_block(self) -> bytes:
        """Up to _BLOCK bytes of the tar, however small the chunks it came in."""
        parts: list[bytes] = []
        got = 0
        while got < _BLOCK:
            data = self._src.read(_BLOCK - got)
            if not data:
                break
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _block(self, data: bytes) -> bytes:
        if not _incompressible(data):
            self._deflating = True
            return self._deflate.compress(data)
        # The compressor's blocks so far end on a byte boundary, its window forgotten (the
        # stored bytes come between), then the data goes as stored blocks.
        out = [self._deflate.flush(zlib.Z_FULL_FLUSH)] if self._deflating else []
        self._deflating = False
        for i in range(0, len(data), 0xFFFF):
            piece = data[i:i + 0xFFFF]
            out += [b"\x00", struct.pack("<HH", len(piece), len(piece) ^ 0xFFFF), piece]
        return b"".join(out)


def _incompressible(data: bytes) -> bool:
    if len(data) < 4 * _SAMPLE:  # the end of the stream: not worth judging
        return False
    sample = data[:_SAMPLE]
    return len(zlib.compress(sample, 1)) > len(sample) * _STORED_RATIO


async def take_layer(chunks: AsyncIterator[bytes], blobs: BlobStore, layers: LayerStore, *,
                     level: int = GZIP_LEVEL,
                     on_digest: Callable[[str], None] | None = None) -> TakenLayer:
    """Read the tar stream `chunks` to its end into a gzip blob and an unpacked layer.

    Raises what stopped it: the stream's own error, a LayerError from unpacking (the tar is
    malformed or hostile), an OSError of the store. The temporary files are removed then
    (a blob or layer that was complete stays for gc); on success both are in the store,
    named by no image yet. `on_digest` is handed to both stores (the blob's digest, from a
    worker thread; the diff_id): the caller pins them there, before they are published."""
    loop = asyncio.get_running_loop()
    to_blob, to_layer = Feed(loop), Feed(loop)
    gzipped = GzipStream(to_blob, level)

    async def blob() -> tuple[str, int]:
        try:
            return await asyncio.to_thread(blobs.put_stream, gzipped, on_digest=on_digest)
        finally:
            to_blob.close()

    async def layer() -> tuple[str, Path, UnpackReport]:
        try:
            return await layers.add(to_layer, on_digest=on_digest)
        finally:
            to_layer.close()

    pending: list[bytes] = []
    gathered = 0

    async def hand_over(at_least: int) -> bool:
        """Give both readers what has gathered, if `at_least` bytes; False if one failed.
        (Small chunks are gathered first: each hand-over wakes two threads and the loop.)"""
        nonlocal gathered
        if gathered < max(at_least, 1):
            return True
        data = b"".join(pending)
        pending.clear()
        gathered = 0
        return await to_blob.put(data) and await to_layer.put(data)

    tasks = [asyncio.ensure_future(blob()), asyncio.ensure_future(layer())]
    try:
        async for chunk in chunks:
            pending.append(bytes(chunk))
            gathered += len(pending[-1])
            if not await hand_over(_HAND_OVER):
                break  # a reader failed: its error is raised below
        else:
            if await hand_over(0):
                for feed in (to_blob, to_layer):
                    feed.end()
    finally:
        # Whatever ended the loop (a reader's failure, the stream's, a cancel), both
        # readers are told and awaited: no thread outlives the call.
        for feed in (to_blob, to_layer):
            feed.end(_Stopped())
        done = await asyncio.gather(*tasks, return_exceptions=True)
    for result in done:
        if isinstance(result, BaseException) and not isinstance(result, _Stopped):
            raise result
    (digest, size), (diff_id, _, report) = done  # type: ignore[misc]
    if diff_id != gzipped.diff_id:
        raise DigestMismatch(f"the committed layer unpacked as {diff_id} but hashed as "
                             f"{gzipped.diff_id} on its way to the blob store: a bug")
    return TakenLayer(digest, size, diff_id, report)
