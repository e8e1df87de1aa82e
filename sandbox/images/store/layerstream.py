"""The uncompressed tar stream of a layer blob: compression detection and decoding.

What `unpack.py` reads from is a forward-only stream that decompresses (gzip, multi-member
included, or zstd) and hashes the tar for the diff_id in a prefetch thread of its own, so that
decoding overlaps with the unpacker's writes. `tarfile` reads the headers from it through
`LayerStream`, which refuses a hostile header size before reading it and never seeks back;
the unpacker copies file data from the decoded chunks directly (`LayerStream.copy_to`). Kept
apart from the unpacker, whose concern is the filesystem, not the bytes.
"""

from __future__ import annotations

import hashlib
import os
import queue
import tarfile
import threading
import zlib
from collections.abc import Callable
from typing import BinaryIO

import zstandard

from sandbox.errors import LayerError

CHUNK = 1 << 20
# Bytes of headers (PAX records, long names, sparse maps) allowed between two members:
# tarfile reads a header body into memory whole, so a hostile size must be refused first.
HEADER_ALLOWANCE = 1 << 20
# Bytes allowed after the end-of-archive blocks (still hashed: they are part of the diff_id).
_TRAILING_CAP = 16 << 20


def detect_compression(head: bytes) -> str:
    """The compression of a layer blob from its first bytes (at least 6 for a sure answer)."""
    if head[:3] == b"\x1f\x8b\x08":
        return "gzip"
    # A zstd frame, or a skippable frame (0x184D2A50-5F) such as zstd:chunked metadata.
    if head[:4] == b"\x28\xb5\x2f\xfd" or (head[1:4] == b"\x2a\x4d\x18"
                                            and head[0] & 0xF0 == 0x50):
        return "zstd"
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0":
        raise LayerError("the layer is bzip2-compressed, which sandboxd does not support; "
                         "push the image with gzip or zstd layers")
    if head[:6] == b"\xfd7zXZ\x00":
        raise LayerError("the layer is xz-compressed, which sandboxd does not support; "
                         "push the image with gzip or zstd layers")
    return "none"


def read_head(f: BinaryIO) -> bytes:
    head = b""
    while len(head) < 6:
        more = f.read(6 - len(head))
        if not more:
            break
        head += more
    return head


class Prefixed:
    """A reader that gives back the bytes already read for compression detection first."""

    def __init__(self, head: bytes, f: BinaryIO) -> None:
        self._head = head
        self._f = f

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data, self._head = self._head, b""
            return data
        return self._f.read(n if n > 0 else CHUNK)


class _Gunzip:
    """Multi-member gzip (pigz and eStargz write several), zero padding allowed after it."""

    def __init__(self, src: Prefixed) -> None:
        self._src = src
        self._d = zlib.decompressobj(31)
        self._pending = b""

    def read(self, n: int) -> bytes:
        while True:
            if self._d.eof and not self._next_member():
                return b""
            data = self._d.unconsumed_tail
            if not data:
                data, self._pending = self._pending or self._src.read(CHUNK), b""
                if not data:
                    raise LayerError("the gzip stream ends in the middle: the layer blob is "
                                     "truncated; delete it from the store and pull again")
            out = self._d.decompress(data, n)
            if out:
                return out

    def _next_member(self) -> bool:
        rest = self._d.unused_data
        while True:
            rest = rest.lstrip(b"\0")
            if len(rest) >= 3:
                break
            more = self._src.read(CHUNK)
            if not more:
                if rest:
                    break
                return False
            rest += more
        if rest[:3] != b"\x1f\x8b\x08":
            raise LayerError("the layer has bytes after its gzip stream that are not gzip: "
                             "the blob is corrupt; rebuild or re-push the image")
        self._d = zlib.decompressobj(31)
        self._pending = rest
        return True


def decoder(compression: str, src: Prefixed) -> Callable[[int], bytes]:
    if compression == "gzip":
        return _Gunzip(src).read
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(
            src, read_size=CHUNK, read_across_frames=True).read
    return src.read


