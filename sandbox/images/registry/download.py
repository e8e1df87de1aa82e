"""Streaming a blob to a file: sha256 and size checked as bytes arrive (never more read than
the descriptor's size), resumed with Range after a break, and nothing left behind on
failure."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import BinaryIO

import aiohttp

from sandbox.errors import DigestMismatch, RegistryError
from sandbox.images.registry.transport import failure_text

# offset -> an open response to GET the blob (with `Range: bytes=offset-` when offset > 0),
# status 200 or 206; anything else the opener raises as an error.
Opener = Callable[[int], AbstractAsyncContextManager[aiohttp.ClientResponse]]

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _Broken(Exception):
    """The body ended or broke before all its bytes came."""


def range_matches(header: str | None, offset: int, size: int) -> bool:
    """Is `Content-Range` exactly the rest of the blob from `offset`?"""
    m = _CONTENT_RANGE.fullmatch((header or "").strip())
    if m is None:
        return False
    start, end, total = int(m[1]), int(m[2]), m[3]
    if start != offset or end < start:
        return False
    return end == size - 1 and total in ("*", str(size))


async def download(open_at: Opener, digest: str, size: int, dest: Path, *,
                   attempts: int, pause: Callable[[int], Awaitable[None]], where: str,
                   on_progress: Callable[[int], None] | None = None) -> None:
    """Write the blob to `dest` (created or truncated), verified, flushed and fsynced. On any
    failure `dest` is removed. A break mid-body is resumed from where it stopped, at most
    `attempts - 1` times, calling `pause(n)` before the n-th resume."""
    try:
        with dest.open("wb") as f:
            got = await _fill(f, open_at, digest, size, attempts, pause, where, on_progress)
            if got != digest:
                raise DigestMismatch(f"blob {digest} from {where} hashes to {got}; the "
                                     "registry (or something between us) served corrupt or "
                                     "wrong content, and it was discarded")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()
        raise


async def _fill(f: BinaryIO, open_at: Opener, digest: str, size: int, attempts: int,
                pause: Callable[[int], Awaitable[None]], where: str,
                on_progress: Callable[[int], None] | None) -> str:
    """Stream into `f`; the digest of what it now holds."""
    hasher = hashlib.sha256()
    written = 0
    breaks = 0
    while True:
        try:
            async with open_at(written) as resp:
                if written and not (resp.status == 206 and range_matches(
                        resp.headers.get("Content-Range"), written, size)):
                    # Not exactly the rest: start over, with this body if it is the whole blob.
                    f.seek(0)
                    f.truncate()
                    hasher, written = hashlib.sha256(), 0
                    if resp.status != 200:
                        raise _Broken(f"the resumed request got {resp.status} with "
                                      f"Content-Range {resp.headers.get('Content-Range')!r}")
                length = resp.content_length
                if length is not None and length != size - written:
                    raise DigestMismatch(
                        f"blob {digest} from {where}: the registry says {length + written} "
                        f"bytes, the manifest says {size}; refusing it")
                async for chunk in resp.content.iter_any():
                    if written + len(chunk) > size:
                        raise DigestMismatch(f"blob {digest} from {where} is longer than the "
                                             f"{size} bytes its descriptor gives; refusing it")
                    f.write(chunk)
                    hasher.update(chunk)
                    written += len(chunk)
                    if on_progress is not None:
                        on_progress(written)
            if written < size:
                raise _Broken(f"the body ended after {written} of {size} bytes")
            return "sha256:" + hasher.hexdigest()
        except (_Broken, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                TimeoutError) as e:
            breaks += 1
            if breaks >= attempts:
                last = str(e) if isinstance(e, _Broken) else failure_text(e)
                raise RegistryError(f"download of blob {digest} from {where} broke off "
                                    f"{breaks} times (last: {last}); the connection or the "
                                    "registry is unreliable; try again later") from None
            await pause(breaks)