class Prefetch:
    """Decompresses and hashes in a thread of its own, ahead of the unpacker: zlib, zstd,
    sha256 and file reads release the GIL, so this overlaps with the unpacker's writes."""

    def __init__(self, decode: Callable[[int], bytes]) -> None:
        self.digest = hashlib.sha256()
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=4)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(decode,), name="layer-decode",
                                        daemon=True)
        self._thread.start()

    def _run(self, decode: Callable[[int], bytes]) -> None:
        try:
            while True:
                data = decode(CHUNK)
                self.digest.update(data)
                if not self._put(data) or not data:
                    return
        except Exception as e:
            self._put(e)

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def read(self) -> bytes:
        """The next decoded chunk; b"" at the end."""
        if self._done:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = not item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class LayerStream:
    """The uncompressed tar as a forward-only file for tarfile (which parses the headers)
    and for the unpacker (which copies file data straight from the decoder's chunks).

    A read may not go past `limit`:
    tarfile reads a header body (PAX records, a long name) into memory whole, so a hostile
    size must be refused before it is read.
    """

    def __init__(self, source: Prefetch) -> None:
        self._source = source
        self._buf = b""  # the last decoded chunk; its unread part starts at _off
        self._off = 0
        self._pos = 0  # bytes handed out
        self.limit = HEADER_ALLOWANCE
        self.over_limit = "a tar header is larger than 1 MiB: the layer is malformed or hostile"
        self.last_block = (-1, b"")  # the last 512-byte read (a header) and its offset

    def _fill(self) -> bool:
        try:
            data = self._source.read()
        except (zlib.error, zstandard.ZstdError) as e:
            raise LayerError(f"the layer does not decompress ({e}): the blob is corrupt; "
                             "delete it from the store and pull again") from e
        if not data:
            return False
        self._buf, self._off = data, 0
        return True

    def tell(self) -> int:
        return self._pos

    def read(self, n: int) -> bytes:
        if self._pos + n > self.limit:
            raise LayerError(self.over_limit)
        end = self._off + n
        if end <= len(self._buf):
            out = self._buf[self._off:end]
            self._off = end
        else:
            parts = [self._buf[self._off:]]
            got = len(parts[0])
            self._off = len(self._buf)
            while got < n and self._fill():
                take = min(n - got, len(self._buf))
                parts.append(self._buf[:take])
                self._off = take
                got += take
            out = b"".join(parts)
        if n == tarfile.BLOCKSIZE:
            self.last_block = (self._pos, out)
        self._pos += len(out)
        return out

    def seek(self, pos: int) -> None:
        """Forward only: tarfile skips padding and the data of entries it is not asked for."""
        if pos < self._pos:
            raise LayerError(f"the tar headers lead back from byte {self._pos} to {pos}: the "
                             "layer is malformed or hostile")
        while pos > self._pos:
            avail = len(self._buf) - self._off
            if not avail and not self._fill():
                return  # tarfile's next read finds the end and reports it
            step = min(avail or len(self._buf), pos - self._pos)
            self._off += step
            self._pos += step

    def copy_to(self, fd: int, size: int) -> None:
        """Write the next `size` bytes to `fd`, whole decoded chunks without a copy."""
        while size:
            avail = len(self._buf) - self._off
            if not avail:
                if not self._fill():
                    raise LayerError("the layer ends in the middle of a file: the blob is "
                                     "truncated; delete it from the store and pull again")
                continue
            take = min(avail, size)
            if take == len(self._buf):
                write_all(fd, self._buf)
            else:
                write_all(fd, memoryview(self._buf)[self._off:self._off + take])
            self._off += take
            self._pos += take
            size -= take

    def drain(self) -> None:
        """Decode (and hash) what follows the end of the archive, up to a cap."""
        extra = len(self._buf) - self._off
        while self._fill():
            extra += len(self._buf)
            if extra > _TRAILING_CAP:
                raise LayerError(f"the layer has more than {_TRAILING_CAP >> 20} MiB of data "
                                 "after the end of its tar archive: it is malformed or hostile")
        self._off = len(self._buf)


def write_all(fd: int, data: bytes) -> None:
    n = os.write(fd, data)
    if n < len(data):
        view = memoryview(data)
        while n < len(data):
            n += os.write(fd, view[n:])


def diff_id_of(path: str | os.PathLike[str], limit: int) -> str:
    """The diff_id of a layer blob (sha256 of its decompressed bytes), without unpacking it:
    how a blob is checked against a layer already in the store. Stops with a LayerError
    past `limit` decompressed bytes."""
    h = hashlib.sha256()
    total = 0
    with open(path, "rb", buffering=0) as f:
        head = read_head(f)
        decode = decoder(detect_compression(head), Prefixed(head, f))
        try:
            while data := decode(CHUNK):
                total += len(data)
                if total > limit:
                    raise LayerError(f"the layer decompresses to more than {limit} bytes, "
                                     "the unpack limit")
                h.update(data)
        except (zlib.error, zstandard.ZstdError) as e:
            raise LayerError(f"the layer does not decompress ({e}): the blob is corrupt") from e
    return "sha256:" + h.hexdigest()
